"""Well-known caching policies. Static ones produce a `Schedule`; each lives in one small module.

- `fora`: recompute every N steps (FORA).
- `delta_dit`: cache the back blocks early and the front blocks late, around a boundary step (Delta-DiT).
- `tgate`: cache cross-attention after a gate step (TGATE).

Runtime policies decide per request while generating (block mode, per-row state):

- `teacache`: accumulated, polynomially rescaled change of the first block's modulated input (TeaCache).
- `magcache`: calibrated residual magnitude ratios, max skips, retention ratio (MagCache).
- `first_block`: change of the first block's residual against the last full step (first-block cache).

`calibration` fits the runtime policies per model; `spec` names them. Plan specs such as `fora:interval=3` are
resolved by `cachekit.plans.resolve_plan` (re-exported here).
"""

from .delta_dit import DeltaDiTConfig, apply_delta_dit, delta_dit_schedule
from .fora import FORAConfig, apply_fora, fora_schedule
from .tgate import TGATEConfig, apply_tgate, tgate_schedule

STATIC_POLICIES = {
    "fora": (fora_schedule, FORAConfig),
    "delta-dit": (delta_dit_schedule, DeltaDiTConfig),
    "tgate": (tgate_schedule, TGATEConfig),
}


def static_schedule(name: str, transformer, num_steps: int, **options):
    """Build a static policy's schedule by name, e.g. `static_schedule("fora", t, 20, interval=3)`."""
    if name not in STATIC_POLICIES:
        raise ValueError(f"unknown static policy {name!r}; choose from {sorted(STATIC_POLICIES)}")
    make, config_cls = STATIC_POLICIES[name]
    fields = config_cls.__dataclass_fields__
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"{name} takes {sorted(fields)}, not {unknown}")
    return make(transformer, num_steps, config_cls(**options))

__all__ = [
    "FORAConfig",
    "fora_schedule",
    "apply_fora",
    "DeltaDiTConfig",
    "delta_dit_schedule",
    "apply_delta_dit",
    "TGATEConfig",
    "tgate_schedule",
    "apply_tgate",
    "STATIC_POLICIES",
    "static_schedule",
]


from .first_block import FirstBlockCacheConfig, FirstBlockCachePolicy, apply_first_block_cache  # noqa: E402
from .magcache import MagCacheConfig, MagCachePolicy, apply_magcache  # noqa: E402
from .teacache import TeaCacheConfig, TeaCachePolicy, apply_teacache  # noqa: E402
from .calibration import PolicyCalibration, calibrate_run  # noqa: E402
from .spec import RUNTIME_POLICIES, runtime_policy  # noqa: E402
from ..plans import resolve_plan  # noqa: E402

__all__ += [
    "FirstBlockCacheConfig",
    "FirstBlockCachePolicy",
    "apply_first_block_cache",
    "MagCacheConfig",
    "MagCachePolicy",
    "apply_magcache",
    "TeaCacheConfig",
    "TeaCachePolicy",
    "apply_teacache",
    "PolicyCalibration",
    "calibrate_run",
    "RUNTIME_POLICIES",
    "resolve_plan",
    "runtime_policy",
]
