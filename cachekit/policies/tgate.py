"""TGATE (Zhang et al., 2024): cross-attention converges early, so after a gate step it is served from cache."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from ..registry import resolve_layout, spec_for
from ..schedule import Schedule
from ..wrapper import denoisers, enable


@dataclass(frozen=True)
class TGATEConfig:
    """Args:
    gate_step: cross-attention computes at steps before it and reuses the output of step `gate_step - 1` after.
    """

    gate_step: int = 10

    def __post_init__(self) -> None:
        if self.gate_step < 1:
            raise ValueError("TGATE gate_step must be >= 1 (step 0 always computes)")

    @property
    def mode(self) -> str:
        """TGATE reuses one component, cross-attention."""
        return "component"


def tgate_schedule(transformer: nn.Module, num_steps: int, config: TGATEConfig = TGATEConfig()) -> Schedule:
    spec = spec_for(transformer)
    cross = {name for group in spec.groups for name in group.cross_attention}
    layout = resolve_layout(transformer)
    columns = [c for c, name in enumerate(layout.components) if name in cross]
    if not columns:
        raise ValueError(
            f"TGATE needs separate cross-attention; {layout.model_class} has none in its registry entry "
            "(joint-attention models such as FLUX and SD3 mix text and image in one attention)"
        )
    full = Schedule.full(transformer, num_steps)
    mask = full.recompute.clone()
    for c in columns:
        mask[config.gate_step :, :, c] = False
    return Schedule.from_mask(
        transformer, mask, provenance={"method": "policy", "policy": "tgate", **asdict(config)}
    )


def apply_tgate(pipe_or_transformer: Any, num_steps: int, config: TGATEConfig = TGATEConfig()) -> Schedule:
    schedule = tgate_schedule(denoisers(pipe_or_transformer)[0], num_steps, config)
    enable(pipe_or_transformer, schedule)
    return schedule
