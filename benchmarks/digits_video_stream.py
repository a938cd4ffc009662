"""Video streams of the bundled digits-video model: time to first frame and frames per second, with and without
caching, and the streamed frames judged like whole clips.

Prints figures measured in one run, never asserts them. For each of N prompts ("a handwritten 3 moving left", ...)
the runner serves, with the same seed, an uncached stream and a stream under `--cache` (taking turns which goes
first), each `--frames` pixel frames long, and one whole clip (a runner request, equal to the stock WanPipeline call)
at the stream's step count and one at the zoo's 20 steps. Reported:

- time to first frame (stream opened -> first frame out; the prompt's text already in the runner's prompt cache)
  and frames per second after the first frame, per mode; the cached/uncached ratios are the median of the
  per-prompt ratios (each pair measured back to back);
- the share of transformer work the plan skips (`reused_share_planned`: MACs, from the plan) and the hooks'
  row-level counts of computed vs reused units (`reused_share_hook_counts`; under a block-mode plan such as FORA
  the component hooks also count their computes inside computed blocks, so this reads lower than the skipped work);
- the digit check of `cachekit.zoo.digits_video_check` (digit of every frame from a box-centred crop, motion
  direction of the ink centre) on the first 9 streamed frames of every stream, as on the whole clips, with the
  check's ceiling on real clips; later 9-frame windows of the streams are printed too, but read them with care: a
  training clip is 9 frames, in which the digit crosses the canvas, so after about 9 frames the model is asked for
  motion it never saw;
- PSNR of the cached stream's frames against the uncached stream's (same seed).

    python benchmarks/digits_video_stream.py --num 20 --frames 33 --cache fora:interval=2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from tqdm import tqdm

from cachekit import sessions
from cachekit.pipelines import Runner
from cachekit.zoo.digits_video_check import check_clips, check_real_clips
from cachekit.zoo.digits_video_data import video_prompts

CLIP = 9  # the model's clip length: what a whole clip is and what the check judges


def as_video(images) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images])


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return 99.0 if mse == 0 else 10 * float(np.log10(255.0 ** 2 / mse))


def stream_once(runner: Runner, prompt: str, seed: int, args, schedule) -> dict:
    stats = sessions(runner.pipe)[0].stats
    computed, reused = stats.computed, stats.reused
    started = time.perf_counter()
    with runner.open_video_stream(prompt, seed=seed, steps=args.steps, window=args.window,
                                  num_frames=args.frames, schedule=schedule) as stream:
        frames = list(stream)
    seconds = time.perf_counter() - started
    if [f.index for f in frames] != list(range(args.frames)):
        raise RuntimeError(f"stream of {prompt!r} sent frames {[f.index for f in frames]}")
    first, last = frames[0].time_s, frames[-1].time_s
    units = stats.computed - computed + stats.reused - reused
    return {"video": as_video([f.image for f in frames]), "ttff": stream.time_to_first_frame_s,
            "fps": (len(frames) - 1) / (last - first), "seconds": seconds, "planned": stream.reused_share,
            "reused": (stats.reused - reused) / units if units else 0.0}


def judge(videos, prompts, start: int) -> dict:
    return check_clips([v[start : start + CLIP] for v in videos], [p[1] for p in prompts],
                       [p[2] for p in prompts]).as_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=20, help="prompts (default 20)")
    parser.add_argument("--frames", type=int, default=33, help="pixel frames per stream (default 33)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps of every latent frame (default 8)")
    parser.add_argument("--window", type=int, default=3, help="latent frames per forward (default 3)")
    parser.add_argument("--cache", default="fora:interval=2", help="the cached streams' plan (default fora:interval=2)")
    parser.add_argument("--seed", type=int, default=11, help="prompt-list seed (default 11)")
    args = parser.parse_args()
    if args.frames < CLIP:
        parser.error(f"--frames must be at least {CLIP} (one clip)")
    prompts = video_prompts(args.num, seed=args.seed)
    rows = {"uncached": [], "cached": []}
    whole, whole_zoo, whole_seconds = [], [], []
    with Runner("digits-video") as runner:
        stream_once(runner, prompts[0][0], 0, args, None)  # warm-up: one-off costs out of the figures
        for i, (prompt, _, _) in enumerate(tqdm(prompts, desc="prompts")):
            # the prompt's text once, untimed, so both timed streams find it in the runner's prompt cache
            with runner.open_video_stream(prompt, seed=i, steps=args.steps, window=args.window, num_frames=1) as s:
                list(s)
            order = ("uncached", "cached") if i % 2 == 0 else ("cached", "uncached")
            for mode in order:
                rows[mode].append(stream_once(runner, prompt, i, args, None if mode == "uncached" else args.cache))
            started = time.perf_counter()
            whole.append(as_video(runner.generate(prompt, seed=i, num_inference_steps=args.steps, timeout=600)))
            whole_seconds.append(time.perf_counter() - started)
            whole_zoo.append(as_video(runner.generate(prompt, seed=i, num_inference_steps=20, timeout=600)))
        loop_threads = runner.loop_threads

    def med(values):
        return round(statistics.median(values), 4)

    report = {
        "settings": {"prompts": args.num, "frames": args.frames, "steps": args.steps, "window": args.window,
                     "lag": args.steps // (args.window - 1), "cache": args.cache, "loop_threads": loop_threads},
        "speed": {
            mode: {"time_to_first_frame_s_p50": med([r["ttff"] for r in rs]),
                   "frames_per_s_p50": med([r["fps"] for r in rs]),
                   "reused_share_planned": med([r["planned"] for r in rs]),
                   "reused_share_hook_counts": med([r["reused"] for r in rs])} for mode, rs in rows.items()},
        "cached_over_uncached": {
            "frames_per_s_ratio_p50": med([c["fps"] / u["fps"] for c, u in zip(rows["cached"], rows["uncached"])]),
            "time_to_first_frame_ratio_p50": med([c["ttff"] / u["ttff"]
                                                  for c, u in zip(rows["cached"], rows["uncached"])]),
            "psnr_db_first_clip_p50": med([psnr(c["video"][:CLIP], u["video"][:CLIP])
                                           for c, u in zip(rows["cached"], rows["uncached"])]),
        },
        "whole_clip": {"seconds_p50_at_stream_steps": med(whole_seconds)},
        "check": {
            "whole_clips_at_stream_steps": judge(whole, prompts, 0),
            "whole_clips_at_20_steps": judge(whole_zoo, prompts, 0),
            **{f"stream_{mode}_frames_0_8": judge([r["video"] for r in rs], prompts, 0) for mode, rs in rows.items()},
            **{f"stream_{mode}_frames_{s}_{s + CLIP - 1}": judge([r["video"] for r in rs], prompts, s)
               for mode, rs in rows.items() for s in range(CLIP - 1, args.frames - CLIP + 1, CLIP - 1)},
            "real_clips": check_real_clips().as_dict(),
        },
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
