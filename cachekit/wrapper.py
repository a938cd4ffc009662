"""The drop-in wrapper: apply a plan to a stock pipeline or transformer, and take it off again.

`enable` attaches hooks to the pipeline's transformer(s) instance; the pipeline's `__call__` and the model classes
stay untouched. `disable` removes every hook, after which the model computes exactly what it computed before.
`rows` and `release` are the request-scoped side the streaming runner uses: per batch row a step, a step count, a
cache key and a plan, and an explicit end of a request's cache.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from .compat import compiled_original
from .hooks import CacheSession, attach_hooks, detach_hooks, session_of
from .plans import PlanLike, resolve_plan
from .registry import UnsupportedModelError, spec_for
from .state import StepRows

__all__ = ["enable", "disable", "cached", "reset", "rows", "release", "branch", "sessions", "denoisers", "compile",
           "COMPILE_MODES"]

MODES = ("component", "block")
COMPILE_MODES = ("regional", "full")


def denoisers(pipe_or_transformer: Any) -> list[nn.Module]:
    """The registered transformers of a pipeline (Wan 2.2 has two), or the transformer itself."""
    if isinstance(pipe_or_transformer, nn.Module):
        transformer = compiled_original(pipe_or_transformer)  # `torch.compile(transformer)`: the instance inside
        spec_for(transformer)  # raises the helpful error for unsupported classes
        return [transformer]
    components = getattr(pipe_or_transformer, "components", None)
    if not isinstance(components, dict):
        raise TypeError(f"expected a diffusers pipeline or transformer, got {type(pipe_or_transformer).__name__}")
    found = []
    for name in sorted(components):
        module = components[name]
        if isinstance(module, nn.Module):
            module = compiled_original(module)
            try:
                spec_for(module)
            except UnsupportedModelError:
                continue
            found.append(module)
    if not found:
        transformer = components.get("transformer")
        if transformer is not None:
            spec_for(compiled_original(transformer))  # the helpful error names the class and how to register it
        raise UnsupportedModelError(f"{type(pipe_or_transformer).__name__} has no transformer cachekit supports")
    return found


def enable(
    pipe_or_transformer: Any,
    plan: PlanLike,
    *,
    scheduler: Any | None = None,
    modes: Sequence[str] | None = None,
) -> Any:
    """Serve the transformer's components from cache as the plan says.

    Args:
        pipe_or_transformer: a stock diffusers pipeline, or a bare transformer.
        plan: a `Schedule`, a runtime policy, a schedule file, a shipped schedule name (`"digits-fast"`), a policy
            spec (`"fora:interval=3"`, `"teacache:threshold=0.2"`), or `None` / `"none"`: no default plan, every
            request brings its own through `cachekit.rows(..., plans=...)` (the runner's use).
        scheduler: for a bare transformer, the scheduler whose timesteps it will be called with, so the step index
            can be read off the `timestep` argument. A pipeline's own scheduler is used otherwise.
        modes: the hook kinds to attach: `("component",)`, `("block",)` or both. Default: the plan's mode; both when
            there is no default plan, so requests may bring plans of either mode.

    Returns the object it was given, so `pipe = cachekit.enable(pipe, schedule)` reads naturally.
    Raises `ScheduleError` if the schedule was made for another model, `PlanError` for an unknown plan name,
    `RuntimeError` if already enabled.
    """
    targets = denoisers(pipe_or_transformer)
    resolved = resolve_plan(plan)
    if modes is None:
        modes = (getattr(resolved, "mode", "component"),) if resolved is not None else MODES
    modes = tuple(m for m in MODES if m in set(modes))
    if not modes:
        raise ValueError("modes must name 'component' and/or 'block'")
    if scheduler is None and not isinstance(pipe_or_transformer, nn.Module):
        scheduler = getattr(pipe_or_transformer, "scheduler", None)
    for transformer in targets:
        if session_of(transformer) is not None:
            raise RuntimeError(
                f"cachekit is already enabled on this {type(transformer).__name__}; call cachekit.disable first"
            )
    if resolved is not None:
        validate = getattr(resolved, "validate_for", None)
        for transformer in targets:
            if validate is not None:
                validate(transformer)
    for transformer in targets:
        attach_hooks(transformer, CacheSession(resolved, transformer, spec_for(transformer), modes, scheduler))
    return pipe_or_transformer


def disable(pipe_or_transformer: Any) -> None:
    """Remove every cachekit hook and free the caches; a no-op where cachekit is not enabled."""
    for transformer in denoisers(pipe_or_transformer):
        session = session_of(transformer)
        if session is None:
            continue
        session.clear()
        detach_hooks(transformer)


def sessions(pipe_or_transformer: Any) -> list[CacheSession]:
    """The live cache sessions (stats, caches) of an enabled pipeline or transformer."""
    found = [session_of(t) for t in denoisers(pipe_or_transformer)]
    return [s for s in found if s is not None]


def reset(pipe_or_transformer: Any) -> None:
    """Free every request's cached features now, e.g. after interrupting a generation from outside the transformer."""
    for session in sessions(pipe_or_transformer):
        session.clear()


def release(pipe_or_transformer: Any, keys: Sequence[Hashable]) -> None:
    """Free the caches and policy state of these requests (finished, cancelled or failed); others keep theirs."""
    keys = tuple(keys)
    for session in sessions(pipe_or_transformer):
        session.release(keys)


@contextmanager
def cached(pipe_or_transformer: Any, plan: PlanLike, **kwargs: Any) -> Iterator[Any]:
    """`with cachekit.cached(pipe, plan): pipe(...)`: enabled inside, disabled and freed on the way out."""
    enable(pipe_or_transformer, plan, **kwargs)
    try:
        yield pipe_or_transformer
    finally:
        disable(pipe_or_transformer)


@contextmanager
def rows(
    pipe_or_transformer: Any,
    steps: Sequence[int] | torch.Tensor,
    keys: Sequence[Hashable],
    num_steps: int | Sequence[int],
    plans: Sequence[PlanLike] | None = None,
) -> Iterator[StepRows]:
    """Declare the step, step count, cache key and plan of each batch row for the forwards inside.

    Requests at different denoising steps, of different lengths and under different plans (`None`: uncached) can
    then share one forward pass while each is served from its own cache. The declaration is local to the calling
    thread or asyncio task. A key's cache lives until its last step has run or `cachekit.release(pipe, [key])`.
    """
    active = sessions(pipe_or_transformer)
    if not active:
        raise RuntimeError("cachekit is not enabled on this transformer")
    resolved = None if plans is None else tuple(resolve_plan(p) for p in plans)
    declared = StepRows(steps, keys, num_steps, resolved)
    with ExitStack() as stack:
        for session in active:
            stack.enter_context(session.declare_rows(declared))
        yield declared


@contextmanager
def branch(pipe_or_transformer: Any, label: Hashable) -> Iterator[None]:
    """Label the transformer calls inside as one CFG branch, so each branch keeps its own cache.

    Pipelines that call the transformer once per branch already say so through diffusers' `cache_context(name)`,
    which cachekit reads; this is the same for models without diffusers' `CacheMixin` (e.g. PixArt) and for custom
    loops. Local to the calling thread or task; a no-op where cachekit is not enabled, so a loop can be written once
    for both.
    """
    with ExitStack() as stack:
        for session in sessions(pipe_or_transformer):
            stack.enter_context(session.branch(label))
        yield


def compile(pipe_or_transformer: Any, mode: str = "regional", **compile_kwargs: Any) -> Any:
    """Compile the transformer(s) with `torch.compile`, in place, in a way that composes with cachekit.

    Args:
        pipe_or_transformer: a pipeline or a bare transformer (enabled or not: enable and disable work either side).
        mode: `"regional"` compiles each block of the registry's block lists on its own (diffusers'
            `compile_repeated_blocks`, for every registered model, also those without `_repeated_blocks` such as
            PixArt): one compiled graph serves every block of a class, so compiling takes seconds, not minutes.
            `"full"` compiles the whole transformer (`module.compile`); cachekit's hooks break its graph at each
            cached module, so it compiles more pieces for about the same speed.
        compile_kwargs: passed to `torch.compile` (`backend`, `mode`, `dynamic`, `fullgraph` is refused: the
            cache's decisions run in eager Python between the compiled pieces).

    Either way the cache's decisions and bookkeeping stay in eager Python (the hooks hand over to
    `torch.compiler.disable`d code) and only the modules' own forwards are compiled, so the graphs depend on tensor
    shapes alone and a generation compiles nothing new once every shape was seen, whatever its plan or step count.
    Plain `torch.compile(pipe.transformer)` or `pipe.transformer.compile()` also works with cachekit; this helper
    adds the regional mode for every registered model. Returns the object it was given.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if compile_kwargs.get("fullgraph"):
        raise ValueError("fullgraph=True cannot hold cachekit's hooks: their decisions run in eager Python between "
                         "compiled graphs; leave fullgraph=False")
    for transformer in denoisers(pipe_or_transformer):
        if mode == "full":
            transformer.compile(**compile_kwargs)
            continue
        for group in spec_for(transformer).groups:
            for block in getattr(transformer, group.attr, None) or ():
                block.compile(**compile_kwargs)
    return pipe_or_transformer
