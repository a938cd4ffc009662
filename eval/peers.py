"""Peers: the feature caches users already have, run on the same model, prompts and seeds as cachekit's policies.

`cachekit bench` compares the uncached model, cachekit's schedules and these peers. A comparison is only fair if
every peer is configured the way its documentation intends *and really acts on the model*: several of diffusers'
caches silently do nothing on a stock PixArt pipeline (no `cache_context` is ever opened, the timestep callback is
missing, the default module patterns match no PixArt module). So a peer row counts only if its measured work went
down, and every row carries the measurement: the transformer's MAC ratio against the uncached call (counted with
`cachekit.cost.count_macs`) and the number of linear-layer calls the transformer blocks skipped. A peer that cannot
act on a model class says why in its row instead of failing.

    from cachekit.eval.peers import PEERS, PipelineCall, run_peers
    call = PipelineCall(["a handwritten 3", "the digit 7"], kwargs=DIGITS_DEFAULTS)   # 20 steps
    rows = run_peers(pipe, call)          # every peer x its sweep, each on a fresh transformer copy
    [row.as_dict() for row in rows]       # JSON for the report; row.counts says whether it may be compared

Peers (sweeps run from the mildest to the most aggressive setting, sized for ~20 denoising steps):

- ``diffusers.fbcache``     First-Block Cache, knob ``threshold``
- ``diffusers.taylorseer``  TaylorSeer, knob ``cache_interval``
- ``diffusers.magcache``    MagCache, knob ``threshold`` (magnitude ratios calibrated first on the same call)
- ``diffusers.fastercache`` FasterCache, knob ``unconditional_batch_skip_range``
- ``diffusers.pab``         Pyramid Attention Broadcast, knob ``spatial_attention_block_skip_range``
- ``cache-dit.dbcache``     cache-dit DBCache, knob ``residual_diff_threshold`` (Fn/Bn scaled to the depth)
- ``cache-dit.dbcache-taylorseer`` the same with cache-dit's TaylorSeer calibrator

How each is made to act on pipelines that do not drive diffusers' cache state (PixArt: no `CacheMixin`, the pipeline
never opens `cache_context`): a small named diffusers `ModelHook` (``cachekit.peer_step``) sits on the transformer
instance while a peer is applied. Around every transformer call it reads the live timestep (the callback PAB and
FasterCache need), sets a diffusers `CacheContext` unless the pipeline already set one (FLUX, Wan), and at step 0 of
every pipeline call resets the peer's state, which a `CacheMixin` pipeline does through `maybe_free_model_hooks` and
PixArt's never does. Nothing is patched on a class. cache-dit is applied transformer-only through a `BlockAdapter`
(its pipeline mode patches the pipeline class's `__call__`, which would leak into every other pipeline of the class).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import importlib
import inspect
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from diffusers.hooks import ModelHook
from torch import nn

from cachekit.pipelines.call import PipelineCall

__all__ = [
    "PEERS",
    "Peer",
    "PeerCannotAct",
    "PeerHandle",
    "PeerRow",
    "PeerStepHook",
    "PipelineCall",
    "STEP_HOOK",
    "WorkReport",
    "fresh_pipeline",
    "get_peer",
    "measure_work",
    "remove",
    "run_peer",
    "run_peers",
]

STEP_HOOK = "cachekit.peer_step"
"""Name of the hook that gives diffusers' caches a cache context, the live timestep and a per-call reset."""

_CONTEXT_NAME = "cachekit.peer"


class PeerCannotAct(RuntimeError):
    """The peer cannot act on this model or call; the message is the reason shown in the peer's row."""


# ------------------------------------------------------------------------------------------------ measuring the work
@dataclasses.dataclass
class WorkReport:
    """The work one pipeline call really did, measured, and (given the uncached call's report) what it skipped.

    `block_linear_calls[b]` counts the linear-layer calls inside transformer block `b`; they happen only when the
    block's work really runs, whereas `block_calls[b]` (calls into the block module) also counts calls that a cache
    hook answered from its cache. `component_linear_calls` splits the linear calls by the block's child module
    (``attn1``, ``attn2``, ``ff``, ...), which shows *what* a peer skipped (PAB: attention only).
    """

    transformer_macs: int
    total_macs: int
    transformer_calls: int
    block_calls: list[int]
    block_linear_calls: list[int]
    component_linear_calls: dict[str, int]
    images: Any = None
    baseline_transformer_macs: int | None = None
    baseline_block_linear_calls: int | None = None

    @property
    def mac_ratio(self) -> float | None:
        """Transformer MACs of this call over those of the uncached call (None without a baseline)."""
        if not self.baseline_transformer_macs:
            return None
        return self.transformer_macs / self.baseline_transformer_macs

    @property
    def skipped_linear_calls(self) -> int | None:
        """Linear-layer calls inside the blocks that the uncached call made and this one did not."""
        if self.baseline_block_linear_calls is None:
            return None
        return self.baseline_block_linear_calls - sum(self.block_linear_calls)

    @property
    def skipped_work(self) -> bool:
        """True only if the work measurably went down: fewer transformer MACs or fewer block linear calls."""
        ratio, skipped = self.mac_ratio, self.skipped_linear_calls
        return (ratio is not None and ratio < 1.0) or (skipped is not None and skipped > 0)

    def against(self, baseline: "WorkReport") -> "WorkReport":
        """This report with the uncached call's numbers filled in (ratios become available)."""
        return dataclasses.replace(self, baseline_transformer_macs=baseline.transformer_macs,
                                   baseline_block_linear_calls=sum(baseline.block_linear_calls))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready numbers (the images are left out)."""
        ratio = self.mac_ratio
        return {
            "transformer_macs": self.transformer_macs,
            "total_macs": self.total_macs,
            "baseline_transformer_macs": self.baseline_transformer_macs,
            "mac_ratio": None if ratio is None else round(ratio, 6),
            "transformer_calls": self.transformer_calls,
            "block_calls": sum(self.block_calls),
            "block_linear_calls": sum(self.block_linear_calls),
            "baseline_block_linear_calls": self.baseline_block_linear_calls,
            "skipped_linear_calls": self.skipped_linear_calls,
            "block_linear_calls_per_block": list(self.block_linear_calls),
            "component_linear_calls": dict(self.component_linear_calls),
        }


def _transformer_blocks(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, block) of every transformer block: cachekit's registry entry, else diffusers' block-list names."""
    from cachekit.registry import UnsupportedModelError, resolve_layout

    try:
        return [(ref.path, ref.module) for ref in resolve_layout(transformer, "block").blocks]
    except UnsupportedModelError:
        from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

        return [(f"{name}.{i}", block) for name, child in transformer.named_children()
                if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, nn.ModuleList)
                for i, block in enumerate(child)]


def _macs_so_far(counter: Any) -> int:
    """The running MAC total of an open `count_macs()` counter (the same arithmetic its `macs` uses on exit)."""
    return int(counter._mode.get_total_flops()) // 2


def measure_work(pipe: Any, call: PipelineCall, baseline: WorkReport | None = None) -> WorkReport:
    """Run `call` once on `pipe` and measure the work its transformer did.

    MACs come from one `cachekit.cost.count_macs()` counter around the whole call (`total_macs`); the transformer's
    share (`transformer_macs`) is the counter's running total sampled by forward hooks on the transformer as each
    transformer call starts and ends. The counter's per-module attribution is not used: caches that swap the
    transformer's block list during its forward (cache-dit) make torch's module tracker rename the transformer
    mid-call, after which it charges everything, VAE included, to the transformer. Block and linear-layer calls are
    counted with plain `register_forward_pre_hook` handles. All hooks are removed before returning. Pass the uncached
    call's report as `baseline` to get the MAC ratio and the skipped linear calls.
    """
    from cachekit.cost import count_macs

    transformer = pipe.transformer
    blocks = _transformer_blocks(transformer)
    block_calls = [0] * len(blocks)
    linear_calls = [0] * len(blocks)
    components: dict[str, int] = {}
    total = count_macs()
    started: list[int] = []
    transformer_macs = [0, 0]  # MACs, calls

    def enter(module: nn.Module, args: tuple) -> None:
        transformer_macs[1] += 1
        started.append(_macs_so_far(total))

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        transformer_macs[0] += _macs_so_far(total) - started.pop()

    def bump_block(b: int) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            block_calls[b] += 1
        return hook

    def bump_linear(b: int, component: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            linear_calls[b] += 1
            components[component] += 1
        return hook

    handles = [transformer.register_forward_pre_hook(enter),
               transformer.register_forward_hook(leave, always_call=True)]
    try:
        for b, (_, block) in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(bump_block(b)))
            for name, module in block.named_modules():
                if isinstance(module, nn.Linear):
                    component = name.split(".")[0]
                    components.setdefault(component, 0)
                    handles.append(module.register_forward_pre_hook(bump_linear(b, component)))
        with total:
            images = call(pipe)
    finally:
        for handle in handles:
            handle.remove()
    report = WorkReport(
        transformer_macs=transformer_macs[0],
        total_macs=int(total.macs),
        transformer_calls=transformer_macs[1],
        block_calls=block_calls,
        block_linear_calls=linear_calls,
        component_linear_calls=components,
        images=images,
    )
    return report.against(baseline) if baseline is not None else report


# ------------------------------------------------------------------------------------------------- fresh pipelines
def _assert_unhooked(transformer: nn.Module) -> None:
    for name, module in transformer.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.hooks:
            where = name or type(transformer).__name__
            raise ValueError(f"the transformer carries hooks ({', '.join(registry.hooks)} on {where}): pass the "
                             "uncached pipeline (remove peers, cachekit.disable) before copying it")
    if getattr(transformer, "_is_cached", False) or not _forward_is_own(transformer):
        raise ValueError("the transformer's forward is replaced (cache-dit?): pass the uncached pipeline")


def _forward_is_own(module: nn.Module) -> bool:
    """Whether `module.forward` is its class's forward (removing diffusers hooks leaves it as an instance attribute)."""
    forward = vars(module).get("forward")
    return forward is None or (getattr(forward, "__func__", None) is type(module).forward
                               and getattr(forward, "__self__", None) is module)


def fresh_pipeline(pipe: Any) -> Any:
    """A pipeline sharing every component with `pipe` except a deep copy of its transformer (and scheduler).

    Peers run one at a time, each on its own copy, so no two caches are ever stacked and removing one can never
    leave another's state behind. The VAE and text encoder are shared (peers do not touch them); the small, stateful
    scheduler is copied too so the copies' denoising loops are independent. The copy is built the documented diffusers
    way, `type(pipe)(**pipe.components)`. A model that does not fit in memory twice needs one load per peer instead.
    """
    _assert_unhooked(pipe.transformer)
    components = dict(pipe.components)
    components["transformer"] = copy.deepcopy(pipe.transformer)
    if components.get("scheduler") is not None:
        components["scheduler"] = copy.deepcopy(pipe.scheduler)
    new = type(pipe)(**components)
    if hasattr(pipe, "_progress_bar_config"):
        new.set_progress_bar_config(**pipe._progress_bar_config)
    return new


# --------------------------------------------------------------------------------------------- the step/context hook
def _timestep_spec(transformer: nn.Module) -> tuple[str, float]:
    from cachekit.registry import UnsupportedModelError, spec_for

    try:
        spec = spec_for(transformer)
        return spec.timestep_arg, spec.timestep_scale
    except UnsupportedModelError:
        return "timestep", 1.0


def _state_contexts(module: nn.Module) -> list[Any]:
    """The cache contexts currently set on the stateful diffusers hooks under `module` (None where unset)."""
    from diffusers.hooks.hooks import HookRegistry, StateManager

    registry = HookRegistry.check_if_exists_or_initialize(module)
    found = []
    for child in (registry, *registry._get_child_registries()):
        for hook in child.hooks.values():
            if hook._is_stateful:
                found.extend(attr._context for attr in vars(hook).values() if isinstance(attr, StateManager))
    return found


class PeerStepHook(ModelHook):
    """What a `CacheMixin` pipeline gives diffusers' caches, for pipelines that give them nothing (PixArt).

    Before every transformer call: reads the live timestep (in the scheduler's units, so the PAB / FasterCache
    timestep ranges mean what their docs say), matches it to the scheduler's timesteps, calls `on_new_call` at step
    0 of every denoising run (the reset `maybe_free_model_hooks` does for `CacheMixin` models and PixArt's pipeline
    never does), and, if `provide_context` and the pipeline set no `cache_context` of its own, sets one for the call
    and clears it afterwards. It keeps no cache state itself.
    """

    _is_stateful = False

    def __init__(self, transformer: nn.Module, scheduler: Any, provide_context: bool,
                 on_new_call: Callable[[nn.Module], None]) -> None:
        super().__init__()
        self.timestep_arg, self.scale = _timestep_spec(transformer)
        self.signature = inspect.signature(type(transformer).forward)
        self.scheduler = scheduler
        self.num_train = float(getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000) or 1000)
        self.provide_context = provide_context
        self.on_new_call = on_new_call
        self.timestep: float | None = None
        self.step_index: int | None = None
        self._own_context = False

    def current_timestep(self) -> float:
        """The timestep of the transformer call in progress, in the scheduler's units (0..num_train_timesteps)."""
        return self.num_train if self.timestep is None else self.timestep

    def _read_timestep(self, module: nn.Module, args: tuple, kwargs: dict) -> float | None:
        value = kwargs.get(self.timestep_arg)
        if value is None:
            try:
                value = self.signature.bind_partial(module, *args, **kwargs).arguments.get(self.timestep_arg)
            except TypeError:
                value = None
        if value is None:
            return None
        return float(torch.as_tensor(value).detach().flatten()[0].float().cpu()) * self.scale

    def _match_step(self, t: float) -> int | None:
        timesteps = getattr(self.scheduler, "timesteps", None)
        if timesteps is None or len(timesteps) == 0:
            return None
        distance = (torch.as_tensor(timesteps).detach().float().cpu() - t).abs()
        index = int(distance.argmin())
        return index if float(distance[index]) <= 1e-3 * self.num_train else None

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        self.timestep = self._read_timestep(module, args, kwargs)
        previous = self.step_index
        self.step_index = None if self.timestep is None else self._match_step(self.timestep)
        outside = next((c for c in _state_contexts(module) if c is not None and c.name != _CONTEXT_NAME), None)
        if self.step_index == 0 and previous != 0:  # step 0 of a new denoising run (once, even with CFG branches)
            self.on_new_call(module)
            if outside is not None:  # the reset cleared the context the pipeline had set for this call
                _set_cache_context(module, outside)
        self._own_context = self.provide_context and outside is None
        if self._own_context:
            steps = getattr(self.scheduler, "timesteps", None)
            _set_cache_context(module, CacheContext(
                _CONTEXT_NAME, step_index=self.step_index, timestep=self.timestep,
                num_inference_steps=None if steps is None else len(steps)))
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        from diffusers.hooks.hooks import _set_cache_context

        if self._own_context:
            _set_cache_context(module, None)
            self._own_context = False
        return output


def _reset_diffusers_state(module: nn.Module) -> None:
    from diffusers.hooks import HookRegistry

    HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks(recurse=True)


def _count_hooks(module: nn.Module, names: Iterable[str]) -> int:
    names = set(names)
    return sum(1 for m in module.modules() for n in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})
               if n in names)


# ------------------------------------------------------------------------------------------------------- handles
class PeerHandle:
    """A peer applied to one pipeline's transformer. `remove()` (or leaving the `with` block) takes it off again.

    `config` describes, JSON-ready, the configuration the peer was given; `details` holds what the peer measured on
    its own while being applied (MagCache's calibrated ratios).
    """

    def __init__(self, peer: "Peer", pipe: Any, knob: float | int, config: dict[str, Any]) -> None:
        self.peer = peer
        self.pipe = pipe
        self.knob = knob
        self.config = config
        self.details: dict[str, Any] = {}
        self._undo: list[Callable[[], None]] = []
        self.step_hook: PeerStepHook | None = None

    @property
    def active(self) -> bool:
        return bool(self._undo)

    def remove(self) -> None:
        """Undo everything `apply` did, last first. Idempotent."""
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> "PeerHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def remove(handle: PeerHandle) -> None:
    """Take a peer off the pipeline it was applied to (same as `handle.remove()`)."""
    handle.remove()


def _describe(config: Any) -> dict[str, Any]:
    """A JSON-ready view of a config dataclass: callables and tensors are named, not serialised."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if callable(value):
            value = f"<{getattr(value, '__name__', type(value).__name__)}>"
        elif isinstance(value, torch.Tensor):
            value = [round(float(v), 5) for v in value.flatten().tolist()]
        elif isinstance(value, torch.dtype):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif hasattr(value, "value") and hasattr(value, "name"):  # enums
            value = value.name
        out[field.name] = value
    return out


# --------------------------------------------------------------------------------------------------- diffusers peers
def _attach_diffusers(handle: PeerHandle, config: Any, apply_fn: Callable[[nn.Module, Any], None],
                      hook_names: tuple[str, ...], step_hook: PeerStepHook) -> PeerHandle:
    """Apply a diffusers cache config (through `enable_cache` where the model has `CacheMixin`) plus the step hook."""
    from diffusers.hooks import HookRegistry
    from diffusers.models.cache_utils import CacheMixin

    transformer = handle.pipe.transformer
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if isinstance(transformer, CacheMixin):
        transformer.enable_cache(config)
        handle._undo.append(transformer.disable_cache)
    else:
        apply_fn(transformer, config)

        def undo() -> None:
            for name in hook_names:
                registry.remove_hook(name, recurse=True)
            registry.invalidate_child_registries_cache()

        handle._undo.append(undo)
    if _count_hooks(transformer, hook_names) == 0:
        handle.remove()
        raise PeerCannotAct(f"no module of {type(transformer).__name__} matched {handle.peer.name}'s patterns")
    registry.register_hook(step_hook, STEP_HOOK)
    registry.invalidate_child_registries_cache()
    handle.step_hook = step_hook

    def undo_step() -> None:
        registry.remove_hook(STEP_HOOK, recurse=False)
        registry.invalidate_child_registries_cache()

    handle._undo.append(undo_step)
    handle.config = {"class": type(config).__name__, **_describe(config), **handle.config}
    return handle


def _block_lists(transformer: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    return [(name, child) for name, child in transformer.named_children()
            if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, nn.ModuleList) and len(child)]


def _check_block_registry(pipe: Any) -> str | None:
    """Why diffusers' block-level caches (FBCache, MagCache) cannot hook this transformer, or None."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    lists = _block_lists(pipe.transformer)
    if not lists:
        return f"{type(pipe.transformer).__name__} has no block list diffusers' block caches recognise"
    blocks = [block for _, child in lists for block in child]
    if len(blocks) < 2:
        return "a block cache needs at least two transformer blocks"
    for block in blocks:
        try:
            TransformerBlockRegistry.get(type(block))
        except ValueError:
            return f"diffusers' TransformerBlockRegistry has no entry for {type(block).__name__}"
    return None


def _attention_modules(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    from diffusers.hooks._common import _ATTENTION_CLASSES

    return [(name, m) for name, m in transformer.named_modules() if isinstance(m, _ATTENTION_CLASSES)]


def _check_attention(pipe: Any) -> str | None:
    if not _attention_modules(pipe.transformer):
        return f"{type(pipe.transformer).__name__} has no diffusers Attention modules"
    return None


def _scaled_range(pipe: Any, low: float, high: float) -> tuple[float, float]:
    """A timestep range given in the papers' 0..1000 units, in this scheduler's units (0..num_train_timesteps)."""
    num_train = float(getattr(pipe.scheduler.config, "num_train_timesteps", 1000) or 1000)
    return (low * num_train / 1000.0, high * num_train / 1000.0)


def _new_step_hook(pipe: Any, provide_context: bool) -> PeerStepHook:
    return PeerStepHook(pipe.transformer, pipe.scheduler, provide_context, _reset_diffusers_state)


def _apply_fbcache(peer: "Peer", pipe: Any, knob: float, call: PipelineCall) -> PeerHandle:
    """FBCache as documented (`FirstBlockCacheConfig(threshold)`); its state lives in a named cache context, which the
    step hook opens around each call because PixArt's pipeline never does ("No cache context is set" otherwise)."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK

    config = FirstBlockCacheConfig(threshold=float(knob))
    handle = PeerHandle(peer, pipe, knob, {})
    return _attach_diffusers(handle, config, apply_first_block_cache, (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK),
                             _new_step_hook(pipe, True))


def _taylorseer_identifiers(transformer: nn.Module) -> list[str]:
    """Regexes for every attention module inside the blocks. diffusers' default patterns (``^transformer_blocks.*attn``
    under `re.fullmatch`) must end in ``attn`` and so match none of PixArt's ``attn1``/``attn2``: a TaylorSeer that
    "ran" there hooked nothing. These say what the defaults intend, spelled so that they match this model."""
    import re

    patterns = set()
    for name, _ in _attention_modules(transformer):
        parts = name.split(".")
        if len(parts) >= 3 and any(part.isdigit() for part in parts):  # inside a block list, not a top-level module
            patterns.add(r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in parts))
    return sorted(patterns)


def _apply_taylorseer(peer: "Peer", pipe: Any, knob: int, call: PipelineCall) -> PeerHandle:
    """TaylorSeer as its docs show it (order 1, full steps every `cache_interval`, caching from step 3), on every
    attention module, in the model's dtype (the bfloat16 default loses precision on CPU float32 models). Short runs
    compute their first 2 steps instead of 3, which is what a first-order forecast needs."""
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    steps = call.num_inference_steps
    warmup = min(3, max(2, steps // 5))  # diffusers' default 3; two steps give the first-order difference
    if steps <= warmup + 1:
        raise PeerCannotAct(f"TaylorSeer needs more than {warmup + 1} steps to forecast anything ({steps} given)")
    identifiers = _taylorseer_identifiers(pipe.transformer)
    if not identifiers:
        raise PeerCannotAct(f"{type(pipe.transformer).__name__} has no attention modules inside blocks")
    config = TaylorSeerCacheConfig(cache_interval=int(knob), disable_cache_before_step=warmup, max_order=1,
                                   taylor_factors_dtype=pipe.transformer.dtype, cache_identifiers=identifiers)
    handle = PeerHandle(peer, pipe, knob, {})
    return _attach_diffusers(handle, config, apply_taylorseer_cache, (_TAYLORSEER_CACHE_HOOK,),
                             _new_step_hook(pipe, True))


def _calibrate_magcache(pipe: Any, call: PipelineCall) -> list[float]:
    """MagCache's own calibration mode (`MagCacheConfig(calibrate=True)`) run on this model, steps and call.

    diffusers prints the ratios for the user to paste into `mag_ratios`; they are read from that printout.
    """
    from diffusers.hooks import MagCacheConfig, apply_mag_cache
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK
    from diffusers.hooks import HookRegistry

    transformer = pipe.transformer
    step_hook = _new_step_hook(pipe, False)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    apply_mag_cache(transformer, MagCacheConfig(calibrate=True, num_inference_steps=call.num_inference_steps))
    registry.register_hook(step_hook, STEP_HOOK)
    registry.invalidate_child_registries_cache()
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            call.replace(output_type="latent")(pipe)
    finally:
        registry.remove_hook(STEP_HOOK, recurse=False)
        for name in (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK):
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()
    lines = [line for line in printed.getvalue().splitlines() if line.startswith("[") and line.endswith("]")]
    if not lines:
        raise PeerCannotAct("MagCache calibration produced no ratios (its tail block never completed a run)")
    ratios = [float(r) for r in ast.literal_eval(lines[-1])]
    if len(ratios) != call.num_inference_steps or not all(math.isfinite(r) for r in ratios):
        raise PeerCannotAct(f"MagCache calibration gave {len(ratios)} ratios for {call.num_inference_steps} steps")
    return ratios


def _apply_magcache(peer: "Peer", pipe: Any, knob: float, call: PipelineCall) -> PeerHandle:
    """MagCache with ratios calibrated on this model, scheduler, step count and call (its docs: ratios are
    checkpoint-dependent; FLUX's must not be reused), and its defaults K=3, retention 20% of the steps."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK

    ratios = _calibrate_magcache(pipe, call)
    config = MagCacheConfig(threshold=float(knob), max_skip_steps=3, retention_ratio=0.2,
                            num_inference_steps=call.num_inference_steps, mag_ratios=ratios)
    handle = PeerHandle(peer, pipe, knob, {"calibrated_on": "the same call, MagCacheConfig(calibrate=True)"})
    handle.details["mag_ratios"] = [round(r, 5) for r in ratios]
    return _attach_diffusers(handle, config, apply_mag_cache, (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK),
                             _new_step_hook(pipe, True))


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


def _apply_fastercache(peer: "Peer", pipe: Any, knob: int, call: PipelineCall) -> PeerHandle:
    """FasterCache with the paper's settings (attention every 2nd step below t=681, CFG-cache below t=641, frequency
    weights 1.1), its timestep ranges in this scheduler's units, the live timestep from the step hook (without it,
    nothing is ever in range), and the tensor format and CFG layout measured on a two-step run of the call."""
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache
    from diffusers.hooks.faster_cache import _FASTER_CACHE_BLOCK_HOOK, _FASTER_CACHE_DENOISER_HOOK

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
    batched_cfg = rows == 2 * images
    step_hook = _new_step_hook(pipe, False)
    config = FasterCacheConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=_scaled_range(pipe, -1, 681),
        low_frequency_weight_update_timestep_range=_scaled_range(pipe, 99, 901),
        high_frequency_weight_update_timestep_range=_scaled_range(pipe, -1, 301),
        unconditional_batch_skip_range=int(knob),
        unconditional_batch_timestep_skip_range=_scaled_range(pipe, -1, 641),
        attention_weight_callback=lambda _: 0.5,
        tensor_format=fmt,
        is_guidance_distilled=not batched_cfg,
        current_timestep_callback=step_hook.current_timestep,
    )
    handle = PeerHandle(peer, pipe, knob, {"batched_cfg": batched_cfg})
    with _quiet_diffusers():
        return _attach_diffusers(handle, config, apply_faster_cache,
                                 (_FASTER_CACHE_DENOISER_HOOK, _FASTER_CACHE_BLOCK_HOOK), step_hook)


def _apply_pab(peer: "Peer", pipe: Any, knob: int, call: PipelineCall) -> PeerHandle:
    """PAB with the paper's middle-steps window (100 < t < 800, in this scheduler's units), self-attention broadcast
    every `knob` calls and cross-attention every `3 * knob`, following the live timestep from the step hook."""
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast
    from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK

    step_hook = _new_step_hook(pipe, False)
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=int(knob),
        cross_attention_block_skip_range=3 * int(knob),  # the paper's pyramid: self-attention 2, cross 6
        spatial_attention_timestep_skip_range=_scaled_range(pipe, 100, 800),
        cross_attention_timestep_skip_range=_scaled_range(pipe, 100, 800),
        current_timestep_callback=step_hook.current_timestep,
    )
    handle = PeerHandle(peer, pipe, knob, {})
    return _attach_diffusers(handle, config, apply_pyramid_attention_broadcast, (_PYRAMID_ATTENTION_BROADCAST_HOOK,),
                             step_hook)


@contextlib.contextmanager
def _quiet_diffusers() -> Any:
    """FasterCache warns "purely experimental" on every apply; the bench applies it once per sweep value."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


# ---------------------------------------------------------------------------------------------------- cache-dit peers
def _cache_dit_adapter(transformer: nn.Module) -> tuple[Any, str]:
    """A transformer-only `BlockAdapter`: cache-dit's registered one for the class, else one built from cachekit's
    model registry (block lists and what each block returns)."""
    from cache_dit import BlockAdapter, BlockAdapterRegister, ForwardPattern

    adapter = BlockAdapterRegister.get_adapter(transformer)
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


def _dbcache_blocks(depth: int) -> tuple[int, int]:
    """Fn/Bn for a block list `depth` deep: ~10% computed in front, ~5% behind, at least one block left to skip."""
    fn = max(1, round(0.1 * depth))
    bn = round(0.05 * depth)
    while fn + bn >= depth and bn > 0:
        bn -= 1
    if fn >= depth:
        raise PeerCannotAct(f"DBCache needs more than {fn} blocks to skip any ({depth} given)")
    return fn, bn


def _apply_cache_dit(peer: "Peer", pipe: Any, knob: float, call: PipelineCall, taylorseer: bool) -> PeerHandle:
    """cache-dit's DBCache (optionally with its TaylorSeer calibrator, order 1) on the transformer alone.

    Settings follow cache-dit's own example runner (`max_continuous_cached_steps=3`; warmup 8 of its 28-50 steps,
    here 20% of the steps), with Fn/Bn scaled to the depth, CFG separation as cache-dit's registry knows the pipeline,
    and `num_inference_steps` so its persistent transformer-only context renews itself after every run. The step
    hook also renews it at step 0 of each run, so a run that stopped early leaves nothing behind.
    """
    import cache_dit
    from cache_dit import BlockAdapterRegister, DBCacheConfig, TaylorSeerCalibratorConfig

    transformer = pipe.transformer
    adapter, how = _cache_dit_adapter(transformer)
    blocks = adapter.blocks if isinstance(adapter.blocks, list) else [adapter.blocks]
    depth = min(len(b) for b in blocks)
    fn, bn = _dbcache_blocks(depth)
    steps = call.num_inference_steps
    separate_cfg = BlockAdapterRegister.has_separate_cfg(pipe)
    config = DBCacheConfig(
        Fn_compute_blocks=fn, Bn_compute_blocks=bn, residual_diff_threshold=float(knob),
        max_warmup_steps=max(1, round(0.2 * steps)), max_continuous_cached_steps=3,
        enable_separate_cfg=separate_cfg, num_inference_steps=steps)
    calibrator = TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
    handle = PeerHandle(peer, pipe, knob, {"adapter": how, "depth": depth})
    cache_dit.enable_cache(adapter, cache_config=config, calibrator_config=calibrator)

    def undo() -> None:
        cache_dit.disable_cache(transformer)

    handle._undo.append(undo)
    if not getattr(transformer, "_is_cached", False):
        handle.remove()
        raise PeerCannotAct(f"cache-dit did not wrap {type(transformer).__name__}")

    def refresh(module: nn.Module) -> None:
        # a new pipeline call: start cache-dit's context afresh even if the last call stopped early
        cache_dit.refresh_context(transformer, cache_config=copy.deepcopy(config),
                                  calibrator_config=copy.deepcopy(calibrator))

    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    step_hook = PeerStepHook(transformer, pipe.scheduler, False, refresh)
    registry.register_hook(step_hook, STEP_HOOK)
    handle.step_hook = step_hook
    handle._undo.append(lambda: registry.remove_hook(STEP_HOOK, recurse=False))
    handle.config = {"class": "DBCacheConfig", **_describe(config),
                     "calibrator": None if calibrator is None else {"class": type(calibrator).__name__,
                                                                    **_describe(calibrator)}, **handle.config}
    return handle


# --------------------------------------------------------------------------------------------------------- the peers
@dataclasses.dataclass(frozen=True)
class Peer:
    """One cache users already have, with its main knob and a sweep of values for ~20 denoising steps.

    `requires` lists ``"module:attribute"`` names the peer needs; `available()` checks them, so a missing package or
    an older release gives a reason in the row instead of an ImportError. `check(pipe)` gives the reason it cannot
    act on a model class (None if it can); `apply` raises `PeerCannotAct` for reasons only found while applying.
    """

    name: str
    family: str
    knob: str
    sweep: tuple[float | int, ...]
    summary: str
    requires: tuple[str, ...]
    install: str
    _apply: Callable[["Peer", Any, Any, PipelineCall], PeerHandle] = dataclasses.field(repr=False)
    _check: Callable[[Any], str | None] | None = dataclasses.field(default=None, repr=False)

    def available(self) -> tuple[bool, str]:
        """(True, "") if every required package and name imports, else (False, why) — never raises."""
        for requirement in self.requires:
            module_name, _, attr = requirement.partition(":")
            try:
                module = importlib.import_module(module_name)
            except ImportError as e:
                return False, f"{module_name.split('.')[0]} is not installed ({e.__class__.__name__}); {self.install}"
            except Exception as e:  # a broken install must not take the bench down either
                return False, f"importing {module_name} failed: {type(e).__name__}: {e}"
            if attr and not hasattr(module, attr):
                version = getattr(importlib.import_module(module_name.split(".")[0]), "__version__", "?")
                return False, f"{module_name} {version} has no {attr}; {self.install}"
        return True, ""

    def check(self, pipe: Any) -> str | None:
        """Why this peer cannot act on `pipe`'s transformer, or None if it can."""
        transformer = getattr(pipe, "transformer", None)
        if not isinstance(transformer, nn.Module):
            return f"{type(pipe).__name__} has no `transformer` (peers hook diffusion transformers)"
        return self._check(pipe) if self._check is not None else None

    def apply(self, pipe: Any, knob: float | int, call: PipelineCall) -> PeerHandle:
        """Apply the peer at `knob` to `pipe.transformer` for calls shaped like `call`; returns a removable handle.

        Apply to a `fresh_pipeline(...)` copy: peers are never stacked. Raises `PeerCannotAct` with the reason
        when the peer cannot act on this model or call.
        """
        ok, why = self.available()
        if not ok:
            raise PeerCannotAct(why)
        reason = self.check(pipe)
        if reason is not None:
            raise PeerCannotAct(reason)
        if getattr(pipe.transformer, "_diffusers_hook", None) is not None and \
                pipe.transformer._diffusers_hook.get_hook(STEP_HOOK) is not None:
            raise RuntimeError("a peer is already applied to this transformer: remove it or use fresh_pipeline")
        return self._apply(self, pipe, knob, call)


PEERS: tuple[Peer, ...] = (
    Peer("diffusers.fbcache", "diffusers", "threshold", (0.05, 0.1, 0.2),
         "First-Block Cache: skip all blocks after the first while the first block's residual barely changes",
         ("diffusers.hooks:apply_first_block_cache",), "pip install -U diffusers",
         _apply_fbcache, _check_block_registry),
    Peer("diffusers.taylorseer", "diffusers", "cache_interval", (2, 3, 4),
         "TaylorSeer: forecast attention outputs by first-order Taylor expansion between full steps",
         ("diffusers.hooks:apply_taylorseer_cache",), "pip install -U diffusers", _apply_taylorseer,
         _check_attention),
    Peer("diffusers.magcache", "diffusers", "threshold", (0.02, 0.06, 0.12),
         "MagCache: skip the blocks while calibrated residual-magnitude ratios accumulate little error",
         ("diffusers.hooks:apply_mag_cache",), "pip install -U diffusers", _apply_magcache, _check_block_registry),
    Peer("diffusers.fastercache", "diffusers", "unconditional_batch_skip_range", (2, 3, 5),
         "FasterCache: reuse self-attention every other step and approximate the CFG-unconditional branch",
         ("diffusers.hooks:apply_faster_cache",), "pip install -U diffusers", _apply_fastercache, _check_attention),
    Peer("diffusers.pab", "diffusers", "spatial_attention_block_skip_range", (2, 3, 5),
         "Pyramid Attention Broadcast: broadcast self- (every N) and cross-attention (every 3N) in the middle steps",
         ("diffusers.hooks:apply_pyramid_attention_broadcast",), "pip install -U diffusers", _apply_pab,
         _check_attention),
    Peer("cache-dit.dbcache", "cache-dit", "residual_diff_threshold", (0.08, 0.12, 0.24),
         "cache-dit DBCache: compute the first Fn and last Bn blocks, reuse the middle while the Fn residual holds",
         ("cache_dit:enable_cache", "cache_dit:BlockAdapter", "cache_dit:DBCacheConfig"), "pip install cache-dit",
         lambda peer, pipe, knob, call: _apply_cache_dit(peer, pipe, knob, call, taylorseer=False)),
    Peer("cache-dit.dbcache-taylorseer", "cache-dit", "residual_diff_threshold", (0.12, 0.24, 0.36),
         "cache-dit DBCache with its TaylorSeer calibrator forecasting the reused residual (order 1)",
         ("cache_dit:enable_cache", "cache_dit:BlockAdapter", "cache_dit:TaylorSeerCalibratorConfig"),
         "pip install cache-dit",
         lambda peer, pipe, knob, call: _apply_cache_dit(peer, pipe, knob, call, taylorseer=True)),
)


def get_peer(name: str) -> Peer:
    """The peer called `name` (see `PEERS`)."""
    for peer in PEERS:
        if peer.name == name:
            return peer
    raise KeyError(f"no peer {name!r}; known: {', '.join(p.name for p in PEERS)}")


# ------------------------------------------------------------------------------------------------------------ rows
@dataclasses.dataclass
class PeerRow:
    """One peer at one knob value on one model: did it act, what did it skip, and if not, why.

    `status`: ``"acted"`` (work measurably went down), ``"no-skip"`` (it ran and skipped nothing: not a valid
    comparison row), ``"unavailable"`` (package missing), ``"cannot-act"`` (the peer cannot act on this model or
    call) or ``"error"`` (it raised while running; the reason has the exception).
    """

    peer: str
    family: str
    knob: str
    value: float | int | None
    status: str
    reason: str = ""
    work: WorkReport | None = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def counts(self) -> bool:
        """Whether the row may enter a comparison: the peer really skipped work on this model."""
        return self.status == "acted"

    @property
    def images(self) -> Any:
        return None if self.work is None else self.work.images

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready row (the images are left out)."""
        return {"peer": self.peer, "family": self.family, "knob": self.knob, "value": self.value,
                "status": self.status, "counts": self.counts, "reason": self.reason,
                "work": None if self.work is None else self.work.as_dict(), "config": self.config,
                "details": self.details}


def run_peer(pipe: Any, peer: Peer, knob: float | int, call: PipelineCall,
             baseline: WorkReport | None = None) -> PeerRow:
    """Apply `peer` at `knob` to a fresh copy of `pipe`, run `call`, measure, remove; never raises for the peer.

    Without `baseline` the uncached call is measured first (on `pipe` itself, which stays unhooked).
    """
    row = PeerRow(peer.name, peer.family, peer.knob, knob, "unavailable")
    ok, why = peer.available()
    if not ok:
        row.reason = why
        return row
    reason = peer.check(pipe)
    if reason is not None:
        row.status, row.reason = "cannot-act", reason
        return row
    if baseline is None:
        baseline = measure_work(pipe, call)
    copy_ = fresh_pipeline(pipe)
    try:
        with peer.apply(copy_, knob, call) as handle:
            row.config, row.details = handle.config, handle.details
            row.work = measure_work(copy_, call, baseline)
    except PeerCannotAct as e:
        row.status, row.reason = "cannot-act", str(e)
        return row
    except Exception as e:  # a peer failing on a model is a result to report, not a crash of the bench
        row.status, row.reason = "error", f"{type(e).__name__}: {e}"
        return row
    if row.work.skipped_work:
        row.status = "acted"
        row.reason = (f"MAC ratio {row.work.mac_ratio:.3f}, "
                      f"{row.work.skipped_linear_calls} of {row.work.baseline_block_linear_calls} block linear calls "
                      "skipped")
    else:
        row.status = "no-skip"
        row.reason = f"ran and skipped nothing at {peer.knob}={knob} (MAC ratio {row.work.mac_ratio:.3f})"
    return row


def run_peers(pipe: Any, call: PipelineCall, peers: Sequence[Peer] = PEERS,
              knobs: Mapping[str, Sequence[float | int]] | None = None, baseline: WorkReport | None = None,
              progress: bool = True) -> list[PeerRow]:
    """Every peer over its sweep (or `knobs[peer.name]`) on `pipe` and `call`, one fresh transformer copy per row.

    A peer that is unavailable or cannot act on the model gets a single row (value None) saying why. The uncached
    call is measured once, on `pipe` itself, unless `baseline` is given.
    """
    from tqdm.auto import tqdm

    jobs = [(peer, value) for peer in peers for value in ((knobs or {}).get(peer.name) or peer.sweep)]
    rows: list[PeerRow] = []
    settled: set[str] = set()
    for peer, value in tqdm(jobs, desc="peers", disable=not progress):
        if peer.name in settled:
            continue
        ok, why = peer.available()
        reason = why if not ok else peer.check(pipe)
        if reason is None and baseline is None:
            baseline = measure_work(pipe, call)
        row = run_peer(pipe, peer, value, call, baseline) if reason is None else \
            PeerRow(peer.name, peer.family, peer.knob, value, "unavailable" if not ok else "cannot-act", reason)
        if row.status in ("unavailable", "cannot-act"):  # about the model or the install, not about the value
            row.value = None
            settled.add(peer.name)
        rows.append(row)
    return rows
