"""Genomes of the schedule search: a schedule as a flat list of bits, and back.

`Genome` encodes schedules of one step count. `JointGenome` makes the step count a gene beside the cache genes, so
the search can trade fewer steps against more reuse: on few-step models running fewer steps beats any cache, on
20-50 step models caching wins, and only a search over both finds the fastest way to a given quality. `make_genome`
picks the one a search config asks for; the search itself sees only the shared interface (`size`, `encode`,
`decode`, `fits`, `mutations`, `flip`, `canonicalize`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from deap import tools

from cachekit.schedule import Schedule

__all__ = ["Genome", "JointGenome", "make_genome", "template_at"]


class Genome:
    """Maps schedules to flat gene lists and back, for one template (model layout, step count, mode).

    Genes are one per (step, block, component) that exists, step 0 excluded, then, with `forecast_order > 0`, one
    per step from 1 on: whether that step's reused entries are extrapolated (TaylorSeer, `forecast_order`) from the
    last computed ones instead of reused as they are. The template's mode (component or block) is the genome's.
    """

    def __init__(self, template: Schedule, forecast_order: int = 0) -> None:
        if forecast_order < 0:
            raise ValueError(f"forecast_order must be >= 0, got {forecast_order}")
        self.template = template
        self.forecast_order = forecast_order
        steps = torch.arange(template.num_steps)[:, None, None].expand_as(template.recompute)
        self.slots = (template.present.unsqueeze(0).expand_as(template.recompute) & (steps > 0)).nonzero()
        self.num_mask_genes = len(self.slots)
        self.num_forecast_genes = template.num_steps - 1 if forecast_order else 0
        self.size = self.num_mask_genes + self.num_forecast_genes
        self.step_of = self.slots[:, 0].tolist() + list(range(1, 1 + self.num_forecast_genes))
        self.block_of = self.slots[:, 1].tolist() + [-1] * self.num_forecast_genes
        self.component_of = self.slots[:, 2].tolist() + [-1] * self.num_forecast_genes
        self.step_counts = (template.num_steps,)

    def fits(self, schedule: Schedule) -> bool:
        """Whether `schedule` is one this genome can encode (same layout, mode and step count)."""
        template = self.template
        return schedule.recompute.shape == template.recompute.shape and schedule.components == template.components

    def encode(self, schedule: Schedule) -> list[int]:
        mask = schedule.recompute
        genes = [int(v) for v in mask[self.slots[:, 0], self.slots[:, 1], self.slots[:, 2]].tolist()]
        if self.num_forecast_genes:
            forecast = schedule.forecast
            per_step = forecast.flatten(1).any(1) if forecast is not None else torch.zeros(schedule.num_steps, dtype=torch.bool)
            genes += [int(v) for v in per_step[1:].tolist()]
        return genes

    def decode(self, genes: Sequence[int], provenance: dict[str, Any] | None = None) -> Schedule:
        genes = list(genes)
        mask = torch.ones_like(self.template.recompute)
        mask[self.slots[:, 0], self.slots[:, 1], self.slots[:, 2]] = torch.tensor(
            genes[: self.num_mask_genes], dtype=torch.bool
        )
        recompute = mask | ~self.template.present.unsqueeze(0)
        schedule = replace(
            self.template,
            recompute=recompute,
            provenance=provenance or {"method": "search"},
            predicted_cost=None,
            measured=None,
        )
        if self.num_forecast_genes:
            forecast_steps = torch.tensor([False] + [bool(g) for g in genes[self.num_mask_genes :]])
            forecast = ~recompute & self.template.present.unsqueeze(0) & forecast_steps[:, None, None]
            if bool(forecast.any()):
                schedule = replace(schedule, forecast=forecast, forecast_order=self.forecast_order)
        return schedule

    def flip(self, genes: list[int]) -> None:
        """Bit-flip mutation (DEAP's), about one gene per call."""
        tools.mutFlipBit(genes, indpb=max(1.0 / self.size, 0.02))

    def canonicalize(self, genes: list[int]) -> None:
        """Every gene list is already the one spelling of its schedule."""

    # ---------------------------------------------------------------- structured mutations
    def mutations(self) -> list[Callable[[list[int]], None]]:
        """The structured mutations that make sense for this layout (component types only when there are several)."""
        ops = [self.mutate_step, self.mutate_block]
        if len(self.template.components) > 1:
            ops.append(self.mutate_component)
        if self.num_forecast_genes:
            ops.append(self.mutate_forecast)
        return ops

    def _set(self, genes: list[int], where: Callable[[int], bool], value: int) -> None:
        for i in range(self.num_mask_genes):
            if where(i):
                genes[i] = value

    def _step_range(self) -> tuple[int, int]:
        if self.template.num_steps <= 2:
            return 1, 2
        lo, hi = sorted(random.sample(range(1, self.template.num_steps + 1), 2))
        return lo, hi

    def mutate_step(self, genes: list[int]) -> None:
        step = random.randrange(1, self.template.num_steps)
        self._set(genes, lambda i: self.step_of[i] == step, random.randint(0, 1))

    def mutate_block(self, genes: list[int]) -> None:
        block = random.randrange(self.template.num_blocks)
        lo, hi = self._step_range()
        self._set(genes, lambda i: self.block_of[i] == block and lo <= self.step_of[i] < hi, random.randint(0, 1))

    def mutate_component(self, genes: list[int]) -> None:
        component = random.randrange(len(self.template.components))
        lo, hi = self._step_range()
        self._set(genes, lambda i: self.component_of[i] == component and lo <= self.step_of[i] < hi,
                  random.randint(0, 1))

    def mutate_forecast(self, genes: list[int]) -> None:
        """Switch extrapolation on or off for a range of steps."""
        lo, hi = self._step_range()
        value = random.randint(0, 1)
        for i in range(self.num_mask_genes, self.size):
            if lo <= self.step_of[i] < hi:
                genes[i] = value


class JointGenome:
    """The step count as a gene, beside one cache genome per step count.

    Layout: `len(step_counts) - 1` step bits, then the genes of a `Genome` for each step count in turn. The step
    bits are a thermometer code: the number of set bits picks the step count, so a flipped bit moves to a
    neighbouring count and a crossover of two counts lands between them. Only the chosen count's cache genes are
    active; `canonicalize` sorts the step bits, sets every inactive gene to 1 (recompute) and clears genes that mean
    nothing (a forecast gene on a step that reuses nothing), so each schedule has one spelling and the fitness memo never judges one twice. Changing the count (`mutate_steps`) carries the
    schedule over to the new count (`Schedule.resample`), so a good reuse pattern is tried at another step count
    instead of being lost.
    """

    def __init__(self, template: Schedule, step_counts: Sequence[int], forecast_order: int = 0) -> None:
        counts = tuple(sorted(set(int(k) for k in step_counts)))
        if len(counts) < 2:
            raise ValueError(f"a joint genome needs at least two step counts, got {list(step_counts)}")
        if counts[0] < 2:
            raise ValueError(f"step counts must be at least 2, got {list(step_counts)}")
        self.template = template
        self.forecast_order = forecast_order
        self.step_counts = counts
        self.parts = [Genome(template_at(template, k), forecast_order) for k in counts]
        self.num_step_genes = len(counts) - 1
        self.offsets = []
        offset = self.num_step_genes
        for part in self.parts:
            self.offsets.append(offset)
            offset += part.size
        self.size = offset

    # ---------------------------------------------------------------- which part is active
    def choice(self, genes: Sequence[int]) -> int:
        """Index into `step_counts` of the count these genes run."""
        return int(sum(1 for g in genes[: self.num_step_genes] if g))

    def _span(self, index: int) -> slice:
        start = self.offsets[index]
        return slice(start, start + self.parts[index].size)

    def fits(self, schedule: Schedule) -> bool:
        return schedule.num_steps in self.step_counts and self.parts[self.step_counts.index(schedule.num_steps)].fits(schedule)

    def encode(self, schedule: Schedule) -> list[int]:
        if not self.fits(schedule):
            raise ValueError(f"a {schedule.num_steps}-step schedule does not fit a joint genome over "
                             f"{list(self.step_counts)} steps (or its layout differs)")
        index = self.step_counts.index(schedule.num_steps)
        genes = [1 if i < index else 0 for i in range(self.num_step_genes)]
        for j, part in enumerate(self.parts):
            genes += part.encode(schedule) if j == index else [1] * part.size
        return genes

    def decode(self, genes: Sequence[int], provenance: dict[str, Any] | None = None) -> Schedule:
        index = self.choice(genes)
        return self.parts[index].decode(list(genes)[self._span(index)], provenance)

    def canonicalize(self, genes: list[int]) -> None:
        index = self.choice(genes)
        genes[: self.num_step_genes] = [1 if i < index else 0 for i in range(self.num_step_genes)]
        for j, part in enumerate(self.parts):
            span = self._span(j)
            if j == index:  # e.g. a forecast gene on a step that reuses nothing means nothing: cleared
                genes[span] = part.encode(part.decode(genes[span]))
            else:
                genes[span] = [1] * part.size

    def flip(self, genes: list[int]) -> None:
        """Bit flips on the step bits and the active cache genes only (inactive genes carry nothing)."""
        index = self.choice(genes)
        active = list(range(self.num_step_genes)) + list(range(self._span(index).start, self._span(index).stop))
        rate = max(1.0 / len(active), 0.02)
        flipped_steps = False
        for i in active:
            if random.random() < rate:
                genes[i] = 1 - genes[i]
                flipped_steps |= i < self.num_step_genes
        if flipped_steps:
            self._carry_over(genes, index)

    # ---------------------------------------------------------------- structured mutations
    def mutations(self) -> list[Callable[[list[int]], None]]:
        ops: list[Callable[[list[int]], None]] = [self.mutate_steps]
        names = [op.__name__ for op in self.parts[0].mutations()]
        for name in names:
            ops.append(self._on_active_part(name))
        return ops

    def _on_active_part(self, name: str) -> Callable[[list[int]], None]:
        def mutate(genes: list[int]) -> None:
            index = self.choice(genes)
            span = self._span(index)
            part = genes[span]
            getattr(self.parts[index], name)(part)
            genes[span] = part

        mutate.__name__ = name
        return mutate

    def mutate_steps(self, genes: list[int]) -> None:
        """Move to another step count, carrying the current schedule over to it."""
        index = self.choice(genes)
        target = random.choice([i for i in range(len(self.step_counts)) if i != index])
        genes[: self.num_step_genes] = [1 if i < target else 0 for i in range(self.num_step_genes)]
        self._carry_over(genes, index)

    def _carry_over(self, genes: list[int], old_index: int) -> None:
        """After the step bits changed: the schedule of the old count, resampled, becomes the new count's genes."""
        new_index = self.choice(genes)
        if new_index == old_index:
            return
        old = self.parts[old_index].decode(genes[self._span(old_index)])
        carried = old.resample(self.step_counts[new_index])
        genes[self._span(new_index)] = self.parts[new_index].encode(carried)


def template_at(template: Schedule, num_steps: int) -> Schedule:
    """The all-recompute template of the same model and mode at another step count."""
    if num_steps == template.num_steps:
        return template
    recompute = torch.ones(num_steps, *template.recompute.shape[1:], dtype=torch.bool)
    return replace(template, recompute=recompute, forecast=None, forecast_order=0, predicted_cost=None, measured=None)


def make_genome(template: Schedule, forecast_order: int = 0, step_counts: Sequence[int] = ()) -> Genome | JointGenome:
    """The genome of a search: over the template's step count, or joint over `step_counts` when it names several.

    The template's step count is the reference the candidates are judged against; it need not be among the counts.
    """
    counts = sorted(set(step_counts)) or [template.num_steps]
    if len(counts) == 1:
        return Genome(template_at(template, counts[0]), forecast_order)
    return JointGenome(template, counts, forecast_order)
