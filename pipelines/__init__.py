"""Runs pipelines with plans: the one seeded pipeline-call layer, and the streaming batch runner.

    from cachekit.pipelines import PipelineCall, Runner
    images = PipelineCall(["a handwritten 3"], num_inference_steps=20, seeds=(0,))(pipe, plan="digits-fast")

    with Runner() as runner:                      # the bundled digits model, many requests per forward
        image = runner.submit("a handwritten 3", seed=0, schedule="digits-fast").result()
"""

from .call import RESERVED_SETTINGS, PipelineCall, accepted_settings, model_call_defaults
from .families import PipelineFamily, family_names, register_family
from .policy_calibration import calibrate_policy
from .requests import RequestCancelled, RequestFailed, RequestHandle, ServedRequest
from .runner import DEFAULT_TIERS, QueueFull, Runner, RunnerClosed

__all__ = ["PipelineCall", "model_call_defaults", "accepted_settings", "RESERVED_SETTINGS", "calibrate_policy",
           "Runner", "RequestHandle", "ServedRequest", "RequestCancelled", "RequestFailed", "QueueFull",
           "RunnerClosed", "DEFAULT_TIERS", "PipelineFamily", "register_family", "family_names"]
