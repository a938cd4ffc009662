"""One way to name a plan on the command line: `none`, a file, or `policy:key=value,...`.

    none                               the uncached model
    fora3.json                         a schedule file (or a policy calibration file: the policy it fits)
    digits-fast                        a schedule shipped with a bundled model (`cachekit.zoo.shipped_schedules()`)
    fora:interval=3                    a static policy's schedule, built for the model and step count
    fora:interval=3,forecast=1         ... with reused outputs extrapolated (TaylorSeer, order 1) instead of reused
    teacache:threshold=0.2,calibration=teacache.json
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from ..schedule import SCHEDULE_FORMAT, Schedule
from .calibration import CALIBRATION_FORMAT, PolicyCalibration
from .first_block import FirstBlockCacheConfig, FirstBlockCachePolicy
from .magcache import MagCacheConfig, MagCachePolicy
from .teacache import TeaCacheConfig, TeaCachePolicy

__all__ = ["resolve_plan", "RUNTIME_POLICIES", "runtime_policy"]

RUNTIME_POLICIES = {
    "teacache": (TeaCachePolicy, TeaCacheConfig),
    "magcache": (MagCachePolicy, MagCacheConfig),
    "first-block": (FirstBlockCachePolicy, FirstBlockCacheConfig),
}


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def runtime_policy(name: str, calibration: PolicyCalibration | None = None, **options: Any) -> Any:
    """A runtime policy by name, with fitted values from a calibration and explicit options on top."""
    policy_cls, config_cls = RUNTIME_POLICIES[name]
    values: dict[str, Any] = {}
    if calibration is not None:
        if calibration.policy != name:
            raise ValueError(f"calibration is for {calibration.policy}, not {name}")
        fields = config_cls.__dataclass_fields__
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in calibration.values.items() if k in fields}
    unknown = sorted(set(options) - set(config_cls.__dataclass_fields__))
    if unknown:
        raise ValueError(f"{name} takes {sorted(config_cls.__dataclass_fields__)}, not {unknown}")
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    return policy_cls(config_cls(**values))


def resolve_plan(spec: str, transformer: nn.Module, num_steps: int) -> Any:
    """Turn a plan spec into a `Schedule`, a runtime policy, or None (uncached)."""
    from . import static_schedule, STATIC_POLICIES

    from ..zoo import shipped_schedules

    if spec.lower() == "none":
        return None
    shipped = shipped_schedules()
    if spec in shipped and not os.path.exists(spec):
        return Schedule.load(shipped[spec])
    name, _, rest = spec.partition(":")
    is_policy = name in STATIC_POLICIES or name in RUNTIME_POLICIES  # 'teacache:calibration=t.json' is no file
    if not is_policy and (spec.endswith(".json") or os.path.exists(spec)):
        if not os.path.exists(spec):
            raise FileNotFoundError(f"schedule or calibration file not found: {spec}")
        with open(spec) as f:
            fmt = json.load(f).get("format")
        if fmt == SCHEDULE_FORMAT:
            return Schedule.load(spec)
        if fmt == CALIBRATION_FORMAT:
            calibration = PolicyCalibration.load(spec)
            return runtime_policy(calibration.policy, calibration)
        raise ValueError(f"{spec} is neither a cachekit schedule nor a policy calibration")
    options = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"policy option {item!r} must look like key=value")
        options[key.strip().replace("-", "_")] = _parse_value(value.strip())
    if name in STATIC_POLICIES:
        forecast = int(options.pop("forecast", 0))  # any static schedule, with TaylorSeer extrapolation on top
        schedule = static_schedule(name, transformer, num_steps, **options)
        return schedule.with_forecast(forecast) if forecast else schedule
    if name in RUNTIME_POLICIES:
        path = options.pop("calibration", None)
        calibration = PolicyCalibration.load(path) if path else None
        return runtime_policy(name, calibration, **options)
    raise ValueError(
        f"unknown plan {spec!r}: give 'none', a schedule file, or one of "
        f"{sorted([*STATIC_POLICIES, *RUNTIME_POLICIES])} with options, e.g. 'fora:interval=3'"
    )
