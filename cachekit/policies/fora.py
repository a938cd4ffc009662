"""FORA (Selvaraju et al., 2024): recompute every `interval` steps and reuse the cached features in between."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..schedule import Schedule
from ..wrapper import denoisers, enable


@dataclass(frozen=True)
class FORAConfig:
    """Args:
    interval: compute at steps 0, interval, 2*interval, ...; reuse at the others.
    mode: "block" reuses whole-block residuals as FORA does; "component" reuses each attention / feed-forward output.
    """

    interval: int = 3
    mode: str = "block"

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"FORA interval must be >= 1, got {self.interval}")


def fora_schedule(transformer: nn.Module, num_steps: int, config: FORAConfig = FORAConfig()) -> Schedule:
    full = Schedule.full(transformer, num_steps, mode=config.mode)
    mask = torch.zeros_like(full.recompute)
    mask[:: config.interval] = True
    return Schedule.from_mask(
        transformer, mask, mode=config.mode, provenance={"method": "policy", "policy": "fora", **asdict(config)}
    )


def apply_fora(pipe_or_transformer: Any, num_steps: int, config: FORAConfig = FORAConfig()) -> Schedule:
    """Enable FORA on a pipeline for `num_steps`-step generations; returns the schedule it applied."""
    schedule = fora_schedule(denoisers(pipe_or_transformer)[0], num_steps, config)
    enable(pipe_or_transformer, schedule)
    return schedule
