"""`cachekit bench`: every method side by side on the same model, prompts and seeds, against the uncached model.

One table answers "which cache should I use on this model": the uncached model; cachekit's policies, each swept over
its main knob (static FORA, Delta-DiT, TGATE; runtime TeaCache, MagCache, first-block, calibrated on the model first;
and, for reference, uniform step-skipping: the uncached model at 1/2 and 1/3 of the steps);
any extra schedules (searched ones); and the peers users already have (diffusers' caches, cache-dit), all taking
turns on one transformer copy. Everything is one `evaluate` run: the same prompts and seeds, the same metrics, latency
timed interleaved with the uncached model, so every speedup is measured against the same baseline at the same time.

A peer enters the comparison only if it measurably skipped work on this model (`PeerRow.counts`); the others keep
their row with the status and the reason, and no peer can make the bench fail. However many peer rows there are, one
transformer copy is alive (`PeerCopy`): each peer is applied to it around each of its own calls (generation, timed
calls, MAC count; outside the timed region, as a deployment applies a cache once) and removed afterwards, which
restores the uncached model exactly. What a peer must measure first (MagCache's calibration) is measured once.
The report records the process's peak memory (`memory`).

    from cachekit.eval.bench import run_bench
    report = run_bench(pipe, digits_prompts(40), 20, "fid,kid,clip,psnr,ssim", "bench-out",
                       pipe_kwargs=..., default_reference="digits-heldout")
    [(row["name"], row["speedup"], row["metrics"].get("psnr")) for row in report["rows"]]

Writes OUT/bench.json (machines), OUT/bench.md (the table), OUT/bench.png (quality against speedup, one curve per
method), OUT/calibration/<policy>.json (the fitted runtime policies, reusable with `cachekit eval`) and, under
OUT/eval/, the full evaluation report with the image grid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cachekit.errors import UsageError
from cachekit.io import save_figure, write_text
from cachekit.keyvalue import parse_value

from .peers import PEERS, Peer, PeerCopy, PeerRow, PipelineCall, get_peer, run_peers
from .prompts import PromptSet
from .report import _fmt, write_json
from .runner import UNCACHED, Variant, evaluate
from .suite import LOWER_IS_BETTER

__all__ = ["POLICY_SWEEPS", "PolicySweep", "get_sweep", "parse_selection", "run_bench", "render_bench_markdown",
           "save_bench_plot", "peak_memory"]

BENCH_FORMAT = "cachekit.bench"


# ---------------------------------------------------------------------------------------------------- our sweeps
def _fractions_of(total: int, fractions: Sequence[float]) -> tuple[int, ...]:
    """Distinct integers `round(f * total)` (at least 1), in the order given: sweeps sized to the model or run."""
    return tuple(dict.fromkeys(max(1, round(f * total)) for f in fractions))


def _first_block_thresholds(num_blocks: int, num_steps: int, calibration: Any) -> tuple[float, ...]:
    """The calibrated quartiles of the first block's step-to-step change: reuse at ~1/4, ~1/2, ~3/4 of the steps.
    Absolute thresholds mean different things on different models; the quartiles mean the same everywhere."""
    quantiles = calibration.values["change_quantiles"]
    return tuple(dict.fromkeys(float(f"{quantiles[q]:.3g}") for q in ("q25", "q50", "q75")))


@dataclasses.dataclass(frozen=True)
class PolicySweep:
    """One of cachekit's policies with its main knob swept from the mildest to the most aggressive setting.

    `values(num_blocks, num_steps, calibration)` is the default sweep, sized to the model and step count (a fixed
    number of cached blocks or a fixed gate step would mean something else on every model); `options(num_blocks,
    num_steps)` the policy's other settings. Runtime policies are first calibrated on the model
    (`cachekit.pipelines.calibrate_policy`: TeaCache's polynomial, MagCache's ratios, first-block's quantiles), then
    built with `runtime_policy` at each knob value; static ones are plan specs for `resolve_plan`.
    """

    family: str
    knob: str
    summary: str
    values: Callable[[int, int, Any], tuple[float | int, ...]]
    options: Callable[[int, int], dict[str, Any]] = lambda num_blocks, num_steps: {}
    runtime: bool = False


POLICY_SWEEPS: tuple[PolicySweep, ...] = (
    PolicySweep("fora", "interval", "FORA: recompute every N steps, reuse whole-block residuals in between",
                lambda b, s, c: (2, 3, 4), lambda b, s: {"mode": "block"}),
    PolicySweep("delta-dit", "num_cached_blocks",
                "Delta-DiT: back blocks cached before the middle step, front blocks after (1/4, 1/2, 3/4 of them)",
                lambda b, s, c: _fractions_of(b, (0.25, 0.5, 0.75)),
                lambda b, s: {"boundary_step": s // 2, "interval": 2}),
    PolicySweep("tgate", "gate_step", "TGATE: cross-attention cached from the gate step on (3/4, 1/2, 1/4 of the run)",
                lambda b, s, c: _fractions_of(s, (0.75, 0.5, 0.25))),
    PolicySweep("teacache", "threshold", "TeaCache: skip while the calibrated, accumulated input change is small",
                lambda b, s, c: (0.1, 0.2, 0.4), runtime=True),
    PolicySweep("magcache", "threshold", "MagCache: skip while calibrated residual-magnitude ratios drift little",
                lambda b, s, c: (0.02, 0.06, 0.12), runtime=True),
    PolicySweep("first-block", "threshold", "first-block cache: skip while the first block's residual holds "
                "(thresholds: the calibrated quartiles of its change)", _first_block_thresholds, runtime=True),
    PolicySweep("steps", "num_inference_steps", "uniform step-skipping, for reference: the uncached model run with "
                "fewer denoising steps (1/2 and 1/3 of them, at least 2), the baseline every cache has to beat",
                lambda b, s, c: _fewer_steps(s)),
)

MIN_STEPS = 2
"""The fewest denoising steps the step-skipping baseline runs: multistep solvers (PixArt's DPM-Solver) cannot run one."""


def _fewer_steps(num_steps: int) -> tuple[int, ...]:
    """1/2 and 1/3 of the run's steps, each at least `MIN_STEPS` and below `num_steps` (distinct, in that order)."""
    values = tuple(dict.fromkeys(v for v in (num_steps // 2, num_steps // 3) if MIN_STEPS <= v < num_steps))
    if not values:
        raise ValueError(f"step-skipping needs at least {MIN_STEPS} steps below the run's {num_steps}")
    return values


def get_sweep(family: str) -> PolicySweep:
    """The sweep of cachekit policy `family` (see `POLICY_SWEEPS`)."""
    for sweep in POLICY_SWEEPS:
        if sweep.family == family:
            return sweep
    raise UsageError(f"unknown policy {family!r}; known: {', '.join(s.family for s in POLICY_SWEEPS)}")


def parse_selection(items: Sequence[str], known: Sequence[str], what: str) -> tuple[list[str], dict[str, tuple]]:
    """`["fora=2,3", "teacache"]` -> (["fora", "teacache"], {"fora": (2, 3)}): names, and knob values where given.

    The grammar is NAME[=V,V,...], a list of values for one knob, not KEY=VALUE settings; each value is read by
    `cachekit.keyvalue.parse_value` and must be a finite number. A name that is not in `known` is a `UsageError`
    listing the known ones.
    """
    names: list[str] = []
    knobs: dict[str, tuple] = {}
    for item in items:
        name, sep, rest = item.partition("=")
        name = name.strip()
        if name not in known:
            raise UsageError(f"unknown {what} {name!r}; known: {', '.join(known)}")
        if name not in names:
            names.append(name)
        if sep:
            try:
                values = tuple(parse_value(v) for v in rest.split(",") if v.strip())
            except UsageError:
                values = ()
            if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise UsageError(f"{what} {item!r}: give numbers after '=', e.g. {name}=1,2")
            knobs[name] = values
    return names, knobs


def _policy_plans(sweeps: Sequence[PolicySweep], knobs: Mapping[str, Sequence], pipe: Any, probe: PipelineCall,
                  base_seed: int, out: Path | None, progress: bool) -> tuple[list[tuple[dict, Any]], list[dict], dict]:
    """((row, plan) per knob value, rows for the families that cannot run here, calibration per runtime policy)."""
    from cachekit.pipelines import calibrate_policy
    from cachekit.policies import resolve_plan, runtime_policy
    from cachekit.registry import resolve_layout

    plans: list[tuple[dict, Any]] = []
    skipped: list[dict] = []
    calibrations: dict[str, Any] = {}
    steps = probe.num_inference_steps
    for sweep in tqdm(sweeps, desc="policies", disable=not progress):
        try:
            num_blocks = resolve_layout(pipe.transformer, "block").num_blocks
            calibration = None
            if sweep.runtime:
                calibration = calibrate_policy(sweep.family, pipe, probe)
                entry: dict[str, Any] = {"values": calibration.values, "samples": calibration.samples}
                if out is not None:
                    path = out / "calibration" / f"{sweep.family}.json"
                    calibration.save(path)
                    entry["file"] = str(path.relative_to(out))
                calibrations[sweep.family] = entry
            values = tuple(knobs.get(sweep.family) or sweep.values(num_blocks, steps, calibration))
            family: list[tuple[dict, Any]] = []
            for value in values:
                if sweep.family == "steps":
                    if not MIN_STEPS <= int(value) < steps:
                        raise ValueError(f"fewer steps means {MIN_STEPS} to {steps - 1}, not {value}")
                    plan = Variant(pipe, None, {"kind": "steps"}, num_steps=int(value))
                elif sweep.runtime:
                    plan = runtime_policy(sweep.family, calibration, **{sweep.knob: value})
                else:
                    options = {sweep.knob: value, **sweep.options(num_blocks, steps)}
                    spec = f"{sweep.family}:" + ",".join(f"{k}={v}" for k, v in options.items())
                    plan = resolve_plan(spec, pipe.transformer, steps)
                family.append((_row(sweep.family, "policy", sweep.knob, value, "ok"), plan))
            plans += family
        except (ValueError, TypeError) as e:  # e.g. TGATE on joint attention, a model missing from the registry
            if sweep.family in knobs:  # values the user asked for explicitly: a clear error, not a quiet row
                raise UsageError(f"{sweep.family} at {sweep.knob}={list(knobs[sweep.family])}: {e}") from e
            skipped.append(_row(sweep.family, "policy", sweep.knob, None, "cannot-act", f"{type(e).__name__}: {e}"))
    return plans, skipped, calibrations


# ------------------------------------------------------------------------------------------------------- the peers
@contextlib.contextmanager
def _quiet_cache_dit(peers: Sequence[Peer]) -> Iterator[None]:
    """cache-dit logs ~8 lines per `enable_cache` (INFO, plus warnings that the forward-pattern check is skipped,
    which `peers` does on purpose, and that it disabled itself on removal); the bench applies it around every call
    of every peer row, which would bury the progress bars. Its loggers (created when it is imported, hence the
    `available()` calls) are set to ERROR for the bench and restored afterwards."""
    for peer in peers:
        if any(r.startswith("cache_dit") for r in peer.requires):
            peer.available()
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
               if n.lower().startswith("cache_dit")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.ERROR))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _peer_variants(pipe: Any, peers: Sequence[Peer], knobs: Mapping[str, Sequence], probe: PipelineCall,
                   progress: bool) -> tuple[list[PeerRow], dict[str, Variant], PeerCopy]:
    """Measure every peer row on the probe call (`run_peers`), all on one `PeerCopy`; each row that acted becomes a
    `Variant` on that same copy whose `setup` applies the peer around each of its calls and removes it afterwards.
    The copy keeps what each peer prepared (MagCache's calibration), so the evaluated peer is the measured one."""
    on = PeerCopy(pipe, probe)  # the copy itself is made when a peer first runs
    rows = run_peers(pipe, probe, peers, knobs=knobs, progress=progress, on=on)
    by_name = {peer.name: peer for peer in peers}
    variants = {_peer_name(row): Variant(on.pipe, info={"kind": "peer", "peer": row.peer, "knob": row.knob,
                                                        "value": row.value, "config": row.config},
                                         setup=functools.partial(on.applied, by_name[row.peer], row.value))
                for row in rows if row.counts}
    return rows, variants, on


def _peer_name(row: PeerRow) -> str:
    return row.peer if row.value is None else f"{row.peer}:{row.knob}={row.value}"


# ------------------------------------------------------------------------------------------------------- the bench
def _row(method: str, kind: str, knob: str | None, value: Any, status: str, reason: str = "",
         name: str | None = None) -> dict[str, Any]:
    return {"name": name or (method if value is None else f"{method}:{knob}={value}"), "method": method,
            "kind": kind, "knob": knob, "value": value, "status": status, "counts": status in ("ok", "acted"),
            "reason": reason, "speedup": None, "latency_s": None, "macs_ratio": None, "metrics": {}, "work": None}


def run_bench(
    pipe: Any,
    prompts: PromptSet | Sequence[str],
    num_steps: int = 20,
    metrics: Any = "clip,psnr,ssim",
    out_dir: str | os.PathLike | None = None,
    *,
    policies: Sequence[str] | None = None,
    policy_knobs: Mapping[str, Sequence[float | int]] | None = None,
    schedules: Mapping[str, Any] | None = None,
    peers: Sequence[Peer | str] | None = None,
    peer_knobs: Mapping[str, Sequence[float | int]] | None = None,
    probe_num: int | None = None,
    batch_size: int = 8,
    base_seed: int = 0,
    pipe_kwargs: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    default_reference: str | None = None,
    latency: bool = True,
    warmup: int = 1,
    repeats: int = 3,
    latency_batch_size: int | None = None,
    macs: bool = True,
    grid_samples: int = 6,
    save_images: bool = False,
    progress: bool = True,
    dist: Any = None,
) -> dict[str, Any]:
    """Compare the uncached model, cachekit's policy sweeps, extra schedules and the peers in one evaluation.

    Args:
        pipe: an uncached diffusers pipeline (peers get fresh copies of its transformer; it is never hooked for good).
        prompts / num_steps / metrics / batch_size / base_seed / pipe_kwargs / default_reference / latency /
            warmup / repeats / latency_batch_size / macs / grid_samples / save_images / dist: as for `evaluate`.
        out_dir: where bench.json / bench.md / bench.png, calibration/ and eval/ go; None writes nothing.
        policies: families of `POLICY_SWEEPS` to sweep (None: all; empty: none).
        policy_knobs: family -> knob values replacing its default sweep, e.g. {"fora": (2, 5)}.
        schedules: extra plans, name -> `Schedule` or runtime policy (e.g. searched schedules).
        peers: `Peer`s or peer names (None: all of `PEERS`; empty: none).
        peer_knobs: peer name -> knob values replacing its sweep.
        probe_num: prompts of the probe call (default: one batch) on which runtime policies are calibrated and
            every peer's skipped work is measured (MagCache peers calibrate on it too); same seeds as the evaluation.

    Returns the bench report: `rows` (one per method and knob value, uncached first, then policies, schedules, peers;
    each with `status`, `counts`, `reason`, `speedup`, `macs_ratio`, `metrics` and, for peers, the measured `work`),
    the calibrations, and the full evaluation report under `eval`.
    """
    prompt_set = prompts if isinstance(prompts, PromptSet) else PromptSet("custom", list(prompts), "argument")
    if len(prompt_set) == 0:
        raise ValueError("no prompts to benchmark")
    families = [s.family for s in POLICY_SWEEPS] if policies is None else list(policies)
    sweeps = [get_sweep(f) for f in dict.fromkeys(families)]
    peer_list = [p if isinstance(p, Peer) else _known_peer(p) for p in (PEERS if peers is None else peers)]
    for what, knobs, known in (("policy", policy_knobs, [s.family for s in sweeps]),
                               ("peer", peer_knobs, [p.name for p in peer_list])):
        unknown = sorted(set(knobs or {}) - set(known))
        if unknown:
            raise UsageError(f"knob values given for {what} {unknown}, which is not selected ({', '.join(known)})")
    extras = dict(schedules or {})
    if UNCACHED in extras:
        raise ValueError(f"'{UNCACHED}' is reserved for the uncached model; rename that schedule")

    out = Path(out_dir) if out_dir is not None else None
    kwargs = dict(pipe_kwargs or {})
    k = min(probe_num or batch_size, len(prompt_set))
    probe = PipelineCall(tuple(prompt_set.prompts[:k]), num_steps, kwargs=kwargs,
                         seeds=tuple(base_seed + i for i in range(k)))
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)

    configs: dict[str, Any] = {}
    rows: list[dict[str, Any]] = [_row(UNCACHED, "uncached", None, None, "ok", "the reference of every ratio")]
    plans, policy_skips, calibrations = _policy_plans(sweeps, policy_knobs or {}, pipe, probe, base_seed, out,
                                                      progress)
    for row, plan in plans:
        configs[row["name"]] = plan
        rows.append(row)
    rows += policy_skips
    for name, plan in extras.items():
        if name in configs:
            raise ValueError(f"the extra schedule {name!r} is also one of the policy sweep's rows; drop or rename it")
        configs[name] = plan
        rows.append(_row(name, "schedule", None, None, "ok", name=name))

    with _quiet_cache_dit(peer_list):
        peer_rows, variants, on = _peer_variants(pipe, peer_list, peer_knobs or {}, probe, progress) \
            if peer_list else ([], {}, None)
        configs.update(variants)
        evaluation = evaluate(
            pipe, configs, prompt_set, num_steps, metrics, out / "eval" if out is not None else None,
            batch_size=batch_size, base_seed=base_seed, pipe_kwargs=kwargs, model_name=model_name,
            default_reference=default_reference, latency=latency, warmup=warmup, repeats=repeats,
            latency_batch_size=latency_batch_size, macs=macs, grid_samples=grid_samples,
            save_images=save_images, dist=dist)
    del configs, variants, on  # the peers' transformer copy goes now, not with the report
    for peer_row in peer_rows:
        row = _row(peer_row.peer, "peer", peer_row.knob, peer_row.value, peer_row.status, peer_row.reason,
                   name=_peer_name(peer_row))
        row["counts"] = peer_row.counts and row["name"] in evaluation["schedules"]
        row["family"] = peer_row.family
        row["work"] = None if peer_row.work is None else peer_row.work.as_dict()
        row["config"] = peer_row.config
        row["caveat"] = peer_row.caveat
        rows.append(row)
    for row in rows:
        entry = evaluation["schedules"].get(row["name"])
        if entry is not None:
            row.update(speedup=entry["speedup"], latency_s=entry["latency_s"], macs_ratio=entry["macs_ratio"],
                       metrics=entry["metrics"])

    x_axis = "speedup" if latency else "compute_speedup"
    report: dict[str, Any] = {
        "format": BENCH_FORMAT,
        "version": 1,
        "model": evaluation["model"],
        "num_steps": num_steps,
        "prompts": evaluation["prompts"],
        "seeds": evaluation["seeds"],
        "pipeline_kwargs": kwargs,
        "device": evaluation["device"],
        "latency_protocol": evaluation["latency_protocol"],
        "x_axis": x_axis,
        "probe": {"prompts": list(probe.prompts), "seeds": list(probe.seeds),
                  "used_for": "calibrating the runtime policies and measuring each peer's skipped work"},
        "policies": {s.family: {"knob": s.knob, "summary": s.summary} for s in sweeps},
        "peers": {p.name: {"knob": p.knob, "summary": p.summary, "family": p.family} for p in peer_list},
        "calibration": calibrations,
        "rows": rows,
        "memory": peak_memory(getattr(dist, "device", None)),
        "eval": evaluation,
    }
    is_main = dist is None or getattr(dist, "is_main", True)
    if out is not None and is_main:
        write_bench(report, out)
    return report


def peak_memory(device: Any = None) -> dict[str, Any]:
    """The process's peak memory so far: resident set (`getrusage(RUSAGE_SELF).ru_maxrss`, in KiB) and, on a CUDA
    `device`, the most memory torch's allocator held for tensors (`torch.cuda.max_memory_allocated`, bytes; None
    elsewhere). Both cover the whole process up to now, not only the bench."""
    import resource
    import sys

    import torch

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kib = maxrss // 1024 if sys.platform == "darwin" else maxrss  # macOS reports bytes, Linux KiB
    cuda = None
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_initialized():
        cuda = int(torch.cuda.max_memory_allocated(torch.device(device)))
    return {"peak_rss_kib": int(kib), "cuda_max_allocated_bytes": cuda,
            "measured": "whole process up to the end of the bench (ru_maxrss; torch.cuda.max_memory_allocated)"}


def _memory_text(memory: dict[str, Any] | None) -> str:
    if not memory:
        return "not recorded"
    text = f"{memory['peak_rss_kib'] / 1024:.0f} MiB peak resident (whole process, ru_maxrss)"
    if memory.get("cuda_max_allocated_bytes") is not None:
        text += f"; CUDA {memory['cuda_max_allocated_bytes'] / 2 ** 20:.0f} MiB max allocated"
    return text


def _known_peer(name: str) -> Peer:
    try:
        return get_peer(name)
    except KeyError as e:
        raise UsageError(e.args[0]) from None


# -------------------------------------------------------------------------------------------------------- reports
def write_bench(report: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write bench.png, bench.json and bench.md (in that order: the JSON and the Markdown name the plot)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"plot": out / "bench.png", "json": out / "bench.json", "markdown": out / "bench.md"}
    if save_bench_plot(report, paths["plot"]):
        report["plot"] = "bench.png"
    if (out / "eval" / "report.json").is_file():
        report["eval_report"] = "eval/report.json"
        if report["eval"].get("grid"):
            report["grid"] = "eval/" + report["eval"]["grid"]
    write_json(report, paths["json"])
    write_text(paths["markdown"], render_bench_markdown(report))
    return paths


def _metric_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for row in rows:
        for m in row.get("metrics") or {}:
            if m not in names and m != "kid_std":
                names.append(m)
    return names


def _x(row: dict[str, Any], x_axis: str) -> float | None:
    """Where a row sits on the plot: measured speedup, or 1 / MAC ratio when latency was not measured."""
    if x_axis == "speedup":
        return row.get("speedup")
    ratio = row.get("macs_ratio")
    return 1.0 / ratio if ratio else None


def _work_text(work: dict[str, Any] | None) -> str:
    if not work:
        return "-"
    ratio = work.get("mac_ratio")
    return (f"transformer MACs ×{_fmt(ratio, 3)}; {work.get('skipped_linear_calls')}/"
            f"{work.get('baseline_block_linear_calls')} block linear calls skipped")


def render_bench_markdown(report: dict[str, Any]) -> str:
    """The side-by-side table first (status and reason for every row), then how the numbers were made."""
    rows = report["rows"]
    metric_names = _metric_names(rows)
    arrows = {m: (" ↓" if m in LOWER_IS_BETTER else " ↑") for m in metric_names}
    prompts = report["prompts"]
    protocol = report.get("latency_protocol")
    lines = [
        f"# cachekit bench: {report.get('model')}",
        "",
        f"- prompts: {prompts.get('name')} ({prompts.get('num_images')} images); steps: {report['num_steps']}; "
        f"seeds: {report['seeds']['rule']} (base {report['seeds']['base_seed']})",
        "- latency: " + (", ".join(f"{k} {v}" for k, v in protocol.items()) if protocol else "not measured "
                         "(the plot uses 1 / MAC ratio)"),
        f"- probe call ({len(report['probe']['prompts'])} prompts, the evaluation's first seeds): "
        f"{report['probe']['used_for']}",
        f"- memory: {_memory_text(report.get('memory'))}",
        "",
        "| method | setting | status | speedup | MAC ratio | " + " | ".join(m + arrows[m] for m in metric_names)
        + " | measured skipped work (peers) | note |",
        "|---|---|---|---|---|" + "---|" * len(metric_names) + "---|---|",
    ]
    for row in rows:
        setting = "-" if row["value"] is None else f"{row['knob']}={_fmt(row['value'])}"
        cells = [row["method"], setting, row["status"], _fmt(row["speedup"], 3), _fmt(row["macs_ratio"], 3)]
        cells += [_fmt(row["metrics"].get(m)) for m in metric_names]
        # what a counted peer skipped is in the work column; what a reader must know about it, in the note
        note = row.get("caveat") or "" if row["counts"] else row["reason"]
        cells += [_work_text(row.get("work")), note.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Speedup (wall clock) and MAC ratio (whole pipeline call) are against the uncached model measured in the same "
        "run; fidelity metrics (PSNR, SSIM, LPIPS) compare each method's images with the uncached images of the same "
        "prompts and seeds. A peer row is compared only if it measurably skipped work on this model (status `acted`); "
        "`no-skip`, `cannot-act`, `unavailable` and `error` rows say why not.",
        "",
        "## Methods",
        "",
    ]
    for family, info in report.get("policies", {}).items():
        extra = ""
        if family in report.get("calibration", {}):
            cal = report["calibration"][family]
            extra = " Calibrated on the probe call" + (f" (`{cal['file']}`)." if cal.get("file") else ".")
        lines.append(f"- **{family}** (knob `{info['knob']}`): {info['summary']}.{extra}")
    for name, info in report.get("peers", {}).items():
        lines.append(f"- **{name}** ({info['family']}, knob `{info['knob']}`): {info['summary']}.")
    for extra, title in (("plot", "quality vs speedup"), ("grid", "samples")):
        if report.get(extra):
            lines += ["", f"![{title}]({report[extra]})"]
    if report.get("eval_report"):
        lines += ["", f"Full evaluation (metric backends, weights, reference set, raw latency samples): "
                      f"`{report['eval_report']}`."]
    return "\n".join(lines) + "\n"


def save_bench_plot(report: dict[str, Any], path: str | os.PathLike) -> bool:
    """One panel per metric: value against speedup, one curve per method through its knob sweep (mildest setting
    first), the uncached model as a star. Peers are dashed, cachekit's policies solid, extra schedules single
    diamonds. Returns False if there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["counts"]]
    x_axis = report.get("x_axis", "speedup")
    metric_names = _metric_names(rows)
    if not metric_names or not any(_x(r, x_axis) for r in rows):
        return False
    methods = list(dict.fromkeys(r["method"] for r in rows if r["kind"] != "uncached"))
    cmap = plt.get_cmap("tab20")  # the ten strong hues first, then their light pairs
    colors = {m: cmap((2 * i) % 20 + (i // 10) % 2) for i, m in enumerate(methods)}
    ncols = min(3, len(metric_names))
    nrows = -(-len(metric_names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows + 0.9), squeeze=False)
    flat = [ax for line in axes for ax in line]
    for ax in flat[len(metric_names):]:
        ax.set_visible(False)
    for ax, metric in zip(flat, metric_names):
        for row in rows:
            if row["kind"] == "uncached":
                v, x = row["metrics"].get(metric), _x(row, x_axis)
                if isinstance(v, (int, float)) and math.isfinite(v) and x:
                    ax.scatter([x], [v], marker="*", s=90, color="black", zorder=3,
                               label=UNCACHED if ax is flat[0] else None)
        for method in methods:
            points = [(_x(r, x_axis), r["metrics"][metric]) for r in rows if r["method"] == method  # sweep order
                      and isinstance(r["metrics"].get(metric), (int, float))
                      and math.isfinite(r["metrics"][metric]) and _x(r, x_axis)]
            if not points:
                continue
            kind = next(r["kind"] for r in rows if r["method"] == method)
            style = {"peer": "s--", "schedule": "D"}.get(kind, "o-")
            ax.plot([p[0] for p in points], [p[1] for p in points], style, color=colors[method], markersize=4,
                    linewidth=1.2, label=method)
        ax.set_xlabel("speedup vs uncached (×)" if x_axis == "speedup" else "compute speedup (1 / MAC ratio)")
        ax.set_ylabel(metric + (" (lower is better)" if metric in LOWER_IS_BETTER else " (higher is better)"))
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in flat[: len(metric_names)]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=min(6, max(1, len(labels))), fontsize=7, frameon=False)
    fig.suptitle(f"cachekit bench — {report.get('model')}, {report.get('num_steps')} steps", fontsize=9)
    legend_inches = 0.2 + 0.2 * -(-len(labels) // 6)  # room under the panels for the shared legend
    fig.tight_layout(rect=(0, min(0.5, legend_inches / fig.get_figheight()), 1, 0.97))
    try:
        save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)
    return True
