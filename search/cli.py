"""`cachekit calibrate`, `cachekit solve` and `cachekit search`: argument parsing only.

The work is in `calibrate.py` (reuse errors), `cachekit.policies.calibration` (runtime-policy fits), `dp.py` (the
solver) and `run.py` (the genetic search seeded by heuristics and the solver). The options every verb shares come
from `cachekit.cli_options`; choice lists come from the registries (`CALIBRATED_POLICIES`, `dp.PRESETS`,
`fitness.QUALITIES` / `COSTS`, `cachekit.wrapper.MODES`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from cachekit import cli_options as opts
from cachekit.errors import UsageError
from cachekit.wrapper import MODES

__all__ = ["add_parser"]


def _load(loader: Any, path: str, what: str) -> Any:
    """`loader(path)` for a file the user named; its complaints about the file's content are one-line errors."""
    from .calibrate import CalibrationError

    try:
        return loader(path)
    except (CalibrationError, ValueError) as err:  # CalibrationError, JSON and format errors: the file, not a bug
        if isinstance(err, UsageError):
            raise
        raise UsageError(f"{path} is not a usable {what}: {err}") from None


def _load_calibration(path: str) -> Any:
    from .calibrate import Calibration

    return _load(Calibration.load, path, "calibration")


def _call(args: argparse.Namespace, prompts: list[str]) -> Any:
    """The calibration prompts' `PipelineCall` (seeds seed + i), built before the model: its settings are checked."""
    from cachekit.pipelines import PipelineCall

    return PipelineCall(tuple(prompts), args.steps, opts.pipeline_settings(args),
                        seeds=tuple(args.seed + i for i in range(len(prompts))))


def _prompts(args: argparse.Namespace) -> list[str]:
    """The calibration prompts: a bad prompt set fails before a large model is loaded."""
    from cachekit.eval.prompts import load_prompts, prompts_for_model

    prompts = list(load_prompts(prompts_for_model(args.prompts, args.model), args.num, args.prompt_seed).prompts)
    if not prompts:
        raise UsageError(f"prompt set {args.prompts!r} has no prompts")
    return prompts


def _pipeline(args: argparse.Namespace, call: Any, device: Any) -> Any:
    from cachekit.pipelines.cli import load_checked

    pipe = load_checked(args.model, call, device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from cachekit.eval.cli import process_for

    from .calibrate import calibrate

    prompts = _prompts(args)
    call = _call(args, prompts)
    pipe = _pipeline(args, call, process_for(args).device)
    if args.policy is not None:
        from cachekit.pipelines import calibrate_policy

        fitted = calibrate_policy(args.policy, pipe, call)
        fitted.details["model"] = args.model
        fitted.save(args.out)
        shown = {k: v for k, v in fitted.values.items() if not isinstance(v, (list, tuple)) or len(v) <= 6}
        print(f"wrote {args.out}: {args.policy} for {fitted.model_class}, {args.steps} steps, fitted {shown}; "
              f"use it as --schedule {args.policy}:calibration={args.out}")
        return 0
    calibration = calibrate(
        pipe, prompts, args.steps, batch_size=args.batch_size, seed=args.seed, mode=args.mode,
        max_features=args.max_features, **call.kwargs,
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


def _search_interrupted(args: argparse.Namespace) -> str:
    from .genetic import CHECKPOINT

    if (Path(args.out) / CHECKPOINT).is_file():
        again = "the same command" + ("" if args.resume else " with --resume")
        return (f"the checkpoint in {args.out} is complete up to the last finished generation; rerun {again} to "
                "continue from there")
    return "no generation was checkpointed yet; rerun the same command to start again"


def _cmd_search(args: argparse.Namespace) -> int:
    from cachekit.eval.cli import process_for

    from .calibrate import calibrate
    from .genetic import CHECKPOINT, OLD_CHECKPOINT, SearchConfig, read_checkpoint
    from .run import search_pipeline
    from .wallclock import WallClockModel

    step_counts = tuple(args.steps)
    args.steps = args.reference_steps if args.reference_steps is not None else max(step_counts)
    joint = step_counts != (args.steps,)
    config = SearchConfig(population=args.population, generations=args.generations, seed=args.search_seed,
                          quality_floor=args.quality_floor, forecast_order=args.forecast_order,
                          step_counts=step_counts if joint else ())
    if args.cost == "latency" and args.no_dp and args.calibration is None:
        raise UsageError("--cost latency needs a calibration's latency table: drop --no-dp or give --calibration")
    if args.wallclock is not None and args.cost != "wallclock":
        raise UsageError("--wallclock is the cost model of --cost wallclock; add --cost wallclock")
    out = Path(args.out)
    if not args.resume and any((out / name).exists() for name in (CHECKPOINT, OLD_CHECKPOINT)):
        raise UsageError(f"{out} holds a search checkpoint: pass --resume to continue it, or choose another --out")
    if args.resume:
        read_checkpoint(out)  # a damaged or old-format checkpoint fails before the model loads
    wallclock = None if args.wallclock is None else _load(WallClockModel.load, args.wallclock, "wall-clock model")
    calibration = None if args.calibration is None else _load_calibration(args.calibration)
    if calibration is not None:
        if calibration.mode != args.genome:
            raise UsageError(f"{args.calibration} is a {calibration.mode}-mode calibration but the search's genome "
                             f"is {args.genome}; calibrate with --mode {args.genome} or search with --genome "
                             f"{calibration.mode}")
        if calibration.num_steps != args.steps:
            raise UsageError(f"{args.calibration} is a calibration for {calibration.num_steps} steps, not "
                             f"{args.steps}; calibrate at --steps {args.steps}")
    prompts = _prompts(args)
    call = _call(args, prompts)
    dist = process_for(args)
    pipe = _pipeline(args, call, dist.device)
    if calibration is None and not args.no_dp and args.steps in step_counts:  # DP seeds at the reference only
        calibration_file = out / "calibration.pt"
        if args.resume and calibration_file.exists():
            calibration = _load_calibration(str(calibration_file))
        else:
            calibration = calibrate(pipe, prompts, args.steps, seed=args.seed, mode=args.genome, **call.kwargs)
            if dist.is_main:
                out.mkdir(parents=True, exist_ok=True)
                calibration.save(calibration_file)
    result = search_pipeline(
        pipe, prompts, args.steps, out, config, calibration=calibration,
        dp_budgets=() if args.no_dp else tuple(args.dp_budgets), cost=args.cost, quality=args.quality,
        mode=args.genome, clip_tolerance=args.clip_tolerance, wallclock=wallclock, resume=args.resume,
        noise_seed=args.seed, dist=dist, model=args.model, **call.kwargs,
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
    config = SolverConfig.from_preset(args.preset, **overrides)
    calibration = _load_calibration(args.calibration)
    solution = solve(calibration, config)
    solution.schedule.save(args.out)
    latency = f", latency ratio {solution.latency_ratio:.3f}" if solution.latency_ratio is not None else ""
    print(
        f"wrote {args.out}: {args.preset} preset, predicted MAC ratio {solution.mac_ratio:.3f}{latency}, "
        f"predicted {config.metric} error {solution.predicted_error:.4g}, solved in {solution.seconds:.2f} s"
    )
    return 0


def _add_run_args(parser: argparse.ArgumentParser, num_prompts: int, joint_steps: bool = False) -> None:
    """Model, prompts, seeds and pipeline settings, shared by `calibrate` and `search` so both run the same calls.

    With `joint_steps`, `--steps` takes several step counts (the search's step-count gene) and `--reference-steps`
    the count candidates are judged against.
    """
    opts.add_model_options(parser)
    if joint_steps:
        parser.add_argument("--steps", type=opts.step_counts, default=(20,), metavar="N[,N...]",
                            help="denoising steps the schedules will run: one count, or several comma-separated "
                                 "(e.g. 6,8,10,12,16,20) to search the step count together with the cache; each "
                                 "2..1000 (default 20)")
        parser.add_argument("--reference-steps", type=opts.STEPS, default=None, metavar="N",
                            help="step count of the uncached images every candidate is judged against and the "
                                 "costs are relative to (default: the largest of --steps)")
    else:
        opts.add_steps(parser, help="denoising steps the schedule will run")
    opts.add_prompts(parser, num=num_prompts, prompt_seed=1, count_alias=True,
                     seed_help="seed choosing the prompts (unlike evaluation's 0, so they differ)")
    opts.add_seed(parser)
    opts.add_guidance_scale(parser)


def add_parser(subparsers: Any) -> None:
    """Add the `calibrate`, `solve` and `search` verbs to the `cachekit` command's subparsers."""
    from cachekit.policies.calibration import CALIBRATED_POLICIES

    from .calibrate import METRICS
    from .dp import PRESETS
    from .fitness import COSTS, QUALITIES

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
    cal.add_argument("--policy", choices=CALIBRATED_POLICIES, default=None,
                     help="fit a runtime policy's coefficients (" + ", ".join(CALIBRATED_POLICIES) + ") for this "
                          "model and step count instead of the solver's reuse errors; the file is then used as "
                          "--schedule POLICY:calibration=FILE")
    _add_run_args(cal, num_prompts=8)
    opts.add_batch_size(cal, default=None)
    cal.add_argument("--mode", choices=MODES, default="component",
                     help="component: each attention / feed-forward output (default); block: whole-block residuals")
    cal.add_argument("--max-features", type=opts.integer(1, 2**31 - 1), default=65536,
                     help="compare at most this many random output coordinates per unit and row (bounds memory on "
                          "large models; default 65536)")
    opts.add_out(cal, required=True, help="calibration file to write (a readable OUT.json is written beside)")
    opts.set_handler(cal, _cmd_calibrate)

    sol = subparsers.add_parser(
        "solve",
        help="solve a schedule from a calibration by dynamic programming",
        description=(
            "Choose, per block and component, the steps to compute so that the summed error of serving the other "
            "steps from the last computed one is least, within a cost budget. Presets: default (relative L1, "
            "per-unit schedules, global budget by Lagrange bisection, first and last step forced), bac (cosine, "
            "the same number of updates S for every unit), cachequant (relative L1, one schedule for the whole "
            "model, stretches in [ceil(N/2), 2N] for interval N)."
        ),
    )
    steps_max = opts.STEPS_RANGE[1]
    sol.add_argument("--calibration", type=opts.input_file("calibration"), required=True,
                     help="calibration file from `cachekit calibrate`")
    sol.add_argument("--budget", type=opts.FRACTION, default=None,
                     help="cost fraction of the uncached transformer to stay within, e.g. 0.4")
    sol.add_argument("--preset", choices=PRESETS, default="default",
                     help=f"solver preset: {', '.join(PRESETS)} (default: default)")
    opts.deprecated_alias(sol, "--mode", "preset", "--preset", choices=PRESETS)
    sol.add_argument("--cost", choices=["macs", "latency"], default="macs",
                     help="what the budget counts: MACs, or latency measured during calibration (default macs)")
    sol.add_argument("--metric", choices=METRICS, default=None, help="reuse error (default: the preset's)")
    sol.add_argument("--updates", type=opts.integer(1, steps_max), default=None,
                     help="exact number of compute steps per unit instead of a budget (BAC's S)")
    sol.add_argument("--interval", type=opts.number(1, steps_max), default=None,
                     help="cachequant: interval N instead of a budget (ceil(T/N) updates)")
    sol.add_argument("--min-stretch", type=opts.integer(1, steps_max), default=None,
                     help="least steps served by one computation (itself included)")
    sol.add_argument("--max-stretch", type=opts.integer(1, steps_max), default=None,
                     help="most steps served by one computation (itself included)")
    sol.add_argument("--max-updates", type=opts.integer(1, steps_max), default=None,
                     help="at most this many computes per unit")
    sol.add_argument("--force", type=opts.integer(-steps_max, steps_max - 1), nargs="*", default=None, metavar="STEP",
                     help="steps that always compute, negative from the end (default: the preset's; 0 always)")
    sol.add_argument("--bubble-threshold", type=opts.number(0, math.inf), default=None,
                     help="Bubbling Union: feed-forward units with mean reuse error >= this also compute whenever "
                          "a later block's feed-forward does")
    sol.add_argument("--bubble-top-k", type=opts.integer(1, 1_000_000), default=None,
                     help="Bubbling Union for the K most volatile feed-forward units (BAC's selection)")
    opts.add_out(sol, required=True, help="schedule JSON to write")
    opts.set_handler(sol, _cmd_solve)

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
            "With several --steps (e.g. --steps 6,8,10,12,16,20) the step count is a gene too: every candidate "
            "runs its own step count and is judged against the uncached model at --reference-steps, and the front "
            "is drawn against uniform step-skipping. "
            "Writes OUT/front.json, one schedule file per front point (named by predicted speedup), front.png, "
            "summary.md and a checkpoint every generation (continue a killed run with --resume)."
        ),
    )
    _add_run_args(search, num_prompts=8, joint_steps=True)
    search.add_argument("--population", type=opts.POPULATION, default=24,
                        help="individuals per generation, a multiple of 4 from 4 to 4096 (default 24)")
    search.add_argument("--generations", type=opts.GENERATIONS, default=10,
                        help="generations after the seeded one, 0..10000 (default 10)")
    search.add_argument("--search-seed", type=opts.SEED, default=0,
                        help="seed of the search's own randomness; the same seed gives the same front (default 0)")
    search.add_argument("--genome", choices=MODES, default="component",
                        help="genome: each attention / feed-forward output (component, ECAD; default) or whole-block "
                             "residuals (block, FORA-style: skipped work turns into wall-clock best)")
    opts.deprecated_alias(search, "--mode", "genome", "--genome", choices=MODES)
    search.add_argument("--cost", choices=list(COSTS), default="macs",
                        help="cost objective: predicted MAC ratio; latency from the calibration's per-unit table; or "
                             "wallclock, a model of the whole pipeline call fitted to probe calls timed on this "
                             "device before the search (OUT/wallclock.json) (default macs)")
    search.add_argument("--wallclock", type=opts.input_file("wall-clock model"), default=None, metavar="FILE",
                        help="with --cost wallclock: a wall-clock model saved by an earlier search on this device "
                             "and settings (OUT/wallclock.json) instead of timing new probes")
    search.add_argument("--quality", choices=list(QUALITIES), default="psnr",
                        help="quality objective: PSNR against the uncached images (default), CLIP score, or "
                             "ImageReward (weights from $CACHEKIT_IMAGEREWARD_DIR)")
    search.add_argument("--clip-tolerance", type=opts.number(0, 100), default=None, metavar="POINTS",
                        help="constraint: a schedule whose CLIP score (bundled digits CLIP) falls more than POINTS "
                             "below the uncached model's is infeasible and never reaches the front")
    search.add_argument("--forecast-order", type=int, choices=[0, 1, 2], default=0,
                        help="add one gene per step choosing TaylorSeer extrapolation of that step's reused outputs, "
                             "of this order (default 0: plain reuse only)")
    search.add_argument("--calibration", type=opts.input_file("calibration"), default=None,
                        help="calibration file from `cachekit calibrate` (default: calibrate now, saved in OUT)")
    search.add_argument("--no-dp", action="store_true", help="no calibration and no DP seeds (heuristic seeds only)")
    search.add_argument("--dp-budgets", type=opts.FRACTION, nargs="+", default=[0.25, 0.35, 0.5, 0.7],
                        metavar="FRACTION", help="cost budgets of the DP seeds (default 0.25 0.35 0.5 0.7)")
    search.add_argument("--quality-floor", type=opts.number(-100, 100), default=15.0,
                        help="hypervolume reference quality (dB PSNR for --quality psnr; default 15)")
    search.add_argument("--resume", action="store_true", help="continue the run checkpointed in OUT")
    opts.add_out(search, directory=True, required=True, help="output folder")
    opts.set_handler(search, _cmd_search, _search_interrupted)
