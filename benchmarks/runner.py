"""The streaming batch runner against one-at-a-time serving and the static-batch limit, on the digits model.

Prints ratios measured in one run (throughput in paired rounds), never asserts them. Requests arrive on a bursty trace (Gamma inter-arrival times,
shape 0.5: coefficient of variation 1.4, as production serving traces show), 20 DPM-Solver steps, CFG 4:

- throughput of the runner against (a) the stock pipeline serving one request at a time and (b) the limit: the
  same prompts and seeds in static-batch pipeline calls of max_batch rows (max_batch / 2 prompts with CFG),
  with the arrival rate at 1.5x the limit's throughput so the runner is never starved; goal >= 0.9 of the limit,
  every output equal to its solo call;
- caching inside the runner: the same with `digits-fast` on every request; goal: the runner keeps >= 0.9 of the
  speedup `digits-fast` has in static batches;
- latency under load: time to first image and p50/p99 latency at 50%, 80% and 100% of the limit's throughput;
  deadline-miss rate with and without cache tiering (requests ask for `digits-lossless` under a deadline);
- streams: frames per second with Stream Batch against frame by frame (anchor 1.5x), residual CFG against CFG
  (anchor 2.05x), and the similarity filter on a static input.

    python benchmarks/runner.py --num 200 --max-batch 32 --json runs/runner.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cachekit.pipelines import PipelineCall, Runner
from cachekit.zoo import load_pipeline
from cachekit.zoo.digits_data import digit_prompts

STEPS = 20


def gamma_arrivals(num: int, rate: float, shape: float, seed: int) -> np.ndarray:
    """Arrival times (s) of `num` requests at `rate` per second with Gamma(shape) inter-arrival gaps."""
    gaps = np.random.default_rng(seed).gamma(shape, 1.0 / (shape * rate), size=num)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def static_batches(pipe, prompts: list[str], seeds: list[int], per_call: int, plan=None) -> tuple[float, list]:
    """Images per second of back-to-back static-batch pipeline calls (and the images)."""
    call = PipelineCall(prompts, num_inference_steps=STEPS, seeds=seeds, output_type="pil")
    images: list = []
    started = time.perf_counter()
    for chunk in tqdm(call.chunks(per_call), desc=f"static batches of {per_call} ({plan or 'uncached'})",
                      leave=False):
        images.extend(chunk(pipe, plan=plan))
    return len(prompts) / (time.perf_counter() - started), images


def one_at_a_time(pipe, prompts: list[str], seeds: list[int]) -> tuple[float, list]:
    call = PipelineCall(prompts, num_inference_steps=STEPS, seeds=seeds, output_type="pil")
    images: list = []
    started = time.perf_counter()
    for chunk in tqdm(call.chunks(1), desc="one at a time", leave=False):
        images.extend(chunk(pipe))
    return len(prompts) / (time.perf_counter() - started), images


def serve_trace(runner: Runner, prompts: list[str], seeds: list[int], arrivals: np.ndarray, plan=None,
                deadline_s: float | None = None, allow_degrade: bool = False, label: str = "") -> dict:
    """Submit each request at its arrival time; wait for all; the runner's figures for this trace alone."""
    handles = []
    started = time.perf_counter()
    for prompt, seed, at in zip(prompts, seeds, arrivals):
        delay = at - (time.perf_counter() - started)
        if delay > 0:
            time.sleep(delay)
        handles.append(runner.submit(prompt, seed=seed, num_inference_steps=STEPS, schedule=plan,
                                     deadline_s=deadline_s, allow_degrade=allow_degrade))
    images = [h.result(timeout=600) for h in tqdm(handles, desc=f"runner {label}", leave=False)]
    elapsed = time.perf_counter() - started
    latencies = [h.info.latency_s for h in handles]
    first_done = min(h.info.latency_s + float(at) for h, at in zip(handles, arrivals))
    misses = [h.info.deadline_missed for h in handles if h.info.deadline_missed is not None]
    return {
        "images": images,
        "images_per_s": len(handles) / elapsed,
        "time_to_first_image_s": first_done,
        "latency_p50_s": float(np.percentile(latencies, 50)),
        "latency_p99_s": float(np.percentile(latencies, 99)),
        "deadline_miss_rate": (sum(misses) / len(misses)) if misses else None,
        "degraded_share": sum(h.info.degraded for h in handles) / len(handles),
        "plans": sorted({h.info.plan for h in handles}),
    }


def stream_fps(runner: Runner, frames: list, repeats: int, **options) -> tuple[float, object]:
    """Output frames per second of one stream fed as fast as it takes frames (each pushed once taken in).

    The outputs are read as they come, by a second thread, as a client does: a stream keeps only its newest
    unread outputs (`OUTBOX_FRAMES`), so reading them all at the end would lose the oldest.
    """
    total = repeats * len(frames)
    with runner.open_stream("a handwritten 8", **options) as stream:
        reader = threading.Thread(target=lambda: [stream.get(timeout=120) for _ in range(total)], daemon=True)
        started = time.perf_counter()
        reader.start()
        for _ in range(repeats):
            for frame in frames:
                before = stream.taken
                stream.push(frame)
                while stream.taken == before:
                    time.sleep(0.0005)
        reader.join()
        return total / (time.perf_counter() - started), stream


_CHILD_PIPE = None  # the child process's pipeline, loaded by `references`, reused by every `static_limits` round


def references(prompts: list[str], seeds: list[int], per_call: int) -> tuple:
    """In a child process: the one-at-a-time rate, and the solo images (as uint8 arrays, uncached and under
    `digits-fast`) every runner output is checked against."""
    global _CHILD_PIPE
    torch.set_num_threads(2)
    _CHILD_PIPE = pipe = load_pipeline("digits")
    pipe.set_progress_bar_config(disable=True)
    static_batches(pipe, prompts[:per_call], seeds[:per_call], per_call)  # warm-up
    solo_rate, solo_images = one_at_a_time(pipe, prompts, seeds)
    fast_solo = PipelineCall(prompts, num_inference_steps=STEPS, seeds=seeds, output_type="pil")
    fast_solo_images = [img for chunk in fast_solo.chunks(1) for img in chunk(pipe, plan="digits-fast")]
    as_arrays = lambda images: [np.asarray(image) for image in images]  # noqa: E731
    return solo_rate, as_arrays(solo_images), as_arrays(fast_solo_images)


def static_limits(prompts: list[str], seeds: list[int], per_call: int) -> tuple[float, float]:
    """In the child process, once per round: the static-batch limit, uncached and under `digits-fast`."""
    limit_rate, _ = static_batches(_CHILD_PIPE, prompts, seeds, per_call)
    limit_fast_rate, _ = static_batches(_CHILD_PIPE, prompts, seeds, per_call, plan="digits-fast")
    return limit_rate, limit_fast_rate


def max_difference(images: list, reference: list) -> int:
    return max(int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
               for a, b in zip(images, reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=200, help="requests per trace (default 200)")
    parser.add_argument("--max-batch", type=int, default=32, help="transformer rows per forward (default 32)")
    parser.add_argument("--shape", type=float, default=0.5, help="Gamma shape of inter-arrival gaps (default 0.5)")
    parser.add_argument("--align-steps", type=float, default=20.0,
                        help="the runner's step-aligned admission (Runner(align_steps=...); 0: off)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="paired rounds of static limit and runner for the throughput ratios (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    pairs = digit_prompts(args.num, seed=args.seed)
    prompts, seeds = [p for p, _ in pairs], list(range(args.num))
    per_call = max(args.max_batch // 2, 1)

    # The references run in a child process, the runner in this one with its model loaded on its own loop thread
    # and no torch work on the main thread, as under `cachekit serve`: two threads that both ran torch keep two
    # OpenMP teams that fight over the cores (section 12 of docs/benchmarks.md), which would charge the runner
    # for the benchmark's own structure. Throughput is measured in paired rounds (the static limit, then the
    # runner on the same prompts), and each ratio is the median of its per-round ratios: the machine's speed drifts
    # over the minutes a run takes, and a ratio of figures taken minutes apart measures the drift.
    child = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    solo_rate, solo_images, fast_solo_images = child.submit(references, prompts, seeds, per_call).result()

    results: dict = {"num": args.num, "max_batch_rows": args.max_batch, "steps": STEPS, "gamma_shape": args.shape,
                     "align_steps": args.align_steps, "rounds": args.rounds,
                     "references": "measured in a child process"}
    runner = Runner("digits", max_batch=args.max_batch, max_queue=args.num, align_steps=args.align_steps)
    try:
        serve_trace(runner, prompts[:per_call], seeds[:per_call], np.zeros(per_call), label="warm-up")
        rounds = []
        for round_index in range(args.rounds):
            limit_rate, limit_fast_rate = child.submit(static_limits, prompts, seeds, per_call).result()
            saturating = gamma_arrivals(args.num, 1.5 * limit_rate, args.shape, args.seed)
            uncached = serve_trace(runner, prompts, seeds, saturating, label=f"uncached, saturated ({round_index})")
            fast = serve_trace(runner, prompts, seeds, saturating, plan="digits-fast",
                               label=f"digits-fast, saturated ({round_index})")
            rounds.append({"static_limit_images_per_s": limit_rate, "static_digits_fast_images_per_s": limit_fast_rate,
                           "runner_images_per_s": uncached["images_per_s"],
                           "runner_digits_fast_images_per_s": fast["images_per_s"],
                           "runner_over_limit": uncached["images_per_s"] / limit_rate,
                           "kept_share_of_speedup": (fast["images_per_s"] / uncached["images_per_s"])
                           / (limit_fast_rate / limit_rate),
                           "max_pixel_difference_vs_solo": max_difference(uncached["images"], solo_images),
                           "digits_fast_max_pixel_difference_vs_solo": max_difference(fast["images"],
                                                                                      fast_solo_images)})
        median = lambda key: float(np.median([r[key] for r in rounds]))  # noqa: E731
        limit_rate = median("static_limit_images_per_s")
        results["rounds_measured"] = rounds
        results["throughput"] = {
            "one_at_a_time_images_per_s": solo_rate, "static_limit_images_per_s": limit_rate,
            "runner_images_per_s": median("runner_images_per_s"),
            "runner_over_limit": median("runner_over_limit"),
            "runner_over_one_at_a_time": median("runner_images_per_s") / solo_rate,
            "max_pixel_difference_vs_solo": max(r["max_pixel_difference_vs_solo"] for r in rounds),
        }
        results["caching"] = {
            "static_digits_fast_images_per_s": median("static_digits_fast_images_per_s"),
            "static_speedup": median("static_digits_fast_images_per_s") / limit_rate,
            "runner_digits_fast_images_per_s": median("runner_digits_fast_images_per_s"),
            "runner_speedup": median("runner_digits_fast_images_per_s") / median("runner_images_per_s"),
            "kept_share_of_speedup": median("kept_share_of_speedup"),
            "max_pixel_difference_vs_solo": max(r["digits_fast_max_pixel_difference_vs_solo"] for r in rounds),
        }
        child.shutdown()
        results["load"] = {}
        for load in (0.5, 0.8, 1.0):
            trace = gamma_arrivals(args.num, load * limit_rate, args.shape, args.seed + 1)
            served = serve_trace(runner, prompts, seeds, trace, label=f"{load:.0%} load")
            results["load"][f"{load:.0%}"] = {k: v for k, v in served.items() if k != "images"}
        # a deadline of twice the uncached p50 latency at 50% load; requests ask for the slowest shipped plan
        deadline = 2.0 * results["load"]["50%"]["latency_p50_s"]
        trace = gamma_arrivals(args.num, 1.0 * limit_rate, args.shape, args.seed + 2)
        results["tiering"] = {"deadline_s": deadline}
        for allow in (False, True):
            served = serve_trace(runner, prompts, seeds, trace, plan="digits-lossless", deadline_s=deadline,
                                 allow_degrade=allow, label=f"tiering {'on' if allow else 'off'}")
            results["tiering"]["with_tiering" if allow else "without_tiering"] = {
                k: v for k, v in served.items() if k != "images"}
        # image streams: 3 stages of 50 timesteps (img2img), fed the first 8 generated digits, 10 rounds
        inputs = uncached["images"][:8]
        batch_fps, _ = stream_fps(runner, inputs, 10, stages=(20, 30, 40), guidance="self")
        single_fps, _ = stream_fps(runner, inputs, 10, stages=(20, 30, 40), guidance="self", stream_batch=False)
        cfg_fps, _ = stream_fps(runner, inputs, 10, stages=(20, 30, 40), guidance="full")
        static_fps, filtered = stream_fps(runner, inputs[:1] * 80, 1, stages=(20, 30, 40), guidance="self",
                                          similarity_filter=True)
        results["streams"] = {
            "stream_batch_fps": batch_fps, "frame_by_frame_fps": single_fps,
            "stream_batch_speedup": batch_fps / single_fps,
            "full_cfg_fps": cfg_fps, "rcfg_self_over_cfg": batch_fps / cfg_fps,
            "static_input_fps": static_fps, "static_input_over_unfiltered": static_fps / batch_fps,
            "static_input_skipped_share": filtered.skipped / filtered.taken,
        }
        results["runner_stats"] = {k: v for k, v in runner.stats().items() if k in ("forwards", "batch_occupancy",
                                                                                    "prompt_cache")}
    finally:
        runner.close()
        child.shutdown()

    t, c = results["throughput"], results["caching"]
    for i, r in enumerate(rounds):
        print(f"round {i}: static limit {r['static_limit_images_per_s']:.2f} img/s, runner "
              f"{r['runner_images_per_s']:.2f} -> {r['runner_over_limit']:.2f}; digits-fast kept "
              f"{r['kept_share_of_speedup']:.2f}")
    print(f"throughput: runner {t['runner_images_per_s']:.2f} img/s, one at a time {solo_rate:.2f}, static limit "
          f"{limit_rate:.2f} -> {t['runner_over_limit']:.2f} of the limit (goal >= 0.9), "
          f"{t['runner_over_one_at_a_time']:.2f}x one at a time (medians over {len(rounds)} paired rounds); "
          f"max pixel difference vs solo "
          f"{t['max_pixel_difference_vs_solo']}")
    print(f"caching: digits-fast speedup static {c['static_speedup']:.2f}x, runner {c['runner_speedup']:.2f}x -> "
          f"{c['kept_share_of_speedup']:.2f} kept (goal >= 0.9); max pixel difference vs solo "
          f"{c['max_pixel_difference_vs_solo']}")
    for load, r in results["load"].items():
        print(f"load {load}: first image {r['time_to_first_image_s']:.2f} s, p50 {r['latency_p50_s']:.2f} s, "
              f"p99 {r['latency_p99_s']:.2f} s")
    for name in ("without_tiering", "with_tiering"):
        r = results["tiering"][name]
        print(f"{name} (deadline {deadline:.2f} s, 100% load): miss rate {r['deadline_miss_rate']:.2%}, "
              f"degraded {r['degraded_share']:.0%}, p99 {r['latency_p99_s']:.2f} s, plans {r['plans']}")
    st = results["streams"]
    print(f"streams (3 stages): Stream Batch {st['stream_batch_fps']:.1f} fps vs frame by frame "
          f"{st['frame_by_frame_fps']:.1f} -> {st['stream_batch_speedup']:.2f}x (anchor 1.5x); RCFG self vs full CFG "
          f"{st['rcfg_self_over_cfg']:.2f}x (anchor up to 2.05x); static input with the similarity filter "
          f"{st['static_input_over_unfiltered']:.2f}x, {st['static_input_skipped_share']:.0%} of frames skipped")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
