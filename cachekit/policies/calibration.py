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
import torch

from ..wrapper import cached, denoisers
from .runtime import SignalRecorder, relative_l1

__all__ = ["PolicyCalibration", "record_signals", "fit", "calibrate_pipeline", "CALIBRATION_FORMAT"]

CALIBRATION_FORMAT = "cachekit.policy-calibration"
CALIBRATED_POLICIES = ("teacache", "magcache", "first-block")


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
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"format": CALIBRATION_FORMAT, "version": 1, **asdict(self)}, f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PolicyCalibration":
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"calibration file not found: {path}") from None
        if data.get("format") != CALIBRATION_FORMAT or data.get("version") != 1:
            raise ValueError(f"{path} is not a cachekit policy calibration (version 1)")
        data.pop("format"), data.pop("version")
        return cls(**data)


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


def calibrate_pipeline(
    policy: str, pipe: Any, prompts: list[str], num_steps: int, seed: int = 0, **call_kwargs: Any
) -> PolicyCalibration:
    """One uncached generation over `prompts`, recorded and fitted for `policy`."""
    if policy not in CALIBRATED_POLICIES:
        raise ValueError(f"no calibration for policy {policy!r}; calibrated policies: {CALIBRATED_POLICIES}")

    def run() -> None:
        generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        with torch.no_grad():
            pipe(prompt=prompts, num_inference_steps=num_steps, generator=generators, output_type="latent",
                 **call_kwargs)

    recorder = record_signals(pipe, run)
    values = fit(policy, recorder, num_steps)
    transformer = denoisers(pipe)[0]
    return PolicyCalibration(
        policy=policy,
        model_class=type(transformer).__name__,
        num_steps=num_steps,
        values=values,
        samples=len(recorder.records),
        details={"prompts": prompts, "seed": seed, "scheduler": type(pipe.scheduler).__name__},
    )
