"""cache-dit's DBCache as a peer (optionally with its TaylorSeer calibrator), applied to the transformer alone.

cache-dit is applied transformer-only through a `BlockAdapter`: its pipeline mode patches the pipeline class's
`__call__`, which would leak into every other pipeline of the class.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import nn

from cachekit.pipelines.call import PipelineCall

from .handle import PeerCannotAct, PeerHandle, describe_config
from .step_hook import PeerStepHook, attach_step_hook

__all__ = ["apply_dbcache", "apply_dbcache_taylorseer", "dbcache_blocks"]


def _adapter(transformer: nn.Module) -> tuple[Any, str]:
    """A transformer-only `BlockAdapter`: cache-dit's registered one for the class, else one built from cachekit's
    model registry (block lists and what each block returns)."""
    from cache_dit import BlockAdapter, BlockAdapterRegister, ForwardPattern

    adapter = _registered(BlockAdapterRegister.get_adapter, transformer)
    if adapter is not None:
        return adapter, "cache-dit's registered adapter, transformer-only"
    from cachekit.registry import UnsupportedModelError, spec_for

    try:
        spec = spec_for(transformer)
    except UnsupportedModelError:
        raise PeerCannotAct(f"neither cache-dit nor cachekit's registry knows where {type(transformer).__name__}'s "
                            "blocks are") from None
    patterns = {("hidden_states",): ForwardPattern.Pattern_3,
                ("encoder_hidden_states", "hidden_states"): ForwardPattern.Pattern_1,
                ("hidden_states", "encoder_hidden_states"): ForwardPattern.Pattern_0}
    groups = [g for g in spec.groups if isinstance(getattr(transformer, g.attr, None), nn.ModuleList)]
    if any(g.residual_outputs not in patterns for g in groups):
        raise PeerCannotAct(f"no cache-dit forward pattern fits {type(transformer).__name__}'s blocks")
    adapter = BlockAdapter(
        pipe=None, transformer=transformer, blocks=[getattr(transformer, g.attr) for g in groups],
        blocks_name=[g.attr for g in groups], forward_pattern=[patterns[g.residual_outputs] for g in groups],
        check_forward_pattern=False)  # the registry entry already says what the blocks return
    return adapter, "explicit BlockAdapter from cachekit's registry"


def _registered(lookup: Any, pipe_or_module: Any) -> Any:
    """A lookup in cache-dit's adapter registry; its strict class check (an assert: e.g. the legacy
    `Transformer2DModel` inside a PixArt pipeline) means cache-dit cannot act here, not that the bench failed."""
    try:
        return lookup(pipe_or_module)
    except AssertionError as e:
        raise PeerCannotAct(f"cache-dit's registered adapter refuses it: {e}") from None


def dbcache_blocks(depth: int) -> tuple[int, int]:
    """Fn/Bn for a block list `depth` deep: ~10% computed in front, ~5% behind, at least one block left to skip."""
    fn = max(1, round(0.1 * depth))
    bn = round(0.05 * depth)
    while fn + bn >= depth and bn > 0:
        bn -= 1
    if fn >= depth:
        raise PeerCannotAct(f"DBCache needs more than {fn} blocks to skip any ({depth} given)")
    return fn, bn


def _apply(peer: Any, pipe: Any, knob: float, call: PipelineCall, taylorseer: bool) -> PeerHandle:
    """cache-dit's DBCache (optionally with its TaylorSeer calibrator, order 1) on the transformer alone.

    Settings follow cache-dit's own example runner (`max_continuous_cached_steps=3`; warmup 8 of its 28-50 steps,
    here 20% of the steps), with Fn/Bn scaled to the depth, CFG separation as cache-dit's registry knows the pipeline,
    and `num_inference_steps` so its persistent transformer-only context renews itself after every run. The step
    hook also renews it at step 0 of each run, so a run that stopped early leaves nothing behind.
    """
    import cache_dit
    from cache_dit import BlockAdapterRegister, DBCacheConfig, TaylorSeerCalibratorConfig

    transformer = pipe.transformer
    adapter, how = _adapter(transformer)
    blocks = adapter.blocks if isinstance(adapter.blocks, list) else [adapter.blocks]
    depth = min(len(b) for b in blocks)
    fn, bn = dbcache_blocks(depth)
    steps = call.num_inference_steps
    separate_cfg = _registered(BlockAdapterRegister.has_separate_cfg, pipe)
    config = DBCacheConfig(
        Fn_compute_blocks=fn, Bn_compute_blocks=bn, residual_diff_threshold=float(knob),
        max_warmup_steps=max(1, round(0.2 * steps)), max_continuous_cached_steps=3,
        enable_separate_cfg=separate_cfg, num_inference_steps=steps)
    calibrator = TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
    handle = PeerHandle(peer, pipe, knob, {"adapter": how, "depth": depth})
    cache_dit.enable_cache(adapter, cache_config=config, calibrator_config=calibrator)
    handle.on_remove(lambda: cache_dit.disable_cache(transformer))
    if not getattr(transformer, "_is_cached", False):
        handle.remove()
        raise PeerCannotAct(f"cache-dit did not wrap {type(transformer).__name__}")

    def refresh(module: nn.Module) -> None:
        # a new pipeline call: start cache-dit's context afresh even if the last call stopped early
        cache_dit.refresh_context(transformer, cache_config=copy.deepcopy(config),
                                  calibrator_config=copy.deepcopy(calibrator))

    step_hook = PeerStepHook(transformer, pipe.scheduler, False, refresh)
    handle.on_remove(attach_step_hook(transformer, step_hook))
    handle.step_hook = step_hook
    handle.config = {"class": "DBCacheConfig", **describe_config(config),
                     "calibrator": None if calibrator is None else {"class": type(calibrator).__name__,
                                                                    **describe_config(calibrator)}, **handle.config}
    return handle


def apply_dbcache(peer: Any, pipe: Any, knob: float, call: PipelineCall, prepared: Mapping[str, Any]) -> PeerHandle:
    """DBCache alone (see `_apply`)."""
    return _apply(peer, pipe, knob, call, taylorseer=False)


def apply_dbcache_taylorseer(peer: Any, pipe: Any, knob: float, call: PipelineCall,
                             prepared: Mapping[str, Any]) -> PeerHandle:
    """DBCache with cache-dit's TaylorSeer calibrator forecasting the reused residual (see `_apply`)."""
    return _apply(peer, pipe, knob, call, taylorseer=True)
