"""The `cachekit` command line: parses arguments and calls the library; no logic lives here.

Each verb lives in the package that does the work and contributes `add_parser(subparsers)` plus a handler (and, for
actions on schedule files that need a model, `add_schedule_parsers(schedule_subparsers)`); this file only gathers
them, so `cachekit eval` depends on `cachekit.eval` without the core importing it. The core's own verbs, `schedule
show` and `schedule resample`, read and write schedule files only. The shared options and the way every verb runs
and fails (one-line errors) are in `cachekit.cli_options`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from . import cli_options as opts

__all__ = ["main", "build_parser"]

# Verbs provided by other modules, imported only when present: `models` (cachekit.coverage), `generate` and `schedule make`
# (cachekit.pipelines), `serve` (cachekit.pipelines.server), `eval` and `bench` (cachekit.eval), `calibrate`, `solve`
# and `search` (cachekit.search).
_PLUGIN_MODULES = ("cachekit.coverage", "cachekit.pipelines.cli", "cachekit.pipelines.server.cli",
                   "cachekit.eval.cli", "cachekit.search.cli")


def _cmd_schedule_show(args: argparse.Namespace) -> int:
    from .registry import UnsupportedModelError, spec_for
    from .schedule import Schedule

    schedule = Schedule.load(args.file)
    try:
        spec_for(schedule.model_class)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"{args.file} is a schedule for {schedule.model_class}: {err}") from None
    print(schedule.summary())
    return 0


def _cmd_schedule_list(args: argparse.Namespace) -> int:
    from .zoo import shipped_schedule_rows

    def shown(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = shipped_schedule_rows()
    width = max(len(row["id"]) for row in rows)
    print(f"{'name':<{width}}  {'model':<24}  steps  held-out speedup  PSNR dB   KID")
    for row in rows:
        print(f"{row['id']:<{width}}  {row['model_class']:<24}  {row['num_inference_steps']:>5}  "
              f"{shown(row['speedup'], '.2f') + 'x':>16}  {shown(row['psnr'], '.1f'):>7}  {shown(row['kid'], '.4f'):>6}")
    print("speedup: wall clock against the uncached model at the model's default steps (`cachekit schedule show "
          "NAME` for how it was measured)")
    return 0


def _cmd_schedule_resample(args: argparse.Namespace) -> int:
    from .schedule import Schedule

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    schedule = Schedule.load(args.file).resample(args.steps)
    schedule.save(args.out)
    print(f"wrote {args.out}: {schedule.num_steps} steps")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = opts.ArgumentParser(
        prog="cachekit",
        description="Learned feature-caching schedules that make diffusers transformers faster.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    schedule = sub.add_parser("schedule", help="inspect, make and transform schedule files",
                              description="Inspect, make and transform schedule files.")
    schedule_sub = schedule.add_subparsers(dest="schedule_command", required=True, metavar="ACTION")
    show = schedule_sub.add_parser("show", help="print a readable summary of a schedule file",
                                   description="Print compute fractions per step, block and component, "
                                   "the predicted cost and a step-by-block map.")
    show.add_argument("file", type=opts.schedule_file, help="schedule JSON file, or a shipped schedule's name")
    opts.set_handler(show, _cmd_schedule_show)
    listing = schedule_sub.add_parser("list", help="list the shipped schedules with their step counts and speedups",
                                      description="List the searched schedules shipped with the bundled models: "
                                      "the model each fits, the step count it runs and what a held-out bench "
                                      "measured for it. Each name works wherever a schedule file does.")
    opts.set_handler(listing, _cmd_schedule_list)
    resample = schedule_sub.add_parser("resample", help="transfer a schedule to another step count",
                                       description="Map a schedule to a new step count by nearest step; logs "
                                       "the mapping.")
    resample.add_argument("file", type=opts.schedule_file, help="schedule JSON file, or a shipped schedule's name")
    opts.add_steps(resample, default=None, help="new number of denoising steps", required=True)
    opts.add_out(resample, required=True, help="where to write the new schedule")
    opts.set_handler(resample, _cmd_schedule_resample)

    for module_name in _PLUGIN_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            missing = err.name or ""
            not_installed = module_name == missing or module_name.startswith(missing + ".")
            if missing.split(".")[0] == "cachekit" and not not_installed:
                raise  # a cachekit module the plug-in needs is broken: a bug, not a missing extra
            continue
        module.add_parser(sub)
        if hasattr(module, "add_schedule_parsers"):
            module.add_schedule_parsers(schedule_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`cachekit ...`: bad input is one line and exit status 2, Ctrl-C exit status 130, a bug a traceback."""
    return opts.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
