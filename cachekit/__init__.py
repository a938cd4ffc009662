"""cachekit: learned feature-caching schedules for diffusers diffusion transformers.

    import cachekit
    cachekit.enable(pipe, "digits-fast")     # a schedule file, a shipped name, a policy spec, a Schedule or policy
    image = pipe(prompt).images[0]
    cachekit.disable(pipe)
"""

from .errors import CachekitError, UsageError
from .plans import PlanError, plan_names, resolve_plan
from .registry import BlockGroupSpec, ModelSpec, register_model, supported_models
from .schedule import Schedule, ScheduleError
from .wrapper import branch, cached, compile, disable, enable, release, reset, rows, sessions

__version__ = "0.1.0"

__all__ = [
    "Schedule",
    "ScheduleError",
    "PlanError",
    "CachekitError",
    "UsageError",
    "resolve_plan",
    "plan_names",
    "enable",
    "disable",
    "cached",
    "reset",
    "release",
    "rows",
    "branch",
    "sessions",
    "compile",
    "register_model",
    "ModelSpec",
    "BlockGroupSpec",
    "supported_models",
]
