"""`cachekit generate` and `cachekit schedule make`: the verbs that run a pipeline through `PipelineCall`.

Argument parsing only, plus `load_checked`, the one way a verb loads its pipeline: the pipeline call's settings are
checked against what the pipeline takes right after it loads, before anything is generated. Other verbs (eval,
bench, calibrate, search) use it too.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from typing import Any

from cachekit import cli_options as opts
from cachekit.errors import UsageError

from .call import PipelineCall

__all__ = ["add_parser", "add_schedule_parsers", "load_checked"]


def load_checked(model: str, call: PipelineCall, device: Any = None, torch_dtype: Any = None) -> Any:
    """The pipeline `model` names, loaded offline, with `call`'s settings checked against its `__call__`."""
    from cachekit.zoo import load_pipeline

    pipe = load_pipeline(model, device=device, torch_dtype=torch_dtype)
    call.check(pipe)
    return pipe


# ---------------------------------------------------------------------------------------------------- generate
def _checked_out(args: argparse.Namespace, video: bool, pipeline: str | None) -> str:
    """`--out` (or its default for the model's kind) checked against the model and `--fps` / `--scale`.

    Runs before any image or clip is made: a video suffix for an image model, an unknown suffix for a video model,
    a missing video encoder or `--fps` for a PNG are one-line errors; every numbered file must be writable.
    """
    from cachekit.io import check_writable

    from .video_io import VIDEO_SUFFIXES, check_video_support, is_video_path, numbered_paths

    out = args.out if args.out is not None else ("cachekit.mp4" if video else "cachekit.png")
    what = f"{args.model} ({pipeline})" if pipeline and pipeline != args.model else args.model
    if not video:
        if is_video_path(out):
            raise UsageError(f"--out {out}: {what} makes images, not videos; write a .png, or use a video model "
                             "such as --model digits-video")
        given = [flag for flag, value in (("--fps", args.fps), ("--scale", args.scale)) if value is not None]
        if given:
            verb = "apply" if len(given) > 1 else "applies"
            raise UsageError(f"{' and '.join(given)} {verb} to a video model's clips; {what} makes images")
        return out
    if is_video_path(out):
        check_video_support(out)
        for path in numbered_paths(out, len(args.prompt) * args.num_images):
            check_writable(path)
    elif out.lower().endswith(".png"):
        if args.fps is not None:
            raise UsageError(f"--fps applies to video files ({', '.join(VIDEO_SUFFIXES)}), not to the PNG strip {out}")
    else:
        raise UsageError(f"--out {out}: {what} makes videos; write {', '.join(VIDEO_SUFFIXES)}, or .png for a strip "
                         "of frames")
    return out


def _cmd_generate(args: argparse.Namespace) -> int:
    import cachekit
    from cachekit.images import save_image_grid
    from cachekit.plans import plan_label, resolve_plan

    from .call import makes_video, pipeline_class_name

    pipeline = pipeline_class_name(args.model)  # the model's kind from its model_index.json, before it loads
    out = _checked_out(args, makes_video(pipeline), pipeline) if pipeline is not None else None
    prompts = tuple(args.prompt) * args.num_images  # one row of the grid per round of prompts
    args.steps = opts.steps_for_plan(args.schedule, args.steps)
    call = PipelineCall(prompts, args.steps, opts.pipeline_settings(args),
                        seeds=tuple(args.seed + i for i in range(len(prompts))), output_type="pt")
    pipe = load_checked(args.model, call, device=args.device)
    video = makes_video(pipe)
    if out is None or pipeline != type(pipe).__name__:  # its model_index.json did not tell, or told otherwise
        out = _checked_out(args, video, type(pipe).__name__)
    plan = resolve_plan(args.schedule, pipe.transformer, args.steps)
    with cachekit.cached(pipe, plan) if plan is not None else nullcontext():
        start = time.perf_counter()
        images = call(pipe)
        seconds = time.perf_counter() - start
        stats = [session.stats for session in cachekit.sessions(pipe)]
    if video:
        written = _write_clips(list(images), out, args)
    else:
        save_image_grid(list(images), out, columns=len(args.prompt))
        written = f"{out}: {len(prompts)} image(s)"
    label = plan_label(args.schedule)
    if plan is None:
        work = "uncached"
    else:
        computed = sum(s.computed for s in stats)
        reused = sum(s.reused for s in stats)
        unit = "block" if getattr(plan, "mode", "block") == "block" else "component"
        work = f"{label}, reused {reused / max(computed + reused, 1):.0%} of {computed + reused} {unit} evaluations"
    print(f"wrote {written}, {args.steps} steps in {seconds:.2f} s, {work}")
    return 0


def _write_clips(clips: list[Any], out: str, args: argparse.Namespace) -> str:
    """Write a video model's clips as `--out` says (video files, numbered when several, or a PNG strip); returns
    what was written, for the summary line."""
    from .video_io import DEFAULT_FPS, is_video_path, save_frame_strip, upscale_factor, write_clips

    frames, height, width = len(clips[0]), clips[0].shape[-2], clips[0].shape[-1]
    scale = args.scale if args.scale is not None else upscale_factor(height, width)
    shown = f"{width}x{height} px" + (f" enlarged {scale}x" if scale > 1 else "")
    if not is_video_path(out):
        save_frame_strip(clips, out, scale=scale)
        return f"{out}: {len(clips)} clip(s) of {frames} frames ({shown}) as a strip"
    fps = args.fps if args.fps is not None else DEFAULT_FPS
    paths = write_clips(clips, out, fps=fps, scale=scale)
    where = str(paths[0]) if len(paths) == 1 else f"{paths[0]} .. {paths[-1]}"
    return f"{where}: {len(clips)} clip(s) of {frames} frames ({shown}) at {fps:g} fps"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `cachekit generate` on the core CLI's subparsers."""
    from .video_io import DEFAULT_FPS

    gen = subparsers.add_parser(
        "generate", help="generate images or videos, optionally with a plan (schedule or policy) applied",
        description="Generate images (or, with a video model such as --model digits-video, clips) with a stock "
                    "diffusers pipeline (the bundled digits model by default), optionally serving transformer "
                    "outputs from cache as a plan says. Prints what it wrote, the time of the pipeline call and the "
                    "share of cached units' evaluations that were reused. A video model writes --out as .mp4 "
                    "(H.264), .webm (VP9) or .gif, one file per clip (clip-0.mp4, clip-1.mp4, ... when there are "
                    f"several; clip i has seed + i), at --fps (default {DEFAULT_FPS}), frames enlarged "
                    "nearest-neighbour to at least 128 px (--scale); or .png, a strip with one row of frames per "
                    "clip. Video files need the video extra: pip install 'cachekit[video]'.")
    opts.add_model_options(gen)
    opts.add_schedule(gen, help="the plan to apply (default none, the uncached model)")
    gen.add_argument("--prompt", nargs="+", default=["a handwritten 7"], metavar="TEXT",
                     help="one or more prompts (default 'a handwritten 7')")
    gen.add_argument("--num-images", type=opts.integer(1, 256), default=1,
                     help="images (clips, for a video model) per prompt, 1..256 (default 1)")
    opts.add_steps(gen, default=None, help="denoising steps (default: the schedule file's own step count, else 20)")
    opts.add_guidance_scale(gen)
    opts.add_seed(gen, help="seed of the first image; image i uses seed + i")
    opts.add_out(gen, default=None,
                 help="output: a PNG (a grid when there are several images; default cachekit.png); for a video model "
                      ".mp4, .webm, .gif (numbered files when there are several clips; default cachekit.mp4) or a "
                      ".png strip of frames")
    opts.add_video_options(gen)
    opts.set_handler(gen, _cmd_generate)
    return gen


# ---------------------------------------------------------------------------------------------------- schedule make
# The static policies' options, by config field; a policy reads the ones its config has.
_POLICY_OPTIONS = {
    "interval": ("--interval", opts.integer(1, opts.STEPS_RANGE[1]), "fora, delta-dit: recompute every N steps"),
    "mode": ("--mode", None, "fora: reuse whole-block residuals (block) or each component's output (component)"),
    "boundary_step": ("--boundary-step", opts.integer(0, opts.STEPS_RANGE[1]),
                      "delta-dit: back blocks cached before it, front blocks from it on"),
    "num_cached_blocks": ("--num-cached-blocks", opts.integer(0, 10_000), "delta-dit: blocks cached per stage"),
    "gate_step": ("--gate-step", opts.integer(1, opts.STEPS_RANGE[1]),
                  "tgate: cross-attention cached from this step on"),
}


def _policy_spec(args: argparse.Namespace) -> str:
    """`fora:interval=3,mode=block` from the options given; an option the policy does not take is an error."""
    from cachekit.policies import STATIC_POLICIES

    fields = STATIC_POLICIES[args.policy][1].__dataclass_fields__
    given = {name: getattr(args, name) for name in _POLICY_OPTIONS if getattr(args, name, None) is not None}
    foreign = [_POLICY_OPTIONS[name][0] for name in given if name not in fields]
    if foreign:
        takes = [_POLICY_OPTIONS[name][0] for name in _POLICY_OPTIONS if name in fields]
        raise UsageError(f"{args.policy} does not take {', '.join(foreign)}; it takes {', '.join(takes) or 'none'}")
    return args.policy + (":" + ",".join(f"{k}={v}" for k, v in given.items()) if given else "")


def _cmd_schedule_make(args: argparse.Namespace) -> int:
    from cachekit.cost import MacProfile
    from cachekit.plans import resolve_plan

    spec = _policy_spec(args)
    resolve_plan(spec)  # the policy's options are checked before the model loads
    call = PipelineCall((args.prompt,), args.steps, opts.pipeline_settings(args))
    pipe = load_checked(args.model, call, device=args.device)
    schedule = resolve_plan(spec, pipe.transformer, args.steps)
    schedule.scheduler = type(pipe.scheduler).__name__
    MacProfile.for_pipeline(pipe, prompt=args.prompt, **call.settings(pipe)).annotate(schedule)
    schedule.save(args.out)
    print(f"wrote {args.out}: {spec} at {args.steps} steps, predicted MAC ratio "
          f"{schedule.predicted_cost['mac_ratio']:.3f}")
    return 0


def add_schedule_parsers(schedule_subparsers: Any) -> None:
    """Register `cachekit schedule make` (it measures MACs on the model) on the core CLI's `schedule` actions."""
    from cachekit.policies import STATIC_POLICIES
    from cachekit.wrapper import MODES

    names = sorted(STATIC_POLICIES)
    make = schedule_subparsers.add_parser(
        "make", help=f"write a static policy's schedule ({', '.join(names)})",
        description="Build a static policy's schedule for a model and step count, with its predicted MAC ratio "
                    "measured on the model at the call settings given. Options a policy does not set keep its "
                    "defaults.")
    make.add_argument("policy", choices=names, help=", ".join(names))
    opts.add_model_options(make)
    opts.add_steps(make, help="denoising steps the schedule is for")
    for name, (flag, kind, text) in _POLICY_OPTIONS.items():
        if name == "mode":
            make.add_argument(flag, dest=name, choices=MODES, default=None, help=text + " (default: the policy's)")
        else:
            make.add_argument(flag, dest=name, type=kind, default=None, help=text + " (default: the policy's)")
    opts.add_guidance_scale(make)
    make.add_argument("--prompt", default="a handwritten 7", metavar="TEXT",
                      help="prompt used to measure MACs at real shapes (default 'a handwritten 7')")
    opts.add_out(make, required=True, help="schedule JSON to write")
    opts.set_handler(make, _cmd_schedule_make)
