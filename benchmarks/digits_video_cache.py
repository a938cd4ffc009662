"""Caching on the bundled video model: speedup and quality of cachekit's policies, the shipped schedule and the peers.

One `cachekit.eval.bench.run_bench` run on `digits-video` (a stock WanPipeline, 9 frames of 32x32, 20 steps): the
uncached model; cachekit's policies over their sweeps (FORA, Delta-DiT, TGATE; TeaCache, MagCache, first-block
calibrated on the probe call; uniform step-skipping for reference); the shipped searched schedule
(`digits-video-fast`); and the peers: diffusers' caches through Wan's `CacheMixin.enable_cache` inside the pipeline's
own `cache_context("cond")` / `("uncond")`, and cache-dit's DBCache (with and without its TaylorSeer). Every row
sees the same prompts (held-out style: digits-video prompts with prompt seed 11) and noise seeds (from 500, apart
from the search's 0..3 and the shipping bench's 1000..).

Printed per row: wall-clock speedup (median over interleaved rounds of the per-round ratio against the uncached
model timed in the same round, so all ratios come from one run), MAC speedup (1 / the whole call's MAC ratio),
PSNR / SSIM of every frame against the uncached clip's frame, and the per-frame digit check
(`cachekit.zoo.digits_video_check.check_clips`: the share of frames showing the prompted digit, of clips whose
most frequent digit is right, of clips moving the prompted way), on the very frames the bench generated.

    python benchmarks/digits_video_cache.py --num 12 --out runs/video-cache
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _clips(folder: Path, num: int, frames: int) -> list[torch.Tensor]:
    """The bench's saved frames of one configuration back as clips (uint8 [F, 3, H, W] each)."""
    clips = []
    for i in range(num):
        stack = [np.asarray(Image.open(folder / f"{i:05d}_{f:03d}.png").convert("RGB")) for f in range(frames)]
        clips.append(torch.from_numpy(np.stack(stack)).permute(0, 3, 1, 2))
    return clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=12, help="clips (default 12)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per configuration (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared CPU)")
    parser.add_argument("--out", default="runs/video-cache", help="output folder (bench.json, bench.md, ...)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from cachekit import zoo
    from cachekit.eval.bench import run_bench
    from cachekit.eval.prompts import digits_video_prompts
    from cachekit.plans import resolve_plan
    from cachekit.zoo.digits_video_check import check_clips, check_real_clips

    pipe = zoo.load_pipeline("digits-video")
    prompts = digits_video_prompts(args.num, seed=11)
    schedules = {}
    if "digits-video-fast" in zoo.shipped_schedules():
        schedules["digits-video-fast"] = resolve_plan("digits-video-fast", pipe.transformer, args.steps)
    out = Path(args.out)
    report = run_bench(pipe, prompts, args.steps, "psnr,ssim", out, schedules=schedules, batch_size=4,
                       base_seed=500, latency_batch_size=4, repeats=args.repeats, probe_num=2, grid_samples=4,
                       save_images=True, model_name="digits-video")
    frames = zoo.call_defaults("digits-video")["num_frames"]
    labels = [m["label"] for m in prompts.meta]
    directions = [m["direction"] for m in prompts.meta]
    results = []
    for row in report["rows"]:
        entry = {k: row.get(k) for k in ("name", "kind", "status", "speedup", "macs_ratio", "caveat")}
        entry["mac_speedup"] = 1 / row["macs_ratio"] if row.get("macs_ratio") else None
        entry.update({k: row["metrics"].get(k) for k in ("psnr", "ssim")})
        folder = out / "eval" / "images" / row["name"]
        if row["counts"] and folder.is_dir():
            entry["check"] = check_clips(_clips(folder, args.num, frames), labels, directions).as_dict()
        else:
            entry["reason"] = row["reason"]
        results.append(entry)
    summary = {"model": "digits-video", "steps": args.steps, "clips": args.num, "prompts": report["prompts"],
               "noise_seeds": "500 + prompt index", "torch_threads": torch.get_num_threads(),
               "latency_protocol": report["latency_protocol"], "real_clips_check": check_real_clips().as_dict(),
               "rows": results}
    (out / "digits_video_cache.json").write_text(json.dumps(summary, indent=1))

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    print("| method | status | speedup | MAC speedup | PSNR dB | SSIM | digit frames | digit clips | direction | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for e in results:
        check = e.get("check") or {}
        note = e.get("caveat") or e.get("reason") or ""
        print(f"| {e['name']} | {e['status']} | {fmt(e['speedup'], '.2f')} | {fmt(e['mac_speedup'], '.2f')} | "
              f"{fmt(e['psnr'], '.2f')} | {fmt(e['ssim'], '.4f')} | {fmt(check.get('digit_frames'), '.3f')} | "
              f"{fmt(check.get('digit_clips'), '.3f')} | {fmt(check.get('direction'), '.3f')} | {note} |")
    print(f"real clips (the check's ceiling): {json.dumps(summary['real_clips_check'])}")
    print(f"wrote {out / 'digits_video_cache.json'}, {out / 'bench.md'}, {out / 'bench.png'}")


if __name__ == "__main__":
    main()
