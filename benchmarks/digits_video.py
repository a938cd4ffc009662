"""First checks of the bundled digits-video model: is the motion direction right, is the digit the prompted one.

Prints figures measured in one run, never asserts them. For each of N held-out-style prompts ("a handwritten 3
moving left", ...) one clip is generated (9 frames, 32x32, the zoo's call defaults); the direction is read from the
ink centre's motion between the first and last frame, the digit from a 16x16 crop around the ink centre of the
middle frame through the project's digit classifier (trained on held-out digits only).

    python benchmarks/digits_video.py --num 40 --steps 20
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm import tqdm

from cachekit import zoo
from cachekit.zoo.digits_classifier import recognise
from cachekit.zoo.digits_video_data import video_prompts


def ink_centre(frame: torch.Tensor) -> torch.Tensor:
    """(x, y) of a frame's brightness-weighted centre, in pixels."""
    grey = frame.mean(0)
    ys, xs = torch.meshgrid(torch.arange(grey.shape[0], dtype=grey.dtype), torch.arange(grey.shape[1],
                            dtype=grey.dtype), indexing="ij")
    mass = grey.sum() + 1e-6
    return torch.stack([(grey * xs).sum() / mass, (grey * ys).sum() / mass])


def direction_of(clip: torch.Tensor) -> str:
    move = ink_centre(clip[-1]) - ink_centre(clip[0])
    axis = 0 if abs(move[0]) >= abs(move[1]) else 1
    return (("left", "right") if axis == 0 else ("up", "down"))[int(move[axis] > 0)]


def digit_of(clip: torch.Tensor) -> int:
    middle = clip[clip.shape[0] // 2]
    x, y = (int(v) for v in ink_centre(middle).round().long())
    half = 8
    x0 = min(max(x - half, 0), middle.shape[2] - 2 * half)
    y0 = min(max(y - half, 0), middle.shape[1] - 2 * half)
    return int(recognise(middle[None, :, y0:y0 + 2 * half, x0:x0 + 2 * half])[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=40, help="clips (default 40)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--seed", type=int, default=11, help="prompt-list seed (default 11)")
    args = parser.parse_args()
    pipe = zoo.load_pipeline("digits-video")
    pipe.set_progress_bar_config(disable=True)
    defaults = zoo.call_defaults("digits-video")
    right_direction = right_digit = 0
    started = time.perf_counter()
    for i, (prompt, label, direction) in enumerate(tqdm(video_prompts(args.num, seed=args.seed), desc="clips")):
        clip = pipe(prompt, num_inference_steps=args.steps, output_type="pt",
                    generator=torch.Generator().manual_seed(i), **defaults).frames[0]
        right_direction += direction_of(clip) == direction
        right_digit += digit_of(clip) == label
    seconds = time.perf_counter() - started
    print(json.dumps({"clips": args.num, "steps": args.steps, "direction_right": right_direction / args.num,
                      "digit_right": right_digit / args.num, "seconds_per_clip": round(seconds / args.num, 3),
                      "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
