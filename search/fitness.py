"""Fitness of candidate schedules: quality against the uncached model, and cost.

The genetic search asks one thing: for these schedules, how good and how expensive? Quality is fidelity to the
uncached model's images on fixed prompts and seeds (PSNR by default): on the digits model CLIP saturates, since the
right digit is easy, while fidelity keeps discriminating. Cost is the predicted MAC ratio from the core's cost
model, or the latency predicted from a calibration's measured per-component latency table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

import cachekit
from cachekit.cost import MacProfile
from cachekit.eval.fidelity import PSNR
from cachekit.eval.images import to_uint8
from cachekit.schedule import Schedule

__all__ = ["Evaluator", "Fitness", "PipelineEvaluator", "MAX_PSNR", "latency_ratio", "capped_psnr"]

MAX_PSNR = 60.0
"""Identical images have infinite PSNR; the search caps quality here (about 1/1000 of a grey level RMS)."""


@dataclass(frozen=True)
class Fitness:
    quality: float
    cost: float


class Evaluator(Protocol):
    quality_name: str
    cost_name: str

    def evaluate(self, schedules: Sequence[Schedule]) -> list[Fitness]: ...


def latency_ratio(schedule: Schedule, per_unit: torch.Tensor, total: float) -> float:
    """Predicted latency as a fraction of the uncached forward, from a calibration's `unit_costs("latency")`."""
    per_unit = per_unit.double()
    skipped = ((~schedule.effective).double() * per_unit).sum()
    return float(1.0 - skipped / (total * schedule.num_steps))


def capped_psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    metric = PSNR()
    metric.update(images, reference)
    value = float(metric.compute())
    return min(value, MAX_PSNR)


class PipelineEvaluator:
    """Evaluates schedules in-process with the model resident, all calibration prompts in one batched call."""

    quality_name = "psnr_vs_uncached"

    def __init__(
        self,
        pipe: Any,
        prompts: Sequence[str],
        num_steps: int,
        seed: int = 0,
        cost: str = "macs",
        latency_table: tuple[torch.Tensor, float] | None = None,
        **call_kwargs: Any,
    ) -> None:
        if cost not in ("macs", "latency"):
            raise ValueError("cost must be 'macs' or 'latency'")
        if cost == "latency" and latency_table is None:
            raise ValueError("latency cost needs `calibration.unit_costs('latency')` from `cachekit calibrate`")
        self.pipe = pipe
        self.prompts = list(prompts)
        self.num_steps = num_steps
        self.seed = seed
        self.call_kwargs = call_kwargs
        self.cost_name = "mac_ratio" if cost == "macs" else "latency_ratio"
        self.latency_table = latency_table
        self.profile = MacProfile.for_pipeline(pipe, prompt=self.prompts[0], **call_kwargs)
        self.reference = self._generate(None)
        self.evaluations = 0

    def _generate(self, schedule: Schedule | None) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(self.seed + i) for i in range(len(self.prompts))]
        call = dict(prompt=self.prompts, num_inference_steps=self.num_steps, generator=generators, output_type="pt",
                    **self.call_kwargs)
        with torch.no_grad():
            if schedule is None:
                images = self.pipe(**call).images
            else:
                with cachekit.cached(self.pipe, schedule):
                    images = self.pipe(**call).images
        return to_uint8(images)

    def cost(self, schedule: Schedule) -> float:
        if self.latency_table is None:
            return self.profile.predict(schedule)
        return latency_ratio(schedule, *self.latency_table)

    def evaluate(self, schedules: Sequence[Schedule]) -> list[Fitness]:
        results = []
        for schedule in schedules:
            images = self._generate(schedule)
            results.append(Fitness(capped_psnr(images, self.reference), self.cost(schedule)))
            self.evaluations += 1
        return results
