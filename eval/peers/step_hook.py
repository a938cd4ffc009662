"""The step/context hook: what a `CacheMixin` pipeline gives diffusers' caches, for pipelines that give them nothing.

PixArt's pipeline opens no `cache_context`, passes no timestep callback and never resets cache state between calls;
`PeerStepHook` (registered on the transformer instance as ``cachekit.peer_step`` while a peer is applied) supplies all
three. Nothing is patched on a class.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from diffusers.hooks import ModelHook
from torch import nn

from cachekit.compat import CacheContext, hook_registry, set_cache_context, stateful_contexts
from cachekit.timesteps import StepResolutionError, match_steps, row_timesteps

__all__ = ["STEP_HOOK", "PeerStepHook", "attach_step_hook", "reset_diffusers_state"]

STEP_HOOK = "cachekit.peer_step"
"""Name of the hook that gives diffusers' caches a cache context, the live timestep and a per-call reset."""

_CONTEXT_NAME = "cachekit.peer"


def _timestep_spec(transformer: nn.Module) -> tuple[str, float]:
    from cachekit.registry import UnsupportedModelError, spec_for

    try:
        spec = spec_for(transformer)
        return spec.timestep_arg, spec.timestep_scale
    except UnsupportedModelError:
        return "timestep", 1.0


def reset_diffusers_state(module: nn.Module) -> None:
    """Reset every stateful diffusers hook under `module` (what `maybe_free_model_hooks` does for `CacheMixin`)."""
    hook_registry(module).reset_stateful_hooks(recurse=True)


class PeerStepHook(ModelHook):
    """What a `CacheMixin` pipeline gives diffusers' caches, for pipelines that give them nothing (PixArt).

    Before every transformer call: reads the live timestep (in the scheduler's units, so the PAB / FasterCache
    timestep ranges mean what their docs say), matches it to the scheduler's timesteps (`cachekit.timesteps`, the
    matcher cachekit's own step tracker uses), calls `on_new_call` at step 0 of every denoising run (the reset
    `maybe_free_model_hooks` does for `CacheMixin` models and PixArt's pipeline never does), and, if
    `provide_context` and the pipeline set no `cache_context` of its own, sets one for the call and clears it
    afterwards. It keeps no cache state itself.
    """

    _is_stateful = False

    def __init__(self, transformer: nn.Module, scheduler: Any, provide_context: bool,
                 on_new_call: Callable[[nn.Module], None] = reset_diffusers_state) -> None:
        super().__init__()
        self.timestep_arg, self.scale = _timestep_spec(transformer)
        self.signature = inspect.signature(type(transformer).forward)
        self.scheduler = scheduler
        self.num_train = float(getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000) or 1000)
        self.provide_context = provide_context
        self.on_new_call = on_new_call
        self.timestep: float | None = None
        self.step_index: int | None = None
        self.num_steps: int | None = None
        self._own_context = False

    def current_timestep(self) -> float:
        """The timestep of the transformer call in progress, in the scheduler's units (0..num_train_timesteps)."""
        return self.num_train if self.timestep is None else self.timestep

    def _read_timestep(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        value = kwargs.get(self.timestep_arg)
        if value is None:
            try:
                value = self.signature.bind_partial(module, *args, **kwargs).arguments.get(self.timestep_arg)
            except TypeError:
                value = None
        return value

    def _locate(self, value: Any) -> tuple[float | None, int | None, int | None]:
        """(timestep in the scheduler's units, step index, step count) of a call; None where it cannot be told."""
        if value is None:
            return None, None, None
        timestep = row_timesteps(value, 1, self.scale)
        try:
            steps, num_steps = match_steps(timestep, self.scheduler)
        except StepResolutionError:  # off the schedule, or no schedule yet: no step, the timestep still counts
            return float(timestep[0]), None, None
        return float(timestep[0]), int(steps[0]), num_steps

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        previous = self.step_index
        self.timestep, self.step_index, self.num_steps = self._locate(self._read_timestep(module, args, kwargs))
        outside = next((c for c in stateful_contexts(module) if c is not None and c.name != _CONTEXT_NAME), None)
        if self.step_index == 0 and previous != 0:  # step 0 of a new denoising run (once, even with CFG branches)
            self.on_new_call(module)
            if outside is not None:  # the reset cleared the context the pipeline had set for this call
                set_cache_context(module, outside)
        self._own_context = self.provide_context and outside is None
        if self._own_context:
            set_cache_context(module, CacheContext(_CONTEXT_NAME, step_index=self.step_index, timestep=self.timestep,
                                                   num_inference_steps=self.num_steps))
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if self._own_context:
            set_cache_context(module, None)
            self._own_context = False
        return output


def attach_step_hook(transformer: nn.Module, step_hook: PeerStepHook) -> Callable[[], None]:
    """Register `step_hook` on the transformer as `STEP_HOOK`; returns what takes it off again."""
    registry = hook_registry(transformer)
    registry.register_hook(step_hook, STEP_HOOK)
    registry.invalidate_child_registries_cache()

    def detach() -> None:
        registry.remove_hook(STEP_HOOK, recurse=False)
        registry.invalidate_child_registries_cache()

    return detach
