"""Caching and compilation together, on the bundled digits model: {eager, compiled} x {uncached, a schedule}.

Four pipelines from the same weights, one per cell, timed in interleaved rounds (one call of each per round, so
machine drift hits every cell alike); the compile warm-up (the first call of a compiled pipeline) is excluded from
the rounds and reported on its own. Prints ratios measured in one run, never asserts them:

- the cache's speedup eager (eager uncached / eager cached) and compiled (compiled uncached / compiled cached);
- compile's speedup uncached and cached;
- whether they multiply: the compiled+cached speedup over eager uncached, against the product of the two.

    python benchmarks/compile.py --num-images 8 --steps 20 --rounds 5
    python benchmarks/compile.py --compile-mode full --torch-mode max-autotune-no-cudagraphs   # on a GPU

The compiled cells count their graphs (dynamo's `unique_graphs`) during the warm-up and during the timed rounds:
the rounds compile nothing, since cachekit's decisions run in eager Python and the graphs depend on shapes alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch._dynamo.utils import counters
from tqdm import tqdm

import cachekit
from cachekit.eval.latency import time_call
from cachekit.zoo import call_defaults, load_pipeline
from cachekit.zoo.digits_data import digit_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits")
    parser.add_argument("--plan", default="digits-fast", help="the cached cells' plan (default digits-fast)")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile-mode", choices=cachekit.wrapper.COMPILE_MODES, default="regional",
                        help="cachekit.compile's mode (default regional)")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--torch-mode", default=None, help="torch.compile's mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    prompts = [p for p, _ in digit_prompts(args.num_images, seed=0)]
    settings = call_defaults(args.model)
    compile_kwargs = {"backend": args.backend}
    if args.torch_mode:
        compile_kwargs["mode"] = args.torch_mode

    cells = {}
    for compiled in (False, True):
        for cached in (False, True):
            pipe = load_pipeline(args.model).to(args.device)
            pipe.set_progress_bar_config(disable=True)
            if compiled:
                cachekit.compile(pipe, args.compile_mode, **compile_kwargs)
            if cached:
                cachekit.enable(pipe, args.plan)
            cells[("compiled" if compiled else "eager", args.plan if cached else "uncached")] = pipe

    def caller(pipe):
        def call():
            generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
            return pipe(prompt=prompts, num_inference_steps=args.steps, generator=generators, output_type="np",
                        **settings).images
        return call

    warmup: dict[tuple, dict] = {}
    for key, pipe in tqdm(cells.items(), desc="warm-up (compiles)"):
        counters.clear()
        t0 = time.perf_counter()
        caller(pipe)()
        warmup[key] = {"s": time.perf_counter() - t0, "graphs": int(counters["stats"]["unique_graphs"])}

    counters.clear()
    times: dict[tuple, list[float]] = {key: [] for key in cells}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for key, pipe in cells.items():
            times[key].append(time_call(caller(pipe), args.device))
    graphs_in_rounds = int(counters["stats"]["unique_graphs"])

    median = {key: statistics.median(t) for key, t in times.items()}
    e_u, e_c = median[("eager", "uncached")], median[("eager", args.plan)]
    c_u, c_c = median[("compiled", "uncached")], median[("compiled", args.plan)]
    print(f"{args.model}: {args.num_images} images x {args.steps} steps, median of {args.rounds} interleaved rounds, "
          f"device {args.device}, torch threads {torch.get_num_threads()}, compile: cachekit.compile(pipe, "
          f"{args.compile_mode!r}, {', '.join(f'{k}={v!r}' for k, v in compile_kwargs.items())})")
    print(f"{'':<10} {'uncached s':>11} {args.plan + ' s':>16} {'cache speedup':>14}")
    for mode, (u, c) in (("eager", (e_u, e_c)), ("compiled", (c_u, c_c))):
        print(f"{mode:<10} {u:>11.3f} {c:>16.3f} {u / c:>13.2f}x")
    print(f"{'compile speedup':<22} uncached {e_u / c_u:.2f}x, {args.plan} {e_c / c_c:.2f}x")
    product = (e_u / e_c) * (e_u / c_u)
    print(f"compiled+cached vs eager uncached: {e_u / c_c:.2f}x; product of the two speedups: {product:.2f}x; "
          f"ratio {e_u / c_c / product:.2f} (1.00: they multiply)")
    for key, w in warmup.items():
        print(f"warm-up {key[0]:>8} {key[1]:<12} {w['s']:7.1f} s, {w['graphs']} graphs compiled")
    print(f"graphs compiled during the timed rounds: {graphs_in_rounds}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median_s": {"/".join(k): v for k, v in median.items()},
                       "times_s": {"/".join(k): v for k, v in times.items()},
                       "warmup": {"/".join(k): v for k, v in warmup.items()},
                       "graphs_in_rounds": graphs_in_rounds, "multiply_ratio": e_u / c_c / product}, f, indent=1)


if __name__ == "__main__":
    main()
