"""Hooks that serve transformer sub-modules from cache, on diffusers' own `HookRegistry`.

Three pieces, in diffusers' hooks shape:

- `CacheSession`: the state one enabled transformer shares between its hooks: the plan (a `Schedule`, or later a
  runtime policy), the per-row caches, and the rows of the forward pass in progress.
- `StepTrackerHook` on the transformer: before every forward it works out, per batch row, the denoising step and the
  cache key, from explicit state (the streaming runner's rows, or the step index diffusers pipelines put in
  `cache_context`) or else from the `timestep` argument matched against the scheduler's timesteps. It never counts
  calls. It frees the caches when a generation ends, and when the forward raises.
- `ComponentCacheHook` on each cacheable sub-module (ECAD semantics: reuse the raw output; the block's gates, shifts
  and residual stream stay live) and `BlockResidualHook` on whole blocks (FORA / Delta-DiT semantics: reuse the
  block's residual `output - input`). Rows that compute run alone when others reuse, and results are scattered
  back among the cached ones.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Hashable
from typing import Any, Protocol

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from torch import nn

from .registry import ModelLayout, ModelSpec
from .schedule import ScheduleError
from .state import CacheStats, RowCache, StepRows, map_tensors, merge_rows

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
]

logger = logging.getLogger(__name__)

STEP_TRACKER_HOOK = "cachekit.step_tracker"
CACHE_HOOK = "cachekit.cache"
PROBE_HOOK = "cachekit.probe"  # runtime policies' read-only observers


class CachePlan(Protocol):
    """What the hooks ask of a schedule or a runtime policy: compute this component for which rows?

    `Schedule` is the static plan. Runtime policies (TeaCache, MagCache, first-block cache) also implement the
    optional `RuntimePlan` methods to watch what the model computes and keep per-request state.
    """

    mode: str  # "component" or "block"
    num_steps: int | None  # None: the plan works at any step count

    def decide(self, rows: StepRows, block: int, component: int) -> bool | torch.Tensor: ...


class RuntimePlan(CachePlan, Protocol):
    def attach(self, transformer: nn.Module, session: "CacheSession") -> None: ...

    def detach(self, transformer: nn.Module) -> None: ...

    def observe(self, rows: StepRows, block: int, component: int, row_index: torch.Tensor | None, value: Any) -> None:
        """Called after `component` of `block` computed: `value` is what was cached, for `row_index` rows (None: all)."""

    def drop(self, keys: tuple[Hashable, ...]) -> None: ...


class CacheSession:
    """State shared by all cachekit hooks of one transformer."""

    def __init__(self, plan: CachePlan, layout: ModelLayout, spec: ModelSpec, scheduler: Any | None = None) -> None:
        self.plan = plan
        self.layout = layout
        self.spec = spec
        self.scheduler = scheduler
        self.caches: dict[tuple[int, int], RowCache] = {}
        self.stats = CacheStats()
        self.current: StepRows | None = None
        self.explicit_rows: StepRows | None = None
        self.branch_label: Hashable = None
        recompute = getattr(plan, "recompute", None)
        self._table = recompute.tolist() if isinstance(recompute, torch.Tensor) else None
        self._observe = getattr(plan, "observe", None)
        forecast = getattr(plan, "forecast", None)
        self.forecast_order = int(getattr(plan, "forecast_order", 0)) if forecast is not None else 0
        self._forecast = forecast.tolist() if forecast is not None else None
        self._forecast_mask = forecast

    def forecast_rows(self, rows: StepRows, row_index: torch.Tensor | None, block: int, component: int) -> Any:
        """For the reusing rows (`row_index`; None: all), which ones extrapolate instead of reusing: bool or tensor."""
        if self._forecast is None:
            return False
        if rows.uniform_step is not None:
            return self._forecast[rows.uniform_step][block][component]
        steps = rows.steps if row_index is None else rows.steps[row_index]
        return self._forecast_mask[steps, block, component]

    def serve(self, cache: RowCache, rows: StepRows, row_index: torch.Tensor | None, block: int, component: int) -> Any:
        """Cached values for reusing rows: plain reuse, or a forecast where the schedule says so."""
        keys = rows.keys if row_index is None else [rows.keys[i] for i in row_index.tolist()]
        forecast = self.forecast_rows(rows, row_index, block, component)
        if forecast is False or (isinstance(forecast, torch.Tensor) and not bool(forecast.any())):
            return cache.gather(keys)
        steps = rows.steps if row_index is None else rows.steps[row_index]
        if forecast is True or bool(forecast.all()):
            return cache.forecast(keys, steps, self.forecast_order)
        f_rows, r_rows = forecast.nonzero().flatten(), (~forecast).nonzero().flatten()
        parts = [
            (f_rows, cache.forecast([keys[i] for i in f_rows.tolist()], steps[f_rows], self.forecast_order)),
            (r_rows, cache.gather([keys[i] for i in r_rows.tolist()])),
        ]
        return merge_rows(parts, len(keys))

    def decide(self, rows: StepRows, block: int, component: int) -> bool | torch.Tensor:
        """True / False for the whole batch when that is known cheaply, else a per-row bool tensor."""
        if rows.uniform_step is not None and self._table is not None:
            return self._table[rows.uniform_step][block][component]
        return self.plan.decide(rows, block, component)

    def observe(self, block: int, component: int, row_index: torch.Tensor | None, value: Any) -> None:
        if self._observe is not None:
            self._observe(self.current, block, component, row_index, value)

    def cache_for(self, block: int, component: int) -> RowCache:
        key = (block, component)
        if key not in self.caches:
            self.caches[key] = RowCache(depth=self.forecast_order + 1)
        return self.caches[key]

    @property
    def cached_entries(self) -> int:
        """How many row entries are alive across all caches (0 after a generation ends)."""
        return sum(len(cache) for cache in self.caches.values())

    def drop(self, keys: tuple[Hashable, ...]) -> None:
        for cache in self.caches.values():
            cache.drop(keys)
        plan_drop = getattr(self.plan, "drop", None)
        if plan_drop is not None:
            plan_drop(keys)

    def clear(self) -> None:
        for cache in self.caches.values():
            cache.clear()
        plan_clear = getattr(self.plan, "clear", None)
        if plan_clear is not None:
            plan_clear()
        self.current = None

    # -------------------------------------------------------------- the forward pass lifecycle
    def begin(self, rows: StepRows) -> None:
        self.plan_steps_check(rows.num_steps)
        starting = tuple(key for key, step in zip(rows.keys, rows.steps.tolist()) if step == 0)
        if starting:
            self.drop(starting)  # leftovers of an interrupted generation under the same key
        self.current = rows

    def end(self, rows: StepRows) -> None:
        self.current = None
        finished = tuple(key for key, step in zip(rows.keys, rows.steps.tolist()) if step >= rows.num_steps - 1)
        if finished:
            self.drop(finished)

    def plan_steps_check(self, num_steps: int) -> None:
        if self.plan.num_steps is not None and num_steps != self.plan.num_steps:
            check = getattr(self.plan, "check_steps", None)
            if check is not None:
                check(num_steps)
            raise ScheduleError(f"plan has {self.plan.num_steps} steps but the pipeline runs {num_steps}")

    # -------------------------------------------------------------- working out the rows
    def resolve_rows(self, batch_size: int, timestep: Any, context: Any) -> StepRows:
        """Per-row steps and keys for this forward, from explicit state first, never from call counts."""
        if self.explicit_rows is not None:
            if self.explicit_rows.batch_size != batch_size:
                raise ValueError(
                    f"cachekit.rows() set {self.explicit_rows.batch_size} rows but the transformer got a batch of "
                    f"{batch_size}"
                )
            return self.explicit_rows
        label = getattr(context, "name", None) if context is not None else self.branch_label
        step_index = getattr(context, "step_index", None)
        num_steps = getattr(context, "num_inference_steps", None)
        if step_index is not None:
            if num_steps is None:
                num_steps = self._scheduler_timesteps().numel()
            return StepRows.uniform(step_index, batch_size, int(num_steps), label)
        steps, num_steps = self._steps_from_timestep(timestep, batch_size)
        return StepRows(steps, tuple((label, i) for i in range(batch_size)), num_steps)

    def _scheduler_timesteps(self) -> torch.Tensor:
        timesteps = getattr(self.scheduler, "timesteps", None)
        if timesteps is None:
            raise RuntimeError(
                "cachekit cannot tell the denoising step: enable it on the pipeline (not the bare transformer), pass "
                "scheduler= to cachekit.enable, or set rows explicitly with cachekit.rows(...)"
            )
        return torch.as_tensor(timesteps).detach().float().cpu()

    def _steps_from_timestep(self, timestep: Any, batch_size: int) -> tuple[torch.Tensor, int]:
        timesteps = self._scheduler_timesteps()
        if timestep is None:
            raise RuntimeError(f"the transformer was called without its {self.spec.timestep_arg!r} argument")
        values = torch.as_tensor(timestep).detach().float().cpu() * self.spec.timestep_scale
        if values.ndim == 0:
            values = values.expand(batch_size)
        elif values.ndim > 1:  # per-token timesteps (Wan 2.2 TI2V): the row's step is its largest timestep
            values = values.flatten(1).amax(1)
        if values.shape[0] != batch_size:
            values = values[:1].expand(batch_size)
        distance = (values[:, None] - timesteps[None, :]).abs()
        steps = distance.argmin(1)
        distinct = timesteps.unique()
        spacing = (distinct[1:] - distinct[:-1]).abs().min().item() if distinct.numel() > 1 else 1.0
        worst = distance.gather(1, steps[:, None]).max().item()
        if worst > 0.5 * spacing:
            raise RuntimeError(
                f"timestep {values.tolist()} is not one of the scheduler's timesteps; if the pipeline rescales "
                f"timesteps, set timestep_scale in its cachekit registry entry"
            )
        if distinct.numel() < timesteps.numel():  # repeated timesteps (2nd-order solvers): ask the scheduler
            step_index = getattr(self.scheduler, "step_index", None)
            steps = torch.full_like(steps, int(step_index or 0))
        return steps.long(), timesteps.numel()


class _CacheContextProbe(StateManager):
    """Receives the `CacheContext` diffusers pipelines set with `transformer.cache_context(name, step_index=...)`."""

    def __init__(self) -> None:
        super().__init__(BaseState)

    @property
    def current(self) -> Any:
        return self._context


class StepTrackerHook(ModelHook):
    """Transformer-level hook: sets the rows of each forward and ends cache lifetimes."""

    _is_stateful = True

    def __init__(self, session: CacheSession) -> None:
        super().__init__()
        self.session = session
        self.cache_context = _CacheContextProbe()
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
        batch_size = _batch_size(args, kwargs)
        rows = self.session.resolve_rows(batch_size, self._timestep(args, kwargs), self.cache_context.current)
        try:
            self.session.begin(rows)
            output = self.fn_ref.original_forward(*args, **kwargs)
        except BaseException:
            self.session.clear()
            raise
        self.session.end(rows)
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        """Called by diffusers at the end of every pipeline `__call__`: the generation is over."""
        self.session.clear()
        return module


def _batch_size(args: tuple, kwargs: dict) -> int:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor):
        raise RuntimeError("cachekit expects the transformer's first argument to be the batched hidden_states")
    return int(hidden.shape[0])


class _RowCachingHook(ModelHook):
    """Shared machinery: decide per row, compute some rows, serve the rest, scatter them back together."""

    serve_needs_inputs = False

    def __init__(self, session: CacheSession, block: int, component: int, name: str, unbatched: frozenset[str]):
        super().__init__()
        self.session = session
        self.block = block
        self.component = component
        self.name = name
        self.unbatched = unbatched
        self._signature: inspect.Signature | None = None

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self._signature = inspect.signature(type(module).forward)
        return module

    # what to store and how to serve it: overridden by the two modes
    def _cache_value(self, args: tuple, kwargs: dict, output: Any) -> Any:
        return output

    def _serve(self, args: tuple, kwargs: dict, cached: Any) -> Any:
        return cached

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        rows = self.session.current
        if rows is None:  # called outside a tracked transformer forward: behave like the stock module
            return self.fn_ref.original_forward(*args, **kwargs)
        session = self.session
        cache = session.cache_for(self.block, self.component)
        decision = session.decide(rows, self.block, self.component)
        if isinstance(decision, bool):
            compute = None
            n_compute = rows.batch_size if decision else 0
        else:
            compute = decision
            n_compute = int(compute.sum())
            if n_compute in (0, rows.batch_size):
                compute = None
        if n_compute < rows.batch_size:
            reuse_keys = rows.keys if compute is None else [k for k, c in zip(rows.keys, compute.tolist()) if not c]
            if not cache.has(reuse_keys):  # nothing to reuse yet (e.g. a request joined mid-way): compute
                session.stats.misses += len(reuse_keys)
                compute, n_compute = None, rows.batch_size
        session.stats.record(self.name, n_compute, rows.batch_size - n_compute)

        if n_compute == rows.batch_size:
            output = self.fn_ref.original_forward(*args, **kwargs)
            value = self._cache_value(args, kwargs, output)
            cache.store(rows.keys, value, rows.step_list)
            session.observe(self.block, self.component, None, value)
            return output
        if n_compute == 0:
            return self._serve(args, kwargs, session.serve(cache, rows, None, self.block, self.component))

        compute_rows = compute.nonzero().flatten()
        reuse_rows = (~compute).nonzero().flatten()
        c_args, c_kwargs = self._take_input_rows(args, kwargs, compute_rows, rows.batch_size)
        computed = self.fn_ref.original_forward(*c_args, **c_kwargs)
        value = self._cache_value(c_args, c_kwargs, computed)
        cache.store([rows.keys[i] for i in compute_rows.tolist()], value, [rows.step_list[i] for i in compute_rows.tolist()])
        session.observe(self.block, self.component, compute_rows, value)
        cached = session.serve(cache, rows, reuse_rows, self.block, self.component)
        if self.serve_needs_inputs:
            r_args, r_kwargs = self._take_input_rows(args, kwargs, reuse_rows, rows.batch_size)
            served = self._serve(r_args, r_kwargs, cached)
        else:
            served = cached
        return merge_rows([(compute_rows, computed), (reuse_rows, served)], rows.batch_size)

    def _take_input_rows(self, args: tuple, kwargs: dict, index: torch.Tensor, batch_size: int) -> tuple[tuple, dict]:
        """Slice every batched input to the given rows; broadcast inputs (rotary embeddings, size-1) pass whole."""
        bound = self._signature.bind(None, *args, **kwargs)
        bound.arguments.pop(next(iter(bound.arguments)))  # self

        def rows_of(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.ndim > 0 and tensor.shape[0] == batch_size:
                return tensor.index_select(0, index.to(tensor.device))
            return tensor

        sliced: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = self._signature.parameters[name].kind
            if name in self.unbatched:
                sliced[name] = value
            elif kind is inspect.Parameter.VAR_KEYWORD:
                sliced[name] = {k: (v if k in self.unbatched else map_tensors(rows_of, v)) for k, v in value.items()}
            else:
                sliced[name] = map_tensors(rows_of, value)
        new_args: list[Any] = []
        new_kwargs: dict[str, Any] = {}
        for name, value in sliced.items():
            kind = self._signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                new_args.extend(value)
            elif kind is inspect.Parameter.VAR_KEYWORD:
                new_kwargs.update(value)
            elif kind is inspect.Parameter.POSITIONAL_ONLY:
                new_args.append(value)
            else:
                new_kwargs[name] = value
        return tuple(new_args), new_kwargs


class ComponentCacheHook(_RowCachingHook):
    """Reuse a component's raw output from the last step where it was computed (ECAD)."""


class BlockResidualHook(_RowCachingHook):
    """Reuse a whole block's residual `output - input`, added to the live input (FORA, Delta-DiT)."""

    serve_needs_inputs = True

    def __init__(self, *args: Any, residual_outputs: tuple[str, ...], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.residual_outputs = residual_outputs
        self._positions: list[int | None] = []

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        module = super().initialize_hook(module)
        # where each residual input sits among the positional arguments (self excluded): read it directly on every
        # call, since binding the signature costs more than a reused block's whole work on small models
        names = [p.name for p in self._signature.parameters.values()
                 if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)][1:]
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
        return tuple(
            None if out is None or inp is None else out - inp for out, inp in zip(outputs, self._inputs(args, kwargs))
        )

    def _serve(self, args: tuple, kwargs: dict, cached: Any) -> Any:
        served = tuple(
            None if res is None or inp is None else inp + res for res, inp in zip(cached, self._inputs(args, kwargs))
        )
        return served if len(served) > 1 else served[0]


def attach_hooks(transformer: nn.Module, session: CacheSession, mode: str) -> list[nn.Module]:
    """Register the tracker on the transformer and a cache hook per component (or block); return hooked modules."""
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(StepTrackerHook(session), STEP_TRACKER_HOOK)
    hooked = [transformer]
    layout = session.layout
    for ref in layout.blocks:
        if mode == "block":
            hook = BlockResidualHook(
                session,
                ref.index,
                0,
                f"{ref.path}",
                session.spec.unbatched_args,
                residual_outputs=ref.group.residual_outputs,
            )
            HookRegistry.check_if_exists_or_initialize(ref.module).register_hook(hook, CACHE_HOOK)
            hooked.append(ref.module)
            continue
        for c, name in enumerate(layout.components):
            if not bool(layout.present[ref.index, c]):
                continue
            module = getattr(ref.module, name)
            hook = ComponentCacheHook(session, ref.index, c, f"{ref.path}.{name}", session.spec.unbatched_args)
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, CACHE_HOOK)
            hooked.append(module)
    registry.invalidate_child_registries_cache()
    return hooked


def detach_hooks(transformer: nn.Module) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.remove_hook(STEP_TRACKER_HOOK, recurse=False)
    for module in transformer.modules():
        child = getattr(module, "_diffusers_hook", None)
        if child is not None:
            child.remove_hook(CACHE_HOOK, recurse=False)
            child.remove_hook(PROBE_HOOK, recurse=False)
    registry.invalidate_child_registries_cache()


def session_of(transformer: nn.Module) -> CacheSession | None:
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(STEP_TRACKER_HOOK) if registry is not None else None
    return hook.session if hook is not None else None
