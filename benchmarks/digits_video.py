"""First checks of the bundled digits-video model: is the motion direction right, is the digit the prompted one.

Prints figures measured in one run, never asserts them. For each of N held-out-style prompts ("a handwritten 3
moving left", ...) one clip is generated (9 frames, 32x32, the zoo's call defaults); the direction is read from the
ink centre's motion between the first and last frame, the digit of every frame from a box-centred 16x16 crop through
the project's digit classifier (trained on held-out digits only; `cachekit.zoo.digits_video_check`). The same check
on real clips is printed beside it as the check's own ceiling.

    python benchmarks/digits_video.py --num 40 --steps 20
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm import tqdm

from cachekit import zoo
from cachekit.zoo.digits_video_check import check_clips, check_real_clips
from cachekit.zoo.digits_video_data import video_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=40, help="clips (default 40)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--seed", type=int, default=11, help="prompt-list seed (default 11)")
    args = parser.parse_args()
    pipe = zoo.load_pipeline("digits-video")
    pipe.set_progress_bar_config(disable=True)
    defaults = zoo.call_defaults("digits-video")
    prompts = video_prompts(args.num, seed=args.seed)
    videos = []
    started = time.perf_counter()
    for i, (prompt, _, _) in enumerate(tqdm(prompts, desc="clips")):
        videos.append(pipe(prompt, num_inference_steps=args.steps, output_type="pt",
                           generator=torch.Generator().manual_seed(i), **defaults).frames[0])
    seconds = time.perf_counter() - started
    model = check_clips(videos, [label for _, label, _ in prompts], [direction for _, _, direction in prompts])
    print(json.dumps({"steps": args.steps, "model": model.as_dict(), "real_clips": check_real_clips().as_dict(),
                      "seconds_per_clip": round(seconds / args.num, 3), "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
