"""First-block cache (ParaAttention's FBCache, diffusers' FirstBlockCache): the first block is the probe.

The first block always runs. If its residual changed little, relative to the residual at the last step where
everything ran, the remaining blocks are served from their cached residuals; otherwise everything runs and that
residual becomes the new reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..state import StepRows
from ..wrapper import enable
from .runtime import BlockSkipPolicy, _hidden_residual, relative_l1


@dataclass(frozen=True)
class FirstBlockCacheConfig:
    """Args:
    threshold: reuse while the first block's residual differs by less than this relative L1 from the reference.
    warmup_steps: steps that always run everything.
    max_consecutive_skips: after this many reused steps in a row, run everything once.
    """

    threshold: float = 0.08
    warmup_steps: int = 2
    max_consecutive_skips: int = 3

    def __post_init__(self) -> None:
        if self.threshold < 0 or self.warmup_steps < 1 or self.max_consecutive_skips < 0:
            raise ValueError(f"invalid first-block cache config {self}")


class FirstBlockCachePolicy(BlockSkipPolicy):
    decides_after_block = 0

    def __init__(self, config: FirstBlockCacheConfig = FirstBlockCacheConfig()) -> None:
        super().__init__()
        self.config = config

    def _skip_rows(self, rows: StepRows, value: Any) -> torch.Tensor:
        residual = _hidden_residual(value).detach()
        skip = torch.zeros(rows.batch_size, dtype=torch.bool)
        for i, (key, step) in enumerate(zip(rows.keys, rows.step_list)):
            state = rows.state(key)
            reference = state.get("reference")
            if reference is not None and step >= self.config.warmup_steps:
                change = float(relative_l1(residual[i : i + 1], reference[None]))
                if change < self.config.threshold and state.get("skips", 0) < self.config.max_consecutive_skips:
                    skip[i] = True
            if skip[i]:
                state["skips"] = state.get("skips", 0) + 1
            else:
                state["reference"], state["skips"] = residual[i].clone(), 0
        return skip

    def describe(self) -> dict[str, Any]:
        return {"policy": "first-block", **asdict(self.config)}


def apply_first_block_cache(pipe_or_transformer: Any, config: FirstBlockCacheConfig = FirstBlockCacheConfig()):
    policy = FirstBlockCachePolicy(config)
    enable(pipe_or_transformer, policy)
    return policy
