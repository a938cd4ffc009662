"""TeaCache (Liu et al., 2025): skip when the accumulated, rescaled change of the modulated input is small.

The first block's modulated input (its first component's input: timestep-modulated, normalised hidden states) is
cheap to observe and tracks how much the output will change. Its relative L1 change between consecutive steps,
passed through a polynomial fitted per model (`calibrate_teacache`), estimates the output change; these estimates
accumulate over reused steps and everything runs again once they cross the threshold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..hooks import FIRST_INPUT
from ..state import StepRows
from ..wrapper import enable
from .runtime import BlockSkipPolicy, relative_l1


@dataclass(frozen=True)
class TeaCacheConfig:
    """Args:
    threshold: run everything once the accumulated estimated change reaches this.
    coefficients: polynomial (highest power first, numpy order) mapping the input change to the output change;
        the identity until calibrated.
    """

    threshold: float = 0.1
    coefficients: tuple[float, ...] = field(default=(1.0, 0.0))

    def __post_init__(self) -> None:
        if self.threshold < 0 or not self.coefficients:
            raise ValueError(f"invalid TeaCache config {self}")


class TeaCachePolicy(BlockSkipPolicy):
    decides_after_block = 0
    needs_input_probe = True

    def __init__(self, config: TeaCacheConfig = TeaCacheConfig()) -> None:
        super().__init__()
        self.config = config

    def _skip_rows(self, rows: StepRows, value: Any) -> torch.Tensor:
        skip = torch.zeros(rows.batch_size, dtype=torch.bool)
        modulated = rows.scratch[FIRST_INPUT]
        for i, (key, step, count) in enumerate(zip(rows.keys, rows.step_list, rows.step_counts)):
            state = rows.state(key)
            previous = state.get("previous")
            current = modulated[key]
            last_step = step >= count - 1
            if previous is not None and not last_step:
                change = float(relative_l1(current[None], previous[None]))
                state["accumulated"] = state.get("accumulated", 0.0) + float(np.polyval(self.config.coefficients, change))
                skip[i] = state["accumulated"] < self.config.threshold
            if not skip[i]:
                state["accumulated"] = 0.0
            state["previous"] = current.clone()
        return skip

    def describe(self) -> dict[str, Any]:
        return {"policy": "teacache", **asdict(self.config)}


def apply_teacache(pipe_or_transformer: Any, config: TeaCacheConfig = TeaCacheConfig()) -> TeaCachePolicy:
    policy = TeaCachePolicy(config)
    enable(pipe_or_transformer, policy)
    return policy
