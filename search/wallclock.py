"""A wall-clock cost model of whole pipeline calls, fitted to calls timed on the target device.

MACs and per-unit latencies both miss what decides real speed on a small or launch-bound model: every block still
pays its hook, its norms and its modulation when its attention and feed-forward are reused, every step pays the
scheduler, and the call pays the text encoder and the VAE. So the search's `wallclock` cost is a linear model of the
time of one pipeline call,

    time / stock time = intercept + a * compute + b * touched + c * forecast

where `compute` counts computed units weighted by their MACs (one uncached forward = 1), `touched` counts
(step, block) pairs with any unit computed (in forwards' worth of blocks), and `forecast` counts entries that
really extrapolate (a forecast entry with fewer than two computed points before it is served as plain reuse). The coefficients come from timing a handful of probe schedules (the uncached model, everything
reused, FORA-like intervals, random masks) with the very calls the search evaluates, round-robin with the stock,
unhooked pipeline, fitted by non-negative least squares. The model is fitted in units of the stock call: each probe's
time is divided by the stock call's in the same round, and the median over rounds is taken, so a machine that slows
down or speeds up for a while (a shared or virtualised CPU does, by tens of percent) shifts both and cancels out.
Hook overhead counts against a schedule: the all-recompute schedule costs more than 1. The fit's leave-one-out error
is recorded beside it.

The features count steps rather than shares of them, so one model prices schedules of several step counts (the joint
search): the intercept is what a call pays whatever its step count (text encoder, VAE), the rest grows with the
steps computed. A joint search adds probes at each of its step counts, so the fit sees the step count vary; the
model then prices the step counts between the least and the most probed one.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any, ContextManager
from dataclasses import asdict, dataclass, field, replace
import numpy as np
import torch
from scipy.optimize import nnls

from cachekit.cost import MacProfile
from cachekit.io import atomic_write
from cachekit.eval.latency import measure_interleaved
from cachekit.schedule import Schedule

from .genome import template_at

__all__ = ["FEATURES", "WallClockModel", "fit_wallclock", "probe_schedules"]

FEATURES = ("intercept", "compute", "touched", "forecast")
UNCACHED = "uncached"


def _unit_weights(profile: MacProfile, schedule: Schedule) -> torch.Tensor:
    """Per-unit MAC share `[blocks, components]` summing to 1 over the units of one forward."""
    if schedule.mode == "block":
        weights = profile.per_block.double()[:, None]
    else:
        weights = profile.per_component.double()
    total = float(weights.sum())
    if total <= 0:
        raise ValueError("the MAC profile has no MACs in its blocks; cannot weight units")
    return weights / total


def schedule_features(schedule: Schedule, profile: MacProfile) -> list[float]:
    """The model's regressors for one schedule (see the module docstring)."""
    effective = schedule.effective
    compute = float((effective.double() * _unit_weights(profile, schedule)).sum())
    touched = float(effective.any(2).double().sum()) / schedule.num_blocks
    units = float(schedule.present.sum())
    forecast = 0.0
    if schedule.forecast is not None:
        # an extrapolation needs two computed points; before that the hooks serve plain reuse at reuse's cost
        computed_before = effective.long().cumsum(0) - effective.long()
        forecast = float((schedule.forecast & (computed_before >= 2)).sum()) / units
    return [1.0, compute, touched, forecast]


@dataclass
class WallClockModel:
    """Predicted cost of one pipeline call under a schedule, in stock calls, for one model, steps, batch and device.

    `coefficients` are in units of the stock pipeline's call (its median `uncached_seconds` is kept for reading).
    """

    model_class: str
    mode: str
    num_steps: int
    batch_size: int
    device: str
    coefficients: dict[str, float]
    uncached_seconds: float
    probes: list[dict[str, Any]] = field(default_factory=list)
    loo_relative_error: float | None = None
    step_counts: list[int] = field(default_factory=list)
    """Step counts probed beside `num_steps` (the reference, in whose stock call the ratios are): the range priced."""

    def ratio(self, schedule: Schedule, profile: MacProfile) -> float:
        """Predicted time as a fraction of the stock pipeline's (1 / predicted wall-clock speedup)."""
        self._check(schedule)
        x = schedule_features(schedule, profile)
        return float(sum(self.coefficients[name] * v for name, v in zip(FEATURES, x)))

    def predict_seconds(self, schedule: Schedule, profile: MacProfile) -> float:
        return self.ratio(schedule, profile) * self.uncached_seconds

    def _check(self, schedule: Schedule) -> None:
        counts = [self.num_steps, *self.step_counts]
        priced = min(counts) <= schedule.num_steps <= max(counts)
        if (schedule.model_class, schedule.mode) != (self.model_class, self.mode) or not priced:
            steps = f"{self.num_steps} steps" if not self.step_counts else f"{min(counts)}-{max(counts)} steps"
            raise ValueError(
                f"wall-clock model is for {self.model_class} ({self.mode} mode, {steps}), schedule is "
                f"{schedule.model_class} ({schedule.mode} mode, {schedule.num_steps} steps)"
            )

    def save(self, path: str | os.PathLike) -> None:
        with atomic_write(path) as f:
            json.dump({"format": "cachekit.wallclock", "version": 1, **asdict(self)}, f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WallClockModel":
        with open(path) as f:
            data = json.load(f)
        if data.pop("format", None) != "cachekit.wallclock" or data.pop("version", None) != 1:
            raise ValueError(f"{path} is not a cachekit wall-clock model (version 1)")
        return cls(**data)


def probe_schedules(
    template: Schedule, forecast_order: int = 0, seed: int = 0, step_counts: tuple[int, ...] = ()
) -> dict[str, Schedule]:
    """Schedules spanning the feature space: all / nothing reused, regular intervals, partial and random masks; with
    `step_counts`, also nothing reused and every other step at each of those counts."""
    steps = template.num_steps
    present = template.present.unsqueeze(0).expand_as(template.recompute)
    step_index = torch.arange(steps)[:, None, None].expand_as(template.recompute)
    generator = torch.Generator().manual_seed(seed)

    def make(mask: torch.Tensor, name: str) -> Schedule:
        mask = (mask | (step_index == 0) | ~present).clone()
        return replace(template, recompute=mask, provenance={"method": "probe", "name": name}, forecast=None,
                       forecast_order=0, predicted_cost=None, measured=None)

    probes = {
        "full": make(torch.ones_like(template.recompute), "full"),
        "step0-only": make(torch.zeros_like(template.recompute), "step0-only"),
    }
    for interval in (2, 3, 5):
        probes[f"every-{interval}"] = make(step_index % interval == 0, f"every-{interval}")
    half_blocks = torch.arange(template.num_blocks)[None, :, None] < template.num_blocks // 2
    probes["front-half-blocks"] = make(half_blocks.expand_as(template.recompute), "front-half-blocks")
    for density in (0.3, 0.6):
        random_mask = torch.rand(template.recompute.shape, generator=generator) < density
        probes[f"random-{density:g}"] = make(random_mask, f"random-{density:g}")
    if forecast_order:
        for name in ("every-2", "every-3", "every-5", "random-0.3"):
            probes[f"{name}+forecast"] = probes[name].with_forecast(forecast_order)
    for count in sorted(set(step_counts) - {steps}):
        probes[f"full@{count}"] = replace(template_at(template, count),
                                          provenance={"method": "probe", "name": f"full@{count}"})
        if count >= 4:
            probes[f"every-2@{count}"] = replace(probes["every-2"].resample(count),
                                                 provenance={"method": "probe", "name": f"every-2@{count}"})
    return probes


def _fit(features: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    coefficients, _ = nnls(features, seconds)
    return coefficients


def fit_wallclock(
    call: Callable[[int], Any],
    apply: Callable[[Schedule], ContextManager[Any]],
    probes: dict[str, Schedule],
    profile: MacProfile,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
    repeats: int = 5,
    progress: bool = True,
) -> WallClockModel:
    """Time `call(steps)` on the stock pipeline and under `apply(probe)` for each probe, round-robin, and fit.

    `call(num_steps)` must be the very call the search evaluates candidates with (same prompts, batch) at that step
    count; the first probe's step count is the reference, the stock call the ratios are taken against. `apply`
    enables a schedule on its pipeline (`cachekit.cached`), outside the timed region, as a deployment does once.
    """
    if len(probes) < len(FEATURES) + 1:
        raise ValueError(f"need at least {len(FEATURES) + 1} probe schedules to fit {len(FEATURES)} coefficients")
    first = next(iter(probes.values()))
    calls = {UNCACHED: functools.partial(call, first.num_steps),
             **{name: functools.partial(call, probe.num_steps) for name, probe in probes.items()}}
    setups = {name: (lambda s: lambda: apply(s))(schedule) for name, schedule in probes.items()}
    stats = measure_interleaved(calls, batch_size=batch_size, num_steps=first.num_steps, repeats=repeats,
                                device=device, progress=progress, setups=setups)
    names = list(probes)
    x = np.array([schedule_features(probes[n], profile) for n in names], dtype=np.float64)
    stock = np.array(stats[UNCACHED].samples_s, dtype=np.float64)
    y = np.array([np.median(np.array(stats[n].samples_s) / stock) for n in names], dtype=np.float64)
    coefficients = _fit(x, y)
    loo = []
    for i in range(len(names)):
        keep = np.arange(len(names)) != i
        loo.append(abs(float(x[i] @ _fit(x[keep], y[keep])) - y[i]) / y[i])
    predicted = x @ coefficients
    return WallClockModel(
        model_class=first.model_class,
        mode=first.mode,
        num_steps=first.num_steps,
        batch_size=batch_size,
        device=str(device),
        coefficients={name: float(c) for name, c in zip(FEATURES, coefficients)},
        uncached_seconds=stats[UNCACHED].median_s,
        probes=[
            {"name": n, "measured_ratio": round(float(y[i]), 5), "predicted_ratio": round(float(predicted[i]), 5),
             "median_s": round(stats[n].median_s, 5), "iqr_s": round(stats[n].iqr_s, 5)}
            for i, n in enumerate(names)
        ],
        loo_relative_error=float(np.mean(loo)),
        step_counts=sorted({p.num_steps for p in probes.values()} - {first.num_steps}),
    )
