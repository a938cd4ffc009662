"""What writing a clip costs beside making it: encode time and size of .mp4, .webm and .gif for a digits-video clip.

Prints figures measured in one run, never asserts them: a generate-then-encode round is repeated (interleaved, so
machine drift hits each alike) and medians are printed, with each format's encode time as a share of generating
the clip. This is why the server encodes `/v1/videos` results on demand instead of storing every format.

    python benchmarks/video_encode.py --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cachekit.pipelines.call import PipelineCall
from cachekit.pipelines.video_io import encode_video
from cachekit.zoo import call_defaults, load_pipeline

FORMATS = ("mp4", "webm", "gif")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="generate-then-encode rounds (default 5)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline("digits-video")
    pipe.set_progress_bar_config(disable=True)
    call = PipelineCall(("a handwritten 3 moving left",), args.steps, call_defaults("digits-video"), seeds=(0,))
    call(pipe)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in ("generate", *FORMATS)}
    sizes: dict[str, int] = {}
    for _ in range(args.rounds):
        started = time.perf_counter()
        clip = call(pipe)[0]
        times["generate"].append(time.perf_counter() - started)
        for fmt in FORMATS:
            started = time.perf_counter()
            sizes[fmt] = len(encode_video(clip, fmt))
            times[fmt].append(time.perf_counter() - started)
    generate = statistics.median(times["generate"])
    print(f"generate ({args.steps} steps, uncached, {args.threads} thread(s)): {generate:.3f} s, "
          f"median of {args.rounds}")
    for fmt in FORMATS:
        encode = statistics.median(times[fmt])
        print(f"{fmt}: encode {encode * 1000:.1f} ms ({encode / generate:.1%} of the generation), {sizes[fmt]} bytes")


if __name__ == "__main__":
    main()
