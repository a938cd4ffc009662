"""The drop-in wrapper: apply a schedule to a stock pipeline or transformer, and take it off again.

`enable` attaches hooks to the pipeline's transformer(s) instance; the pipeline's `__call__` and the model classes
stay untouched. `disable` removes every hook, after which the model computes exactly what it computed before.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .hooks import CachePlan, CacheSession, attach_hooks, detach_hooks, session_of
from .registry import UnsupportedModelError, resolve_layout, spec_for
from .schedule import Schedule
from .state import StepRows

__all__ = ["enable", "disable", "cached", "reset", "rows", "branch", "sessions", "denoisers"]


def denoisers(pipe_or_transformer: Any) -> list[nn.Module]:
    """The registered transformers of a pipeline (Wan 2.2 has two), or the transformer itself."""
    if isinstance(pipe_or_transformer, nn.Module):
        spec_for(pipe_or_transformer)  # raises the helpful error for unsupported classes
        return [pipe_or_transformer]
    components = getattr(pipe_or_transformer, "components", None)
    if not isinstance(components, dict):
        raise TypeError(f"expected a diffusers pipeline or transformer, got {type(pipe_or_transformer).__name__}")
    found = []
    for name in sorted(components):
        module = components[name]
        if isinstance(module, nn.Module):
            try:
                spec_for(module)
            except UnsupportedModelError:
                continue
            found.append(module)
    if not found:
        transformer = components.get("transformer")
        if transformer is not None:
            spec_for(transformer)  # the helpful error names the class and how to register it
        raise UnsupportedModelError(f"{type(pipe_or_transformer).__name__} has no transformer cachekit supports")
    return found


def _as_plan(schedule_or_policy: Schedule | CachePlan | str | os.PathLike) -> CachePlan:
    if isinstance(schedule_or_policy, (str, os.PathLike)):
        return Schedule.load(schedule_or_policy)
    if not hasattr(schedule_or_policy, "decide"):
        raise TypeError(
            f"expected a cachekit.Schedule, a schedule file path or a policy, got {type(schedule_or_policy).__name__}"
        )
    return schedule_or_policy


def enable(
    pipe_or_transformer: Any,
    schedule_or_policy: Schedule | CachePlan | str | os.PathLike,
    *,
    scheduler: Any | None = None,
) -> Any:
    """Serve the transformer's components from cache as the schedule (or policy) says.

    Args:
        pipe_or_transformer: a stock diffusers pipeline, or a bare transformer.
        schedule_or_policy: a `Schedule`, the path of a schedule file, or a runtime policy.
        scheduler: for a bare transformer, the scheduler whose timesteps it will be called with, so the step index
            can be read off the `timestep` argument. A pipeline's own scheduler is used otherwise.

    Returns the object it was given, so `pipe = cachekit.enable(pipe, schedule)` reads naturally.
    Raises `ScheduleError` if the schedule was made for another model, `RuntimeError` if already enabled.
    """
    plan = _as_plan(schedule_or_policy)
    targets = denoisers(pipe_or_transformer)
    if scheduler is None and not isinstance(pipe_or_transformer, nn.Module):
        scheduler = getattr(pipe_or_transformer, "scheduler", None)
    for transformer in targets:
        if session_of(transformer) is not None:
            raise RuntimeError(
                f"cachekit is already enabled on this {type(transformer).__name__}; call cachekit.disable first"
            )
    mode = getattr(plan, "mode", "component")
    for transformer in targets:
        validate = getattr(plan, "validate_for", None)
        if validate is not None:
            validate(transformer)
    for transformer in targets:
        layout = resolve_layout(transformer, mode)
        session = CacheSession(plan, layout, spec_for(transformer), scheduler)
        attach_hooks(transformer, session, mode)
        attach = getattr(plan, "attach", None)
        if attach is not None:
            attach(transformer, session)
    return pipe_or_transformer


def disable(pipe_or_transformer: Any) -> None:
    """Remove every cachekit hook and free the caches; a no-op where cachekit is not enabled."""
    for transformer in denoisers(pipe_or_transformer):
        session = session_of(transformer)
        if session is None:
            continue
        session.clear()
        detach = getattr(session.plan, "detach", None)
        if detach is not None:
            detach(transformer)
        detach_hooks(transformer)


def sessions(pipe_or_transformer: Any) -> list[CacheSession]:
    """The live cache sessions (stats, caches) of an enabled pipeline or transformer."""
    found = [session_of(t) for t in denoisers(pipe_or_transformer)]
    return [s for s in found if s is not None]


def reset(pipe_or_transformer: Any) -> None:
    """Free all cached features now, e.g. after interrupting a generation from outside the transformer."""
    for session in sessions(pipe_or_transformer):
        session.clear()


@contextmanager
def cached(pipe_or_transformer: Any, schedule_or_policy: Any, **kwargs: Any) -> Iterator[Any]:
    """`with cachekit.cached(pipe, schedule): pipe(...)`: enabled inside, disabled and freed on the way out."""
    enable(pipe_or_transformer, schedule_or_policy, **kwargs)
    try:
        yield pipe_or_transformer
    finally:
        disable(pipe_or_transformer)


@contextmanager
def rows(
    transformer: nn.Module, steps: Sequence[int] | torch.Tensor, keys: Sequence[Hashable], num_steps: int
) -> Iterator[None]:
    """Declare the step and cache key of each batch row for the forwards inside (used by the streaming runner).

    Requests at different denoising steps can then share one forward pass while each is served from its own cache.
    """
    session = session_of(transformer)
    if session is None:
        raise RuntimeError("cachekit is not enabled on this transformer")
    session.explicit_rows = StepRows(torch.as_tensor(steps, dtype=torch.long).cpu(), tuple(keys), num_steps)
    try:
        yield
    finally:
        session.explicit_rows = None


@contextmanager
def branch(pipe_or_transformer: Any, label: Hashable) -> Iterator[None]:
    """Label the transformer calls inside as one CFG branch, so each branch keeps its own cache.

    Pipelines that call the transformer once per branch already say so through diffusers' `cache_context(name)`,
    which cachekit reads; this is the same for models without diffusers' `CacheMixin` (e.g. PixArt) and for custom
    loops. A no-op where cachekit is not enabled, so a loop can be written once for both.
    """
    active = sessions(pipe_or_transformer)
    previous = [session.branch_label for session in active]
    for session in active:
        session.branch_label = label
    try:
        yield
    finally:
        for session, old in zip(active, previous):
            session.branch_label = old
