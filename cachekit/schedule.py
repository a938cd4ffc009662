"""What a cache schedule is, and its file format.

A schedule is a boolean tensor `recompute[step, block, component]` (True: compute, False: serve the output cached at
the last step where it was computed) plus the metadata needed to refuse it on a model or step count it was not made
for. Files are versioned JSON, one line of `0`/`1` per step so that two schedules diff line by line.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .errors import CachekitError
from .io import atomic_write, read_json
from .registry import BLOCK_COMPONENT, ModelLayout, resolve_layout
from .state import StepRows

__all__ = ["Schedule", "ScheduleError", "SCHEDULE_FORMAT", "SCHEDULE_VERSION"]

logger = logging.getLogger(__name__)

SCHEDULE_FORMAT = "cachekit.schedule"
SCHEDULE_VERSION = 1
PROVENANCES = ("full", "hand", "policy", "search", "solver", "transfer")


class ScheduleError(CachekitError, ValueError):
    """A schedule that does not fit the model, the step count, or its own file format."""


@dataclass
class Schedule:
    """A per-step, per-block, per-component recompute plan.

    Build one with `Schedule.full` or `Schedule.from_mask`; every other constructor in cachekit goes through these.
    """

    recompute: torch.Tensor
    model_class: str
    components: tuple[str, ...]
    present: torch.Tensor
    mode: str = "component"
    scheduler: str | None = None
    provenance: dict[str, Any] = field(default_factory=lambda: {"method": "hand"})
    predicted_cost: dict[str, float] | None = None
    measured: dict[str, Any] | None = None
    forecast: torch.Tensor | None = None  # [steps, blocks, components]: reuse entries served by extrapolation
    forecast_order: int = 0

    # ------------------------------------------------------------------ constructors
    @classmethod
    def full(
        cls, transformer: nn.Module, num_steps: int, *, mode: str = "component", scheduler: str | None = None
    ) -> "Schedule":
        """Recompute everything at every step: the uncached model, expressed as a schedule."""
        layout = resolve_layout(transformer, mode)
        mask = torch.ones(num_steps, layout.num_blocks, len(layout.components), dtype=torch.bool)
        return cls._from_layout(layout, mask, mode, scheduler, {"method": "full"})

    @classmethod
    def from_mask(
        cls,
        transformer: nn.Module,
        mask: torch.Tensor,
        *,
        mode: str = "component",
        scheduler: str | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> "Schedule":
        """Wrap a `[steps, blocks, components]` bool mask, last axis ordered as `schedule.components` lists.

        The components are those of the model in `mode` (see `cachekit.registry.resolve_layout`).
        """
        layout = resolve_layout(transformer, mode)
        mask = torch.as_tensor(mask)
        expected = (layout.num_blocks, len(layout.components))
        if mask.ndim != 3 or tuple(mask.shape[1:]) != expected:
            raise ScheduleError(
                f"mask must have shape [steps, {expected[0]} blocks, {expected[1]} components {list(layout.components)}]"
                f" for {layout.model_class}, got {list(mask.shape)}"
            )
        return cls._from_layout(layout, mask.bool(), mode, scheduler, provenance or {"method": "hand"})

    @classmethod
    def _from_layout(
        cls, layout: ModelLayout, mask: torch.Tensor, mode: str, scheduler: str | None, provenance: dict[str, Any]
    ) -> "Schedule":
        schedule = cls(
            recompute=mask.cpu() | ~layout.present.unsqueeze(0),  # absent components: nothing to skip
            model_class=layout.model_class,
            components=layout.components,
            present=layout.present.clone(),
            mode=mode,
            scheduler=scheduler,
            provenance=dict(provenance),
        )
        schedule._check_consistency()
        return schedule

    # ------------------------------------------------------------------ shape
    @property
    def num_steps(self) -> int:
        return int(self.recompute.shape[0])

    @property
    def num_blocks(self) -> int:
        return int(self.recompute.shape[1])

    @property
    def effective(self) -> torch.Tensor:
        """The mask as it acts: absent components count as computed (there is nothing to skip)."""
        return self.recompute | ~self.present.unsqueeze(0)

    def decide(self, rows: StepRows, block: int, component: int) -> torch.Tensor:
        """Per batch row, whether `component` of `block` computes at that row's step (the `CachePlan` protocol)."""
        return self.recompute[rows.steps, block, component]

    def with_forecast(self, order: int = 1, where: torch.Tensor | None = None) -> "Schedule":
        """Serve reused entries by TaylorSeer-style extrapolation of order `order` instead of plain reuse.

        `where` (a `[steps, blocks, components]` bool mask) limits forecasting to some reuse entries; by default every
        reuse entry forecasts. Order 1 extrapolates linearly from the last two computed steps.
        """
        if order < 1:
            raise ScheduleError("forecast order must be >= 1 (order 0 is plain reuse)")
        reuse = ~self.recompute
        forecast = reuse if where is None else reuse & torch.as_tensor(where, dtype=torch.bool)
        provenance = {**self.provenance, "forecast": {"method": "taylorseer", "order": order}}
        return replace(self, forecast=forecast.clone(), forecast_order=order, provenance=provenance, predicted_cost=None)

    # ------------------------------------------------------------------ validation
    def _check_consistency(self) -> None:
        if self.mode not in ("component", "block"):
            raise ScheduleError(f"unknown schedule mode {self.mode!r}; expected 'component' or 'block'")
        if self.mode == "block" and self.components != (BLOCK_COMPONENT,):
            raise ScheduleError(f"a block-mode schedule has the single component {BLOCK_COMPONENT!r}")
        if self.recompute.dtype != torch.bool or self.recompute.ndim != 3:
            raise ScheduleError("recompute must be a 3-d bool tensor [steps, blocks, components]")
        if self.num_steps < 1:
            raise ScheduleError("a schedule needs at least one step")
        if tuple(self.present.shape) != (self.num_blocks, len(self.components)):
            raise ScheduleError("the present mask does not match the number of blocks and components")
        missing = ~self.recompute[0] & self.present
        if bool(missing.any()):
            block, comp = (int(i) for i in missing.nonzero()[0])
            raise ScheduleError(
                f"step 0 must compute everything (nothing is cached yet), but block {block} "
                f"component {self.components[comp]!r} is set to reuse"
            )
        if self.forecast is not None:
            if self.forecast.shape != self.recompute.shape or bool((self.forecast & self.recompute).any()):
                raise ScheduleError("forecast entries must be a subset of the reuse entries")
            if self.forecast_order < 1:
                raise ScheduleError("a schedule with forecast entries needs forecast_order >= 1")
        if self.provenance.get("method") not in PROVENANCES:
            raise ScheduleError(f"provenance method must be one of {PROVENANCES}, got {self.provenance.get('method')!r}")

    def validate_for(self, transformer: nn.Module, num_steps: int | None = None) -> None:
        """Raise a `ScheduleError` naming exactly what does not fit this transformer (and step count)."""
        layout = resolve_layout(transformer, self.mode)
        if layout.model_class != self.model_class:
            raise ScheduleError(
                f"schedule was made for {self.model_class}, but the model is {layout.model_class}"
            )
        if layout.num_blocks != self.num_blocks:
            raise ScheduleError(
                f"schedule has {self.num_blocks} blocks, but this {layout.model_class} has {layout.num_blocks}"
            )
        if layout.components != self.components:
            raise ScheduleError(
                f"schedule components {list(self.components)} do not match the model's {list(layout.components)}"
            )
        if not torch.equal(layout.present, self.present):
            raise ScheduleError("schedule's component layout per block does not match the model's")
        if num_steps is not None:
            self.check_steps(num_steps)

    def schedule_for(self, num_steps: int) -> "Schedule":
        """This schedule, if it is for `num_steps` steps (the plan protocol's per-step-count view); else an error."""
        self.check_steps(num_steps)
        return self

    def check_steps(self, num_steps: int) -> None:
        if num_steps != self.num_steps:
            raise ScheduleError(
                f"schedule has {self.num_steps} steps but the pipeline runs {num_steps}; make one for {num_steps} "
                f"steps or transfer it explicitly with schedule.resample({num_steps}) "
                f"(CLI: cachekit schedule resample FILE --steps {num_steps})"
            )

    # ------------------------------------------------------------------ transfer
    def resample(self, num_steps: int) -> "Schedule":
        """Map this schedule onto another step count by nearest relative position, and log the mapping.

        Step 0 always maps to step 0, so the first step still computes everything.
        """
        if num_steps < 1:
            raise ScheduleError("num_steps must be positive")
        if num_steps == self.num_steps:
            return replace(self, recompute=self.recompute.clone())
        if num_steps == 1:
            source = torch.zeros(1, dtype=torch.long)
        else:
            positions = torch.arange(num_steps, dtype=torch.float64) * (self.num_steps - 1) / (num_steps - 1)
            source = (positions + 0.5).floor().long()  # nearest, ties to the later step
        mask = self.recompute[source].clone()
        mask[0] = True
        logger.info(
            "cachekit: transferred schedule from %d to %d steps by nearest step: new step -> old step %s",
            self.num_steps,
            num_steps,
            dict(enumerate(source.tolist())),
        )
        provenance = {"method": "transfer", "from_steps": self.num_steps, "source": self.provenance}
        forecast = None if self.forecast is None else self.forecast[source] & ~mask
        if forecast is not None and not bool(forecast.any()):
            forecast = None
        return replace(self, recompute=mask, provenance=provenance, predicted_cost=None, measured=None,
                       forecast=forecast, forecast_order=self.forecast_order if forecast is not None else 0)

    # ------------------------------------------------------------------ statistics
    def compute_fraction(self, weights: torch.Tensor | None = None) -> float:
        """Fraction of component evaluations that compute; with `weights[block, comp]`, weighted (e.g. by MACs)."""
        eff = self.effective.float()
        if weights is None:
            return float(eff[:, self.present].mean())
        weights = weights.float() * self.present.float()
        return float((eff * weights).sum() / (weights.sum() * self.num_steps))

    def summary(self) -> str:
        """A human-readable overview: compute fractions per step, block and component, and predicted cost."""
        eff = self.effective.float()
        present = self.present.float()
        lines = [
            f"{self.model_class}: {self.num_steps} steps x {self.num_blocks} blocks x {len(self.components)} "
            f"components {list(self.components)} ({self.mode} mode)",
            f"scheduler: {self.scheduler or 'unspecified'}   provenance: {json.dumps(self.provenance)}",
            f"computed: {self.compute_fraction():.1%} of component evaluations",
        ]
        if self.predicted_cost:
            lines.append("predicted cost: " + ", ".join(f"{k}={v:.4g}" for k, v in self.predicted_cost.items()))
        if self.measured:
            lines.append("measured: " + json.dumps(self.measured))
        per_step = (eff * present).sum((1, 2)) / present.sum()
        lines.append("per step:      " + " ".join(f"{i}:{v:.0%}" for i, v in enumerate(per_step.tolist())))
        per_block = (eff * present).sum((0, 2)) / (present.sum(1) * self.num_steps)
        lines.append("per block:     " + " ".join(f"{i}:{v:.0%}" for i, v in enumerate(per_block.tolist())))
        per_comp = (eff * present).sum((0, 1)) / (present.sum(0) * self.num_steps)
        lines.append("per component: " + " ".join(f"{n}:{v:.0%}" for n, v in zip(self.components, per_comp.tolist())))
        lines.append("map (rows = steps, columns = blocks; #: all components computed, +: some, .: none)")
        for step in range(self.num_steps):
            row = []
            for block in range(self.num_blocks):
                have = self.present[block]
                done = self.recompute[step, block][have]
                row.append("#" if bool(done.all()) else ("+" if bool(done.any()) else "."))
            lines.append(f"  {step:>3} {''.join(row)}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ files
    def _entry_char(self, step: int, block: int, component: int) -> str:
        if not bool(self.present[block, component]):
            return "-"
        if bool(self.recompute[step, block, component]):
            return "1"
        if self.forecast is not None and bool(self.forecast[step, block, component]):
            return "f"
        return "0"

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for step in range(self.num_steps):
            blocks = []
            for block in range(self.num_blocks):
                blocks.append("".join(self._entry_char(step, block, c) for c in range(len(self.components))))
            rows.append(" ".join(blocks))
        return {
            "format": SCHEDULE_FORMAT,
            "version": SCHEDULE_VERSION,
            "model_class": self.model_class,
            "mode": self.mode,
            "num_steps": self.num_steps,
            "num_blocks": self.num_blocks,
            "components": list(self.components),
            "scheduler": self.scheduler,
            "provenance": self.provenance,
            "predicted_cost": self.predicted_cost,
            "measured": self.measured,
            "forecast_order": self.forecast_order,
            "recompute": rows,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Schedule":
        if not isinstance(data, dict) or data.get("format") != SCHEDULE_FORMAT:
            raise ScheduleError(f"not a cachekit schedule (missing \"format\": \"{SCHEDULE_FORMAT}\")")
        version = data.get("version")
        if version != SCHEDULE_VERSION:
            raise ScheduleError(
                f"unknown schedule version {version!r}; this cachekit reads version {SCHEDULE_VERSION}"
            )
        try:
            components = tuple(data["components"])
            num_steps, num_blocks = int(data["num_steps"]), int(data["num_blocks"])
            rows = data["recompute"]
            if len(rows) != num_steps:
                raise ScheduleError(f"recompute has {len(rows)} rows but num_steps is {num_steps}")
            recompute = torch.ones(num_steps, num_blocks, len(components), dtype=torch.bool)
            forecast = torch.zeros_like(recompute)
            present = torch.ones(num_blocks, len(components), dtype=torch.bool)
            for step, row in enumerate(rows):
                blocks = row.split()
                if len(blocks) != num_blocks or any(len(b) != len(components) for b in blocks):
                    raise ScheduleError(
                        f"recompute row {step} must have {num_blocks} groups of {len(components)} characters"
                    )
                for block, chars in enumerate(blocks):
                    for c, char in enumerate(chars):
                        if char not in "01f-":
                            raise ScheduleError(f"recompute row {step} has {char!r}; only 0, 1, f and - are allowed")
                        if step == 0:
                            present[block, c] = char != "-"
                        elif (char == "-") != (not bool(present[block, c])):
                            raise ScheduleError(f"recompute row {step} disagrees with row 0 on absent components")
                        recompute[step, block, c] = char in "1-"
                        forecast[step, block, c] = char == "f"
            schedule = cls(
                recompute=recompute,
                model_class=str(data["model_class"]),
                components=components,
                present=present,
                mode=str(data.get("mode", "component")),
                scheduler=data.get("scheduler"),
                provenance=dict(data.get("provenance") or {"method": "hand"}),
                predicted_cost=data.get("predicted_cost"),
                measured=data.get("measured"),
                forecast=forecast if bool(forecast.any()) else None,
                forecast_order=int(data.get("forecast_order", 0)),
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise ScheduleError(f"corrupt schedule: {type(err).__name__}: {err}") from None
        schedule._check_consistency()
        return schedule

    def save(self, path: str | os.PathLike) -> None:
        """Write the schedule atomically: a crash mid-write never leaves a half-written file."""
        with atomic_write(path) as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Schedule":
        data = read_json(path, "schedule", ScheduleError)
        try:
            return cls.from_dict(data)
        except ScheduleError as err:
            raise ScheduleError(f"{path}: {err}") from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        return self.to_dict() == other.to_dict()
