"""Pieces of StreamDiffusion's image streams that need no model: the stochastic similarity filter and residual CFG.

They are kept apart from the stream loop so each is checked against the paper's formula on its own:

- the similarity filter skips an input frame that is nearly the last one it let through, with probability
  `max(0, 1 - (1 - cos) / (1 - eta))`, and never more than `max_skips` frames in a row (a static camera still
  refreshes); a skipped frame is answered with the previous output;
- residual CFG replaces the unconditional prediction by a stored noise residual scaled by `delta`, so guidance costs
  one conditional row instead of two: `eps = delta * stock + g * (cond - delta * stock)`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from cachekit.errors import UsageError

__all__ = ["SimilarityFilterConfig", "SimilarityFilter", "residual_cfg"]


@dataclasses.dataclass(frozen=True)
class SimilarityFilterConfig:
    """`eta`: the cosine similarity above which frames start being skipped; `max_skips`: skips in a row at most."""

    eta: float = 0.98
    max_skips: int = 10

    def __post_init__(self) -> None:
        if not 0.0 <= self.eta < 1.0:
            raise UsageError(f"similarity filter eta must be in [0, 1), got {self.eta}")
        if isinstance(self.max_skips, bool) or not isinstance(self.max_skips, int) or self.max_skips < 0:
            raise UsageError(f"similarity filter max_skips must be an integer >= 0, got {self.max_skips!r}")


class SimilarityFilter:
    """Decides, per input frame of one stream, whether to skip it; owns that stream's state alone."""

    def __init__(self, config: SimilarityFilterConfig | None = None, seed: int = 0) -> None:
        self.config = config or SimilarityFilterConfig()
        self._generator = torch.Generator("cpu").manual_seed(seed)
        self._last_kept: torch.Tensor | None = None
        self._skipped_in_a_row = 0

    def skip_probability(self, frame: torch.Tensor) -> float:
        """The probability of skipping `frame` given the last frame let through (0 for the first frame)."""
        if self._last_kept is None:
            return 0.0
        cos = float(F.cosine_similarity(frame.flatten().float(), self._last_kept.flatten().float(), dim=0))
        return max(0.0, 1.0 - (1.0 - cos) / (1.0 - self.config.eta))

    def should_skip(self, frame: torch.Tensor) -> bool:
        probability = self.skip_probability(frame)
        if self._skipped_in_a_row < self.config.max_skips and \
                float(torch.rand((), generator=self._generator)) < probability:
            self._skipped_in_a_row += 1
            return True
        self._last_kept = frame.detach().clone()
        self._skipped_in_a_row = 0
        return False


def residual_cfg(cond: torch.Tensor, stock_noise: torch.Tensor, guidance_scale: float,
                 delta: float = 1.0) -> torch.Tensor:
    """Guided noise from the conditional prediction and a stored residual in place of the unconditional one."""
    virtual_uncond = delta * stock_noise
    return virtual_uncond + guidance_scale * (cond - virtual_uncond)
