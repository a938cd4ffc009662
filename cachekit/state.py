"""Per-request cache state.

Everything here is keyed per batch row. A row carries its own denoising step and its own cache key, so that the
streaming runner can pack requests sitting at different steps into one forward pass (StreamDiffusion's Stream Batch)
and the hooks still serve each request from its own cache. A plain pipeline call is the special case where every row
is at the same step and the key is `(branch label, row index)`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["StepRows", "RowCache", "CacheStats", "map_tensors", "take_rows", "merge_rows"]


@dataclass(frozen=True)
class StepRows:
    """Which denoising step and which cache key each batch row of the current forward belongs to."""

    steps: torch.Tensor  # long [batch], on CPU
    keys: tuple[Hashable, ...]
    num_steps: int

    def __post_init__(self) -> None:
        if self.steps.ndim != 1 or len(self.keys) != self.steps.shape[0]:
            raise ValueError("StepRows needs one step and one key per batch row")
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("cache keys must be unique within a batch")
        steps = self.steps.tolist()
        object.__setattr__(self, "step_list", steps)
        # the common case (a plain pipeline call): one step for the whole batch, decided once per component
        object.__setattr__(self, "uniform_step", steps[0] if steps and min(steps) == max(steps) else None)

    @property
    def batch_size(self) -> int:
        return len(self.keys)

    @classmethod
    def uniform(cls, step: int, batch_size: int, num_steps: int, label: Hashable = None) -> "StepRows":
        steps = torch.full((batch_size,), int(step), dtype=torch.long)
        return cls(steps, tuple((label, i) for i in range(batch_size)), num_steps)


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
class RowCache:
    """The last computed values of one cacheable module, per row key.

    Values are stored by reference to the batch they came from, so the common case (the same requests in the same
    order as when they were computed) is served without copying. With `depth > 1` the last `depth` computed values
    are kept with their steps, for forecasting (TaylorSeer) instead of plain reuse.
    """

    def __init__(self, depth: int = 1) -> None:
        self.depth = depth
        self._entries: dict[Hashable, list[tuple[int, Any, int]]] = {}  # key -> [(step, batch value, row)], newest last

    def __len__(self) -> int:
        return len(self._entries)

    def has(self, keys: Sequence[Hashable]) -> bool:
        return all(key in self._entries for key in keys)

    def store(self, keys: Sequence[Hashable], value: Any, steps: Sequence[int] | None = None) -> None:
        for row, key in enumerate(keys):
            point = (steps[row] if steps is not None else -1, value, row)
            history = self._entries.get(key)
            if history is None or self.depth == 1:
                self._entries[key] = [point]
            else:
                history.append(point)
                del history[: -self.depth]

    def _rows_of(self, keys: Sequence[Hashable], age: int) -> Any:
        """The value `age` computations back (0: newest) for each key, as one batch."""
        entries = [self._entries[key][-1 - age] for key in keys]
        value = entries[0][1]
        same_batch = all(e[1] is value and e[2] == i for i, e in enumerate(entries))
        if same_batch and _batch_len(value) == len(keys):
            return value
        parts = [take_rows(e[1], torch.tensor([e[2]])) for e in entries]
        return _zip_trees(parts, lambda tensors: torch.cat(tensors, dim=0))

    def gather(self, keys: Sequence[Hashable]) -> Any:
        return self._rows_of(keys, 0)

    def forecast(self, keys: Sequence[Hashable], target_steps: torch.Tensor, order: int) -> Any:
        """Extrapolate each key's value to its target step from its last computed ones (TaylorSeer).

        A Newton divided-difference polynomial through the last `order + 1` computed points, in step units: order 0
        is plain reuse, order 1 a linear extrapolation, and so on. Rows with fewer points use what they have.
        """
        points = min([order + 1, *(len(self._entries[key]) for key in keys)])
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
        for key in keys:
            self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()


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


@dataclass
class CacheStats:
    """Row-level counts of what the hooks did, so benches report skipped work measured rather than assumed."""

    computed: int = 0
    reused: int = 0
    misses: int = 0
    per_component: dict[str, list[int]] = field(default_factory=dict)

    def record(self, name: str, computed: int, reused: int) -> None:
        self.computed += computed
        self.reused += reused
        counts = self.per_component.setdefault(name, [0, 0])
        counts[0] += computed
        counts[1] += reused

    @property
    def reuse_fraction(self) -> float:
        total = self.computed + self.reused
        return self.reused / total if total else 0.0

    def reset(self) -> None:
        self.computed = self.reused = self.misses = 0
        self.per_component.clear()
