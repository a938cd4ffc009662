"""The `cachekit` command line: parses arguments and calls the library; no logic lives here.

Each verb lives in the package that does the work and contributes `add_parser(subparsers)` plus a handler; this file
only gathers them, so `cachekit eval` depends on `cachekit.eval` without the core importing it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

# Verbs provided by the optional packages, imported only when present.
_PLUGIN_MODULES = ("cachekit.eval.cli", "cachekit.search.cli")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="digits",
        help="bundled model name ('digits', the default) or a local diffusers pipeline folder",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    import cachekit
    from cachekit.images import save_image_grid
    from cachekit.zoo import load_pipeline

    pipe = load_pipeline(args.model, device=args.device)
    prompts = list(args.prompt) * args.num_images
    generators = [torch.Generator("cpu").manual_seed(args.seed + i) for i in range(len(prompts))]
    call = dict(prompt=prompts, num_inference_steps=args.steps, generator=generators, output_type="pil")
    if args.guidance_scale is not None:
        call["guidance_scale"] = args.guidance_scale
    if args.schedule.lower() != "none":
        cachekit.enable(pipe, args.schedule)
    start = time.perf_counter()
    try:
        images = pipe(**call).images
        stats = [s.stats for s in cachekit.sessions(pipe)]
    finally:
        cachekit.disable(pipe)
    seconds = time.perf_counter() - start
    save_image_grid(images, args.out, columns=len(args.prompt))
    reused = f", reused {stats[0].reuse_fraction:.0%} of component evaluations" if stats else ""
    print(f"wrote {args.out}: {len(images)} image(s), {args.steps} steps in {seconds:.2f} s{reused}")
    return 0


def _cmd_schedule_show(args: argparse.Namespace) -> int:
    from cachekit.schedule import Schedule

    print(Schedule.load(args.file).summary())
    return 0


def _cmd_schedule_make(args: argparse.Namespace) -> int:
    from cachekit.cost import MacProfile
    from cachekit.policies import static_schedule
    from cachekit.zoo import load_pipeline

    options = {
        "fora": {"interval": args.interval, "mode": args.mode},
        "delta-dit": {"boundary_step": args.boundary_step, "num_cached_blocks": args.num_cached_blocks,
                      "interval": args.interval},
        "tgate": {"gate_step": args.gate_step},
    }[args.policy]
    pipe = load_pipeline(args.model, device=args.device)
    schedule = static_schedule(args.policy, pipe.transformer, args.steps, **options)
    schedule.scheduler = type(pipe.scheduler).__name__
    profile = MacProfile.for_pipeline(pipe, prompt=args.prompt)
    profile.annotate(schedule)
    schedule.save(args.out)
    print(f"wrote {args.out}: {args.policy} {options}, predicted MAC ratio {schedule.predicted_cost['mac_ratio']:.3f}")
    return 0


def _cmd_schedule_resample(args: argparse.Namespace) -> int:
    from cachekit.schedule import Schedule

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    schedule = Schedule.load(args.file).resample(args.steps)
    schedule.save(args.out)
    print(f"wrote {args.out}: {schedule.num_steps} steps")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cachekit",
        description="Learned feature-caching schedules that make diffusers transformers faster.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate images with a schedule applied", description=(
        "Generate images with a stock diffusers pipeline, optionally serving transformer components from cache "
        "as a schedule file says."))
    _add_model_args(gen)
    gen.add_argument("--schedule", default="none", help="schedule JSON file, or 'none' for the uncached model")
    gen.add_argument("--prompt", nargs="+", default=["a handwritten 7"], help="one or more prompts")
    gen.add_argument("--num-images", type=int, default=1, help="images per prompt")
    gen.add_argument("--steps", type=int, default=20, help="denoising steps")
    gen.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the pipeline's)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    gen.add_argument("--out", default="cachekit.png", help="output PNG (a grid when there are several images)")
    gen.set_defaults(handler=_cmd_generate)

    schedule = sub.add_parser("schedule", help="inspect and transform schedule files",
                              description="Inspect and transform schedule files.")
    schedule_sub = schedule.add_subparsers(dest="schedule_command", required=True, metavar="ACTION")
    show = schedule_sub.add_parser("show", help="print a readable summary of a schedule file",
                                   description="Print compute fractions per step, block and component, "
                                   "the predicted cost and a step-by-block map.")
    show.add_argument("file", help="schedule JSON file")
    show.set_defaults(handler=_cmd_schedule_show)
    make = schedule_sub.add_parser("make", help="write a static policy's schedule (FORA, Delta-DiT, TGATE)",
                                   description="Build a FORA, Delta-DiT or TGATE schedule for a model and step "
                                   "count, with its predicted MAC ratio measured on the model.")
    make.add_argument("policy", choices=["fora", "delta-dit", "tgate"])
    _add_model_args(make)
    make.add_argument("--steps", type=int, default=20, help="denoising steps the schedule is for")
    make.add_argument("--interval", type=int, default=3, help="fora, delta-dit: recompute every N steps")
    make.add_argument("--mode", choices=["block", "component"], default="block",
                      help="fora: reuse whole-block residuals or each component's output")
    make.add_argument("--boundary-step", type=int, default=10, help="delta-dit: back blocks cached before it, "
                      "front blocks from it on")
    make.add_argument("--num-cached-blocks", type=int, default=8, help="delta-dit: blocks cached per stage")
    make.add_argument("--gate-step", type=int, default=10, help="tgate: cross-attention cached from this step")
    make.add_argument("--prompt", default="a handwritten 7", help="prompt used to measure MACs at real shapes")
    make.add_argument("--out", required=True, help="schedule JSON to write")
    make.set_defaults(handler=_cmd_schedule_make)
    resample = schedule_sub.add_parser("resample", help="transfer a schedule to another step count",
                                       description="Map a schedule to a new step count by nearest step; logs "
                                       "the mapping.")
    resample.add_argument("file", help="schedule JSON file")
    resample.add_argument("--steps", type=int, required=True, help="new number of denoising steps")
    resample.add_argument("--out", required=True, help="where to write the new schedule")
    resample.set_defaults(handler=_cmd_schedule_resample)

    for module_name in _PLUGIN_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (FileNotFoundError, ValueError, RuntimeError, TypeError) as err:
        print(f"cachekit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
