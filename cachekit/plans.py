"""One way to name a plan, shared by `cachekit.enable`, every CLI verb, the runner and the server.

A plan is what decides, per step, which cached outputs are reused:

    None or "none"                     the uncached model
    a `Schedule` or a policy object    used as it is
    "digits-fast"                      a schedule shipped with a bundled model (`cachekit.zoo.shipped_schedules()`)
    "fora:interval=3"                  a static policy's schedule, built for the model and the step count it runs
    "fora:interval=3,forecast=1"       ... with reused outputs extrapolated (TaylorSeer, order 1) instead of reused
    "teacache:threshold=0.2,calibration=teacache.json"
    "my_schedule.json"                 a schedule file, or a policy calibration file (the policy it fits)

An unknown name is a `PlanError` listing the names that exist. Static policies named before the step count is known
(`cachekit.enable(pipe, "fora:interval=3")`) become a `StaticPolicyPlan`, which builds its schedule for each step count
it meets, so one plan serves requests of different lengths.
"""

from __future__ import annotations

import dataclasses

import functools
import os
from pathlib import Path
from typing import Any, Union

from torch import nn

from .errors import UsageError
from .io import read_json
from .keyvalue import parse_options
from .schedule import SCHEDULE_FORMAT, Schedule, ScheduleError
from .state import StepRows

__all__ = ["PlanError", "PlanLike", "StaticPolicyPlan", "resolve_plan", "plan_names", "plan_label", "describe_names"]

PlanLike = Union[None, str, os.PathLike, Schedule, Any]


class PlanError(UsageError):
    """A plan name, spec or file that cachekit cannot turn into a plan."""


def _policies() -> tuple[dict[str, Any], dict[str, Any]]:
    from .policies import STATIC_POLICIES
    from .policies.spec import RUNTIME_POLICIES

    return STATIC_POLICIES, RUNTIME_POLICIES


def plan_names() -> dict[str, list[str]]:
    """The names a plan can start with, from the registries: shipped schedules, static and runtime policies."""
    from .zoo import shipped_schedules

    static, runtime = _policies()
    return {"shipped": sorted(shipped_schedules()), "static": sorted(static), "runtime": sorted(runtime)}


def describe_names() -> str:
    """One line listing every known plan name, for errors and `--help`."""
    names = plan_names()
    return (f"'none', a schedule file, a shipped schedule ({', '.join(names['shipped']) or 'none shipped'}) or a "
            f"policy spec ({', '.join(names['static'] + names['runtime'])}, e.g. 'fora:interval=3')")


def plan_label(plan: PlanLike) -> str:
    """A short name for reports: 'uncached' for none, a file's stem, a shipped name or the spec itself."""
    if plan is None or (isinstance(plan, str) and plan.strip().lower() == "none"):
        return "uncached"
    if isinstance(plan, os.PathLike):
        return Path(plan).stem
    if isinstance(plan, str):
        name = plan.partition(":")[0]
        static, runtime = _policies()
        if name not in static and name not in runtime and (plan.endswith(".json") or os.path.exists(plan)):
            return Path(plan).stem
        return plan
    if isinstance(plan, Schedule) and (plan.provenance or {}).get("shipped_as"):
        return str(plan.provenance["shipped_as"])
    label = getattr(plan, "label", None)
    return str(label) if label else type(plan).__name__


def resolve_plan(plan: PlanLike, transformer: nn.Module | None = None, num_steps: int | None = None, *,
                 allow_files: bool = True) -> Any:
    """Turn anything that names a plan into a plan object (a `Schedule`, a policy) or None for the uncached model.

    With `transformer` and `num_steps`, a static policy spec becomes the concrete `Schedule`; otherwise it becomes a
    `StaticPolicyPlan` that builds one per step count. Raises `PlanError` (a `ValueError`) naming what is wrong.
    `allow_files=False` is for text from someone who must not make this process open files (a server's client):
    only "none", shipped names and policy specs without a calibration file are taken, never a path.
    """
    if plan is None:
        return None
    if isinstance(plan, Schedule) or (hasattr(plan, "decide") and not isinstance(plan, (str, os.PathLike))):
        return plan
    if isinstance(plan, os.PathLike):
        return _from_file(Path(plan))
    if not isinstance(plan, str):
        raise PlanError(f"expected a plan name, spec, file, Schedule or policy, got {type(plan).__name__}")
    spec = plan.strip()
    if not spec:
        raise PlanError(f"an empty plan; give {describe_names()}")
    if spec.lower() == "none":
        return None
    name, sep, rest = spec.partition(":")
    static, runtime = _policies()
    if name in static or name in runtime:
        if not allow_files and "calibration" in parse_options(rest, f"{name} option"):
            raise PlanError(f"{name}: a calibration file cannot be named here; use a shipped plan or plain options")
        return _from_policy_spec(name, rest, transformer, num_steps)
    from .zoo import shipped_schedules

    shipped = shipped_schedules()
    if not allow_files:
        if spec in shipped:
            return _load_shipped(shipped[spec])
        known = ", ".join(["none", *sorted(shipped), *sorted([*static, *runtime])])
        raise PlanError(f"unknown plan {spec!r} (files are not accepted here); known: {known}")
    path = Path(spec).expanduser()
    if spec in shipped and not path.exists():
        return _load_shipped(shipped[spec])
    if path.is_dir():
        raise PlanError(f"{spec} is a folder, not a schedule file")
    if path.exists():
        return _from_file(path)
    if sep or spec.endswith(".json") or os.sep in spec:
        if sep:
            raise PlanError(f"unknown policy {name!r} in {spec!r}; policies: {', '.join(sorted([*static, *runtime]))}")
        raise PlanError(f"schedule file not found: {spec}")
    raise PlanError(f"unknown plan {spec!r}; give {describe_names()}")


def _load_shipped(path: Path) -> Schedule:
    """A shipped schedule, parsed once per file version and then shared.

    A server resolves a plan name on every request; parsing the file each time, and compiling each fresh copy
    into the hooks' tables, cost more than a request's caching saved. Schedules are never changed in place
    (their methods return new ones), so every request may hold the same object.
    """
    stat = path.stat()
    return _parse_shipped(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _parse_shipped(path: str, mtime_ns: int, size: int) -> Schedule:
    return Schedule.load(path)


def _from_file(path: Path) -> Any:
    from .policies.calibration import POLICY_CALIBRATION_FORMAT, PolicyCalibration
    from .policies.spec import runtime_policy

    data = read_json(path, "schedule", PlanError)
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt == SCHEDULE_FORMAT:
        return Schedule.load(path)
    if fmt == POLICY_CALIBRATION_FORMAT:
        calibration = PolicyCalibration.load(path)
        return runtime_policy(calibration.policy, calibration)
    raise PlanError(f"{path} is neither a cachekit schedule nor a policy calibration")


def _from_policy_spec(name: str, rest: str, transformer: nn.Module | None, num_steps: int | None) -> Any:
    from .policies.calibration import PolicyCalibration
    from .policies.spec import runtime_policy

    static, runtime = _policies()
    options = parse_options(rest, f"{name} option")
    _check_option_types(name, (static.get(name) or runtime[name])[1], options)
    try:
        if name in static:
            forecast = options.pop("forecast", 0)
            if not isinstance(forecast, int) or isinstance(forecast, bool) or forecast < 0:
                raise PlanError(f"{name}: forecast must be a whole number >= 0 (the TaylorSeer order), got {forecast!r}")
            deferred = StaticPolicyPlan(name, options, forecast)
            if transformer is not None and num_steps is not None:
                return deferred.schedule_for(num_steps, transformer)
            return deferred
        path = options.pop("calibration", None)
        calibration = PolicyCalibration.load(path) if path else None
        return runtime_policy(name, calibration, **options)
    except (ScheduleError, PlanError):
        raise
    except (ValueError, TypeError) as err:
        raise PlanError(str(err)) from None


def _check_option_types(name: str, config_cls: type, options: dict[str, Any]) -> None:
    """A number where the policy's config has a number (so `fora:interval=banana` says so, not a TypeError)."""
    for key, value in options.items():
        field = config_cls.__dataclass_fields__.get(key)
        default = getattr(field, "default", dataclasses.MISSING)
        if isinstance(default, (int, float)) and not isinstance(default, bool) and \
                (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise PlanError(f"{name}: {key} must be a number, got {value!r}")


class StaticPolicyPlan:
    """A static policy (FORA, Delta-DiT, TGATE) whose schedule is built for each step count it is run at.

    `cachekit.enable(pipe, "fora:interval=3")` does not know the step count yet, and a runner serves requests of
    several lengths under one plan; both get the schedule the policy gives at each request's own step count.
    """

    num_steps = None  # works at any step count

    def __init__(self, name: str, options: dict[str, Any], forecast: int = 0) -> None:
        static, _ = _policies()
        make, config_cls = static[name]
        fields = config_cls.__dataclass_fields__
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise PlanError(f"{name} takes {sorted(fields)}, not {unknown}")
        self.name = name
        self.config = config_cls(**options)
        self.forecast_order = int(forecast)
        self.mode = self.config.mode
        self.label = name + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")
        if forecast:
            self.label += f"{',' if options else ':'}forecast={forecast}"
        self._make = make
        self._transformer: nn.Module | None = None
        self._schedules: dict[int, Schedule] = {}

    def validate_for(self, transformer: nn.Module, num_steps: int | None = None) -> None:
        """Remember the model to build schedules for; check the options fit it (e.g. Delta-DiT's block count)."""
        self._transformer = transformer
        self.schedule_for(num_steps or 20, transformer)

    def schedule_for(self, num_steps: int, transformer: nn.Module | None = None) -> Schedule:
        """The policy's schedule at `num_steps` (built once per step count)."""
        schedule = self._schedules.get(num_steps)
        if schedule is None:
            transformer = transformer or self._transformer
            if transformer is None:
                raise RuntimeError(f"{self.label} needs the model before it can build a schedule: enable it first")
            schedule = self._make(transformer, num_steps, self.config)
            if self.forecast_order:
                schedule = schedule.with_forecast(self.forecast_order)
            self._schedules[num_steps] = schedule
        return schedule

    def decide(self, rows: StepRows, block: int, component: int) -> Any:
        import torch

        counts = rows.step_counts
        if rows.num_steps is not None:
            return self.schedule_for(rows.num_steps).decide(rows, block, component)
        decision = torch.empty(rows.batch_size, dtype=torch.bool)
        for n in set(counts):
            index = torch.tensor([i for i, c in enumerate(counts) if c == n])
            decision[index] = self.schedule_for(n).decide(rows.subset(index), block, component)
        return decision

    def describe(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"policy": self.name, **asdict(self.config), "forecast": self.forecast_order}

    def __repr__(self) -> str:
        return f"StaticPolicyPlan({self.label!r})"
