"""Hook overhead and FORA-like speedup of the core, on the embedded digits model (or any local pipeline).

Prints ratios measured in one run, never asserts them:
- hook overhead: the all-recompute schedule against the stock (never hooked) pipeline, the median over paired
  rounds of their time ratio; goal <= 1%;
- the wall-clock speedup of "recompute every 3rd step" schedules (component and block mode) against their MAC
  reduction; goal >= 0.9 of it.

    python benchmarks/core_overhead.py --num-images 40 --repeats 5
    python benchmarks/core_overhead.py --num-images 40 --repeats 5 --against HEAD~1 --rounds 3

`--against REF` measures a regression the only fair way on a shared machine: the same benchmark of the commit REF
(checked out in a temporary git worktree) and of this tree, run alternately in fresh processes, each reporting its
own overhead against the stock pipeline timed in the same process, so machine drift cancels within each number.
Both trees run this file's benchmark code; only the library under test differs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import cachekit
from cachekit.eval.latency import count_call_macs, time_call
from cachekit.zoo import call_defaults, load_pipeline
from cachekit.zoo.digits_data import digit_prompts


def every_nth_step(transformer, num_steps: int, n: int, mode: str) -> cachekit.Schedule:
    full = cachekit.Schedule.full(transformer, num_steps, mode=mode)
    mask = torch.zeros_like(full.recompute)
    mask[::n] = True
    return cachekit.Schedule.from_mask(transformer, mask, mode=mode, provenance={"method": "hand", "every": n})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits")
    parser.add_argument("--num-images", type=int, default=40)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--against", default=None, metavar="REF",
                        help="also measure git commit REF, alternating fresh processes with this tree")
    parser.add_argument("--rounds", type=int, default=3, help="with --against: processes per tree (default 3)")
    args = parser.parse_args()
    if args.against:
        compare_with(args)
        return

    torch.set_num_threads(torch.get_num_threads())
    pipe = load_pipeline(args.model)
    prompts = [p for p, _ in digit_prompts(args.num_images, seed=0)]
    transformer = pipe.transformer
    configs = {
        "stock": None,
        "all-recompute": cachekit.Schedule.full(transformer, args.steps),
        "every-3rd (component)": every_nth_step(transformer, args.steps, 3, "component"),
        "every-3rd (block)": every_nth_step(transformer, args.steps, 3, "block"),
    }

    settings = call_defaults(args.model)
    pipe.set_progress_bar_config(disable=True)

    def call():
        generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        return pipe(prompt=prompts, num_inference_steps=args.steps, generator=generators, output_type="np",
                    **settings).images

    times: dict[str, list[float]] = {name: [] for name in configs}
    macs: dict[str, int] = {}
    for name, schedule in configs.items():  # warm-up and MAC count, one call each
        if schedule is not None:
            cachekit.enable(pipe, schedule)
        call()
        macs[name] = count_call_macs(call)
        cachekit.disable(pipe)
    names = list(configs)
    for round_ in range(args.repeats):
        # Paired rounds: every configuration once per round, the order rotated each round so that none always runs
        # right after the same other (the call after a cached one pays for freeing its cache). Ratios are taken
        # within a round, where machine drift is shared, and the median is over rounds.
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            if configs[name] is not None:
                cachekit.enable(pipe, configs[name])
            gc.collect()
            times[name].append(time_call(call))
            cachekit.disable(pipe)

    def paired(name: str) -> float:
        """Median over rounds of the stock time over `name`'s time in the same round."""
        return statistics.median(s / t for s, t in zip(times["stock"], times[name]))

    results = {"model": args.model, "num_images": args.num_images, "steps": args.steps, "repeats": args.repeats,
               "threads": torch.get_num_threads(), "rows": {}}
    print(f"{args.num_images} images x {args.steps} steps, median of {args.repeats} (torch threads: "
          f"{torch.get_num_threads()})")
    print(f"{'configuration':<24} {'median s':>9} {'IQR s':>7} {'MAC ratio':>9} {'wall speedup':>12} "
          f"{'MAC speedup':>11} {'wall/MAC':>8}")
    for name in configs:
        median = statistics.median(times[name])
        q = statistics.quantiles(times[name], n=4, method="inclusive") if len(times[name]) > 1 else [median] * 3
        mac_ratio = macs[name] / macs["stock"]
        wall_speedup = paired(name)
        mac_speedup = 1.0 / mac_ratio
        row = {"median_s": median, "iqr_s": q[2] - q[0], "mac_ratio": mac_ratio, "wall_speedup": wall_speedup,
               "mac_speedup": mac_speedup, "wall_over_mac": wall_speedup / mac_speedup}
        results["rows"][name] = row
        print(f"{name:<24} {median:>9.3f} {row['iqr_s']:>7.3f} {mac_ratio:>9.3f} {wall_speedup:>11.2f}x "
              f"{mac_speedup:>10.2f}x {row['wall_over_mac']:>8.2f}")
    overhead = statistics.median(t / s for s, t in zip(times["stock"], times["all-recompute"])) - 1.0
    results["hook_overhead"] = overhead
    print(f"hook overhead of the all-recompute schedule: {overhead:+.2%} (goal <= +1%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def compare_with(args: argparse.Namespace) -> None:
    """Run this benchmark for commit `args.against` and for this tree, alternately, and print both overheads."""
    repo = Path(__file__).resolve().parents[1]
    common = ["--model", args.model, "--num-images", str(args.num_images), "--steps", str(args.steps),
              "--repeats", str(args.repeats)]
    results: dict[str, list[dict]] = {args.against: [], "this tree": []}
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "ref"
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(worktree), args.against],
                       check=True, capture_output=True)
        try:
            for package in ("eval", "search", "pipelines"):  # the repo maps these into cachekit. at install time
                link = worktree / "cachekit" / package
                if (worktree / package).is_dir() and not link.exists():
                    link.symlink_to(worktree / package, target_is_directory=True)
            for round_ in range(args.rounds):
                for label, root in ((args.against, worktree), ("this tree", repo)):
                    out = Path(tmp) / f"{round_}-{len(results[label])}-{label.replace(' ', '_')}.json"
                    env = dict(os.environ, PYTHONPATH=str(root))
                    # this tree's benchmark for both, so that only the library differs between the two
                    subprocess.run([sys.executable, str(Path(__file__).resolve()), *common,
                                    "--json", str(out)], check=True, env=env, cwd=root, stdout=subprocess.DEVNULL)
                    results[label].append(json.loads(out.read_text()))
                    print(f"round {round_ + 1}/{args.rounds} {label}: hook overhead "
                          f"{results[label][-1]['hook_overhead']:+.2%}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(worktree)],
                           check=False, capture_output=True)
    summary = {}
    for label, runs in results.items():
        overheads = [r["hook_overhead"] for r in runs]
        block = [r["rows"]["every-3rd (block)"]["wall_over_mac"] for r in runs]
        component = [r["rows"]["every-3rd (component)"]["wall_over_mac"] for r in runs]
        summary[label] = {"hook_overhead": statistics.median(overheads), "runs": overheads,
                          "wall_over_mac_block": statistics.median(block),
                          "wall_over_mac_component": statistics.median(component)}
        print(f"{label:<12} hook overhead median {summary[label]['hook_overhead']:+.2%} "
              f"(runs {', '.join(f'{o:+.2%}' for o in overheads)}); every-3rd wall/MAC: "
              f"block {summary[label]['wall_over_mac_block']:.2f}, "
              f"component {summary[label]['wall_over_mac_component']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"against": args.against, "rounds": args.rounds, "summary": summary, "runs": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
