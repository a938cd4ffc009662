"""Ship searched schedules with the bundled model, labelled with what a held-out bench measured for them.

    python benchmarks/ship_schedules.py runs/bench-block/bench.json --front runs/search-block \\
        --latency-bench runs/timing-b8/bench.json runs/timing-b40/bench.json \\
        --ship digits-lossless=front_24_x1.67 digits-fast=front_20_x2.12 digits-fastest=front_14_x2.61

Each NAME=STEM copies FRONT/STEM.json (a `cachekit search` output) to cachekit/zoo/schedules/NAME.json and records,
under `measured["heldout"]`, the bench row of STEM (wall-clock speedup, MAC ratio, every metric) beside the uncached
row's metrics and how they were measured, so a shipped schedule never carries a number nobody measured.
`ship(...)` is the same as a function; `ship_video_schedule.py` uses it for the digits-video model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cachekit import Schedule

SHIPPED = Path(__file__).resolve().parents[1] / "cachekit" / "zoo" / "schedules"


def ship(report: dict[str, Any], front: str | Path, items: list[str], latency_benches: list[str] | None = None,
         out: str | Path = SHIPPED, provenance: dict[str, Any] | None = None) -> list[Path]:
    """Copy each NAME=STEM of `items` from the search folder `front` to `out`/NAME.json, labelled with the bench row
    of STEM in `report` (a `cachekit bench` report) under `measured["heldout"]`; returns the written files.

    `latency_benches` are further bench.json files that timed the same schedules (each speedup recorded as
    speedup_at_batch_<N>, the first one the headline); `provenance` is added to each schedule's provenance (e.g.
    the weights it was searched on)."""
    rows = {row["name"]: row for row in report["rows"]}
    uncached = next(row for row in report["rows"] if row["kind"] == "uncached")
    timed = []
    for path in latency_benches or []:
        other = json.loads(Path(path).read_text())
        timed.append((path, other["latency_protocol"], {row["name"]: row for row in other["rows"]}))
    Path(out).mkdir(parents=True, exist_ok=True)
    written = []
    for item in items:
        name, _, stem = item.partition("=")
        if stem not in rows:
            raise SystemExit(f"{stem} is not a row of the bench; rows: {', '.join(rows)}")
        row = rows[stem]
        schedule = Schedule.load(Path(front) / f"{stem}.json")
        schedule.provenance = {**schedule.provenance, "shipped_as": name, "front_file": f"{stem}.json",
                               **(provenance or {})}
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
        if report.get("latency_protocol"):
            schedule.measured["heldout"]["latency_protocol"] = report["latency_protocol"]
        for i, (path, protocol, timed_rows) in enumerate(timed):
            if stem not in timed_rows:
                raise SystemExit(f"{stem} is not a row of {path}")
            schedule.measured["heldout"][f"speedup_at_batch_{protocol['batch_size']}"] = timed_rows[stem]["speedup"]
            if i == 0:  # the headline speedup, labelled with the protocol that timed it
                schedule.measured["heldout"]["speedup"] = timed_rows[stem]["speedup"]
                schedule.measured["heldout"]["speedup_from"] = path
                schedule.measured["heldout"]["latency_protocol"] = protocol
        path = Path(out) / f"{name}.json"
        schedule.save(path)
        written.append(path)
        shown = ", ".join(f"{k} {v:.3g}" for k, v in row["metrics"].items() if isinstance(v, (int, float)))
        speeds = {k: v for k, v in schedule.measured["heldout"].items() if "speedup" in k}
        print(f"wrote {path}: {stem}, {json.dumps(speeds)}, MAC ratio {row['macs_ratio']:.3f}, {shown}")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", help="bench.json from `cachekit bench` that evaluated the front schedules")
    parser.add_argument("--front", required=True, help="the `cachekit search` output folder")
    parser.add_argument("--ship", nargs="+", required=True, metavar="NAME=STEM")
    parser.add_argument("--latency-bench", nargs="+", default=[],
                        help="bench.json files that timed the same schedules (e.g. at other batch sizes or with more "
                             "repeats): each speedup is recorded as speedup_at_batch_<N>, and the first one is the "
                             "schedule's headline `speedup` (else the quality bench's)")
    parser.add_argument("--out", default=str(SHIPPED), help="where shipped schedules live")
    args = parser.parse_args()
    ship(json.loads(Path(args.bench).read_text()), args.front, args.ship, args.latency_bench, args.out)


if __name__ == "__main__":
    main()
