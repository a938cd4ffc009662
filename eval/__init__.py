"""Measures: FID/KID/CLIP/PSNR/SSIM/LPIPS, prompt sets, latency and MACs, reports, sharded over processes.

    from cachekit.eval import evaluate, run_bench, MetricConfig, digits_prompts
    report = evaluate(pipe, {"fora2": schedule}, digits_prompts(40), 20, MetricConfig(["fid", "clip", "psnr"]),
                      "out/", default_reference="digits-heldout")

    bench = run_bench(pipe, digits_prompts(40), 20, "fid,clip,psnr", "bench-out",  # every method side by side
                      default_reference="digits-heldout")

    video = evaluate_video(video_pipe, {"fora2": "fora:interval=2"}, video_prompt_set(40), 20,  # clips
                           VideoMetricFactory(MetricConfig([])), "video-out")

Names are imported on first use, so `cachekit --help` does not pay for torchmetrics and open_clip.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "evaluate": "runner",
    "generate": "runner",
    "Variant": "runner",
    "run_bench": "bench",
    "POLICY_SWEEPS": "bench",
    "MetricConfig": "suite",
    "MetricFactory": "suite",
    "MetricSuite": "suite",
    "FID": "fid",
    "KID": "fid",
    "ReferenceStats": "fid",
    "frechet_distance": "fid",
    "build_reference": "reference",
    "CLIPScore": "clip_score",
    "load_clip_model": "clip_models",
    "PSNR": "fidelity",
    "SSIM": "fidelity",
    "LPIPS": "fidelity",
    "ImageRewardScore": "image_reward",
    "InceptionFeatures": "features",
    "ClipImageFeatures": "features",
    "FeatureExtractor": "features",
    "MissingWeightsError": "weights",
    "resolve_inception_weights": "weights",
    "PromptSet": "prompts",
    "load_prompts": "prompts",
    "digits_prompts": "prompts",
    "load_coco_captions": "prompts",
    "load_mjhq": "prompts",
    "load_parti_prompts": "prompts",
    "load_drawbench": "prompts",
    "measure_latency": "latency",
    "measure_interleaved": "latency",
    "count_call_macs": "latency",
    "LatencyStats": "latency",
    "write_report": "report",
    "evaluate_video": "video",
    "VideoMetricFactory": "video",
    "video_prompt_set": "video",
    "FVD": "fvd",
    "load_video_features": "fvd",
    "get_dist": "distributed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
