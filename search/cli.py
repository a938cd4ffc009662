"""`cachekit calibrate` and `cachekit solve`: argument parsing only; the work is in `calibrate.py` and `dp.py`."""

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


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from cachekit.eval.prompts import load_prompts
    from cachekit.zoo import DIGITS_DEFAULTS, load_pipeline

    from .calibrate import calibrate

    call = {k: v for k, v in DIGITS_DEFAULTS.items() if k != "num_inference_steps"} if args.model == "digits" else {}
    if args.guidance_scale is not None:
        call["guidance_scale"] = args.guidance_scale
    call.update(_pipeline_args(args.pipeline_arg))
    prompts = load_prompts(args.prompt_set, args.prompts, args.prompt_seed).prompts
    if not prompts:
        raise ValueError(f"prompt set {args.prompt_set!r} has no prompts")
    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
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
    cal.add_argument("--model", default="digits",
                     help="bundled model name ('digits', the default) or a local diffusers pipeline folder")
    cal.add_argument("--device", default=None, help="torch device to calibrate and time on (default: cpu)")
    cal.add_argument("--steps", type=_positive_int, default=20,
                     help="denoising steps the schedule will run (default 20)")
    cal.add_argument("--prompts", type=_positive_int, default=8, help="number of calibration prompts (default 8)")
    cal.add_argument("--prompt-set", default="digits",
                     help="prompt set: digits, coco[:PATH], parti[:PATH], ... or a .txt/.jsonl file (default digits)")
    cal.add_argument("--prompt-seed", type=int, default=1,
                     help="seed choosing the prompts (default 1, unlike evaluation's 0, so they differ)")
    cal.add_argument("--seed", type=int, default=0, help="seed of the first prompt's noise; prompt k uses seed + k")
    cal.add_argument("--batch-size", type=_positive_int, default=None,
                     help="prompts per pipeline call (default: all at once)")
    cal.add_argument("--mode", choices=["component", "block"], default="component",
                     help="component: each attention / feed-forward output (default); block: whole-block residuals")
    cal.add_argument("--max-features", type=_positive_int, default=65536,
                     help="compare at most this many random output coordinates per unit and row (bounds memory on "
                          "large models; default 65536)")
    cal.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the pipeline's)")
    cal.add_argument("--pipeline-arg", action="append", default=[], metavar="KEY=VALUE",
                     help="extra pipeline call setting, repeatable, e.g. --pipeline-arg height=512 "
                          "(values read as JSON when possible)")
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
