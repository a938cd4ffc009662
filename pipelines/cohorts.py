"""Cohorts: requests admitted together that denoise in lockstep, stepped by one scheduler.

Requests admitted in the same tick with the same group (latent shape, text length), step count and row layout
(CFG or not) are at the same step in every forward of their group, for as long as they live. Their per-request
work between forwards (the guidance combination, the scheduler step, the model-input scaling) is the same
arithmetic on different rows, so a cohort does it once over all its rows instead of once per request: on a small
model that work is per-operation overhead, and per request it cost the runner as much as a tenth of its time.

Each row still gets what its solo call computes: a scheduler step treats the rows of a batch independently (its
coefficients depend on the step alone), and a generator list draws each row's noise from that row's generator, as
diffusers' `randn_tensor` does for a batch of one per generator.

A member that leaves early (cancelled, failed) leaves the forward at once and its caches are freed; its row stays in
the cohort's latents and scheduler state until the cohort ends, stepped with a zero prediction nobody reads, so
that the scheduler's per-row history (multistep solvers keep the last outputs) never has to be taken apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .requests import ActiveRequest

__all__ = ["Cohort"]


class Cohort:
    """The lockstep members of one admission, their stacked latents, and the one scheduler that steps them."""

    def __init__(self, members: Sequence[ActiveRequest], scheduler: Any, latents: torch.Tensor,
                 extra_step_kwargs: dict[str, Any]) -> None:
        self.members = list(members)
        self.scheduler = scheduler
        self.latents = latents
        self.extra_step_kwargs = dict(extra_step_kwargs)
        if "generator" in self.extra_step_kwargs and len(self.members) > 1:
            self.extra_step_kwargs["generator"] = [m.generator for m in self.members]
        self._step = 0
        self._alive = [True] * len(self.members)
        self._row_of = {m: i for i, m in enumerate(self.members)}
        self._share_rows()

    @property
    def num_rows(self) -> int:
        """Transformer rows per member (2 with CFG as two rows, else 1)."""
        return self.members[0].num_rows

    @property
    def step(self) -> int:
        """The step every member is at (members that left stay behind at theirs)."""
        return self._step

    @property
    def timestep(self) -> torch.Tensor:
        return self.scheduler.timesteps[self.step]

    def leave(self, request: ActiveRequest) -> None:
        """The member is gone (cancelled, failed, or finished alone): it takes no more rows of any forward."""
        self._alive[self._row_of[request]] = False

    @property
    def live(self) -> list[ActiveRequest]:
        return [m for m, alive in zip(self.members, self._alive) if alive]

    def model_input(self, family: Any, members: Sequence[ActiveRequest]) -> torch.Tensor:
        """The transformer's input rows of these live members, in order, each repeated for its rows."""
        latents = self.latents if len(members) == len(self.members) else \
            self.latents.index_select(0, self._index(members))
        if self.num_rows > 1:
            latents = latents.repeat_interleave(self.num_rows, dim=0)
        return family.model_input(self.scheduler, latents, self.timestep)

    def guide(self, members: Sequence[ActiveRequest], prediction: torch.Tensor) -> torch.Tensor:
        """The guided prediction of these members from their transformer rows (uncond, cond per member)."""
        if self.num_rows == 1:
            return prediction
        pairs = prediction.unflatten(0, (len(members), 2))
        uncond, cond = pairs[:, 0], pairs[:, 1]
        scales = {m.guidance_scale for m in members}
        if len(scales) == 1:
            scale: Any = scales.pop()
        else:
            scale = torch.tensor([m.guidance_scale for m in members], dtype=prediction.dtype,
                                 device=prediction.device).view(-1, *([1] * (prediction.ndim - 1)))
        return uncond + scale * (cond - uncond)

    def advance(self, members: Sequence[ActiveRequest], guided: torch.Tensor) -> None:
        """One scheduler step of every row, from the guided predictions of these (the live) members."""
        if len(members) < len(self.members):
            full = torch.zeros_like(self.latents)
            full[self._index(members)] = guided.to(full.dtype)
            guided = full
        self.latents = self.scheduler.step(guided, self.timestep, self.latents, **self.extra_step_kwargs,
                                           return_dict=False)[0]
        self._step += 1
        self._share_rows()

    def _share_rows(self) -> None:
        for member, row in zip(self.members, self.latents.split(1)):
            member.latents = row

    def _index(self, members: Sequence[ActiveRequest]) -> torch.Tensor:
        return torch.tensor([self._row_of[m] for m in members], device=self.latents.device)
