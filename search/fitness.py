"""Fitness of candidate schedules: quality, cost, and whether the schedule stays within the CLIP constraint.

The genetic search asks one thing: for these schedules, how good and how expensive? Quality is pluggable:

- `psnr` (default): fidelity of the final images to the uncached model's on fixed prompts and seeds. On the digits
  model CLIP saturates, since the right digit is easy, while fidelity keeps discriminating.
- `clip`: CLIP score of the images against their prompts (any local CLIP, by default the bundled digits CLIP).
- `image-reward`: ImageReward, when its weights are on disk.

Cost is the predicted transformer MAC ratio (`macs`), the latency predicted from a calibration's per-unit table
(`latency`), or the whole pipeline call's seconds predicted by a model fitted to timed calls (`wallclock`, see
`wallclock.py`), each as a fraction of the uncached model at the reference step count.

A candidate may run another step count than the reference (the joint search): it is then called at its own step
count and judged against the uncached images at the reference count, and its cost counts its steps (a 6-step
schedule that reuses nothing costs 6/20 of the transformer's work at 20 steps).

A CLIP constraint (`clip_tolerance`) marks a schedule infeasible when its CLIP score falls more than the tolerance
below the uncached model's on the same prompts; NSGA-II then ranks it below every feasible schedule (its quality
becomes minus the shortfall) and it never reaches the written front.

Under `accelerate launch` (or any torch.distributed launch) each process evaluates its share of the candidates with
the model resident, and the fitnesses are gathered in candidate order, so every process runs the same search.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

import cachekit
from cachekit.cost import MacProfile
from cachekit.eval.distributed import Dist, get_dist, global_batches
from cachekit.eval.fidelity import PSNR
from cachekit.eval.images import to_uint8
from cachekit.pipelines.call import PipelineCall
from cachekit.schedule import Schedule

__all__ = [
    "COSTS",
    "QUALITIES",
    "Evaluator",
    "Fitness",
    "PipelineEvaluator",
    "MAX_PSNR",
    "latency_ratio",
    "capped_psnr",
]

MAX_PSNR = 60.0
"""Identical images have infinite PSNR; the search caps quality here (about 1/1000 of a grey level RMS)."""

QUALITIES = {"psnr": "psnr_vs_uncached", "clip": "clip_score", "image-reward": "image_reward"}
COSTS = {"macs": "mac_ratio", "latency": "latency_ratio", "wallclock": "wallclock_ratio"}


@dataclass(frozen=True)
class Fitness:
    quality: float
    cost: float
    feasible: bool = True
    details: dict[str, float] = field(default_factory=dict)


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
    # this process's images only: under torch.distributed a torchmetrics compute() would otherwise average in
    # whatever candidate another process is judging at the same moment
    metric = PSNR(sync_on_compute=False)
    metric.update(images, reference)
    value = float(metric.compute())
    return min(value, MAX_PSNR)


class PipelineEvaluator:
    """Evaluates schedules in-process with the model resident, all calibration prompts in one batched call.

    Args:
        pipe, prompts, num_steps, call_kwargs: the pipeline call every candidate is judged by; `num_steps` is the
            reference step count (the uncached images), a candidate runs its own schedule's step count.
        seed: noise seed of the first prompt; prompt i uses `seed + i`.
        quality: one of `QUALITIES`.
        cost: one of `COSTS`; `latency` needs `latency_table`, `wallclock` needs `set_wallclock` before evaluating.
        clip: a `cachekit.eval.clip_score.CLIPScore` for the `clip` quality and the constraint (default: the
            bundled digits CLIP, loaded when needed).
        clip_tolerance: CLIP-score points a feasible schedule may lose against the uncached model (None: no
            constraint).
    """

    def __init__(
        self,
        pipe: Any,
        prompts: Sequence[str],
        num_steps: int,
        seed: int = 0,
        quality: str = "psnr",
        cost: str = "macs",
        latency_table: tuple[torch.Tensor, float] | None = None,
        clip: Any | None = None,
        clip_tolerance: float | None = None,
        dist: Dist | None = None,
        **call_kwargs: Any,
    ) -> None:
        if quality not in QUALITIES:
            raise ValueError(f"quality must be one of {list(QUALITIES)}, got {quality!r}")
        if cost not in COSTS:
            raise ValueError(f"cost must be one of {list(COSTS)}, got {cost!r}")
        if cost == "latency" and latency_table is None:
            raise ValueError("latency cost needs `calibration.unit_costs('latency')` from `cachekit calibrate`")
        if clip_tolerance is not None and clip_tolerance < 0:
            raise ValueError(f"clip_tolerance must be >= 0, got {clip_tolerance}")
        self.pipe = pipe
        self.prompts = list(prompts)
        self.num_steps = num_steps
        self.seed = seed
        self.call_kwargs = call_kwargs
        self._calls: dict[int, PipelineCall] = {}
        self.quality = quality
        self.cost_kind = cost
        self.quality_name = QUALITIES[quality]
        self.cost_name = COSTS[cost]
        self.latency_table = latency_table
        self.wallclock = None
        self.clip_tolerance = clip_tolerance
        self.dist = dist or get_dist()
        self.device = getattr(pipe, "device", torch.device("cpu"))
        self.clip = clip
        if self.clip is None and (quality == "clip" or clip_tolerance is not None):
            from cachekit.eval.clip_models import load_clip_model
            from cachekit.eval.clip_score import CLIPScore

            self.clip = CLIPScore(load_clip_model("digits", device=str(self.device)))
        self._image_reward = None
        if quality == "image-reward":
            from cachekit.eval.image_reward import ImageRewardScore

            self._image_reward = ImageRewardScore(os.environ.get("CACHEKIT_IMAGEREWARD_DIR"), sync_on_compute=False)
        self.profile = MacProfile.for_pipeline(pipe, prompt=self.prompts[0], **call_kwargs)
        self.reference = self.generate(None)
        self.reference_clip = self._clip_score(self.reference) if self.clip is not None else None
        self.evaluations = 0

    # ---------------------------------------------------------------- the call every candidate is judged by
    def generate(self, schedule: Schedule | None) -> torch.Tensor:
        """uint8 images of the calibration prompts under `schedule` (None: the stock, unhooked pipeline)."""
        if schedule is None:
            return self.call()
        with self.apply(schedule):
            return self.call(schedule.num_steps)

    def call(self, num_steps: int | None = None) -> torch.Tensor:
        """The pipeline call candidates are judged by (at `num_steps`, default the reference), with whatever cache
        is enabled on the pipeline."""
        num_steps = self.num_steps if num_steps is None else int(num_steps)
        call = self._calls.get(num_steps)
        if call is None:
            call = self._calls[num_steps] = PipelineCall(tuple(self.prompts), num_steps, self.call_kwargs,
                                                         tuple(self.seed + i for i in range(len(self.prompts))))
        return to_uint8(call(self.pipe))

    def apply(self, schedule: Schedule) -> Any:
        """A context with `schedule` enabled on the pipeline."""
        return cachekit.cached(self.pipe, schedule)

    def set_wallclock(self, model: Any) -> None:
        """Use a fitted `WallClockModel` (`wallclock.fit_wallclock(self.call, self.apply, ...)`) for the cost."""
        self.wallclock = model

    # ---------------------------------------------------------------- objectives
    def _clip_score(self, images: torch.Tensor) -> float:
        return float(self.clip.per_image(images, self.prompts).mean())

    def _quality(self, images: torch.Tensor, clip_score: float | None) -> float:
        if self.quality == "psnr":
            return capped_psnr(images, self.reference)
        if self.quality == "clip":
            return float(clip_score)
        self._image_reward.reset()
        self._image_reward.update(images, self.prompts)
        return float(self._image_reward.compute())

    def cost(self, schedule: Schedule) -> float:
        """Cost against the uncached model at the reference step count (fewer steps cost proportionally less)."""
        steps_share = schedule.num_steps / self.num_steps
        if self.cost_kind == "macs":
            return self.profile.predict(schedule) * steps_share
        if self.cost_kind == "latency":
            return latency_ratio(schedule, *self.latency_table) * steps_share
        if self.wallclock is None:
            raise RuntimeError("wallclock cost needs a fitted model: call set_wallclock(fit_wallclock(...)) first")
        return self.wallclock.ratio(schedule, self.profile)

    def _evaluate_one(self, schedule: Schedule) -> Fitness:
        images = self.generate(schedule)
        clip_score = self._clip_score(images) if self.clip is not None else None
        quality = self._quality(images, clip_score)
        details: dict[str, float] = {}
        feasible = True
        if clip_score is not None:
            details["clip_score"] = round(clip_score, 4)
            if self.clip_tolerance is not None:
                shortfall = self.reference_clip - clip_score - self.clip_tolerance
                if shortfall > 0:
                    feasible = False
                    quality = -shortfall
        return Fitness(quality, self.cost(schedule), feasible, details)

    def evaluate(self, schedules: Sequence[Schedule]) -> list[Fitness]:
        """Fitness of each schedule, in order; with several processes each evaluates its share, then all gather."""
        if self.dist.world_size == 1:
            results = [self._evaluate_one(s) for s in schedules]
        else:
            mine = [i for batch in self.dist.my_batches(global_batches(len(schedules), 1)) for i in batch]
            local = [(i, self._evaluate_one(schedules[i])) for i in mine]
            gathered = dict(pair for part in self.dist.gather(local) for pair in part)
            results = [gathered[i] for i in range(len(schedules))]
        self.evaluations += len(results)
        return results

    def describe(self) -> dict[str, Any]:
        """What the objectives were, for every output."""
        info: dict[str, Any] = {
            "quality": self.quality_name,
            "cost": self.cost_name,
            "prompts": len(self.prompts),
            "noise_seed": self.seed,
            "num_steps": self.num_steps,
            "processes": self.dist.world_size,
        }
        if self.reference_clip is not None:
            info["uncached_clip_score"] = round(self.reference_clip, 4)
        if self.clip_tolerance is not None:
            info["constraint"] = f"clip_score >= uncached - {self.clip_tolerance:g}"
        return info
