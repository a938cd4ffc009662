"""Which denoising step a transformer call belongs to, read off its `timestep` argument.

The one place that matches timesteps to a scheduler's schedule: cachekit's step tracker uses it to index schedules,
and the peer benchmarks use it to give diffusers' caches the step index PixArt's pipeline never provides. Matching is
by nearest timestep, accepted within half the smallest spacing of the schedule, so it never depends on call counts.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import CachekitError

__all__ = ["StepResolutionError", "scheduler_timesteps", "row_timesteps", "match_steps"]


class StepResolutionError(CachekitError, RuntimeError):
    """The denoising step of a transformer call cannot be told from its timestep and the scheduler."""


def scheduler_timesteps(scheduler: Any) -> torch.Tensor:
    """The scheduler's current timesteps as float32 on CPU; a clear error when it has none yet."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or len(timesteps) == 0:
        raise StepResolutionError(
            "cachekit cannot tell the denoising step: enable it on the pipeline (not the bare transformer), pass "
            "scheduler= to cachekit.enable, or set rows explicitly with cachekit.rows(...)"
        )
    return torch.as_tensor(timesteps).detach().float().cpu()


def row_timesteps(timestep: Any, batch_size: int, scale: float = 1.0) -> torch.Tensor:
    """One timestep per batch row, in the scheduler's units (`scale` undoes a pipeline's rescaling, FLUX's t/1000).

    A scalar is broadcast; per-token timesteps (Wan 2.2 TI2V) count as the row's largest one; a batch of one
    timestep for a larger batch is broadcast.
    """
    if timestep is None:
        raise StepResolutionError("the transformer was called without its timestep argument")
    values = torch.as_tensor(timestep).detach().float().cpu() * scale
    if values.ndim == 0:
        return values.expand(batch_size)
    if values.ndim > 1:
        values = values.flatten(1).amax(1)
    if values.shape[0] != batch_size:
        values = values[:1].expand(batch_size)
    return values


def match_steps(values: torch.Tensor, scheduler: Any) -> tuple[torch.Tensor, int]:
    """(The step index of each timestep in `values` (long, CPU), the schedule's step count).

    Raises `StepResolutionError` if a timestep is off the scheduler's schedule.

    Schedules that repeat timesteps (second-order solvers) cannot be matched by value; the scheduler's own
    `step_index` decides there.
    """
    timesteps = scheduler_timesteps(scheduler)
    distance = (values[:, None] - timesteps[None, :]).abs()
    steps = distance.argmin(1)
    distinct = timesteps.unique()
    spacing = (distinct[1:] - distinct[:-1]).abs().min().item() if distinct.numel() > 1 else 1.0
    worst = distance.gather(1, steps[:, None]).max().item()
    if worst > 0.5 * spacing:
        raise StepResolutionError(
            f"timestep {values.tolist()} is not one of the scheduler's timesteps; if the pipeline rescales "
            "timesteps, set timestep_scale in its cachekit registry entry"
        )
    if distinct.numel() < timesteps.numel():
        step_index = getattr(scheduler, "step_index", None)
        steps = torch.full_like(steps, int(step_index or 0))
    return steps.long(), int(timesteps.numel())
