"""The runtime policies by name, and how one is built from a calibration plus explicit options.

Plan names and specs as a whole (`none`, files, shipped schedules, `fora:interval=3`) are resolved in
`cachekit.plans.resolve_plan`; this module is the runtime-policy registry it reads.
"""

from __future__ import annotations

from typing import Any

from .calibration import PolicyCalibration
from .first_block import FirstBlockCacheConfig, FirstBlockCachePolicy
from .magcache import MagCacheConfig, MagCachePolicy
from .teacache import TeaCacheConfig, TeaCachePolicy

__all__ = ["RUNTIME_POLICIES", "runtime_policy"]

RUNTIME_POLICIES = {
    "teacache": (TeaCachePolicy, TeaCacheConfig),
    "magcache": (MagCachePolicy, MagCacheConfig),
    "first-block": (FirstBlockCachePolicy, FirstBlockCacheConfig),
}


def runtime_policy(name: str, calibration: PolicyCalibration | None = None, **options: Any) -> Any:
    """A runtime policy by name, with fitted values from a calibration and explicit options on top."""
    if name not in RUNTIME_POLICIES:
        raise ValueError(f"unknown runtime policy {name!r}; choose from {sorted(RUNTIME_POLICIES)}")
    policy_cls, config_cls = RUNTIME_POLICIES[name]
    fields = config_cls.__dataclass_fields__
    values: dict[str, Any] = {}
    if calibration is not None:
        if calibration.policy != name:
            raise ValueError(f"calibration is for {calibration.policy}, not {name}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in calibration.values.items() if k in fields}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"{name} takes {sorted(fields)}, not {unknown}")
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    return policy_cls(config_cls(**values))
