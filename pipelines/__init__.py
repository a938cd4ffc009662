"""Runs pipelines with plans: the one seeded pipeline-call layer, and (next) the streaming runner and server.

    from cachekit.pipelines import PipelineCall
    images = PipelineCall(["a handwritten 3"], num_inference_steps=20, seeds=(0,))(pipe, plan="digits-fast")
"""

from .call import RESERVED_SETTINGS, PipelineCall, accepted_settings, model_call_defaults
from .policy_calibration import calibrate_policy

__all__ = ["PipelineCall", "model_call_defaults", "accepted_settings", "RESERVED_SETTINGS", "calibrate_policy"]
