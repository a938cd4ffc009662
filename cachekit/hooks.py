"""Hooks that serve transformer sub-modules from cache, on diffusers' own `HookRegistry`.

Three pieces, in diffusers' hooks shape:

- `CacheSession`: what one enabled transformer's hooks share: the default plan, the per-row caches, the request
  states of runtime policies, and (per thread or asyncio task, in context variables) the rows of the forward pass in
  progress. Nothing about one forward is kept on the session itself, so two threads can drive forwards with their
  own rows without reading each other's.
- `StepTrackerHook` on the transformer: before every forward it works out, per batch row, the denoising step, the
  step count, the cache key and the plan, from explicit state (the streaming runner's `cachekit.rows`, or the step
  index diffusers pipelines put in `cache_context`) or else from the `timestep` argument matched against the
  scheduler's timesteps. It never counts calls. Caches are freed per request: when a row's last step ran, when a
  forward raises (for that forward's rows), when a plain pipeline call ends (for that call's rows), and on
  `cachekit.release` (the runner's cancellations).
- `ComponentCacheHook` on each cacheable sub-module (ECAD semantics: reuse the raw output; the block's gates, shifts
  and residual stream stay live) and `BlockResidualHook` on whole blocks (FORA / Delta-DiT semantics: reuse the
  block's residual `output - input`). Rows that compute run alone when others reuse, and results are scattered back
  among the cached ones. With both kinds attached, rows under block-mode plans and rows under component-mode plans
  share one forward.
"""

from __future__ import annotations

import contextvars
import inspect
import itertools
import logging
import weakref
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Any, Callable, Protocol

import torch
from diffusers.hooks import ModelHook
from torch import nn

from .compat import CacheContextReceiver, eager_frame, existing_registry, hook_registry
from .registry import ModelLayout, ModelSpec, resolve_layout
from .schedule import ScheduleError
from .state import CacheStats, CallRowKey, RowCache, StepRows, map_tensors, merge_rows, take_rows
from .timesteps import match_steps, row_timesteps, scheduler_timesteps

__all__ = [
    "CachePlan",
    "RuntimePlan",
    "CacheSession",
    "StepTrackerHook",
    "ComponentCacheHook",
    "BlockResidualHook",
    "STEP_TRACKER_HOOK",
    "CACHE_HOOK",
    "PROBE_HOOK",
    "FEEDER_HOOK",
    "FIRST_INPUT",
]

logger = logging.getLogger(__name__)

STEP_TRACKER_HOOK = "cachekit.step_tracker"
CACHE_HOOK = "cachekit.cache"
PROBE_HOOK = "cachekit.probe"  # the read-only observer of the first block's input, for runtime policies
FEEDER_HOOK = "cachekit.feeder"  # skips a norm whose output only a reused component would have read
FIRST_INPUT = "cachekit.first_input"
"""Key in a forward's `StepRows.scratch`: `{cache key: the first block's first component input for that row}`."""
_STATES_BEFORE = "cachekit.request_states_before"  # scratch: policy states as a declared forward began

_session_ids = itertools.count()


class CachePlan(Protocol):
    """What the hooks ask of a schedule or a runtime policy: compute this component for which rows?

    `Schedule` is the static plan. Runtime policies (TeaCache, MagCache, first-block cache) also implement
    `RuntimePlan.observe` to watch what the model computed; they keep no state of their own between forwards but
    `rows.state(key)` (per request, owned by the session) and `rows.scratch` (per forward).
    """

    mode: str  # "component" or "block"
    num_steps: int | None  # None: the plan works at any step count

    def decide(self, rows: StepRows, block: int, component: int) -> bool | torch.Tensor: ...


class RuntimePlan(CachePlan, Protocol):
    needs_input_probe: bool  # reads `rows.scratch[FIRST_INPUT]`

    def observe(self, rows: StepRows, block: int, component: int, value: Any) -> None:
        """Called after `component` of `block` computed for `rows`: `value` is what was cached, row-aligned."""


class _Compiled:
    """One plan at one step count, in the form the hooks consult at every component call."""

    __slots__ = ("plan", "mode", "table", "decider", "forecast", "forecast_table", "order", "observe", "keep",
                 "keep_table", "computes_all")

    def __init__(self, plan: Any, num_steps: int) -> None:
        self.plan = plan
        self.mode = None if plan is None else getattr(plan, "mode", "component")
        self.table = self.forecast = self.forecast_table = self.observe = None
        # keep[step][block][component]: is the value computed there read later? None: always keep (runtime
        # policies decide as they go, so any computed value may be reused)
        self.keep: torch.Tensor | None = None
        self.keep_table: list | None = None
        self.decider: Callable[..., Any] | None = None
        self.order = 0
        # computes_all[step]: every hooked module computes every row at `step` and nothing computed there is read
        # later (None: not known ahead, decided per call). The hooks then run the stock forward at once.
        self.computes_all: list[bool] | None = None
        if plan is None:
            return
        schedule_for = getattr(plan, "schedule_for", None)
        schedule = schedule_for(num_steps) if schedule_for is not None else None
        if schedule is None and plan.num_steps is not None and plan.num_steps != num_steps:
            check = getattr(plan, "check_steps", None)
            if check is not None:
                check(num_steps)
            raise ScheduleError(f"plan has {plan.num_steps} steps but the pipeline runs {num_steps}")
        source = schedule if schedule is not None else plan
        recompute = getattr(source, "recompute", None)
        if isinstance(recompute, torch.Tensor):
            self.table = recompute.tolist()
        self.decider = source.decide
        forecast = getattr(source, "forecast", None)
        if isinstance(forecast, torch.Tensor):
            self.forecast, self.forecast_table = forecast, forecast.tolist()
            self.order = int(getattr(source, "forecast_order", 0))
        self.observe = getattr(plan, "observe", None)
        if isinstance(recompute, torch.Tensor) and self.forecast is None and self.observe is None:
            # A static plan reads a stored value only at the reuse steps right after it, so a value is kept only
            # where the next step reuses: an all-recompute schedule stores nothing, and no per-row bookkeeping
            # runs on its forwards. (Forecasts read several past values; they keep everything.)
            keep = torch.zeros_like(recompute)
            keep[:-1] = recompute[:-1] & ~recompute[1:]
            self.keep, self.keep_table = keep, keep.tolist()
            steps = recompute.shape[0]
            self.computes_all = (recompute.reshape(steps, -1).all(1) & ~keep.reshape(steps, -1).any(1)).tolist()

    def keeps(self, rows: StepRows, block: int, component: int) -> bool:
        """Whether the value computed for `rows` here is read at a later step of any of them (asked only for rows
        of this plan's mode, so never for uncached rows)."""
        if self.keep is None:
            return True
        if rows.uniform_step is not None:
            return self.keep_table[rows.uniform_step][block][component]
        return bool(self.keep[rows.steps, block, component].any())

    def decide(self, rows: StepRows, block: int, component: int, mode: str) -> bool | torch.Tensor:
        if self.mode != mode:  # uncached rows, or a plan of the other mode: this hook computes for them
            return True
        if self.table is not None and rows.uniform_step is not None:
            return self.table[rows.uniform_step][block][component]
        return self.decider(rows, block, component)


class _PlanGroup:
    """The rows of one forward that share a plan and a step count (`index` None: all of them)."""

    __slots__ = ("compiled", "index", "rows")

    def __init__(self, compiled: _Compiled, index: torch.Tensor | None, rows: StepRows) -> None:
        self.compiled, self.index, self.rows = compiled, index, rows


class _PlanMemo:
    """Compiled plans by identity, held weakly: a server resolving a plan per request does not grow this."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Any, dict[int, _Compiled]]] = {}

    def get(self, plan: Any) -> dict[int, _Compiled] | None:
        entry = self._entries.get(id(plan))
        if entry is None:
            return None
        ref, compiled = entry
        return compiled if (ref() if isinstance(ref, weakref.ref) else ref) is plan else None

    def add(self, plan: Any) -> dict[int, _Compiled]:
        key = id(plan)
        try:
            ref: Any = weakref.ref(plan, lambda _, key=key, entries=self._entries: entries.pop(key, None))
        except TypeError:  # not weak-referenceable: keep it
            ref = plan
        compiled: dict[int, _Compiled] = {}
        self._entries[key] = (ref, compiled)
        return compiled

    def clear(self) -> None:
        self._entries.clear()


class CacheSession:
    """State shared by all cachekit hooks of one transformer.

    Args:
        plan: the default plan of every row (None: rows are uncached unless `cachekit.rows` gives them a plan).
        transformer: the transformer the hooks sit on.
        spec: its registry entry.
        modes: which hook kinds are attached: ("component",), ("block",) or both.
        scheduler: whose timesteps the transformer is called with (to read the step off the `timestep` argument).
    """

    def __init__(self, plan: Any, transformer: nn.Module, spec: ModelSpec, modes: tuple[str, ...],
                 scheduler: Any | None = None) -> None:
        self.plan = plan
        self.transformer = transformer
        self.spec = spec
        self.modes = modes
        self.layouts: dict[str, ModelLayout] = {mode: resolve_layout(transformer, mode) for mode in modes}
        self.scheduler = scheduler
        self.caches: list[RowCache] = []
        self.stats = CacheStats()
        self.request_states: dict[Hashable, dict[str, Any]] = {}
        self.has_observers = False
        self._depth = 1
        self._memo = _PlanMemo()
        self._probe_attached = False
        uid = next(_session_ids)
        self._rows: contextvars.ContextVar[StepRows | None] = contextvars.ContextVar(f"cachekit.rows.{uid}",
                                                                                   default=None)
        self._explicit: contextvars.ContextVar[StepRows | None] = contextvars.ContextVar(
            f"cachekit.explicit_rows.{uid}", default=None)
        self._branch: contextvars.ContextVar[Hashable] = contextvars.ContextVar(f"cachekit.branch.{uid}",
                                                                              default=None)
        # per thread or task: the steps of the last implicit forward per label and how often they repeated
        self._call_log: contextvars.ContextVar[dict | None] = contextvars.ContextVar(f"cachekit.call_log.{uid}",
                                                                                   default=None)

    @property
    def layout(self) -> ModelLayout:
        """The layout of the default plan's mode (the first attached mode without one)."""
        mode = getattr(self.plan, "mode", None)
        return self.layouts[mode if mode in self.layouts else self.modes[0]]

    # -------------------------------------------------------------- caches and request lifetimes
    def new_cache(self) -> RowCache:
        cache = RowCache(depth=self._depth)
        self.caches.append(cache)
        return cache

    @property
    def cached_entries(self) -> int:
        """How many row entries are alive across all caches (0 once every request ended)."""
        return sum(len(cache) for cache in self.caches)

    def cached_keys(self) -> set[Hashable]:
        """The request keys that still hold cache entries or policy state."""
        keys = set(self.request_states)
        for cache in self.caches:
            keys.update(cache.keys())
        return keys

    def cached_bytes(self) -> int:
        """Tensor memory the caches keep alive."""
        return sum(cache.nbytes() for cache in self.caches)

    def release(self, keys: tuple[Hashable, ...] | list[Hashable]) -> None:
        """Free everything held for these requests: cached values and runtime-policy state."""
        for cache in self.caches:
            cache.drop(keys)
        for key in keys:
            self.request_states.pop(key, None)

    def clear(self) -> None:
        """Free every request's cache and state."""
        for cache in self.caches:
            cache.clear()
        self.request_states.clear()

    def end_call(self) -> None:
        """A plain pipeline call ended: free its rows (keyed `CallRowKey`), never other requests' caches."""
        call_keys = [key for key in self.cached_keys() if isinstance(key, CallRowKey)]
        if call_keys:
            self.release(call_keys)
        self._call_log.set(None)

    # -------------------------------------------------------------- plans per row
    def _compile(self, plan: Any, num_steps: int) -> _Compiled:
        if plan is None:
            return _UNCACHED
        compiled = self._memo.get(plan)
        if compiled is None:
            compiled = self._memo.add(plan)
        entry = compiled.get(num_steps)
        if entry is None:
            self._admit(plan)
            entry = compiled[num_steps] = _Compiled(plan, num_steps)
            if entry.order + 1 > self._depth:
                self._depth = entry.order + 1
                for cache in self.caches:
                    cache.depth = max(cache.depth, self._depth)
            if entry.observe is not None:
                self.has_observers = True
        return entry

    def _admit(self, plan: Any) -> None:
        """First sight of a plan: it must fit the model and the attached hook kinds."""
        mode = getattr(plan, "mode", "component")
        if mode not in self.modes:
            raise ScheduleError(
                f"a {mode}-mode plan on a transformer enabled for {' and '.join(self.modes)} mode: enable cachekit "
                f"with modes=('block', 'component') to serve both")
        validate = getattr(plan, "validate_for", None)
        if validate is not None:
            validate(self.transformer)
        if getattr(plan, "needs_input_probe", False) and not self._probe_attached:
            attach_input_probe(self.transformer, self)
            self._probe_attached = True

    def groups_of(self, rows: StepRows) -> list[_PlanGroup]:
        """Rows grouped by (plan, step count), compiled; cached on the rows object."""
        groups = rows.groups
        if groups is not None:
            return groups
        if rows.plans is None and rows.num_steps is not None:
            groups = [_PlanGroup(self._compile(self.plan, rows.num_steps), None, rows)]
        else:
            buckets: dict[tuple[int, int], list[int]] = {}
            plans: dict[int, Any] = {}
            for i, count in enumerate(rows.step_counts):
                plan = rows.plan_of(i, self.plan)
                plans[id(plan)] = plan
                buckets.setdefault((id(plan), count), []).append(i)
            if len(buckets) == 1:
                (pid, count), = buckets
                groups = [_PlanGroup(self._compile(plans[pid], count), None, rows)]
            else:
                groups = []
                for (pid, count), index in buckets.items():
                    sub = rows.subset(index)
                    group = _PlanGroup(self._compile(plans[pid], count), torch.tensor(index), sub)
                    sub.groups = [_PlanGroup(group.compiled, None, sub)]
                    groups.append(group)
        rows.groups = groups
        return groups

    def decide(self, rows: StepRows, block: int, component: int, mode: str) -> bool | torch.Tensor:
        """True / False for the whole batch when that is known cheaply, else a per-row bool tensor."""
        groups = rows.groups or self.groups_of(rows)
        if len(groups) == 1:
            return groups[0].compiled.decide(rows, block, component, mode)
        decision = torch.ones(rows.batch_size, dtype=torch.bool)
        for group in groups:
            part = group.compiled.decide(group.rows, block, component, mode)
            if part is not True:
                decision[group.index] = part
        return decision

    def reuses_all(self, rows: StepRows, block: int, component: int, cache: RowCache) -> bool:
        """Whether every row will be served `component` of `block` from cache, known from a static table alone.

        Runtime policies are never asked here: their decisions may read what the block has not computed yet.
        """
        groups = rows.groups or self.groups_of(rows)
        if len(groups) != 1 or rows.uniform_step is None:
            return False
        compiled = groups[0].compiled
        return (compiled.mode == "component" and compiled.table is not None
                and not compiled.table[rows.uniform_step][block][component] and cache.has(rows.keys))

    def keeps(self, rows: StepRows, block: int, component: int, mode: str) -> bool:
        """Whether the value `rows` compute at this component is read at a later step (else it is not stored)."""
        groups = rows.groups or self.groups_of(rows)
        if len(groups) == 1:
            compiled = groups[0].compiled
            return compiled.mode == mode and compiled.keeps(rows, block, component)
        return any(group.compiled.mode == mode and group.compiled.keeps(group.rows, block, component)
                   for group in groups)

    def forecast_orders(self, rows: StepRows, row_index: torch.Tensor | None, block: int,
                        component: int) -> int | list[int]:
        """For the reusing rows (`row_index`; None: all), the TaylorSeer order serving each (0: plain reuse)."""
        groups = rows.groups or self.groups_of(rows)
        if len(groups) == 1:
            compiled = groups[0].compiled
            if compiled.forecast_table is None:
                return 0
            if rows.uniform_step is not None:
                return compiled.order if compiled.forecast_table[rows.uniform_step][block][component] else 0
            steps = rows.steps if row_index is None else rows.steps[row_index]
            return [compiled.order if m else 0 for m in compiled.forecast[steps, block, component].tolist()]
        per_row = [0] * rows.batch_size
        for group in groups:
            compiled = group.compiled
            if compiled.forecast is None:
                continue
            mask = compiled.forecast[group.rows.steps, block, component].tolist()
            for i, m in zip(group.index.tolist(), mask):
                per_row[i] = compiled.order if m else 0
        orders = per_row if row_index is None else [per_row[i] for i in row_index.tolist()]
        return orders[0] if len(set(orders)) == 1 else orders

    def serve(self, cache: RowCache, rows: StepRows, row_index: torch.Tensor | None, block: int,
              component: int) -> Any:
        """Cached values for reusing rows: plain reuse, or a forecast where the plan says so."""
        keys = rows.keys if row_index is None else [rows.keys[i] for i in row_index.tolist()]
        orders = self.forecast_orders(rows, row_index, block, component)
        steps = rows.steps if row_index is None else rows.steps[row_index]
        if isinstance(orders, int):
            return cache.gather(keys) if orders == 0 else cache.forecast(keys, steps, orders)
        parts = []
        for order in sorted(set(orders)):
            index = torch.tensor([i for i, o in enumerate(orders) if o == order])
            chosen = [keys[i] for i in index.tolist()]
            parts.append((index, cache.gather(chosen) if order == 0 else cache.forecast(chosen, steps[index], order)))
        return merge_rows(parts, len(keys))

    def observe(self, rows: StepRows, block: int, component: int, mode: str, value: Any) -> None:
        """Hand what `rows` just computed to the plans that watch (runtime policies); `value` is row-aligned.

        A plan sees only the hooks of its own mode: a block-mode policy reads block residuals, never the component
        outputs computed inside a block for rows of component-mode plans.
        """
        if not self.has_observers:
            return
        for group in rows.groups or self.groups_of(rows):
            observe = group.compiled.observe
            if observe is not None and group.compiled.mode == mode:
                observe(group.rows, block, component, value if group.index is None else take_rows(value, group.index))

    # -------------------------------------------------------------- the forward pass lifecycle
    def current_rows(self) -> StepRows | None:
        """The rows of the forward in progress in this thread or task (None outside one)."""
        return self._rows.get()

    def begin(self, rows: StepRows) -> StepRows:
        """Start a forward: bind the rows to this session's request states, check their plans, drop stale caches."""
        rows = rows.for_forward(self.request_states)
        groups = self.groups_of(rows)
        if len(groups) == 1 and rows.uniform_step is not None and not self.has_observers:
            computes_all = groups[0].compiled.computes_all
            rows.computes_all = computes_all is not None and computes_all[rows.uniform_step]
        starting = rows.starting()
        if starting:
            self.release(starting)  # leftovers of an interrupted generation under the same key
        if self.has_observers and self._explicit.get() is not None:
            # a runner may retry this forward's rows if it fails: keep what the policies knew before it
            states = self.request_states
            rows.scratch[_STATES_BEFORE] = {k: dict(states[k]) for k in rows.keys if k in states}
        return rows

    def end(self, rows: StepRows) -> None:
        finished = rows.finishing()
        if finished:
            self.release(finished)

    def fail(self, rows: StepRows) -> None:
        """The forward raised. A pipeline call is over: the caches of all its rows (every branch) are freed.

        Rows that the caller declared (`cachekit.rows`, the runner) stay theirs to retry or release. Their caches
        hold only values of finished computations (a retried step stores its values again, replacing them), and
        the runtime policies' request states are put back as they were before the forward, so a retry of the same
        step decides and computes exactly as the failed forward would have.
        """
        if self._explicit.get() is None:
            self.end_call()
            return
        before = rows.scratch.get(_STATES_BEFORE)
        if before is not None:
            states = self.request_states
            for key in rows.keys:
                if key in before:
                    states[key] = before[key]
                else:
                    states.pop(key, None)

    @contextmanager
    def declare_rows(self, rows: StepRows) -> Iterator[None]:
        token = self._explicit.set(rows)
        try:
            yield
        finally:
            self._explicit.reset(token)

    @contextmanager
    def branch(self, label: Hashable) -> Iterator[None]:
        token = self._branch.set(label)
        try:
            yield
        finally:
            self._branch.reset(token)

    # -------------------------------------------------------------- working out the rows
    def resolve_rows(self, batch_size: int, timestep: Callable[[], Any], context: Any) -> StepRows:
        """Per-row steps and keys for this forward, from explicit state first, never from counting calls."""
        explicit = self._explicit.get()
        if explicit is not None:
            if explicit.batch_size != batch_size:
                raise ValueError(
                    f"cachekit.rows() set {explicit.batch_size} rows but the transformer got a batch of {batch_size}")
            return explicit
        label = getattr(context, "name", None) if context is not None else self._branch.get()
        step_index = getattr(context, "step_index", None)
        if step_index is not None:
            num_steps = getattr(context, "num_inference_steps", None)
            if num_steps is None:
                num_steps = scheduler_timesteps(self.scheduler).numel()
            label = self._branch_of_repeat(label, (int(step_index),))
            return StepRows.uniform(step_index, batch_size, int(num_steps), label)
        values = row_timesteps(timestep(), batch_size, self.spec.timestep_scale)
        steps, num_steps = match_steps(values, self.scheduler)
        label = self._branch_of_repeat(label, tuple(torch.as_tensor(steps).reshape(-1).tolist()))
        return StepRows(steps, tuple(CallRowKey(label, i) for i in range(batch_size)), num_steps)

    def _branch_of_repeat(self, label: Hashable, steps: tuple[int, ...]) -> Hashable:
        """The branch of a forward whose caller named none beyond `label`: a repeat of the last call's steps is
        another branch.

        Some stock pipelines (Chroma, ChronoEdit, GLM-Image, Krea 2, ...) run CFG as two transformer calls per step
        with neither batched rows nor a `cache_context` name. Both calls would get the same implicit keys and serve
        each other's caches; the second call at the same step under the same label is keyed apart instead. The
        step itself still comes from explicit state or the timestep, and a repeat for any other reason (a
        second-order solver's second evaluation) only keeps a cache of its own, which is always safe.
        """
        log = self._call_log.get()
        if log is None:
            log = {}
            self._call_log.set(log)
        last = log.get(label)
        repeat = last[1] + 1 if last is not None and last[0] == steps else 0
        log[label] = (steps, repeat)
        return label if repeat == 0 else (label, repeat)


_UNCACHED = _Compiled(None, 1)

# what a caching hook does with one call (`_RowCachingHook._plan`); compared by identity
_PASS, _SERVED, _ALL, _SOME = (object() for _ in range(4))
_PASS_JOB = (_PASS,)


class StepTrackerHook(ModelHook):
    """Transformer-level hook: sets the rows of each forward and ends cache lifetimes."""

    _is_stateful = True

    def __init__(self, session: CacheSession) -> None:
        super().__init__()
        self.session = session
        self.cache_context = CacheContextReceiver()
        self._signature: inspect.Signature | None = None

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self._signature = inspect.signature(type(module).forward)
        return module

    def _timestep(self, args: tuple, kwargs: dict) -> Any:
        name = self.session.spec.timestep_arg
        if name in kwargs:
            return kwargs[name]
        bound = self._signature.bind_partial(None, *args, **kwargs)
        return bound.arguments.get(name)

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # dynamo is tracing: track in eager Python, compile the model's forward
            return _tracked_forward_under_compile(self, args, kwargs)
        rows, token = self._start(args, kwargs)
        try:
            output = self.fn_ref.original_forward(*args, **kwargs)
        except BaseException:
            self._abort(rows, token)
            raise
        self._finish(rows, token)
        return output

    def _start(self, args: tuple, kwargs: dict) -> tuple[StepRows, contextvars.Token | None]:
        """Work out this forward's rows; the token is None when every row is uncached (nothing for the inner
        hooks to decide or store, so they see no rows and pass straight through: a runner serving requests
        without a plan)."""
        session = self.session
        declared = session.resolve_rows(_batch_size(args, kwargs), lambda: self._timestep(args, kwargs),
                                        self.cache_context.current)
        rows = session.begin(declared)
        if all(group.compiled.plan is None for group in session.groups_of(rows)):
            return rows, None
        return rows, session._rows.set(rows)

    def _abort(self, rows: StepRows, token: contextvars.Token | None) -> None:
        if token is not None:
            self.session.fail(rows)
            self.session._rows.reset(token)

    def _finish(self, rows: StepRows, token: contextvars.Token | None) -> None:
        if token is not None:
            self.session._rows.reset(token)
        self.session.end(rows)

    def reset_state(self, module: nn.Module) -> nn.Module:
        """Called by diffusers at the end of every pipeline `__call__`: that call's generation is over."""
        self.session.end_call()
        return module


def _batch_size(args: tuple, kwargs: dict) -> int:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor):
        raise RuntimeError("cachekit expects the transformer's first argument to be the batched hidden_states")
    return int(hidden.shape[0])


class _RowCachingHook(ModelHook):
    """Shared machinery: decide per row, compute some rows, serve the rest, scatter them back together."""

    serve_needs_inputs = False
    mode = "component"

    def __init__(self, session: CacheSession, block: int, component: int, name: str, unbatched: frozenset[str]):
        super().__init__()
        self.session = session
        self.block = block
        self.component = component
        self.name = name
        self.unbatched = unbatched
        self.cache = session.new_cache()
        self._signature: inspect.Signature | None = None
        self._positional_names: list[str] = []
        self._var_positional: str | None = None

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self._signature = inspect.signature(type(module).forward)
        parameters = list(self._signature.parameters.values())[1:]  # self excluded
        self._positional_names = [p.name for p in parameters
                                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        self._var_positional = next((p.name for p in parameters if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
        return module

    # what to store and how to serve it: overridden by the two modes
    def _cache_value(self, args: tuple, kwargs: dict, output: Any) -> Any:
        return output

    def _serve(self, args: tuple, kwargs: dict, cached: Any) -> Any:
        return cached

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # dynamo is tracing: decide in eager Python, compile the module's work
            return _row_forward_under_compile(self, args, kwargs)
        job = self._plan(args, kwargs)
        kind = job[0]
        if kind is _PASS:
            return self.fn_ref.original_forward(*args, **kwargs)
        if kind is _SERVED:
            return job[1]
        if kind is _ALL:
            output = self.fn_ref.original_forward(*args, **kwargs)
            if job[2]:
                self._store_all(job[1], args, kwargs, output)
            return output
        _, rows, computing, c_args, c_kwargs = job[:5]
        token = self.session._rows.set(computing)  # inner hooks see the computing rows alone
        try:
            computed = self.fn_ref.original_forward(*c_args, **c_kwargs)
        finally:
            self.session._rows.reset(token)
        return self._merge_some(job, args, kwargs, computed)

    def _plan(self, args: tuple, kwargs: dict) -> tuple:
        """What this call does: `(_PASS,)`, `(_SERVED, value)`, `(_ALL, rows, store?)` or `(_SOME, rows, computing
        rows, their args, their kwargs, compute index, reuse index, batch size)`.

        Split from the module's own forward so that under `torch.compile` this bookkeeping runs in eager Python
        (`torch.compiler.disable`) while the module's forward, called between `_plan` and `_store_all` /
        `_merge_some`, is compiled.
        """
        session = self.session
        rows = session._rows.get()
        if rows is None:  # called outside a tracked transformer forward: behave like the stock module
            return _PASS_JOB
        batch = rows.batch_size
        if rows.computes_all:  # decided for the whole forward when it began
            session.stats.record(self.name, batch, 0)
            return _PASS_JOB
        cache = self.cache
        decision = session.decide(rows, self.block, self.component, self.mode)
        if isinstance(decision, bool):
            compute = None
            n_compute = batch if decision else 0
        else:
            compute = decision
            n_compute = int(compute.sum())
            if n_compute in (0, batch):
                compute = None
        missed = False
        if n_compute < batch:
            reuse_keys = rows.keys if compute is None else [k for k, c in zip(rows.keys, compute.tolist()) if not c]
            if not cache.has(reuse_keys):  # nothing to reuse yet (e.g. a request joined mid-way): compute
                session.stats.misses += len(reuse_keys)
                compute, n_compute, missed = None, batch, True
        session.stats.record(self.name, n_compute, batch - n_compute)

        if n_compute == batch:
            store = missed or session.has_observers or session.keeps(rows, self.block, self.component, self.mode)
            return (_ALL, rows, store)
        if n_compute == 0:
            return (_SERVED, self._serve(args, kwargs, session.serve(cache, rows, None, self.block, self.component)))
        compute_rows = compute.nonzero().flatten()
        reuse_rows = (~compute).nonzero().flatten()
        c_args, c_kwargs = self._take_input_rows(args, kwargs, compute_rows, batch)
        return (_SOME, rows, rows.subset(compute_rows), c_args, c_kwargs, compute_rows, reuse_rows, batch)

    def _store_all(self, rows: StepRows, args: tuple, kwargs: dict, output: Any) -> None:
        """Every row computed: keep what a later step reads, and show it to the watching policies."""
        value = self._cache_value(args, kwargs, output)
        self.cache.store(rows.keys, value, rows.step_list)
        self.session.observe(rows, self.block, self.component, self.mode, value)

    def _merge_some(self, job: tuple, args: tuple, kwargs: dict, computed: Any) -> Any:
        """Some rows computed (`computed`): store them, serve the others, and put the batch back in row order."""
        _, rows, computing, c_args, c_kwargs, compute_rows, reuse_rows, batch = job
        session = self.session
        value = self._cache_value(c_args, c_kwargs, computed)
        self.cache.store(computing.keys, value, computing.step_list)
        session.observe(computing, self.block, self.component, self.mode, value)
        cached = session.serve(self.cache, rows, reuse_rows, self.block, self.component)
        if self.serve_needs_inputs:
            r_args, r_kwargs = self._take_input_rows(args, kwargs, reuse_rows, batch)
            served = self._serve(r_args, r_kwargs, cached)
        else:
            served = cached
        return merge_rows([(compute_rows, computed), (reuse_rows, served)], batch)

    def _take_input_rows(self, args: tuple, kwargs: dict, index: torch.Tensor, batch_size: int) -> tuple[tuple, dict]:
        """Slice every batched input to the given rows; broadcast inputs (rotary embeddings, size-1) pass whole.

        Arguments are matched to parameter names by position, never by binding the signature: this runs on every
        partly reused module of the runner's mixed-step batches, where binding cost more than the sliced work.
        """
        unbatched = self.unbatched

        def rows_of(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.ndim > 0 and tensor.shape[0] == batch_size:
                return tensor.index_select(0, index.to(tensor.device))
            return tensor

        names = itertools.chain(self._positional_names, itertools.repeat(self._var_positional))
        new_args = tuple(value if name in unbatched else map_tensors(rows_of, value)
                         for name, value in zip(names, args))
        new_kwargs = {name: value if name in unbatched else map_tensors(rows_of, value)
                      for name, value in kwargs.items()}
        return new_args, new_kwargs


class ComponentCacheHook(_RowCachingHook):
    """Reuse a component's raw output from the last step where it was computed (ECAD)."""


class BlockResidualHook(_RowCachingHook):
    """Reuse a whole block's residual `output - input`, added to the live input (FORA, Delta-DiT).

    The cached value holds one residual per stream with the image stream (`hidden_states`) last, whichever order
    the block returns them in (FLUX returns the text stream first, HunyuanVideo and CogView4 last): the runtime
    policies read the last one as their signal, and must not judge the text stream.
    """

    serve_needs_inputs = True
    mode = "block"

    def __init__(self, *args: Any, residual_outputs: tuple[str, ...], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.residual_outputs = residual_outputs
        self._positions: list[int | None] = []
        image = residual_outputs.index("hidden_states") if "hidden_states" in residual_outputs else -1
        order = list(range(len(residual_outputs)))
        if image >= 0:
            order.append(order.pop(image))
        self._stored_order = tuple(order)  # output position of each stored residual
        self._reordered = self._stored_order != tuple(range(len(residual_outputs)))

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        module = super().initialize_hook(module)
        # where each residual input sits among the positional arguments (self excluded): read it directly on every
        # call, since binding the signature costs more than a reused block's whole work on small models
        names = self._positional_names
        self._positions = [names.index(name) if name in names else None for name in self.residual_outputs]
        return module

    def _inputs(self, args: tuple, kwargs: dict) -> list[Any]:
        inputs = []
        for name, position in zip(self.residual_outputs, self._positions):
            if name in kwargs:
                inputs.append(kwargs[name])
            elif position is not None and position < len(args):
                inputs.append(args[position])
            else:  # not passed (e.g. FLUX single blocks have no encoder stream): nothing to add a residual to
                inputs.append(None)
        return inputs

    def _as_tuple(self, output: Any) -> tuple:
        return output if isinstance(output, tuple) else (output,)

    def _cache_value(self, args: tuple, kwargs: dict, output: Any) -> Any:
        outputs = self._as_tuple(output)
        if len(outputs) != len(self.residual_outputs):
            raise RuntimeError(
                f"{self.name} returned {len(outputs)} outputs but its registry entry names {self.residual_outputs}"
            )
        residuals = tuple(
            None if out is None or inp is None else out - inp for out, inp in zip(outputs, self._inputs(args, kwargs))
        )
        return tuple(residuals[i] for i in self._stored_order) if self._reordered else residuals

    def _serve(self, args: tuple, kwargs: dict, cached: Any) -> Any:
        if self._reordered:  # back to the block's own output order
            by_output: list[Any] = [None] * len(cached)
            for residual, position in zip(cached, self._stored_order):
                by_output[position] = residual
            cached = by_output
        served = tuple(
            None if res is None or inp is None else inp + res for res, inp in zip(cached, self._inputs(args, kwargs))
        )
        return served if len(served) > 1 else served[0]


class FeederSkipHook(ModelHook):
    """On a module whose output only one component reads (the registry's `feeders`): when every row reuses that
    component, return (a view of) the input instead of computing. The value is never read; its shape only has to
    let the block's live modulation between it and the component run. Where the registry says that modulation
    broadcasts (`feeders_broadcast`), the view is one token per row, so the modulation costs one token too."""

    def __init__(self, session: CacheSession, component_hook: ComponentCacheHook, broadcast: bool = False) -> None:
        super().__init__()
        self.session = session
        self.component_hook = component_hook
        self.broadcast = broadcast

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return _feeder_forward_under_compile(self, args, kwargs)
        if self.skips(args):
            return self.placeholder(args[0])
        return self.fn_ref.original_forward(*args, **kwargs)

    def placeholder(self, hidden: Any) -> Any:
        """What a skipped feeder returns: its input, cut to the first token where the modulation broadcasts."""
        if self.broadcast and isinstance(hidden, torch.Tensor) and hidden.ndim >= 3:
            return hidden[:, :1]
        return hidden

    def skips(self, args: tuple) -> bool:
        rows = self.session._rows.get()
        hook = self.component_hook
        return (rows is not None and not rows.computes_all and bool(args)
                and self.session.reuses_all(rows, hook.block, hook.component, hook.cache))


class _FirstInputProbe(ModelHook):
    """Read-only: records the first block's first component input per row (TeaCache's modulated input)."""

    def __init__(self, session: CacheSession) -> None:
        super().__init__()
        self.session = session

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if torch.compiler.is_compiling():
            return _probe_under_compile(self, module, args, kwargs)
        return self.record(module, args, kwargs)

    def record(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        rows = self.session.current_rows()
        hidden = args[0] if args else kwargs.get("hidden_states")
        if rows is not None and isinstance(hidden, torch.Tensor) and hidden.shape[0] == rows.batch_size:
            rows.scratch.setdefault(FIRST_INPUT, {}).update(zip(rows.keys, hidden.detach()))
        return args, kwargs


# ---------------------------------------------------------------------- under torch.compile
# When dynamo traces into a cachekit hook (a compiled transformer, or a compiled block), the hook hands over to one of
# the functions below. Their own frame is skipped (`compat.eager_frame`), so dynamo breaks the graph there
# instead of tracing the bookkeeping (step indices, dicts keyed by request, per-row decisions), which would
# specialise every graph on the step and recompile at each one. The bookkeeping helpers they call are disabled
# entirely and run in eager Python; the module's own forward they call is compiled as its own frame, with the
# compile settings in force. Only that forward is compiled, so the graphs depend on tensor shapes alone: a plain
# pipeline call compiles each distinct piece once, whatever the schedule and the step count.

@torch.compiler.disable
def _eager(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


@eager_frame
def _row_forward_under_compile(hook: _RowCachingHook, args: tuple, kwargs: dict) -> Any:
    job = _eager(hook._plan, args, kwargs)
    kind = job[0]
    forward = hook.fn_ref.original_forward
    if kind is _PASS:
        return forward(*args, **kwargs)
    if kind is _SERVED:
        return job[1]
    if kind is _ALL:
        output = forward(*args, **kwargs)
        if job[2]:
            _eager(hook._store_all, job[1], args, kwargs, output)
        return output
    rows_var = hook.session._rows
    token = rows_var.set(job[2])
    try:
        computed = forward(*job[3], **job[4])
    finally:
        rows_var.reset(token)
    return _eager(hook._merge_some, job, args, kwargs, computed)


@eager_frame
def _tracked_forward_under_compile(hook: StepTrackerHook, args: tuple, kwargs: dict) -> Any:
    rows, token = _eager(hook._start, args, kwargs)
    try:
        output = hook.fn_ref.original_forward(*args, **kwargs)
    except BaseException:
        _eager(hook._abort, rows, token)
        raise
    _eager(hook._finish, rows, token)
    return output


@eager_frame
def _feeder_forward_under_compile(hook: FeederSkipHook, args: tuple, kwargs: dict) -> Any:
    if _eager(hook.skips, args):
        return hook.placeholder(args[0])
    return hook.fn_ref.original_forward(*args, **kwargs)


@torch.compiler.disable
def _probe_under_compile(hook: _FirstInputProbe, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return hook.record(module, args, kwargs)


def attach_input_probe(transformer: nn.Module, session: CacheSession) -> None:
    """Watch the input of the first block's first component: the modulated input on PixArt, FLUX, Wan, SD3."""
    layout = resolve_layout(transformer, "component")
    first = layout.blocks[0]
    name = next(c for i, c in enumerate(layout.components) if bool(layout.present[0, i]))
    hook_registry(getattr(first.module, name)).register_hook(_FirstInputProbe(session), PROBE_HOOK)
    hook_registry(transformer).invalidate_child_registries_cache()


def attach_hooks(transformer: nn.Module, session: CacheSession) -> None:
    """Register the tracker on the transformer, and a cache hook per block and/or component as the modes say."""
    registry = hook_registry(transformer)
    registry.register_hook(StepTrackerHook(session), STEP_TRACKER_HOOK)
    unbatched = session.spec.unbatched_args
    if "block" in session.modes:
        for ref in session.layouts["block"].blocks:
            hook = BlockResidualHook(session, ref.index, 0, ref.path, unbatched,
                                     residual_outputs=ref.group.residual_outputs)
            hook_registry(ref.module).register_hook(hook, CACHE_HOOK)
    if "component" in session.modes:
        layout = session.layouts["component"]
        for ref in layout.blocks:
            for c, name in enumerate(layout.components):
                if bool(layout.present[ref.index, c]):
                    hook = ComponentCacheHook(session, ref.index, c, f"{ref.path}.{name}", unbatched)
                    hook_registry(getattr(ref.module, name)).register_hook(hook, CACHE_HOOK)
                    for feeder_name in ref.group.feeders_of(name):
                        feeder = getattr(ref.module, feeder_name, None)
                        if isinstance(feeder, nn.Module) and not isinstance(feeder, nn.Identity):
                            skip = FeederSkipHook(session, hook, broadcast=ref.group.feeders_broadcast)
                            hook_registry(feeder).register_hook(skip, FEEDER_HOOK)
    if getattr(session.plan, "needs_input_probe", False):
        attach_input_probe(transformer, session)
        session._probe_attached = True
    registry.invalidate_child_registries_cache()


def detach_hooks(transformer: nn.Module) -> None:
    registry = hook_registry(transformer)
    registry.remove_hook(STEP_TRACKER_HOOK, recurse=False)
    for module in transformer.modules():
        child = existing_registry(module)
        if child is not None:
            child.remove_hook(CACHE_HOOK, recurse=False)
            child.remove_hook(PROBE_HOOK, recurse=False)
            child.remove_hook(FEEDER_HOOK, recurse=False)
    registry.invalidate_child_registries_cache()


def session_of(transformer: nn.Module) -> CacheSession | None:
    registry = existing_registry(transformer)
    hook = registry.get_hook(STEP_TRACKER_HOOK) if registry is not None else None
    return hook.session if hook is not None else None
