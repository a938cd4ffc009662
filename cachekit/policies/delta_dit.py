"""Delta-DiT (Chen et al., 2024): cache block residuals by denoising stage.

Early steps shape the outline, which the back blocks refine little, so before the boundary step the back blocks are
served from cache; after it, detail matters and the front blocks are cached instead. Cached blocks are recomputed
every `interval` steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from ..schedule import Schedule
from ..wrapper import denoisers, enable


@dataclass(frozen=True)
class DeltaDiTConfig:
    """Args:
    boundary_step: steps before it cache the back blocks, steps from it on cache the front blocks.
    num_cached_blocks: how many blocks (at the back, then at the front) are cached.
    interval: cached blocks are recomputed every `interval` steps.
    """

    boundary_step: int = 10
    num_cached_blocks: int = 8
    interval: int = 2

    def __post_init__(self) -> None:
        if self.interval < 1 or self.num_cached_blocks < 0 or self.boundary_step < 0:
            raise ValueError(f"invalid Delta-DiT config {self}")

    @property
    def mode(self) -> str:
        """Delta-DiT reuses whole-block residuals."""
        return "block"


def delta_dit_schedule(transformer: nn.Module, num_steps: int, config: DeltaDiTConfig = DeltaDiTConfig()) -> Schedule:
    full = Schedule.full(transformer, num_steps, mode="block")
    if config.num_cached_blocks > full.num_blocks:
        raise ValueError(f"num_cached_blocks={config.num_cached_blocks} exceeds the model's {full.num_blocks} blocks")
    mask = full.recompute.clone()
    k = config.num_cached_blocks
    for step in range(num_steps):
        if step % config.interval == 0 or k == 0:
            continue
        blocks = slice(full.num_blocks - k, None) if step < config.boundary_step else slice(0, k)
        mask[step, blocks] = False
    return Schedule.from_mask(
        transformer, mask, mode="block", provenance={"method": "policy", "policy": "delta-dit", **asdict(config)}
    )


def apply_delta_dit(pipe_or_transformer: Any, num_steps: int, config: DeltaDiTConfig = DeltaDiTConfig()) -> Schedule:
    schedule = delta_dit_schedule(denoisers(pipe_or_transformer)[0], num_steps, config)
    enable(pipe_or_transformer, schedule)
    return schedule
