"""Ship searched schedules with the bundled model, labelled with what a held-out bench measured for them.

    python benchmarks/ship_schedules.py runs/bench-digits/bench.json --front runs/search-digits \\
        --ship digits-lossless=front_09_x1.99 digits-fast=front_05_x2.82 digits-fastest=front_02_x3.95

Each NAME=STEM copies FRONT/STEM.json (a `cachekit search` output) to cachekit/zoo/schedules/NAME.json and records,
under `measured["heldout"]`, the bench row of STEM (wall-clock speedup, MAC ratio, every metric) beside the uncached
row's metrics and how they were measured, so a shipped schedule never carries a number nobody measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cachekit import Schedule

SHIPPED = Path(__file__).resolve().parents[1] / "cachekit" / "zoo" / "schedules"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", help="bench.json from `cachekit bench` that evaluated the front schedules")
    parser.add_argument("--front", required=True, help="the `cachekit search` output folder")
    parser.add_argument("--ship", nargs="+", required=True, metavar="NAME=STEM")
    parser.add_argument("--latency-bench", default=None,
                        help="a second bench.json that timed the same schedules at another batch size: its speedup "
                             "is recorded too, as speedup_at_batch_<N>")
    parser.add_argument("--out", default=str(SHIPPED), help="where shipped schedules live")
    args = parser.parse_args()

    report = json.loads(Path(args.bench).read_text())
    rows = {row["name"]: row for row in report["rows"]}
    uncached = next(row for row in report["rows"] if row["kind"] == "uncached")
    timed = None
    if args.latency_bench:
        second = json.loads(Path(args.latency_bench).read_text())
        timed = (second["latency_protocol"]["batch_size"], {row["name"]: row for row in second["rows"]})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for item in args.ship:
        name, _, stem = item.partition("=")
        if stem not in rows:
            raise SystemExit(f"{stem} is not a row of {args.bench}; rows: {', '.join(rows)}")
        row = rows[stem]
        schedule = Schedule.load(Path(args.front) / f"{stem}.json")
        schedule.provenance = {**schedule.provenance, "shipped_as": name, "front_file": f"{stem}.json"}
        schedule.measured = {
            **(schedule.measured or {}),
            "heldout": {
                "speedup": row["speedup"],
                "macs_ratio": row["macs_ratio"],
                **row["metrics"],
                "uncached": uncached["metrics"],
                "prompts": report["prompts"],
                "num_steps": report["num_steps"],
                "seeds": report["seeds"]["rule"],
                "device": report.get("device"),
            },
        }
        if timed is not None:
            batch, timed_rows = timed
            if stem not in timed_rows:
                raise SystemExit(f"{stem} is not a row of {args.latency_bench}")
            schedule.measured["heldout"][f"speedup_at_batch_{batch}"] = timed_rows[stem]["speedup"]
        path = Path(args.out) / f"{name}.json"
        schedule.save(path)
        shown = ", ".join(f"{k} {v:.3g}" for k, v in row["metrics"].items() if isinstance(v, (int, float)))
        print(f"wrote {path}: {stem}, {json.dumps({k: v for k, v in schedule.measured['heldout'].items() if 'speedup' in k})}, MAC ratio {row['macs_ratio']:.3f}, {shown}")


if __name__ == "__main__":
    main()
