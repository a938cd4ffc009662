"""`cachekit calibrate`, `cachekit solve` and `cachekit search`: argument parsing only.

The work is in `calibrate.py` (reuse errors), `cachekit.policies.calibration` (runtime-policy fits), `dp.py` (the
solver) and `run.py` (the genetic search seeded by heuristics and the solver).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_parser"]

_SOLVE_MODES = ("default", "bac", "cachequant")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text}")
    return value


def _pipeline_args(pairs: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs; values are read as JSON when they parse (16, 4.5, false, null), else as strings."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--pipeline-arg expects KEY=VALUE, got {pair!r}")
        try:
            settings[key] = json.loads(text)
        except json.JSONDecodeError:
            settings[key] = text
    return settings


def _generation_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Pipeline call settings: the bundled model's recommended ones, then --guidance-scale and --pipeline-arg."""
    from cachekit.zoo import call_defaults

    call = call_defaults(args.model)
    if args.guidance_scale is not None:
        call["guidance_scale"] = args.guidance_scale
    call.update(_pipeline_args(args.pipeline_arg))
    return call


def _process(args: argparse.Namespace) -> Any:
    """This process's place under `accelerate launch` (one process otherwise), on --device or its accelerator."""
    import torch

    from cachekit.eval.distributed import get_dist

    on_cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
    return get_dist(cpu=on_cpu)


def _prompts_and_pipeline(args: argparse.Namespace, device: Any = None) -> tuple[list[str], Any]:
    """The calibration prompts, then the pipeline: a bad prompt set fails before a large model is loaded."""
    from cachekit.eval.prompts import load_prompts
    from cachekit.zoo import load_pipeline

    prompts = load_prompts(args.prompt_set, args.prompts, args.prompt_seed).prompts
    if not prompts:
        raise ValueError(f"prompt set {args.prompt_set!r} has no prompts")
    pipe = load_pipeline(args.model, device=args.device or device)
    pipe.set_progress_bar_config(disable=True)
    return list(prompts), pipe


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate

    call = _generation_settings(args)
    prompts, pipe = _prompts_and_pipeline(args, _process(args).device)
    if args.policy is not None:
        from cachekit.pipelines import PipelineCall, calibrate_policy

        seeds = tuple(args.seed + i for i in range(len(prompts)))
        fitted = calibrate_policy(args.policy, pipe, PipelineCall(tuple(prompts), args.steps, call, seeds))
        fitted.details["model"] = args.model
        fitted.save(args.out)
        shown = {k: v for k, v in fitted.values.items() if not isinstance(v, (list, tuple)) or len(v) <= 6}
        print(f"wrote {args.out}: {args.policy} for {fitted.model_class}, {args.steps} steps, fitted {shown}; "
              f"use it as --schedule {args.policy}:calibration={args.out}")
        return 0
    calibration = calibrate(
        pipe, prompts, args.steps, batch_size=args.batch_size, seed=args.seed, mode=args.mode,
        max_features=args.max_features, **call,
    )
    calibration.meta["model"] = args.model
    calibration.save(args.out)
    units = int(calibration.present.sum())
    print(
        f"wrote {args.out} (+ {args.out}.json): {calibration.model_class}, {args.steps} steps, {units} units, "
        f"{calibration.num_samples} samples from {len(prompts)} prompts on {calibration.meta['device']}, "
        f"in {calibration.meta['calibration_seconds']:.1f} s"
    )
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .calibrate import Calibration, calibrate
    from .genetic import SearchConfig
    from .run import search_pipeline
    from .wallclock import WallClockModel

    config = SearchConfig(population=args.population, generations=args.generations, seed=args.search_seed,
                          quality_floor=args.quality_floor, forecast_order=args.forecast_order)
    if args.cost == "latency" and args.no_dp and args.calibration is None:
        raise ValueError("--cost latency needs a calibration's latency table: drop --no-dp or give --calibration")
    out = Path(args.out)
    from .genetic import CHECKPOINT, OLD_CHECKPOINT, read_checkpoint

    if not args.resume and any((out / name).exists() for name in (CHECKPOINT, OLD_CHECKPOINT)):
        raise ValueError(f"{out} holds a search checkpoint: pass --resume to continue it, or choose another --out")
    if args.resume:
        read_checkpoint(out)  # a damaged or old-format checkpoint fails before the model loads
    wallclock = None
    if args.wallclock is not None:
        if args.cost != "wallclock":
            raise ValueError("--wallclock is the cost model of --cost wallclock; add --cost wallclock")
        wallclock = WallClockModel.load(args.wallclock)
    call = _generation_settings(args)
    dist = _process(args)
    prompts, pipe = _prompts_and_pipeline(args, dist.device)
    calibration = None
    if args.calibration is not None:
        calibration = Calibration.load(args.calibration)
    elif not args.no_dp:
        calibration_file = out / "calibration.pt"
        if args.resume and calibration_file.exists():
            calibration = Calibration.load(calibration_file)
        else:
            calibration = calibrate(pipe, prompts, args.steps, seed=args.seed, mode=args.mode, **call)
            if dist.is_main:
                out.mkdir(parents=True, exist_ok=True)
                calibration.save(calibration_file)
    result = search_pipeline(
        pipe, prompts, args.steps, out, config, calibration=calibration,
        dp_budgets=() if args.no_dp else tuple(args.dp_budgets), cost=args.cost, quality=args.quality,
        mode=args.mode, clip_tolerance=args.clip_tolerance, wallclock=wallclock, resume=args.resume,
        noise_seed=args.seed, dist=dist, model=args.model, **call,
    )
    if not dist.is_main:
        return 0
    best = result.history[-1]
    print(
        f"wrote {out / 'front.json'}, {len(result.front)} front schedules, front.png and summary.md: "
        f"{result.evaluations} evaluations, hypervolume {result.history[0]['hypervolume']:.4g} (seeds) -> "
        f"{best['hypervolume']:.4g}; quality {result.objectives['quality']}, cost {result.objectives['cost']}"
        + (f", {result.evaluator['constraint']}" if result.evaluator.get("constraint") else "")
    )
    return 0


def _cmd_solve(args: argparse.Namespace) -> int:
    from .calibrate import Calibration
    from .dp import SolverConfig, solve

    overrides: dict[str, Any] = {
        "budget": args.budget, "cost": args.cost, "updates": args.updates, "interval": args.interval,
        "max_updates": args.max_updates, "bubble_threshold": args.bubble_threshold, "bubble_top_k": args.bubble_top_k,
    }
    for name in ("metric", "min_stretch", "max_stretch"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.force is not None:
        overrides["forced"] = tuple(args.force)
    config = SolverConfig.from_preset(args.mode, **overrides)
    calibration = Calibration.load(args.calibration)
    solution = solve(calibration, config)
    solution.schedule.save(args.out)
    latency = f", latency ratio {solution.latency_ratio:.3f}" if solution.latency_ratio is not None else ""
    print(
        f"wrote {args.out}: {args.mode} mode, predicted MAC ratio {solution.mac_ratio:.3f}{latency}, "
        f"predicted {config.metric} error {solution.predicted_error:.4g}, solved in {solution.seconds:.2f} s"
    )
    return 0


def _add_run_args(parser: argparse.ArgumentParser, num_prompts: int) -> None:
    """Model, prompts, seeds and pipeline settings, shared by `calibrate` and `search` so both run the same calls."""
    parser.add_argument("--model", default="digits",
                        help="bundled model name ('digits', the default) or a local diffusers pipeline folder")
    parser.add_argument("--device", default=None,
                        help="torch device to run and time on (default: the GPU when there is one, under "
                             "`accelerate launch` each process's own; else cpu)")
    parser.add_argument("--steps", type=_positive_int, default=20,
                        help="denoising steps the schedule will run (default 20)")
    parser.add_argument("--prompts", type=_positive_int, default=num_prompts,
                        help=f"number of calibration prompts (default {num_prompts})")
    parser.add_argument("--prompt-set", default="digits",
                        help="prompt set: digits, coco[:PATH], parti[:PATH], ... or a .txt/.jsonl file "
                             "(default digits)")
    parser.add_argument("--prompt-seed", type=int, default=1,
                        help="seed choosing the prompts (default 1, unlike evaluation's 0, so they differ)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the first prompt's noise; prompt k uses seed + k")
    parser.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the pipeline's)")
    parser.add_argument("--pipeline-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra pipeline call setting, repeatable, e.g. --pipeline-arg height=512 "
                             "(values read as JSON when possible)")


def add_parser(subparsers: Any) -> None:
    """Add the `calibrate` and `solve` verbs to the `cachekit` command's subparsers."""
    cal = subparsers.add_parser(
        "calibrate",
        help="measure reuse errors, latency and MACs of every cacheable unit (input of `solve`)",
        description=(
            "Run the uncached model over a few calibration prompts and record, for every block, component and pair "
            "of steps i <= t, the error of serving step t from the output cached at step i (relative L1 and "
            "1 - cosine, averaged over samples), plus each component's latency on this device and its MACs. "
            "Use the step count and pipeline settings you will generate with: errors depend on them."
        ),
    )
    cal.add_argument("--policy", choices=["teacache", "magcache", "first-block"], default=None,
                     help="fit a runtime policy's coefficients (TeaCache polynomial, MagCache ratios, first-block "
                          "threshold) for this model and step count instead of the solver's reuse errors; the file "
                          "is then used as --schedule POLICY:calibration=FILE")
    _add_run_args(cal, num_prompts=8)
    cal.add_argument("--batch-size", type=_positive_int, default=None,
                     help="prompts per pipeline call (default: all at once)")
    cal.add_argument("--mode", choices=["component", "block"], default="component",
                     help="component: each attention / feed-forward output (default); block: whole-block residuals")
    cal.add_argument("--max-features", type=_positive_int, default=65536,
                     help="compare at most this many random output coordinates per unit and row (bounds memory on "
                          "large models; default 65536)")
    cal.add_argument("--out", required=True, help="calibration file to write (a readable OUT.json is written beside)")
    cal.set_defaults(handler=_cmd_calibrate)

    sol = subparsers.add_parser(
        "solve",
        help="solve a schedule from a calibration by dynamic programming",
        description=(
            "Choose, per block and component, the steps to compute so that the summed error of serving the other "
            "steps from the last computed one is least, within a cost budget. Modes: default (relative L1, "
            "per-unit schedules, global budget by Lagrange bisection, first and last step forced), bac (cosine, "
            "the same number of updates S for every unit), cachequant (relative L1, one schedule for the whole "
            "model, stretches in [ceil(N/2), 2N] for interval N)."
        ),
    )
    sol.add_argument("--calibration", required=True, help="calibration file from `cachekit calibrate`")
    sol.add_argument("--budget", type=_fraction, default=None,
                     help="cost fraction of the uncached transformer to stay within, e.g. 0.4")
    sol.add_argument("--mode", choices=_SOLVE_MODES, default="default", help="solver preset (default: default)")
    sol.add_argument("--cost", choices=["macs", "latency"], default="macs",
                     help="what the budget counts: MACs, or latency measured during calibration (default macs)")
    sol.add_argument("--metric", choices=["l1", "cosine"], default=None, help="reuse error (default: the mode's)")
    sol.add_argument("--updates", type=_positive_int, default=None,
                     help="exact number of compute steps per unit instead of a budget (BAC's S)")
    sol.add_argument("--interval", type=float, default=None,
                     help="cachequant: interval N instead of a budget (ceil(T/N) updates)")
    sol.add_argument("--min-stretch", type=_positive_int, default=None,
                     help="least steps served by one computation (itself included)")
    sol.add_argument("--max-stretch", type=_positive_int, default=None,
                     help="most steps served by one computation (itself included)")
    sol.add_argument("--max-updates", type=_positive_int, default=None, help="at most this many computes per unit")
    sol.add_argument("--force", type=int, nargs="*", default=None, metavar="STEP",
                     help="steps that always compute, negative from the end (default: the mode's; 0 always)")
    sol.add_argument("--bubble-threshold", type=float, default=None,
                     help="Bubbling Union: feed-forward units with mean reuse error >= this also compute whenever "
                          "a later block's feed-forward does")
    sol.add_argument("--bubble-top-k", type=_positive_int, default=None,
                     help="Bubbling Union for the K most volatile feed-forward units (BAC's selection)")
    sol.add_argument("--out", required=True, help="schedule JSON to write")
    sol.set_defaults(handler=_cmd_solve)

    search = subparsers.add_parser(
        "search",
        help="learn a Pareto front of schedules (quality against cost) with NSGA-II, seeded by heuristics and DP",
        description=(
            "Calibrate once (unless --calibration or --no-dp), solve DP schedules at several budgets, seed NSGA-II "
            "with them and with FORA / Delta-DiT / TGATE, then evolve schedules judged in-process on the "
            "calibration prompts: quality is PSNR of the final images against the uncached model's (same seeds), "
            "or --quality clip / image-reward, optionally under a CLIP constraint (--clip-tolerance); cost is the "
            "predicted MAC ratio, the calibration's per-unit latency (--cost latency), or the whole call's "
            "wall-clock time from a model fitted to timed probe calls (--cost wallclock). Under `accelerate launch "
            "-m cachekit search ...` the candidates of each generation are spread over the processes. "
            "Writes OUT/front.json, one schedule file per front point (named by predicted speedup), front.png, "
            "summary.md and a checkpoint every generation (continue a killed run with --resume)."
        ),
    )
    _add_run_args(search, num_prompts=8)
    search.add_argument("--population", type=_positive_int, default=24,
                        help="individuals per generation, a multiple of 4 (default 24)")
    search.add_argument("--generations", type=int, default=10, help="generations after the seeded one (default 10)")
    search.add_argument("--search-seed", type=int, default=0,
                        help="seed of the search's own randomness; the same seed gives the same front (default 0)")
    search.add_argument("--mode", choices=["component", "block"], default="component",
                        help="genome: each attention / feed-forward output (component, ECAD; default) or whole-block "
                             "residuals (block, FORA-style: skipped work turns into wall-clock best)")
    search.add_argument("--cost", choices=["macs", "latency", "wallclock"], default="macs",
                        help="cost objective: predicted MAC ratio; latency from the calibration's per-unit table; or "
                             "wallclock, a model of the whole pipeline call fitted to probe calls timed on this "
                             "device before the search (OUT/wallclock.json) (default macs)")
    search.add_argument("--wallclock", default=None, metavar="FILE",
                        help="with --cost wallclock: a wall-clock model saved by an earlier search on this device "
                             "and settings (OUT/wallclock.json) instead of timing new probes")
    search.add_argument("--quality", choices=["psnr", "clip", "image-reward"], default="psnr",
                        help="quality objective: PSNR against the uncached images (default), CLIP score, or "
                             "ImageReward (weights from $CACHEKIT_IMAGEREWARD_DIR)")
    search.add_argument("--clip-tolerance", type=float, default=None, metavar="POINTS",
                        help="constraint: a schedule whose CLIP score (bundled digits CLIP) falls more than POINTS "
                             "below the uncached model's is infeasible and never reaches the front")
    search.add_argument("--forecast-order", type=int, choices=[0, 1, 2], default=0,
                        help="add one gene per step choosing TaylorSeer extrapolation of that step's reused outputs, "
                             "of this order (default 0: plain reuse only)")
    search.add_argument("--calibration", default=None,
                        help="calibration file from `cachekit calibrate` (default: calibrate now, saved in OUT)")
    search.add_argument("--no-dp", action="store_true", help="no calibration and no DP seeds (heuristic seeds only)")
    search.add_argument("--dp-budgets", type=_fraction, nargs="+", default=[0.25, 0.35, 0.5, 0.7],
                        metavar="FRACTION", help="cost budgets of the DP seeds (default 0.25 0.35 0.5 0.7)")
    search.add_argument("--quality-floor", type=float, default=15.0,
                        help="hypervolume reference quality in dB PSNR (default 15)")
    search.add_argument("--resume", action="store_true", help="continue the run checkpointed in OUT")
    search.add_argument("--out", required=True, help="output folder")
    search.set_defaults(handler=_cmd_search)
