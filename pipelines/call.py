"""The one seeded, reproducible call of a stock diffusers pipeline.

Evaluation, search, calibration, the peer benchmarks and `cachekit generate` all generate through `PipelineCall`, so
an image made by one of them is the image any other makes for the same prompt, seed and settings:

- one CPU `torch.Generator` per prompt, seeded `seeds[i]` (default `i`): the initial noise is the same on every
  device and process, and an image does not depend on which other prompts share its batch;
- the model's own call settings first (the bundled digits model needs 16x16 without resolution binning, see
  `cachekit.zoo.call_defaults`), then the caller's;
- settings the pipeline's `__call__` does not take are refused up front (`check`), instead of being ignored;
- a plan, if given, is enabled around the call and taken off afterwards, whatever happens.

    call = PipelineCall(["a handwritten 3", "the digit 7"], num_inference_steps=20, seeds=(0, 1))
    images = call(pipe)                       # uncached
    images = call(pipe, plan="digits-fast")   # the same prompts and noise under a shipped schedule
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Mapping
from typing import Any

import torch

from cachekit.errors import UsageError

__all__ = ["PipelineCall", "model_call_defaults", "accepted_settings", "makes_video", "pipeline_class_name",
           "RESERVED_SETTINGS"]

RESERVED_SETTINGS = frozenset({"prompt", "generator", "output_type", "num_inference_steps"})
"""Call arguments `PipelineCall` sets itself."""


def model_call_defaults(pipe: Any) -> dict[str, Any]:
    """The call settings the pipeline's model needs (a bundled model's, see `cachekit.zoo`), else none."""
    from cachekit.zoo import call_defaults, bundled_name

    name = bundled_name(pipe)
    return call_defaults(name) if name is not None else {}


def accepted_settings(pipe: Any) -> frozenset[str] | None:
    """The named keyword arguments of the pipeline's `__call__` (None if it has no readable signature).

    A catch-all `**kwargs` does not count: diffusers pipelines keep one only for deprecated arguments, and a setting
    that lands there does nothing.
    """
    return _named_parameters(type(pipe))


def makes_video(pipeline: Any) -> bool:
    """Whether a pipeline (an instance, its class, or the class's name in diffusers) makes videos, not images.

    Read off its `__call__`: diffusers' video pipelines (Wan, CogVideoX, LTX, HunyuanVideo, Mochi, AnimateDiff)
    all take `num_frames` and return `.frames`, its image pipelines take no such setting, so no list of classes is
    kept here.
    """
    if isinstance(pipeline, str):
        import diffusers

        pipeline = getattr(diffusers, pipeline, None)
        if pipeline is None:
            return False
    accepted = _named_parameters(pipeline if isinstance(pipeline, type) else type(pipeline))
    return accepted is not None and "num_frames" in accepted


def pipeline_class_name(model: str) -> str | None:
    """The diffusers pipeline class `model` names (a bundled name, a local folder or a cached id), read from its
    `model_index.json` without loading any weights; None where that file is not here (then only loading tells)."""
    import json
    from pathlib import Path

    from cachekit.zoo import pipeline_path

    index = Path(pipeline_path(model)).expanduser() / "model_index.json"
    if not index.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(model), "model_index.json")
        except (ImportError, ValueError):  # no hub client, or not a repository id
            return None
        if not isinstance(cached, str):
            return None
        index = Path(cached)
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


@functools.lru_cache(maxsize=64)
def _named_parameters(pipeline_class: type) -> frozenset[str] | None:
    try:
        parameters = inspect.signature(pipeline_class.__call__).parameters
    except (TypeError, ValueError):
        return None
    return frozenset(name for name, p in parameters.items()
                     if name != "self" and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL))


@dataclasses.dataclass(frozen=True)
class PipelineCall:
    """One reproducible pipeline call: the same prompts, settings and seeds every time it runs.

    `num_inference_steps` may also come in `kwargs` (so `kwargs=DIGITS_DEFAULTS` works). `model_defaults=False`
    passes exactly `kwargs`, without the bundled model's settings underneath.
    """

    prompts: tuple[str, ...]
    num_inference_steps: int | None = None
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seeds: tuple[int, ...] | None = None
    output_type: str = "pt"
    model_defaults: bool = True

    def __post_init__(self) -> None:
        prompts = (self.prompts,) if isinstance(self.prompts, str) else tuple(str(p) for p in self.prompts)
        kwargs = dict(self.kwargs)
        steps = kwargs.pop("num_inference_steps", None)
        if steps is not None and self.num_inference_steps is not None and steps != self.num_inference_steps:
            raise UsageError(f"num_inference_steps is {self.num_inference_steps}, but kwargs say {steps}")
        steps = self.num_inference_steps if self.num_inference_steps is not None else steps
        if steps is None or isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise UsageError(f"a pipeline call needs num_inference_steps >= 1, got {steps!r}")
        if not prompts:
            raise UsageError("a pipeline call needs at least one prompt")
        reserved = sorted((RESERVED_SETTINGS - {"num_inference_steps"}) & set(kwargs))
        if reserved:
            raise UsageError(f"{reserved} are set by the call itself, not as pipeline settings")
        object.__setattr__(self, "prompts", prompts)
        object.__setattr__(self, "kwargs", kwargs)
        object.__setattr__(self, "num_inference_steps", int(steps))
        if self.seeds is not None:
            seeds = tuple(int(s) for s in self.seeds)
            if len(seeds) != len(prompts):
                raise UsageError(f"{len(seeds)} seeds for {len(prompts)} prompts")
            object.__setattr__(self, "seeds", seeds)

    # ---------------------------------------------------------------- building
    def replace(self, **changes: Any) -> "PipelineCall":
        return dataclasses.replace(self, **changes)

    @property
    def seed_list(self) -> tuple[int, ...]:
        return self.seeds if self.seeds is not None else tuple(range(len(self.prompts)))

    def chunks(self, size: int | None) -> list["PipelineCall"]:
        """The same call split into calls of at most `size` prompts, each prompt keeping its seed."""
        if size is None or size >= len(self.prompts):
            return [self]
        if size < 1:
            raise UsageError(f"batch size must be positive, got {size}")
        seeds = self.seed_list
        return [self.replace(prompts=self.prompts[i : i + size], seeds=seeds[i : i + size])
                for i in range(0, len(self.prompts), size)]

    # ---------------------------------------------------------------- running
    def settings(self, pipe: Any) -> dict[str, Any]:
        """What the pipeline is called with besides prompts, generators, steps and output type."""
        return {**(model_call_defaults(pipe) if self.model_defaults else {}), **self.kwargs}

    def check(self, pipe: Any) -> None:
        """Refuse settings the pipeline's `__call__` does not take (a one-line `UsageError` naming them)."""
        accepted = accepted_settings(pipe)
        if accepted is None:
            return
        unknown = sorted(set(self.kwargs) - accepted)
        if unknown:
            raise UsageError(
                f"{type(pipe).__name__} does not take {', '.join(unknown)}; it takes "
                f"{', '.join(sorted(accepted - RESERVED_SETTINGS - {'callback_on_step_end_tensor_inputs'}))}")

    def generators(self) -> list[torch.Generator]:
        return [torch.Generator("cpu").manual_seed(s) for s in self.seed_list]

    def __call__(self, pipe: Any, plan: Any = None) -> Any:
        """Run the pipeline once and return its images (latents with `output_type="latent"`).

        `plan` (anything `cachekit.enable` takes) is enabled for this call only; None runs whatever is enabled on
        the pipeline already (nothing, or a cache the caller applied).
        """
        import cachekit

        self.check(pipe)
        arguments = dict(prompt=list(self.prompts), num_inference_steps=self.num_inference_steps,
                         generator=self.generators(), output_type=self.output_type, **self.settings(pipe))
        with torch.no_grad():
            try:
                if plan is None:
                    out = pipe(**arguments)
                else:
                    with cachekit.cached(pipe, plan):
                        out = pipe(**arguments)
            except ValueError as err:
                if "Invalid sample size" in str(err):
                    raise UsageError(_binning_hint(pipe)) from None
                raise
        return out.images if hasattr(out, "images") else (out.frames if hasattr(out, "frames") else out[0])


def _binning_hint(pipe: Any) -> str:
    size = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "sample_size", None)
    return (f"{type(pipe).__name__}'s resolution binning only knows 256/512/1024/2048 px models, not this one "
            f"(sample_size {size}); call it with use_resolution_binning=False and its height/width, e.g. "
            "pipe(prompt, **cachekit.zoo.call_defaults('digits')) or --pipeline-arg use_resolution_binning=false")
