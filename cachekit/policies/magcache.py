"""MagCache (Ma et al., 2025): residual magnitudes shrink at a steady, model-specific rate across steps.

A calibrated table gives, per step, the ratio of the residual's magnitude to the previous step's. While reusing,
the product of those ratios says how far the cached residual has drifted; the accumulated error `sum |1 - product|`
and a cap on consecutive skips decide when to run everything again. The first `retention_ratio` of the steps
always run, since early steps shape the image. Decisions need no signal from the current step, so even the first
block can be skipped.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..state import StepRows
from ..wrapper import enable
from .runtime import BlockSkipPolicy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MagCacheConfig:
    """Args:
    magnitude_ratios: per step, mean |residual_t| / mean |residual_{t-1}| from `calibrate_magcache`.
    threshold: reuse while the accumulated error stays below it.
    max_skip_steps: at most this many consecutive reused steps.
    retention_ratio: the first fraction of steps that always run.
    """

    magnitude_ratios: tuple[float, ...] = ()
    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2

    def __post_init__(self) -> None:
        if not self.magnitude_ratios:
            raise ValueError("MagCache needs calibrated magnitude ratios: run `cachekit calibrate --policy magcache`")
        if not 0 <= self.retention_ratio <= 1 or self.threshold < 0 or self.max_skip_steps < 0:
            raise ValueError(f"invalid MagCache config {self}")

    def ratios_for(self, num_steps: int) -> np.ndarray:
        """The ratio table at `num_steps`; interpolated (and logged) when calibrated at another step count."""
        ratios = np.asarray(self.magnitude_ratios, dtype=np.float64)
        if len(ratios) == num_steps:
            return ratios
        logger.info("cachekit: MagCache ratios calibrated for %d steps, interpolated to %d", len(ratios), num_steps)
        return np.interp(np.linspace(0, len(ratios) - 1, num_steps), np.arange(len(ratios)), ratios)


class MagCachePolicy(BlockSkipPolicy):
    decides_after_block = None

    def __init__(self, config: MagCacheConfig) -> None:
        super().__init__()
        self.config = config
        self._ratio_tables: dict[int, np.ndarray] = {}

    def _skip_rows(self, rows: StepRows, value: Any) -> torch.Tensor:
        skip = torch.zeros(rows.batch_size, dtype=torch.bool)
        for i, (key, step, count) in enumerate(zip(rows.keys, rows.step_list, rows.step_counts)):
            ratios = self._ratios(count)
            retained = int(round(self.config.retention_ratio * count))
            state = rows.state(key)
            if step >= max(retained, 1) and step < count - 1:
                ratio = state.get("ratio", 1.0) * float(ratios[step])
                error = state.get("error", 0.0) + abs(1.0 - ratio)
                skips = state.get("skips", 0) + 1
                if error < self.config.threshold and skips <= self.config.max_skip_steps:
                    state.update(ratio=ratio, error=error, skips=skips)
                    skip[i] = True
            if not skip[i]:
                state.update(ratio=1.0, error=0.0, skips=0)
        return skip

    def _ratios(self, num_steps: int) -> np.ndarray:
        """The ratio table at `num_steps`, computed once per step count."""
        if num_steps not in self._ratio_tables:
            self._ratio_tables[num_steps] = self.config.ratios_for(num_steps)
        return self._ratio_tables[num_steps]

    def describe(self) -> dict[str, Any]:
        return {"policy": "magcache", **asdict(self.config)}


def apply_magcache(pipe_or_transformer: Any, config: MagCacheConfig) -> MagCachePolicy:
    policy = MagCachePolicy(config)
    enable(pipe_or_transformer, policy)
    return policy
