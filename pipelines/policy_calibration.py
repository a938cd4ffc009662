"""Fit a runtime policy (TeaCache, MagCache, first-block cache) to a model with one seeded pipeline call.

The fit itself is in `cachekit.policies.calibration`; this is the pipeline side: the recorded run is a
`PipelineCall`, so `cachekit calibrate --policy` and `cachekit bench` calibrate on exactly the images they evaluate.
"""

from __future__ import annotations

from typing import Any

from cachekit.policies.calibration import PolicyCalibration, calibrate_run

from .call import PipelineCall

__all__ = ["calibrate_policy"]


def calibrate_policy(policy: str, pipe: Any, call: PipelineCall) -> PolicyCalibration:
    """One uncached run of `call` (latents only) recorded and fitted for `policy`."""
    latents = call.replace(output_type="latent")
    details = {"prompts": list(call.prompts), "seeds": list(call.seed_list),
               "scheduler": type(pipe.scheduler).__name__}
    return calibrate_run(policy, pipe, lambda: latents(pipe), call.num_inference_steps, details)
