"""cachekit: learned feature-caching schedules for diffusers diffusion transformers.

    import cachekit
    cachekit.enable(pipe, "schedule.json")   # or a cachekit.Schedule, or a policy
    image = pipe(prompt).images[0]
    cachekit.disable(pipe)
"""

from .registry import BlockGroupSpec, ModelSpec, register_model, supported_models
from .schedule import Schedule, ScheduleError
from .wrapper import branch, cached, disable, enable, reset, rows, sessions

__version__ = "0.1.0"

__all__ = [
    "Schedule",
    "ScheduleError",
    "enable",
    "disable",
    "cached",
    "reset",
    "rows",
    "branch",
    "sessions",
    "register_model",
    "ModelSpec",
    "BlockGroupSpec",
    "supported_models",
]
