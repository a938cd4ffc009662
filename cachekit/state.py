"""Request-scoped cache state.

Everything here is keyed per batch row. A row carries its own denoising step, its own step count, its own cache key
and (optionally) its own plan, so that the streaming runner can pack many requests sitting at different steps, of
different lengths and under different schedules or policies into one forward pass, and the hooks still serve each
request from its own cache. A plain pipeline call is the special case where every row is at the same step of the
same plan and the key is `CallRowKey(branch label, row index)`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, NamedTuple

import torch

__all__ = ["CallRowKey", "StepRows", "RowCache", "CacheStats", "map_tensors", "take_rows", "merge_rows"]


class CallRowKey(NamedTuple):
    """The cache key of row `index` of a plain pipeline call, in CFG branch `label`.

    Keys of this type belong to the pipeline call in progress and are freed when it ends; any other key (the
    runner's request ids) is freed only by its owner (`cachekit.release`), when its last step ran, or on error.
    """

    label: Hashable
    index: int


class StepRows:
    """Which step, step count, cache key and plan each batch row of one transformer forward belongs to.

    Args:
        steps: the denoising step of each row (long, any device; kept on CPU).
        keys: one hashable cache key per row, unique within the batch.
        num_steps: the step count of each row's generation: one int for all rows, or one per row.
        plans: per row, the plan that decides for it (a `Schedule`, a policy, or None: uncached); None for the whole
            argument means every row follows the plan cachekit was enabled with.

    `scratch` is shared by every subset of the same forward (what a policy learns at block 0 and uses at block 1);
    `state(key)` is a request's state that outlives the forward (a runtime policy's accumulators), owned by the
    session and freed with the request's cache.
    """

    __slots__ = ("steps", "keys", "plans", "step_list", "step_counts", "num_steps", "uniform_step", "scratch",
                 "_states", "groups", "computes_all")

    def __init__(self, steps: Any, keys: Sequence[Hashable], num_steps: int | Sequence[int] | torch.Tensor,
                 plans: Sequence[Any] | None = None) -> None:
        self.steps = torch.as_tensor(steps, dtype=torch.long).cpu().reshape(-1)
        self.keys = tuple(keys)
        batch = len(self.keys)
        if self.steps.shape[0] != batch:
            raise ValueError("StepRows needs one step and one key per batch row")
        if len(set(self.keys)) != batch:
            raise ValueError("cache keys must be unique within a batch")
        self.step_list: list[int] = self.steps.tolist()
        if isinstance(num_steps, torch.Tensor):
            num_steps = num_steps.tolist()
        counts = (int(num_steps),) * batch if isinstance(num_steps, int) else tuple(int(n) for n in num_steps)
        if len(counts) != batch:
            raise ValueError(f"{len(counts)} step counts for {batch} rows")
        for step, count in zip(self.step_list, counts):
            if count < 1 or not 0 <= step < count:
                raise ValueError(f"step {step} is outside a {count}-step generation")
        self.step_counts = counts
        self.num_steps: int | None = counts[0] if counts and min(counts) == max(counts) else None
        if isinstance(num_steps, int) and not counts:
            self.num_steps = int(num_steps)
        if plans is not None:
            plans = tuple(plans)
            if len(plans) != batch:
                raise ValueError(f"{len(plans)} plans for {batch} rows")
        self.plans: tuple[Any, ...] | None = plans
        steps_ = self.step_list
        # the common case (a plain pipeline call): one step for the whole batch, decided once per component
        self.uniform_step = steps_[0] if steps_ and min(steps_) == max(steps_) else None
        self.scratch: dict[Any, Any] = {}
        self._states: dict[Hashable, dict[str, Any]] = {}
        self.groups: Any = None  # filled by the session: the plan groups of these rows
        # set by the session when a forward starts: every hooked module computes every row and keeps nothing, known
        # from static tables, so the hooks run the stock forward without deciding anything per call
        self.computes_all = False

    @property
    def batch_size(self) -> int:
        return len(self.keys)

    @classmethod
    def uniform(cls, step: int, batch_size: int, num_steps: int, label: Hashable = None) -> "StepRows":
        """Every row at `step` of a `num_steps` generation, keyed as rows of a plain pipeline call."""
        steps = torch.full((batch_size,), int(step), dtype=torch.long)
        return cls(steps, tuple(CallRowKey(label, i) for i in range(batch_size)), num_steps)

    def plan_of(self, row: int, default: Any) -> Any:
        """The plan deciding for `row`: its own, or `default` (the session's) when the rows name none."""
        return default if self.plans is None else self.plans[row]

    def state(self, key: Hashable) -> dict[str, Any]:
        """The per-request state of `key` that outlives this forward (freed with the request's cache)."""
        return self._states.setdefault(key, {})

    def for_forward(self, states: dict[Hashable, dict[str, Any]]) -> "StepRows":
        """A copy for one forward pass: fresh scratch, request states bound to the session's."""
        rows = StepRows.__new__(StepRows)
        for name in ("steps", "keys", "plans", "step_list", "step_counts", "num_steps", "uniform_step"):
            setattr(rows, name, getattr(self, name))
        rows.scratch, rows._states, rows.groups, rows.computes_all = {}, states, None, False
        return rows

    def subset(self, index: torch.Tensor | Sequence[int]) -> "StepRows":
        """The rows at `index`, sharing this forward's scratch and request states."""
        index_list = index.tolist() if isinstance(index, torch.Tensor) else list(index)
        rows = StepRows.__new__(StepRows)
        rows.steps = self.steps[torch.as_tensor(index_list, dtype=torch.long)]
        rows.keys = tuple(self.keys[i] for i in index_list)
        rows.plans = None if self.plans is None else tuple(self.plans[i] for i in index_list)
        rows.step_list = [self.step_list[i] for i in index_list]
        rows.step_counts = tuple(self.step_counts[i] for i in index_list)
        counts = rows.step_counts
        rows.num_steps = counts[0] if counts and min(counts) == max(counts) else None
        rows.uniform_step = rows.step_list[0] if rows.step_list and min(rows.step_list) == max(rows.step_list) else None
        rows.scratch, rows._states, rows.groups, rows.computes_all = self.scratch, self._states, None, False
        return rows

    def finishing(self) -> tuple[Hashable, ...]:
        """Keys of the rows at the last step of their generation (their caches are freed after this forward)."""
        return tuple(k for k, s, n in zip(self.keys, self.step_list, self.step_counts) if s >= n - 1)

    def starting(self) -> tuple[Hashable, ...]:
        """Keys of the rows at step 0 (leftovers of an earlier generation under the same key are dropped)."""
        return tuple(k for k, s in zip(self.keys, self.step_list) if s == 0)

    def __repr__(self) -> str:
        return f"StepRows(steps={self.step_list}, keys={list(self.keys)}, num_steps={list(self.step_counts)})"


# ---------------------------------------------------------------------- tensor trees
def map_tensors(fn: Callable[[torch.Tensor], Any], tree: Any) -> Any:
    """Apply `fn` to every tensor in nested tuples / lists / dicts, leaving other leaves (None, ints) alone."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, tuple):
        return tuple(map_tensors(fn, x) for x in tree)
    if isinstance(tree, list):
        return [map_tensors(fn, x) for x in tree]
    if isinstance(tree, dict):
        return {k: map_tensors(fn, v) for k, v in tree.items()}
    return tree


def take_rows(tree: Any, index: torch.Tensor) -> Any:
    """Select batch rows of every tensor in a tree of module outputs."""
    return map_tensors(lambda t: t.index_select(0, index.to(t.device)), tree)


def _zip_trees(trees: Sequence[Any], combine: Callable[[list[torch.Tensor]], torch.Tensor]) -> Any:
    first = trees[0]
    if isinstance(first, torch.Tensor):
        return combine(list(trees))
    if isinstance(first, (tuple, list)):
        return type(first)(_zip_trees([t[i] for t in trees], combine) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _zip_trees([t[k] for t in trees], combine) for k in first}
    return first


def merge_rows(parts: Sequence[tuple[torch.Tensor, Any]], batch_size: int) -> Any:
    """Interleave row subsets back into one batch: `parts` is a list of (row indices, tree with those rows)."""
    order = torch.cat([rows for rows, _ in parts])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(batch_size)

    def combine(tensors: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.cat(tensors, dim=0)
        return stacked.index_select(0, inverse.to(stacked.device))

    return _zip_trees([tree for _, tree in parts], combine)


# ---------------------------------------------------------------------- caches
class _Stored:
    """One computed batch value and which live keys still read which of its rows.

    Values are kept by reference to the batch they came from, so the common case (the same requests in the same
    order as when they were computed) is served without copying. When fewer than half of a value's rows are still
    read (requests left, or recomputed on their own), the live rows are copied out and the batch is let go, so a
    cached row costs memory in proportion to itself, not to the batch it was computed in.
    """

    __slots__ = ("value", "members")

    def __init__(self, value: Any, keys: Sequence[Hashable]) -> None:
        self.value = value
        self.members: dict[Hashable, int] = {key: row for row, key in enumerate(keys)}

    def release(self, keys: Iterable[Hashable]) -> None:
        """Stop reading these keys' rows; released together so a batch replaced whole is dropped, never copied."""
        keys = keys if isinstance(keys, (list, tuple)) else list(keys)
        if len(keys) >= len(self.members) and self.members.keys() <= set(keys):
            self.members = {}
        else:
            for key in keys:
                self.members.pop(key, None)
        if not self.members:
            self.value = None
            return
        size = _batch_len(self.value)
        if size is not None and 2 * len(self.members) <= size:
            live = sorted(self.members.items(), key=lambda item: item[1])
            self.value = take_rows(self.value, torch.tensor([row for _, row in live]))
            self.members = {key: i for i, (key, _) in enumerate(live)}


class _Releases:
    """Keys to release, grouped by the batch they read from, so each batch is released (and compacted) once."""

    def __init__(self) -> None:
        self._by_batch: dict[int, tuple[_Stored, list[Hashable]]] = {}
        self._last: _Stored | None = None
        self._last_keys: list[Hashable] = []

    def add(self, stored: _Stored, key: Hashable) -> None:
        if stored is not self._last:  # consecutive keys mostly come from the same batch
            self._last = stored
            self._last_keys = self._by_batch.setdefault(id(stored), (stored, []))[1]
        self._last_keys.append(key)

    def apply(self) -> None:
        for stored, keys in self._by_batch.values():
            stored.release(keys)


class RowCache:
    """The last computed values of one cacheable module, per row key.

    With `depth > 1` the last `depth` computed values are kept with their steps, for forecasting (TaylorSeer)
    instead of plain reuse.
    """

    def __init__(self, depth: int = 1) -> None:
        self.depth = depth
        self._entries: dict[Hashable, list[tuple[int, _Stored]]] = {}  # key -> [(step, stored batch)], newest last

    def __len__(self) -> int:
        return len(self._entries)

    def has(self, keys: Sequence[Hashable]) -> bool:
        return all(key in self._entries for key in keys)

    def store(self, keys: Sequence[Hashable], value: Any, steps: Sequence[int] | None = None) -> None:
        stored = _Stored(value, keys)
        entries, depth = self._entries, self.depth
        superseded = _Releases()
        # this runs for every hooked module on every forward: one tight pass over the rows
        for key, step in zip(keys, steps if steps is not None else itertools.repeat(-1)):
            history = entries.get(key)
            if history is None:
                entries[key] = [(step, stored)]
            elif depth == 1 or history[-1][0] == step:  # a step computed again (a retried forward) replaces
                superseded.add(history[-1][1], key)
                history[-1] = (step, stored)
            else:
                history.append((step, stored))
                if len(history) > depth:
                    for _, old in history[:-depth]:
                        superseded.add(old, key)
                    del history[:-depth]
        superseded.apply()

    def _rows_of(self, keys: Sequence[Hashable], age: int) -> Any:
        """The value `age` computations back (0: newest) for each key, as one batch.

        One row selection per stored batch the keys read from, never one per key: in the runner, rows at different
        steps were computed in a few earlier ticks, and a per-row copy on every reused module made caching slower
        than computing.
        """
        points = [self._entries[key][-1 - age][1] for key in keys]
        first = points[0]
        if all(p is first for p in points):
            rows = [first.members[k] for k in keys]
            if rows == list(range(len(rows))) and _batch_len(first.value) == len(rows):
                return first.value  # the same requests in the same order as when computed: no copy
            return take_rows(first.value, torch.tensor(rows))
        by_batch: dict[int, tuple[_Stored, list[int], list[int]]] = {}
        for position, (point, key) in enumerate(zip(points, keys)):
            _, positions, rows = by_batch.setdefault(id(point), (point, [], []))
            positions.append(position)
            rows.append(point.members[key])
        parts = [(torch.tensor(positions), take_rows(point.value, torch.tensor(rows)))
                 for point, positions, rows in by_batch.values()]
        return merge_rows(parts, len(keys))

    def gather(self, keys: Sequence[Hashable]) -> Any:
        return self._rows_of(keys, 0)

    def forecast(self, keys: Sequence[Hashable], target_steps: torch.Tensor, order: int) -> Any:
        """Extrapolate each key's value to its target step from its last computed ones (TaylorSeer).

        A Newton divided-difference polynomial through the last `order + 1` computed points, in step units: order 0
        is plain reuse, order 1 a linear extrapolation, and so on. Rows with fewer points use what they have.
        """
        available = [min(order + 1, len(self._entries[key])) for key in keys]
        if min(available) != max(available):
            # a request that joined later has fewer points than its batch-mates: each row uses all of its own,
            # exactly as it would alone
            targets = torch.as_tensor(target_steps).flatten()
            if targets.numel() == 1:
                targets = targets.expand(len(keys))
            parts = []
            for count in sorted(set(available)):
                index = torch.tensor([i for i, n in enumerate(available) if n == count])
                subset = [keys[i] for i in index.tolist()]
                parts.append((index, self.forecast(subset, targets[index], count - 1)))
            return merge_rows(parts, len(keys))
        points = available[0]
        if points <= 1:
            return self.gather(keys)
        history = [[self._entries[key][-1 - a][0] for a in range(points)] for key in keys]
        values = [self._rows_of(keys, a) for a in range(points)]
        targets = torch.as_tensor(target_steps).flatten().tolist()
        if all(h == history[0] for h in history) and all(t == targets[0] for t in targets):
            # every row computed at the same steps and wants the same step (a plain batch): the polynomial's
            # weights are scalars, and the forecast is a weighted sum of whole-batch tensors (Lagrange form)
            return _zip_trees(values, _weighted_sum(_lagrange_weights(history[0], float(targets[0]))))
        steps = torch.tensor(history, dtype=torch.float64)
        target = torch.as_tensor(target_steps, dtype=torch.float64)

        def newton(tensors: list[torch.Tensor]) -> torch.Tensor:
            shape = (-1,) + (1,) * (tensors[0].ndim - 1)
            dtype, device = tensors[0].dtype, tensors[0].device
            as_col = lambda x: x.to(device=device, dtype=torch.float32).view(shape)  # noqa: E731
            table = [t.float() for t in tensors]  # divided differences, built in place
            result = table[0].clone()
            basis = torch.ones(len(keys), dtype=torch.float64)
            for level in range(1, points):
                table = [
                    (table[j] - table[j + 1]) / as_col(steps[:, j] - steps[:, j + level]) for j in range(points - level)
                ]
                basis = basis * (target - steps[:, level - 1])
                result = result + table[0] * as_col(basis)
            return result.to(dtype)

        return _zip_trees(values, newton)

    def drop(self, keys: Sequence[Hashable]) -> None:
        dropped = _Releases()
        for key in keys:
            for _, stored in self._entries.pop(key, None) or ():
                dropped.add(stored, key)
        dropped.apply()

    def clear(self) -> None:
        self._entries.clear()

    def keys(self) -> list[Hashable]:
        return list(self._entries)

    def nbytes(self) -> int:
        """Bytes of tensor memory this cache holds alive (each stored batch counted once)."""
        seen: dict[int, int] = {}
        for history in self._entries.values():
            for _, stored in history:
                if id(stored) not in seen:
                    total = [0]
                    map_tensors(lambda t: total.__setitem__(0, total[0] + t.numel() * t.element_size()), stored.value)
                    seen[id(stored)] = total[0]
        return sum(seen.values())


def _lagrange_weights(steps: Sequence[int], target: float) -> list[float]:
    """Weights w_a with p(target) = sum_a w_a * p(steps[a]) for every polynomial p of degree < len(steps)."""
    weights = []
    for a, s_a in enumerate(steps):
        w = 1.0
        for b, s_b in enumerate(steps):
            if b != a:
                w *= (target - s_b) / (s_a - s_b)
        weights.append(w)
    return weights


def _weighted_sum(weights: list[float]) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    def combine(tensors: list[torch.Tensor]) -> torch.Tensor:
        result = tensors[0].float() * weights[0]
        for w, t in zip(weights[1:], tensors[1:]):
            result = result.add(t.float(), alpha=w)
        return result.to(tensors[0].dtype)

    return combine


def _batch_len(tree: Any) -> int | None:
    if isinstance(tree, torch.Tensor):
        return tree.shape[0]
    if isinstance(tree, (tuple, list)):
        for item in tree:
            n = _batch_len(item)
            if n is not None:
                return n
    if isinstance(tree, dict):
        return _batch_len(list(tree.values()))
    return None


class CacheStats:
    """Row-level counts of what the hooks did, so benches report skipped work measured rather than assumed."""

    def __init__(self) -> None:
        self.computed = 0
        self.reused = 0
        self.misses = 0
        self.per_component: dict[str, list[int]] = {}

    def record(self, name: str, computed: int, reused: int) -> None:
        self.computed += computed
        self.reused += reused
        counts = self.per_component.get(name)
        if counts is None:
            counts = self.per_component[name] = [0, 0]
        counts[0] += computed
        counts[1] += reused

    @property
    def reuse_fraction(self) -> float:
        total = self.computed + self.reused
        return self.reused / total if total else 0.0

    def reset(self) -> None:
        self.computed = self.reused = self.misses = 0
        self.per_component.clear()
