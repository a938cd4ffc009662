"""A dynamic-programming schedule solver over calibrated reuse errors.

For one cacheable unit (a component of a block, or a whole block) over T steps, a schedule is the set of steps where
it computes. It splits the steps into *stretches*: a compute step i and the reuse steps i+1 .. j-1 that follow it,
up to the next compute step j (or the end, j = T). Every reused step is served from the output cached at i, so the
stretch costs

    err_stretch(i, j) = sum_{t=i+1}^{j-1} err[i, t]

measured against the cached step i, never against the previous step (which may itself have been reused). The best
schedule is a shortest path over stretches, solved exactly in O(T^2) per unit (O(T^2 K) with an update count K):

- stretch length (j - i: the compute step plus its reuses) in [min_stretch, max_stretch]; the final stretch, cut off
  by the end of sampling, has no lower bound;
- forced compute steps (default: the first and the last) are never inside a stretch;
- optionally a number of compute steps per unit in [min_updates, max_updates] (exact when equal).

A global budget (a fraction of the uncached transformer's MACs or measured latency) couples the units. It is met by
bisection on a Lagrange multiplier lambda: each unit independently minimises `error + lambda * cost_of_its_computes`
(cost as a fraction of one forward), and lambda is raised until the predicted cost is within budget. Lagrangian
solutions lie on the lower convex hull of the error/cost trade-off, so the returned schedule is the cheapest
hull point within budget, not necessarily the exact knapsack optimum; with dozens of units the gap is small.

Presets (`SolverConfig.from_preset`):

- `default`: relative L1 error, per-unit schedules under a global budget (Lagrange), first and last step forced.
- `bac` (BAC, Ji et al. 2025, "Block-wise Adaptive Caching"): cosine distance, the same number S of updates for
  every unit, only step 0 forced. Maximising the summed cosine similarity of the skipped steps with exactly S updates
  is the same as minimising their summed (1 - cosine), since the number of skipped steps is fixed at T - S. With a
  budget, S is the largest count whose predicted cost fits.
- `cachequant` (CacheQuant, Liu et al. 2025, "dynamic programming schedule"): relative L1 error, one schedule shared
  by all units (the whole model's features are cached together), ceil(T / N) updates for interval N, and stretches
  in [ceil(N / 2), floor(2 N)]. With a budget, N = T / S for the largest S that fits.

Bubbling Union (from BAC): caching errors of an upstream unit propagate through every downstream feed-forward that
recomputes on top of them. With `bubble_threshold` (or `bubble_top_k`), the feed-forward units whose volatility (the
mean reuse error over all step pairs i < t, independent of any schedule) is >= threshold (or among the k largest)
are selected, and each selected unit additionally computes at every step where any feed-forward unit of a *later
block* computes. Feed-forward units are the components named in `FEED_FORWARD` (every block in block mode). This is
applied inside the budget search, so the reported cost includes the extra computes.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from cachekit.errors import UsageError
from cachekit.schedule import Schedule

from .calibrate import METRICS, Calibration

__all__ = [
    "FEED_FORWARD",
    "InfeasibleError",
    "SolverConfig",
    "Solution",
    "UnitSolution",
    "solve",
    "solve_units",
    "stretch_costs",
    "valid_stretches",
    "schedule_error",
    "volatility",
    "bubbling_union",
]

FEED_FORWARD = frozenset({"ff", "ffn", "ff_context", "proj_mlp"})
"""Feed-forward component names: PixArt / DiT / Sana `ff`, Wan `ffn`, FLUX `ff`, `ff_context`, `proj_mlp`."""

PRESETS = ("default", "bac", "cachequant")


class InfeasibleError(UsageError):
    """No schedule satisfies the constraints (stretch limits, forced steps, update counts, budget)."""


# ---------------------------------------------------------------------------------------------------------- one unit
def stretch_costs(err: np.ndarray) -> np.ndarray:
    """`[U, T, T+1]`: entry `[u, i, j]` is the summed error of serving steps i+1..j-1 from step i (j = T: the end).

    Entries with j <= i are meaningless; `valid_stretches` masks them.
    """
    err = np.asarray(err, dtype=np.float64)
    units, steps, _ = err.shape
    cumulative = np.cumsum(np.triu(err, 1), axis=2)  # [u, i, t] = sum_{i < t' <= t} err[u, i, t']
    costs = np.full((units, steps, steps + 1), np.inf)
    costs[:, :, 1:] = cumulative  # a stretch ending at j serves i+1 .. j-1
    return costs


def valid_stretches(
    num_steps: int, min_stretch: int = 1, max_stretch: int | None = None, forced: tuple[int, ...] = (0,)
) -> np.ndarray:
    """`[T, T+1]` bool: may a stretch start at compute step i and end where the next compute step j begins?"""
    steps = num_steps
    max_stretch = steps if max_stretch is None else max_stretch
    i = np.arange(steps)[:, None]
    j = np.arange(steps + 1)[None, :]
    length = j - i
    ok = (length >= 1) & (length <= max_stretch) & ((j == steps) | (length >= min_stretch))
    forced_sorted = sorted(set(forced))
    next_forced = np.array([min([f for f in forced_sorted if f > s], default=steps) for s in range(steps)])
    return ok & (j <= next_forced[:, None])  # a forced step is never skipped: the stretch stops at or before it


@dataclass
class UnitSolution:
    """Per-unit optima: masks `[U, T]`, their summed reuse error `[U]` and number of compute steps `[U]`."""

    masks: np.ndarray
    error: np.ndarray
    updates: np.ndarray


def solve_units(
    err: np.ndarray,
    penalty: np.ndarray | float = 0.0,
    *,
    min_stretch: int = 1,
    max_stretch: int | None = None,
    forced: tuple[int, ...] = (0,),
    min_updates: int | None = None,
    max_updates: int | None = None,
    costs: np.ndarray | None = None,
) -> UnitSolution:
    """Exact per-unit minimum of `reuse error + penalty * number of compute steps`, vectorised over units.

    Args:
        err: `[U, T, T]` reuse errors; `err[u, i, t]` (i < t) is the error of serving t from the output of i.
        penalty: per-unit price of one compute step (a Lagrange multiplier times the unit's cost), `[U]` or scalar.
        min_stretch, max_stretch: limits on a stretch's length (compute step + the reuses it serves).
        forced: steps that must compute (negative indices count from the end); step 0 always computes.
        min_updates, max_updates: limits on the number of compute steps per unit.
        costs: precomputed `stretch_costs(err)`, to reuse across many penalties.
    Raises `InfeasibleError` if some unit has no admissible schedule.
    """
    err = np.asarray(err, dtype=np.float64)
    units, steps, _ = err.shape
    forced_steps = tuple(sorted({0} | {f % steps for f in forced}))
    if min_stretch < 1 or (max_stretch is not None and max_stretch < 1):
        raise UsageError(f"stretch limits must be >= 1, got [{min_stretch}, {max_stretch}]")
    penalty = np.broadcast_to(np.asarray(penalty, dtype=np.float64), (units,))
    valid = valid_stretches(steps, min_stretch, max_stretch, forced_steps)
    if costs is None:
        costs = stretch_costs(err)
    costs = np.where(valid[None], costs, np.inf)
    rows = np.arange(units)
    masks = np.zeros((units, steps), dtype=bool)

    if min_updates is None and max_updates is None:
        best = np.full((units, steps + 1), np.inf)  # best[u, j]: cheapest prefix with a compute step at j
        parent = np.zeros((units, steps + 1), dtype=np.int64)
        best[:, 0] = penalty
        for j in range(1, steps + 1):
            candidates = best[:, :j] + costs[:, :j, j]
            parent[:, j] = candidates.argmin(1)
            best[:, j] = candidates[rows, parent[:, j]] + (penalty if j < steps else 0.0)
        total = best[:, steps]
        _check_feasible(total, steps, min_stretch, max_stretch, forced_steps, min_updates, max_updates)
        current = np.full(units, steps)
        for _ in range(steps):
            active = current > 0
            if not active.any():
                break
            previous = parent[rows, current]
            masks[rows[active], previous[active]] = True
            current = np.where(active, previous, 0)
    else:
        low = max(1, min_updates or 1)
        high = min(steps, max_updates if max_updates is not None else steps)
        if low > high:
            raise InfeasibleError(f"update count limits [{min_updates}, {max_updates}] admit no count in 1..{steps}")
        # best[u, k, j]: cheapest prefix with exactly k compute steps, the last of them at j
        best = np.full((units, high + 1, steps), np.inf)
        parent = np.zeros((units, high + 1, steps), dtype=np.int64)
        best[:, 1, 0] = penalty
        for j in range(1, steps):
            if high < 2:
                break
            candidates = best[:, 1:high, :j] + costs[:, None, :j, j]  # previous compute at i, k-1 computes
            choice = candidates.argmin(2)
            parent[:, 2:, j] = choice
            best[:, 2:, j] = np.take_along_axis(candidates, choice[..., None], 2)[..., 0] + penalty[:, None]
        endings = best[:, low : high + 1, :] + costs[:, None, :, steps]  # [U, counts, last compute]
        flat = endings.reshape(units, -1).argmin(1)
        total = endings.reshape(units, -1)[rows, flat]
        _check_feasible(total, steps, min_stretch, max_stretch, forced_steps, min_updates, max_updates)
        count, last = flat // steps + low, flat % steps
        for u in range(units):
            k, j = int(count[u]), int(last[u])
            while True:
                masks[u, j] = True
                if k == 1:
                    break
                j, k = int(parent[u, k, j]), k - 1
    return UnitSolution(masks, schedule_error(err, masks), masks.sum(1))


def _check_feasible(
    total: np.ndarray,
    steps: int,
    min_stretch: int,
    max_stretch: int | None,
    forced: tuple[int, ...],
    min_updates: int | None,
    max_updates: int | None,
) -> None:
    if np.isinf(total).any():
        raise InfeasibleError(
            f"no {steps}-step schedule has stretches in [{min_stretch}, {max_stretch or steps}] with compute steps "
            f"{list(forced)} forced and [{min_updates or 1}, {max_updates or steps}] updates"
        )


def schedule_error(err: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """`[U]`: summed error of each unit's mask, every reused step served from the last computed step."""
    err = np.asarray(err, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    steps = masks.shape[-1]
    if not masks[..., 0].all():
        raise ValueError("step 0 must compute")
    source = np.maximum.accumulate(np.where(masks, np.arange(steps), 0), axis=-1)  # last compute step <= t
    served = err[np.arange(masks.shape[0])[:, None], source, np.arange(steps)[None, :]]
    return np.where(masks, 0.0, served).sum(1)


def volatility(err: np.ndarray) -> np.ndarray:
    """`[U]`: mean reuse error over all step pairs i < t; how much a unit drifts, whatever the schedule."""
    err = np.asarray(err, dtype=np.float64)
    steps = err.shape[-1]
    if steps < 2:
        return np.zeros(err.shape[0])
    i, t = np.triu_indices(steps, 1)
    return err[:, i, t].mean(1)


def bubbling_union(masks: np.ndarray, blocks: np.ndarray, feed_forward: np.ndarray, selected: np.ndarray) -> np.ndarray:
    """BAC's Bubbling Union: each selected unit also computes wherever a feed-forward unit of a later block computes.

    `blocks[u]` is the unit's block index (execution order), `feed_forward[u]` whether it is a feed-forward unit,
    `selected[u]` whether it is an upstream unit whose errors must not reach downstream feed-forwards. Processing
    upstream from the deepest block, as BAC does, gives the same result as this direct union, because a downstream
    unit's added steps come from feed-forwards that are downstream of the upstream unit too.
    """
    masks = np.asarray(masks, dtype=bool)
    out = masks.copy()
    blocks = np.asarray(blocks)
    ff = np.asarray(feed_forward, dtype=bool)
    for u in np.flatnonzero(selected):
        downstream = ff & (blocks > blocks[u])
        if downstream.any():
            out[u] |= masks[downstream].any(0)
    return out


# ---------------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class SolverConfig:
    """What to optimise and under which constraints. Start from a preset: `SolverConfig.from_preset("bac", budget=0.4)`.

    Args:
        preset: the name recorded in the schedule's provenance ('default', 'bac', 'cachequant').
        metric: reuse error, 'l1' (relative L1) or 'cosine' (1 - cosine similarity).
        budget: target cost as a fraction of the uncached transformer (0 < budget <= 1).
        cost: what the budget counts, 'macs' or 'latency' (measured on the calibration device).
        min_stretch, max_stretch: stretch length limits (compute step + reuses served from it).
        forced: steps that always compute (negative: from the end). Step 0 always computes.
        updates: exact number of compute steps per unit (instead of a budget).
        max_updates: at most this many compute steps per unit (with a budget).
        interval: CacheQuant's N: updates = ceil(T / N).
        fixed_count: with a budget, give every unit the same exact update count: the largest that fits (BAC,
            CacheQuant) instead of the Lagrange search.
        interval_stretch: stretch limits are [ceil(N / 2), floor(2 N)] for the interval N (CacheQuant).
        shared: one schedule for all units, minimising their summed error (CacheQuant's model-level schedule).
        bubble_threshold: Bubbling Union for feed-forward units with volatility >= this (in the metric's units).
        bubble_top_k: Bubbling Union for the k most volatile feed-forward units.
    """

    preset: str = "default"
    metric: str = "l1"
    budget: float | None = None
    cost: str = "macs"
    min_stretch: int = 1
    max_stretch: int | None = None
    forced: tuple[int, ...] = (0, -1)
    updates: int | None = None
    max_updates: int | None = None
    interval: float | None = None
    fixed_count: bool = False
    interval_stretch: bool = False
    shared: bool = False
    bubble_threshold: float | None = None
    bubble_top_k: int | None = None

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise UsageError(f"unknown solver mode {self.preset!r}; expected one of {list(PRESETS)}")
        if self.metric not in METRICS:
            raise UsageError(f"unknown error metric {self.metric!r}; expected one of {list(METRICS)}")
        if self.cost not in ("macs", "latency"):
            raise UsageError(f"unknown cost {self.cost!r}; expected 'macs' or 'latency'")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise UsageError(f"budget is a fraction of the uncached cost in (0, 1], got {self.budget}")
        if self.min_stretch < 1:
            raise UsageError(f"min_stretch must be >= 1, got {self.min_stretch}")
        if self.max_stretch is not None and self.max_stretch < self.min_stretch:
            raise UsageError(f"max_stretch ({self.max_stretch}) is below min_stretch ({self.min_stretch})")
        for name in ("updates", "max_updates", "bubble_top_k"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"{name} must be >= 1, got {value}")
        if self.interval is not None and not (math.isfinite(self.interval) and self.interval >= 1):
            raise UsageError(f"interval must be a finite number >= 1, got {self.interval}")
        if self.bubble_threshold is not None and not math.isfinite(self.bubble_threshold):
            raise UsageError(f"bubble_threshold must be a finite number, got {self.bubble_threshold}")
        if self.updates is not None and self.interval is not None:
            raise UsageError("give either updates or interval, not both")
        if self.budget is not None and (self.updates is not None or self.interval is not None):
            raise UsageError("give either a budget or a fixed number of updates (updates / interval), not both")
        if self.bubble_threshold is not None and self.bubble_top_k is not None:
            raise UsageError("give either bubble_threshold or bubble_top_k, not both")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "SolverConfig":
        """A preset (see the module docstring) with any field overridden."""
        presets: dict[str, dict[str, Any]] = {
            "default": {},
            "bac": {"metric": "cosine", "forced": (0,), "fixed_count": True},
            "cachequant": {"metric": "l1", "forced": (0,), "fixed_count": True, "interval_stretch": True,
                           "shared": True},
        }
        if name not in presets:
            raise UsageError(f"unknown solver mode {name!r}; expected one of {list(PRESETS)}")
        return cls(preset=name, **{**presets[name], **overrides})


# ---------------------------------------------------------------------------------------------------------- solve
@dataclass
class Solution:
    """A solved schedule and what the solver predicts about it."""

    schedule: Schedule
    predicted_error: float  # summed reuse error over units and steps, in the metric
    cost_ratio: float  # predicted cost in the config's cost, as a fraction of the uncached model
    mac_ratio: float
    latency_ratio: float | None
    updates: np.ndarray  # [blocks, components] compute steps per unit (T for absent units)
    lagrange: float | None  # the multiplier used (None for fixed update counts)
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


class _Problem:
    """The units of a calibration, their errors, costs and feed-forward flags, flattened for the solver."""

    def __init__(self, calibration: Calibration, config: SolverConfig) -> None:
        self.calibration = calibration
        self.config = config
        present = calibration.present.numpy()
        self.index = np.argwhere(present)  # [U, 2] (block, component), in execution order
        err = calibration.errors(config.metric).numpy()
        self.err = err[self.index[:, 0], self.index[:, 1]]  # [U, T, T]
        self.steps = calibration.num_steps
        self.blocks = self.index[:, 0]
        if calibration.mode == "block":
            self.feed_forward = np.ones(len(self.index), dtype=bool)
        else:
            names = np.array(calibration.components)[self.index[:, 1]]
            self.feed_forward = np.array([n in FEED_FORWARD for n in names], dtype=bool)
        self.unit_cost, self.total = self._costs(config.cost)
        self.mac_cost, self.mac_total = self._costs("macs")
        self.forced = tuple(sorted({0} | {f % self.steps for f in config.forced}))
        vol = volatility(self.err)
        ff = self.feed_forward
        if config.bubble_threshold is not None:
            self.bubble = ff & (vol >= config.bubble_threshold)
        elif config.bubble_top_k is not None:
            order = [u for u in np.argsort(-vol, kind="stable") if ff[u]][: config.bubble_top_k]
            self.bubble = np.isin(np.arange(len(vol)), order)
        else:
            self.bubble = np.zeros(len(vol), dtype=bool)
        self.volatility = vol

    def _costs(self, kind: str) -> tuple[np.ndarray, float]:
        per_unit, total = self.calibration.unit_costs(kind)
        return per_unit.numpy()[self.index[:, 0], self.index[:, 1]], total

    def ratio(self, masks: np.ndarray, unit_cost: np.ndarray, total: float) -> float:
        """Predicted cost fraction: the part outside the units always runs, each unit costs once per compute."""
        outside = total - unit_cost.sum()
        return float((outside * self.steps + (masks.sum(1) * unit_cost).sum()) / (total * self.steps))

    def finish(self, masks: np.ndarray) -> np.ndarray:
        return bubbling_union(masks, self.blocks, self.feed_forward, self.bubble) if self.bubble.any() else masks


def _stretch_limits(config: SolverConfig, interval: float | None) -> tuple[int, int | None]:
    if config.interval_stretch and interval is not None:
        return max(1, math.ceil(interval / 2)), max(1, math.floor(2 * interval))
    return config.min_stretch, config.max_stretch


def _solve_fixed(problem: _Problem, count: int, interval: float | None) -> np.ndarray:
    """Every unit (or the one shared schedule) computes exactly `count` times."""
    config = problem.config
    low, high = _stretch_limits(config, interval)
    err = problem.err.sum(0, keepdims=True) if config.shared else problem.err
    solution = solve_units(err, 0.0, min_stretch=low, max_stretch=high, forced=problem.forced, min_updates=count,
                           max_updates=count)
    masks = solution.masks
    if config.shared:
        masks = np.repeat(masks, len(problem.err), axis=0)
    return problem.finish(masks)


def _solve_lagrange(problem: _Problem, budget: float) -> tuple[np.ndarray, float]:
    """Bisection on lambda: the smallest price per (fraction of a forward) of compute whose schedule fits."""
    config = problem.config
    shared = config.shared
    err = problem.err.sum(0, keepdims=True) if shared else problem.err
    price = problem.unit_cost / problem.total  # each compute's share of one forward
    price = np.array([price.sum()]) if shared else price
    costs = stretch_costs(err)

    def masks_at(lam: float) -> np.ndarray:
        solution = solve_units(err, lam * price, min_stretch=config.min_stretch, max_stretch=config.max_stretch,
                               forced=problem.forced, max_updates=config.max_updates, costs=costs)
        masks = solution.masks
        if shared:
            masks = np.repeat(masks, len(problem.err), axis=0)
        return problem.finish(masks)

    def fits(masks: np.ndarray) -> bool:
        return problem.ratio(masks, problem.unit_cost, problem.total) <= budget + 1e-12

    masks = masks_at(0.0)
    if fits(masks):
        return masks, 0.0
    low, high = 0.0, 1.0
    best = masks_at(high)
    while not fits(best):  # find a price high enough to fit
        low, high = high, high * 4.0
        if high > 1e15:
            floor = problem.ratio(best, problem.unit_cost, problem.total)
            raise InfeasibleError(
                f"budget {budget:.3f} is below the cheapest schedule these constraints allow ({floor:.3f} of the "
                f"uncached {config.cost}; the transformer outside the cached units alone costs "
                f"{1 - problem.unit_cost.sum() / problem.total:.3f})"
            )
        best = masks_at(high)
    for _ in range(60):  # then the lowest price that still fits: the least error within budget
        middle = 0.5 * (low + high)
        candidate = masks_at(middle)
        if fits(candidate):
            high, best = middle, candidate
        else:
            low = middle
        if high - low <= 1e-9 * high:
            break
    return best, high


def _solve_count_for_budget(problem: _Problem, budget: float) -> tuple[np.ndarray, float | None]:
    """The largest common update count whose schedule fits the budget (more updates: less error).

    Without Bubbling Union the cost of S updates per unit is known in closed form, so the search starts at the
    largest S that fits and only steps down when the union's extra computes (or infeasible stretch limits) demand.
    """
    config, steps = problem.config, problem.steps
    outside = problem.total - problem.unit_cost.sum()
    share = problem.unit_cost.sum() / problem.total
    start = steps
    if share:
        start = int(math.floor((budget * problem.total - outside) / problem.unit_cost.sum() * steps + 1e-9))
    for count in range(min(start, steps), 0, -1):
        interval = steps / count if config.interval_stretch else None
        try:
            masks = _solve_fixed(problem, count, interval)
        except InfeasibleError:
            continue
        if problem.ratio(masks, problem.unit_cost, problem.total) <= budget + 1e-12:
            return masks, interval
    cheapest = (outside + problem.unit_cost.sum() / steps) / problem.total
    raise InfeasibleError(
        f"budget {budget:.3f} is below the cheapest {config.preset} schedule: one update per unit costs at least "
        f"{cheapest:.3f} of the uncached {config.cost}"
    )


def _check_fits(calibration: Calibration, config: SolverConfig) -> None:
    """Refuse settings the calibration cannot serve, and calibrations whose cost tables cannot be right."""
    steps = calibration.num_steps
    if config.updates is not None and config.updates > steps:
        raise UsageError(f"updates={config.updates} is more than the calibration's {steps} steps")
    outside = [f for f in config.forced if not -steps <= f < steps]
    if outside:
        raise UsageError(f"forced step(s) {outside} outside the calibration's {steps} steps (0..{steps - 1}, or "
                         f"-{steps}..-1 counting from the end)")
    latency = calibration.latency.double()
    if not bool(torch.isfinite(latency).all()) or bool((latency < 0).any()) or not (
            math.isfinite(calibration.latency_remainder) and calibration.latency_remainder >= 0):
        raise UsageError("the calibration's latency table has NaN, infinite or negative entries; recalibrate "
                         "(`cachekit calibrate`)")
    for name in ("per_component", "per_block"):
        macs = torch.as_tensor(calibration.macs[name]).double()
        if not bool(torch.isfinite(macs).all()) or bool((macs < 0).any()):
            raise UsageError(f"the calibration's MAC table ({name}) has NaN, infinite or negative entries; recalibrate "
                             "(`cachekit calibrate`)")


def solve(calibration: Calibration, config: SolverConfig | None = None, **overrides: Any) -> Solution:
    """Solve a schedule from a calibration: the recompute mask of least predicted error under the config's limits.

    `overrides` replace fields of `config` (default: the 'default' preset). Needs a `budget`, or a fixed update
    count (`updates`, or `interval` for CacheQuant). Returns the schedule with `provenance["method"] == "solver"`,
    the predicted MAC ratio in `schedule.predicted_cost["mac_ratio"]` (from `MacProfile.predict`) and, when the
    calibration measured latency, `latency_ratio` too.
    """
    start = time.perf_counter()
    config = replace(config or SolverConfig(), **overrides)
    _check_fits(calibration, config)
    problem = _Problem(calibration, config)
    steps = problem.steps
    lagrange: float | None = None
    interval = config.interval
    if config.updates is not None or config.interval is not None:
        count = min(steps, config.updates if config.updates is not None else math.ceil(steps / config.interval))
        if interval is None and config.interval_stretch:
            interval = steps / count
        masks = _solve_fixed(problem, count, interval)
    elif config.budget is None:
        raise UsageError("the solver needs a budget (a cost fraction) or a fixed number of updates")
    elif config.fixed_count:
        masks, interval = _solve_count_for_budget(problem, config.budget)
    else:
        masks, lagrange = _solve_lagrange(problem, config.budget)
    return _solution(problem, masks, lagrange, interval, time.perf_counter() - start)


def _solution(problem: _Problem, masks: np.ndarray, lagrange: float | None, interval: float | None,
              seconds: float) -> Solution:
    calibration, config = problem.calibration, problem.config
    steps = problem.steps
    blocks, comps = calibration.present.shape
    recompute = torch.ones(steps, blocks, comps, dtype=torch.bool)
    recompute[:, problem.index[:, 0], problem.index[:, 1]] = torch.from_numpy(masks.T.copy())
    error = float(schedule_error(problem.err, masks).sum())
    mac_ratio = problem.ratio(masks, problem.mac_cost, problem.mac_total)
    latency_ratio = None
    if float(calibration.latency.sum()) > 0:
        lat_cost, lat_total = problem._costs("latency")
        latency_ratio = problem.ratio(masks, lat_cost, lat_total)
    updates = torch.full((blocks, comps), steps, dtype=torch.long)
    updates[problem.index[:, 0], problem.index[:, 1]] = torch.from_numpy(masks.sum(1))
    settings = {k: v for k, v in asdict(config).items() if v is not None and k != "preset"}
    settings["forced"] = list(problem.forced)
    provenance = {
        "method": "solver",
        "solver": "dp",
        "preset": config.preset,
        **settings,
        "lagrange": lagrange,
        "interval_used": interval,
        "bubbled_units": int(problem.bubble.sum()),
        "predicted_error": round(error, 6),
        "calibration": {
            "num_samples": calibration.num_samples,
            "num_prompts": len(calibration.meta.get("prompts") or []),
            "device": calibration.meta.get("device"),
        },
    }
    schedule = Schedule(
        recompute=recompute,
        model_class=calibration.model_class,
        components=tuple(calibration.components),
        present=calibration.present.clone(),
        mode=calibration.mode,
        scheduler=calibration.meta.get("scheduler"),
        provenance=_json_safe(provenance),
    )
    schedule = Schedule.from_dict(schedule.to_dict())  # the file format's own validation
    calibration.mac_profile().annotate(schedule)
    if latency_ratio is not None:
        schedule.predicted_cost["latency_ratio"] = round(latency_ratio, 6)
    cost_ratio = mac_ratio if config.cost == "macs" else float(latency_ratio)
    return Solution(schedule, error, cost_ratio, mac_ratio, latency_ratio, updates.numpy(), lagrange, seconds,
                    {"volatility": problem.volatility, "bubbled": problem.bubble})


def _json_safe(value: Any) -> Any:
    """Plain JSON types for provenance (tuples to lists, numpy scalars to Python numbers)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
