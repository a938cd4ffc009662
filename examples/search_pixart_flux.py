"""Search a cache schedule for PixArt-alpha 256 (COCO captions) or FLUX.1-dev (MJHQ prompts) on GPUs.

The same job as `cachekit search` on the bundled digits model, at the settings a GPU user runs: the model resident,
a few calibration prompts that evaluation never sees (prompt seed 1; `cachekit eval` and the eval examples use 0),
20 steps, and the block-mode genome with forecast genes on a wall-clock cost fitted on *your* device.

    python examples/search_pixart_flux.py --model pixart --captions ~/data/coco/annotations/captions_val2014.json \\
        --out runs/search-pixart
    python examples/search_pixart_flux.py --model flux --meta ~/data/mjhq/meta_data.json --out runs/search-flux
    # candidates of each generation spread over 8 GPUs (the front is the one a single process finds):
    accelerate launch --multi_gpu --num_processes 8 examples/search_pixart_flux.py ... (same arguments)
    # then judge the front on held-out prompts and seeds:
    python examples/eval_pixart_coco.py --captions ... --fid-ref ... --schedule runs/search-pixart/front_*.json

Settings and what they cost. Population 32 and 20 generations evaluate about 550 distinct schedules (1.4% of ECAD's
72 x 550), as on the digits model (docs/benchmarks.md, section 7). Each evaluation is one pipeline call of all
calibration prompts (16 by default) with the candidate applied; before the search come one calibration call and the
wall-clock probes (13 configurations x 6 calls). So the search takes about 650 calls of your calibration batch:
time one uncached call first (`cachekit eval --schedule none --num 16 ...` prints it) and multiply. For example, at
4 s per call that is about 45 minutes on one GPU and 6 on eight; this example has not been run on a GPU here (the
build machine has none), so measure before you plan. `--resume` continues a killed run from its last generation.

What has to be on the machine: the model in the Hugging Face cache (HF_HUB_OFFLINE=1 forbids downloads), the prompt
file (COCO captions_val2014.json or MJHQ meta_data.json). Fidelity (PSNR against the uncached images) needs nothing
else; `--quality clip` needs OpenAI's ViT-B-32.pt in ~/.cache/clip.
"""

from __future__ import annotations

import argparse

import torch

from eval_pixart_coco import load_pixart_256  # the PixArt-alpha 256 loader the eval example uses

FLUX = "black-forest-labs/FLUX.1-dev"
CALL_SETTINGS = {
    "pixart": {"guidance_scale": 4.5, "height": 256, "width": 256},  # ECAD's PixArt-alpha settings
    "flux": {"guidance_scale": 5.0, "height": 256, "width": 256},  # ECAD's FLUX.1-dev search resolution
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(CALL_SETTINGS), required=True)
    p.add_argument("--captions", default=None, help="pixart: COCO captions_val2014.json")
    p.add_argument("--meta", default=None, help="flux: MJHQ-30K meta_data.json")
    p.add_argument("--num", type=int, default=16, help="calibration prompts (one batched call per candidate)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--population", type=int, default=32)
    p.add_argument("--generations", type=int, default=20)
    p.add_argument("--genome", choices=["block", "component"], default="block", help="what a gene switches")
    p.add_argument("--cost", choices=["wallclock", "macs", "latency"], default="wallclock")
    p.add_argument("--forecast-order", type=int, default=2)
    p.add_argument("--quality", choices=["psnr", "clip"], default="psnr")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from cachekit.eval.distributed import get_dist
    from cachekit.eval.prompts import load_prompts
    from cachekit.search import SearchConfig, calibrate, search_pipeline

    if args.model == "pixart" and not args.captions:
        p.error("--model pixart needs --captions (COCO captions_val2014.json)")
    if args.model == "flux" and not args.meta:
        p.error("--model flux needs --meta (MJHQ-30K meta_data.json)")
    prompt_set = f"coco:{args.captions}" if args.model == "pixart" else f"mjhq:{args.meta}"
    prompts = list(load_prompts(prompt_set, args.num, 1).prompts)  # fails before the model loads
    dist = get_dist()
    if args.model == "pixart":
        pipe = load_pixart_256(dist.device)
    else:
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(FLUX, torch_dtype=torch.bfloat16).to(dist.device)
    pipe.set_progress_bar_config(disable=True)
    call = CALL_SETTINGS[args.model]
    calibration = calibrate(pipe, prompts, args.steps, seed=0, mode=args.genome, **call)
    config = SearchConfig(population=args.population, generations=args.generations, seed=0,
                          forecast_order=args.forecast_order)
    result = search_pipeline(pipe, prompts, args.steps, args.out, config, calibration=calibration, cost=args.cost,
                             quality=args.quality, mode=args.genome, resume=args.resume, **call)
    if dist.is_main:
        print(f"{result.evaluations} evaluations; hypervolume {result.history[0]['hypervolume']:.4g} -> "
              f"{result.history[-1]['hypervolume']:.4g}; front in {args.out}/front.json and front.png")


if __name__ == "__main__":
    main()
