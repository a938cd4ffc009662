"""Automatic calibration of runtime policies: fit TeaCache's polynomial, MagCache's ratios, a first-block threshold.

Hand-fitting TeaCache coefficients per model is its users' most common complaint. Here one uncached run over a few
prompts records the signals each policy reads (`SignalRecorder`), the fit happens in closed form, and the result is
a small JSON file tied to the model class and step count it was measured on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from ..errors import UsageError
from ..io import atomic_write, read_json
from ..wrapper import cached, denoisers
from .runtime import SignalRecorder, relative_l1

__all__ = ["PolicyCalibration", "record_signals", "fit", "calibrate_run", "POLICY_CALIBRATION_FORMAT",
           "CALIBRATED_POLICIES"]

POLICY_CALIBRATION_FORMAT = "cachekit.policy-calibration"
"""The `format` field of a runtime-policy calibration file (the solver's calibration is `cachekit.calibration`)."""
CALIBRATED_POLICIES = ("teacache", "magcache", "first-block")
"""The runtime policies `fit` knows how to calibrate (every entry of `cachekit.policies.RUNTIME_POLICIES`)."""


@dataclass
class PolicyCalibration:
    """Fitted values for one runtime policy on one model class and step count."""

    policy: str
    model_class: str
    num_steps: int
    values: dict[str, Any]
    samples: int
    details: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        with atomic_write(path) as f:
            json.dump({"format": POLICY_CALIBRATION_FORMAT, "version": 1, **asdict(self)}, f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PolicyCalibration":
        data = read_json(path, "policy calibration", UsageError)
        if not isinstance(data, dict) or data.get("format") != POLICY_CALIBRATION_FORMAT or data.get("version") != 1:
            raise UsageError(f"{path} is not a cachekit policy calibration (version 1)")
        data.pop("format"), data.pop("version")
        try:
            return cls(**data)
        except TypeError as err:
            raise UsageError(f"corrupt policy calibration {path}: {err}") from None


def record_signals(pipe_or_transformer: Any, run: Callable[[], Any], **enable_kwargs: Any) -> SignalRecorder:
    """Run `run()` uncached with a `SignalRecorder` attached, and return what it saw."""
    recorder = SignalRecorder()
    with cached(pipe_or_transformer, recorder, **enable_kwargs):
        run()
    return recorder


def _consecutive(recorder: SignalRecorder, name: str) -> list[tuple[int, float]]:
    """(step, relative L1 change from the previous step) of one recorded signal, over all rows."""
    changes = []
    for steps in recorder.records.values():
        for step in sorted(steps):
            if step - 1 in steps and name in steps[step] and name in steps[step - 1]:
                change = relative_l1(steps[step][name][None], steps[step - 1][name][None])
                changes.append((step, float(change)))
    return changes


def fit(policy: str, recorder: SignalRecorder, num_steps: int, degree: int = 4) -> dict[str, Any]:
    """Closed-form fits of what each policy needs from an uncached recording."""
    if policy == "teacache":
        x = np.array([c for _, c in _consecutive(recorder, "modulated_input")])
        y = np.array([c for _, c in _consecutive(recorder, "stack_residual")])
        if len(x) < 2:
            raise ValueError("TeaCache calibration needs at least 3 recorded steps")
        degree = min(degree, len(x) - 1)
        return {"coefficients": [float(c) for c in np.polyfit(x, y, degree)]}
    if policy == "magcache":
        ratios = np.ones(num_steps)
        for step in range(1, num_steps):
            per_row = [
                float(steps[step]["stack_residual"].abs().mean() / steps[step - 1]["stack_residual"].abs().mean())
                for steps in recorder.records.values()
                if step in steps and step - 1 in steps
            ]
            if per_row:
                ratios[step] = float(np.mean(per_row))
        return {"magnitude_ratios": [round(float(r), 6) for r in ratios]}
    if policy == "first-block":
        changes = np.array([c for step, c in _consecutive(recorder, "first_residual") if step >= 2])
        if len(changes) == 0:
            raise ValueError("first-block calibration needs more than two steps")
        quantiles = {f"q{int(q * 100)}": float(np.quantile(changes, q)) for q in (0.25, 0.5, 0.75)}
        # reuse at roughly half of the steps after warm-up: the median consecutive change
        return {"threshold": quantiles["q50"], "change_quantiles": quantiles}
    raise ValueError(f"no calibration for policy {policy!r}; calibrated policies: {CALIBRATED_POLICIES}")


def calibrate_run(policy: str, pipe_or_transformer: Any, run: Callable[[], Any], num_steps: int,
                  details: dict[str, Any] | None = None, **enable_kwargs: Any) -> PolicyCalibration:
    """Record `run()` (complete uncached `num_steps`-step generations) and fit `policy` to what it saw.

    `cachekit.pipelines.calibrate_policy` is this with a seeded pipeline call as `run`.
    """
    if policy not in CALIBRATED_POLICIES:
        raise ValueError(f"no calibration for policy {policy!r}; calibrated policies: {CALIBRATED_POLICIES}")
    recorder = record_signals(pipe_or_transformer, run, **enable_kwargs)
    values = fit(policy, recorder, num_steps)
    return PolicyCalibration(
        policy=policy,
        model_class=type(denoisers(pipe_or_transformer)[0]).__name__,
        num_steps=num_steps,
        values=values,
        samples=len(recorder.records),
        details=dict(details or {}),
    )
