"""diffusers' own caches as peers: First-Block Cache, TaylorSeer, MagCache, FasterCache, Pyramid Attention Broadcast.

Each is configured the way its documentation intends, spelled so that it matches the model (module patterns, the
scheduler's timestep units, the CFG layout), and given what a `CacheMixin` pipeline would give it through the step
hook (`step_hook.PeerStepHook`: a cache context, the live timestep, a reset at step 0 of every call). A model with
`CacheMixin` (Wan, FLUX) gets its cache through `enable_cache`; others (PixArt) through the `apply_*` function.

Each `apply_*` here has the signature `Peer._apply` calls: ``(peer, pipe, knob, call, prepared) -> PeerHandle``;
`prepared` is what the peer's `prepare_*` measured on the model and call beforehand, once for every knob value
(MagCache's calibrated ratios, FasterCache's CFG layout); `{}` for the others.
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cachekit.compat import (
    PEER_HOOK_NAMES,
    attention_classes,
    block_registry_has,
    hook_registry,
    transformer_block_identifiers,
)
from cachekit.pipelines.call import PipelineCall

from .handle import PeerCannotAct, PeerHandle, describe_config
from .step_hook import PeerStepHook, attach_step_hook

if TYPE_CHECKING:
    from .registry import Peer

__all__ = [
    "apply_fbcache",
    "apply_taylorseer",
    "apply_magcache",
    "apply_fastercache",
    "apply_pab",
    "prepare_magcache",
    "prepare_fastercache",
    "prepare_pab",
    "check_block_registry",
    "check_attention",
]


def _count_hooks(module: nn.Module, names: tuple[str, ...]) -> int:
    return sum(1 for m in module.modules() for n in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})
               if n in names)


def _remove_hooks(transformer: nn.Module, names: tuple[str, ...]) -> None:
    """Take diffusers hooks called `names` off `transformer` and everything under it."""
    registry = hook_registry(transformer)
    for name in names:
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()


def _attach(handle: PeerHandle, config: Any, apply_fn: Callable[[nn.Module, Any], None], family: str,
            step_hook: PeerStepHook) -> PeerHandle:
    """Apply a diffusers cache config (through `enable_cache` where the model has `CacheMixin`) plus the step hook."""
    from diffusers.models.cache_utils import CacheMixin

    transformer = handle.pipe.transformer
    hook_names = PEER_HOOK_NAMES[family]
    if isinstance(transformer, CacheMixin):
        transformer.enable_cache(config)
        handle.on_remove(transformer.disable_cache)
        through = f"{type(transformer).__name__}.enable_cache"
    else:
        apply_fn(transformer, config)
        handle.on_remove(lambda: _remove_hooks(transformer, hook_names))
        through = f"diffusers.hooks.{apply_fn.__name__}"
    if _count_hooks(transformer, hook_names) == 0:
        handle.remove()
        raise PeerCannotAct(f"no module of {type(transformer).__name__} matched {handle.peer.name}'s patterns")
    handle.on_remove(attach_step_hook(transformer, step_hook))
    handle.step_hook = step_hook
    handle.config = {"class": type(config).__name__, "applied_through": through, **describe_config(config),
                     **handle.config}
    return handle


# ------------------------------------------------------------------------------------------------ what they need
def _block_lists(transformer: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    names = transformer_block_identifiers()
    return [(name, child) for name, child in transformer.named_children()
            if name in names and isinstance(child, nn.ModuleList) and len(child)]


def check_block_registry(pipe: Any) -> str | None:
    """Why diffusers' block-level caches (FBCache, MagCache) cannot hook this transformer, or None."""
    lists = _block_lists(pipe.transformer)
    if not lists:
        return f"{type(pipe.transformer).__name__} has no block list diffusers' block caches recognise"
    blocks = [block for _, child in lists for block in child]
    if len(blocks) < 2:
        return "a block cache needs at least two transformer blocks"
    for block in blocks:
        if not block_registry_has(type(block)):
            return f"diffusers' TransformerBlockRegistry has no entry for {type(block).__name__}"
    return None


def _attention_modules(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    classes = attention_classes()
    return [(name, m) for name, m in transformer.named_modules() if isinstance(m, classes)]


def check_attention(pipe: Any) -> str | None:
    """Why diffusers' attention-level caches (TaylorSeer, FasterCache, PAB) cannot hook this transformer, or None."""
    if not _attention_modules(pipe.transformer):
        return f"{type(pipe.transformer).__name__} has no diffusers Attention modules"
    return None


def _scaled_range(pipe: Any, low: float, high: float) -> tuple[float, float]:
    """A timestep range given in the papers' 0..1000 units, in this scheduler's units (0..num_train_timesteps)."""
    num_train = float(getattr(pipe.scheduler.config, "num_train_timesteps", 1000) or 1000)
    return (low * num_train / 1000.0, high * num_train / 1000.0)


def _step_hook(pipe: Any, provide_context: bool) -> PeerStepHook:
    return PeerStepHook(pipe.transformer, pipe.scheduler, provide_context)


# ---------------------------------------------------------------------------------------------------- the caches
def apply_fbcache(peer: "Peer", pipe: Any, knob: float, call: PipelineCall,
                  prepared: Mapping[str, Any]) -> PeerHandle:
    """FBCache as documented (`FirstBlockCacheConfig(threshold)`); its state lives in a named cache context, which the
    step hook opens around each call because PixArt's pipeline never does ("No cache context is set" otherwise)."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    config = FirstBlockCacheConfig(threshold=float(knob))
    return _attach(PeerHandle(peer, pipe, knob, {}), config, apply_first_block_cache, "fbcache",
                   _step_hook(pipe, True))


def _taylorseer_identifiers(transformer: nn.Module) -> list[str]:
    """Regexes for every attention module inside the blocks. diffusers' default patterns (``^transformer_blocks.*attn``
    under `re.fullmatch`) must end in ``attn`` and so match none of PixArt's ``attn1``/``attn2``: a TaylorSeer that
    "ran" there hooked nothing. These say what the defaults intend, spelled so that they match this model."""
    patterns = set()
    for name, _ in _attention_modules(transformer):
        parts = name.split(".")
        if len(parts) >= 3 and any(part.isdigit() for part in parts):  # inside a block list, not a top-level module
            patterns.add(r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in parts))
    return sorted(patterns)


def apply_taylorseer(peer: "Peer", pipe: Any, knob: int, call: PipelineCall,
                     prepared: Mapping[str, Any]) -> PeerHandle:
    """TaylorSeer as its docs show it (order 1, full steps every `cache_interval`, caching from step 3), on every
    attention module, in the model's dtype (the bfloat16 default loses precision on CPU float32 models). Short runs
    compute their first 2 steps instead of 3, which is what a first-order forecast needs."""
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    steps = call.num_inference_steps
    warmup = min(3, max(2, steps // 5))  # diffusers' default 3; two steps give the first-order difference
    if steps <= warmup + 1:
        raise PeerCannotAct(f"TaylorSeer needs more than {warmup + 1} steps to forecast anything ({steps} given)")
    identifiers = _taylorseer_identifiers(pipe.transformer)
    if not identifiers:
        raise PeerCannotAct(f"{type(pipe.transformer).__name__} has no attention modules inside blocks")
    config = TaylorSeerCacheConfig(cache_interval=int(knob), disable_cache_before_step=warmup, max_order=1,
                                   taylor_factors_dtype=pipe.transformer.dtype, cache_identifiers=identifiers)
    return _attach(PeerHandle(peer, pipe, knob, {}), config, apply_taylorseer_cache, "taylorseer",
                   _step_hook(pipe, True))


def prepare_magcache(pipe: Any, call: PipelineCall) -> dict[str, Any]:
    """MagCache's own calibration mode (`MagCacheConfig(calibrate=True)`) run on this model, steps and call.

    diffusers prints the ratios for the user to paste into `mag_ratios`; they are read from that printout. The
    ratios depend on the model, the scheduler, the step count and the call, not on the threshold: one calibration
    serves every threshold of a sweep. Returns ``{"mag_ratios": [...]}``.
    """
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    transformer = pipe.transformer
    apply_mag_cache(transformer, MagCacheConfig(calibrate=True, num_inference_steps=call.num_inference_steps))
    detach = attach_step_hook(transformer, _step_hook(pipe, False))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            call.replace(output_type="latent")(pipe)
    finally:
        detach()
        _remove_hooks(transformer, PEER_HOOK_NAMES["magcache"])
    lines = [line for line in printed.getvalue().splitlines() if line.startswith("[") and line.endswith("]")]
    if not lines:
        raise PeerCannotAct("MagCache calibration produced no ratios (its tail block never completed a run)")
    ratios = [float(r) for r in ast.literal_eval(lines[-1])]
    if len(ratios) != call.num_inference_steps or not all(math.isfinite(r) for r in ratios):
        raise PeerCannotAct(f"MagCache calibration gave {len(ratios)} ratios for {call.num_inference_steps} steps")
    return {"mag_ratios": ratios}


def apply_magcache(peer: "Peer", pipe: Any, knob: float, call: PipelineCall,
                   prepared: Mapping[str, Any]) -> PeerHandle:
    """MagCache with ratios calibrated on this model, scheduler, step count and call (`prepare_magcache`; its docs:
    ratios are checkpoint-dependent, FLUX's must not be reused), and its defaults K=3, retention 20% of the steps."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    ratios = list(prepared["mag_ratios"])
    if len(ratios) != call.num_inference_steps:
        raise ValueError(f"{len(ratios)} MagCache ratios for a {call.num_inference_steps}-step call")
    config = MagCacheConfig(threshold=float(knob), max_skip_steps=3, retention_ratio=0.2,
                            num_inference_steps=call.num_inference_steps, mag_ratios=ratios)
    handle = PeerHandle(peer, pipe, knob, {"calibrated_on": "the same call, MagCacheConfig(calibrate=True)"})
    handle.details["mag_ratios"] = [round(r, 5) for r in ratios]
    return _attach(handle, config, apply_mag_cache, "magcache", _step_hook(pipe, True))


def _probe_transformer(pipe: Any, call: PipelineCall) -> tuple[int, int, int]:
    """(transformer calls per step, batch rows per call, output tensor rank) of `call`, measured on a two-step run
    (PixArt's pipeline cannot run a single DPM-Solver step)."""
    rows: list[int] = []
    ranks: list[int] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        rows.append(int(tensors[0].shape[0]) if tensors else 0)

    def grab_out(module: nn.Module, args: tuple, output: Any) -> None:
        sample = output if isinstance(output, torch.Tensor) else output[0]
        ranks.append(sample.ndim)

    handles = [pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True),
               pipe.transformer.register_forward_hook(grab_out)]
    try:
        call.replace(num_inference_steps=2, output_type="latent")(pipe)
    finally:
        for handle in handles:
            handle.remove()
    return len(rows) // 2, (rows[0] if rows else 0), (ranks[0] if ranks else 0)


# FasterCache splits the transformer's output into spatial frequencies, so it must know the layout of that output.
_FASTERCACHE_VIDEO_FORMATS = {"CogVideoX": "BFCHW", "Latte": "BFCHW"}  # other 5-D outputs are B, C, F, H, W


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """FasterCache warns "purely experimental" on every apply; the bench applies it around every call."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


def prepare_fastercache(pipe: Any, call: PipelineCall) -> dict[str, Any]:
    """The tensor format and CFG layout FasterCache must be told, measured on a two-step run of the call:
    ``{"tensor_format": "BCHW" | ..., "batched_cfg": bool}``; `PeerCannotAct` where FasterCache cannot work."""
    cls = type(pipe.transformer).__name__
    calls_per_step, rows, rank = _probe_transformer(pipe, call)
    if calls_per_step != 1:
        raise PeerCannotAct(f"the pipeline calls the transformer {calls_per_step}x per step (one call per CFG "
                            "branch); diffusers' FasterCache needs uncond and cond batched in one call")
    if rank == 4:
        fmt = "BCHW"
    elif rank == 5:
        fmt = next((f for prefix, f in _FASTERCACHE_VIDEO_FORMATS.items() if cls.startswith(prefix)), "BCFHW")
    else:
        raise PeerCannotAct(f"FasterCache's frequency split needs spatial latents; {cls} returns a rank-{rank} "
                            "tensor (packed tokens)")
    images = len(call.prompts) * int(call.kwargs.get("num_images_per_prompt", 1) or 1)
    if rows not in (images, 2 * images):
        raise PeerCannotAct(f"cannot tell CFG rows apart: {rows} transformer rows for {images} images")
    return {"tensor_format": fmt, "batched_cfg": rows == 2 * images}


def apply_fastercache(peer: "Peer", pipe: Any, knob: int, call: PipelineCall,
                      prepared: Mapping[str, Any]) -> PeerHandle:
    """FasterCache with the paper's settings (attention every 2nd step below t=681, CFG-cache below t=641, frequency
    weights 1.1), its timestep ranges in this scheduler's units, the live timestep from the step hook (without it,
    nothing is ever in range), and the tensor format and CFG layout from `prepare_fastercache`."""
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache

    batched_cfg = bool(prepared["batched_cfg"])
    step_hook = _step_hook(pipe, False)
    config = FasterCacheConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=_scaled_range(pipe, -1, 681),
        low_frequency_weight_update_timestep_range=_scaled_range(pipe, 99, 901),
        high_frequency_weight_update_timestep_range=_scaled_range(pipe, -1, 301),
        unconditional_batch_skip_range=int(knob),
        unconditional_batch_timestep_skip_range=_scaled_range(pipe, -1, 641),
        attention_weight_callback=lambda _: 0.5,
        tensor_format=prepared["tensor_format"],
        is_guidance_distilled=not batched_cfg,
        current_timestep_callback=step_hook.current_timestep,
    )
    handle = PeerHandle(peer, pipe, knob, {"batched_cfg": batched_cfg})
    with _quiet_diffusers():
        return _attach(handle, config, apply_faster_cache, "fastercache", step_hook)


def prepare_pab(pipe: Any, call: PipelineCall) -> dict[str, Any]:
    """How many times per step the pipeline calls the transformer (measured on a two-step run of the call): PAB
    counts calls, so its rows must say what its knob means where a pipeline calls once per CFG branch."""
    calls_per_step, _, _ = _probe_transformer(pipe, call)
    return {"calls_per_step": calls_per_step}


def apply_pab(peer: "Peer", pipe: Any, knob: int, call: PipelineCall,
              prepared: Mapping[str, Any]) -> PeerHandle:
    """PAB with the paper's middle-steps window (100 < t < 800, in this scheduler's units), self-attention broadcast
    every `knob` calls and cross-attention every `3 * knob`, following the live timestep from the step hook.

    diffusers' PAB keeps one cache and one call counter per attention module, whatever `cache_context` the pipeline
    opens. Where the pipeline calls the transformer once per CFG branch (Wan), its calls alternate between the
    branches, so a branch may be served the other branch's attention: the row says so (`caveat`)."""
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    step_hook = _step_hook(pipe, False)
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=int(knob),
        cross_attention_block_skip_range=3 * int(knob),  # the paper's pyramid: self-attention 2, cross 6
        spatial_attention_timestep_skip_range=_scaled_range(pipe, 100, 800),
        cross_attention_timestep_skip_range=_scaled_range(pipe, 100, 800),
        current_timestep_callback=step_hook.current_timestep,
    )
    handle = PeerHandle(peer, pipe, knob, {})
    calls = int(prepared.get("calls_per_step", 1))
    if calls > 1:
        handle.details["caveat"] = (
            f"diffusers' PAB keeps one cache and call counter per attention module, not per cache_context: the "
            f"pipeline calls the transformer {calls}x per step (once per CFG branch), so its knob counts branch "
            "calls and a branch may be served the other branch's attention")
    return _attach(handle, config, apply_pyramid_attention_broadcast, "pab", step_hook)
