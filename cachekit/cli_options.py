"""The command-line options every `cachekit` verb shares, defined once: names, meanings, checks.

The same name means the same thing in every verb:

    --model NAME_OR_FOLDER     the bundled model ('digits', the default), a local diffusers folder or a cached id
    --device DEVICE            torch device (default: the GPU when there is one, else cpu)
    --pipeline-arg KEY=VALUE   extra pipeline call setting, repeatable (values read as JSON when they parse)
    --prompts SET_OR_FILE      prompt set: digits, coco[:FILE], mjhq[:FILE], parti[:FILE], drawbench[:FILE], a file
    --num N                    number of prompts taken from the set
    --steps N                  denoising steps (2..1000)
    --seed S                   noise seed of the first prompt; prompt i uses S + i
    --schedule PLAN            none, a shipped schedule, a schedule / policy-calibration file or a policy spec
    --guidance-scale G         classifier-free guidance scale (finite, 0..100; default: the model's)
    --out PATH                 what the verb writes (checked writable before any work)

Values are checked while the command line is parsed (type functions below), so a bad value is a one-line error
before any model is loaded; settings that need the pipeline (`--pipeline-arg` names) are checked right after it is
loaded, before anything is generated (`cachekit.pipelines.cli.load_checked`).

Old spellings keep working for one release with a `FutureWarning` naming the new one (`deprecated_alias`):
`--pipe-arg` (= `--pipeline-arg`), `--cpu` (= `--device cpu`), and in calibrate / search `--prompts N` given as a
count (= `--num N`) and `--prompt-set` (= `--prompts`).

`ArgumentParser` prints argparse errors on one line, and `run_handler` turns a `CachekitError` or an `OSError` into
`cachekit VERB: error: MESSAGE` (exit 2) and Ctrl-C into one line (exit 130); anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from .errors import CachekitError, UsageError

__all__ = [
    "ArgumentParser",
    "run",
    "run_handler",
    "set_handler",
    "error_line",
    # value types
    "integer",
    "number",
    "finite_float",
    "STEPS_RANGE",
    "STEPS",
    "NUM_IMAGES",
    "NUM_PROMPTS",
    "POPULATION",
    "GENERATIONS",
    "SEED",
    "MAX_SEED",
    "GUIDANCE_SCALE",
    "BATCH_SIZE",
    "FRACTION",
    "device",
    "plan_spec",
    "schedule_file",
    "DEFAULT_STEPS",
    "steps_for_plan",
    "step_counts",
    "input_file",
    "check_input_file",
    "output_file",
    "output_dir",
    # options
    "deprecated_alias",
    "add_model_options",
    "add_prompts",
    "add_steps",
    "add_seed",
    "add_guidance_scale",
    "add_schedule",
    "add_batch_size",
    "add_out",
    "add_video_options",
    "FPS",
    "VIDEO_SCALE",
    # after parsing
    "pipeline_settings",
]


# ------------------------------------------------------------------------------------------------ parser and errors
class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `cachekit VERB: error: MESSAGE (see cachekit VERB --help)`, exit 2.

    Subparsers made from it are of the same class, so every verb (plug-ins included) behaves the same. Arguments that
    no parser knows are reported by the verb they were given to, not by the top-level `cachekit`.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        text = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {text} (see {self.prog} --help)\n")

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> tuple[Any, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        if getattr(namespace, "_parser", None) is None:  # the innermost (verb) parser finishes first and wins
            namespace._parser = self
        return namespace, extras

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            verb = getattr(namespace, "_parser", None)
            (verb if isinstance(verb, argparse.ArgumentParser) else self).error(
                f"unrecognized arguments: {' '.join(extras)}")
        return namespace


def error_line(err: BaseException) -> str:
    """The one-line message of a user-fixable error (an OSError names its file without the errno prefix)."""
    if isinstance(err, OSError) and not isinstance(err, CachekitError) and err.strerror:
        text = err.strerror
        if err.filename is not None:
            text += f": {err.filename}"
        if err.filename2 is not None:
            text += f" -> {err.filename2}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def _prog(args: argparse.Namespace, default: str) -> str:
    parser = getattr(args, "_parser", None)
    return parser.prog if isinstance(parser, argparse.ArgumentParser) else default


def run_handler(args: argparse.Namespace, prog: str = "cachekit") -> int:
    """Run the verb's handler: user-fixable errors are one line (exit 2), Ctrl-C is one line (exit 130).

    A `CachekitError` (bad input, a missing model or file, an output that cannot be written) or an `OSError`
    (permissions, a folder given as a file, a full disk) prints `PROG: error: MESSAGE`. Ctrl-C prints what the verb's
    `on_interrupt(args)` default says (how to resume), if it has one. Every other exception is a bug: it propagates
    with its traceback.
    """
    prog = _prog(args, prog)
    try:
        return int(args.handler(args) or 0)
    except BrokenPipeError:  # `cachekit ... | head`: the reader is gone, there is nobody to tell
        _silence_stdout()
        return 141
    except KeyboardInterrupt:
        hint = getattr(args, "on_interrupt", None)
        text = hint(args) if callable(hint) else None
        print(f"\n{prog}: interrupted" + (f"; {' '.join(text.split())}" if text else ""), file=sys.stderr)
        return 130
    except (CachekitError, OSError) as err:
        print(f"{prog}: error: {error_line(err)}", file=sys.stderr)
        return 2


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real stdout (captured, closed): nothing to redirect
        pass


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and run the verb's handler through `run_handler`; returns the exit status.

    An argument error (printed on one line by `ArgumentParser.error`) returns 2 like any other bad input, so
    `main(argv) == 2` holds for every user error; `--help` still exits (status 0) as argparse does.
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:
        if done.code in (0, None):
            raise
        return done.code if isinstance(done.code, int) else 2
    return run_handler(args, parser.prog)


def set_handler(parser: argparse.ArgumentParser, handler: Callable[[argparse.Namespace], Any],
                on_interrupt: Callable[[argparse.Namespace], str | None] | None = None) -> None:
    """The function a verb runs; `on_interrupt(args)` says, after Ctrl-C, how to resume (None: nothing to say)."""
    parser.set_defaults(handler=handler, on_interrupt=on_interrupt)


# ------------------------------------------------------------------------------------------------------ value types
def _named(function: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    function.__name__ = name  # argparse names the type in its own messages
    return function


def integer(low: int, high: int, *, multiple_of: int | None = None, why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (and a multiple of `multiple_of`); `why` explains the bound."""
    note = f" ({why})" if why else ""

    def parse(text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            if low == 1:
                raise argparse.ArgumentTypeError(f"must be a positive integer{note}, got {value}")
            if low == 0:
                raise argparse.ArgumentTypeError(f"must be a non-negative integer{note}, got {value}")
            raise argparse.ArgumentTypeError(f"must be at least {low}{note}, got {value}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}{note}, got {value}")
        if multiple_of and value % multiple_of:
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple_of}{note}, got {value}")
        return value

    return _named(parse, "integer")


def number(low: float, high: float, *, low_open: bool = False, why: str = "") -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] (or (low, high] with `low_open`); NaN and inf refused."""
    note = f" ({why})" if why else ""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < low or value > high or (low_open and value == low):
            if (low, high, low_open) == (0.0, 1.0, True):
                raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1]{note}, got {text}")
            raise argparse.ArgumentTypeError(f"must be in {interval}{note}, got {text}")
        return value

    return _named(parse, "number")


MAX_SEED = 2**63 - 1
STEPS_RANGE = (2, 1000)
"""Denoising steps a verb accepts: samplers such as PixArt's DPM-Solver cannot run a single step."""
finite_float = _named(number(-math.inf, math.inf), "number")
"""An argparse type: any finite number (NaN and inf refused)."""
STEPS = integer(*STEPS_RANGE, why="denoising steps; samplers such as PixArt's DPM-Solver need at least 2")


def step_counts(text: str) -> tuple[int, ...]:
    """An argparse type: one step count or several, comma-separated (`6,8,10,12,16,20`), sorted, each 2..1000."""
    parts = [p for p in str(text).replace(" ", "").split(",")]
    if not parts or any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"step counts separated by commas, e.g. 6,8,10,20: got {text!r}")
    try:
        counts = sorted({STEPS(p) for p in parts})
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"step counts separated by commas, e.g. 6,8,10,20: each {err}") from None
    return tuple(counts)


NUM_IMAGES = integer(1, 256)
NUM_PROMPTS = integer(1, 1_000_000)
POPULATION = integer(4, 4096, multiple_of=4, why="NSGA-II's tournament takes individuals in fours")
GENERATIONS = integer(0, 10_000)
SEED = integer(0, MAX_SEED)
GUIDANCE_SCALE = number(0.0, 100.0, why="classifier-free guidance scale")
BATCH_SIZE = integer(1, 4096)
FRACTION = number(0.0, 1.0, low_open=True)


def device(text: str) -> str:
    """An argparse type: a torch device that exists here (cpu, cuda, cuda:N below the GPU count, mps), kept as text."""
    import torch

    text = str(text).strip()
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; e.g. cpu, cuda, cuda:1, mps") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: there is no CUDA device here; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: there are {count} CUDA device(s) here, cuda:0..cuda:{count - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available here; use --device cpu")
    return text


def plan_spec(text: str) -> str:
    """An argparse type: a plan the resolver knows (`none`, a shipped name, a file, a policy spec); kept as text.

    Files are read and specs checked now, before any model is loaded: a folder, a missing file or an unknown name
    is a one-line error listing the names that exist.
    """
    from .plans import resolve_plan

    try:
        resolve_plan(text)
    except (CachekitError, OSError) as err:
        raise argparse.ArgumentTypeError(error_line(err)) from None
    return text


DEFAULT_STEPS = 20
"""Denoising steps when neither --steps nor the schedule names a count."""


def steps_for_plan(spec: str | None, num_steps: int | None) -> int:
    """Before a model loads: the step count a call under `spec` runs.

    A schedule file records its step count (a joint search's front points run 6, 8, ... steps), so without --steps
    a schedule runs its own; an explicit --steps must match it (`ScheduleError` otherwise). Policies and no plan
    run --steps, by default `DEFAULT_STEPS`.
    """
    from .plans import resolve_plan
    from .schedule import Schedule

    plan = resolve_plan(spec) if spec is not None else None
    if isinstance(plan, Schedule):
        if num_steps is None:
            return plan.num_steps
        plan.check_steps(num_steps)
    return DEFAULT_STEPS if num_steps is None else num_steps


def schedule_file(text: str) -> str:
    """An argparse type: a schedule file, or a shipped schedule's name (`digits-fast`); returns the file's path."""
    from .zoo import shipped_schedules

    shipped = shipped_schedules()
    if text in shipped and not os.path.exists(text):
        return str(shipped[text])
    try:
        return check_input_file(text, "schedule")
    except OSError as err:
        names = ", ".join(sorted(shipped)) or "none"
        hint = f" (shipped schedules: {names})" if isinstance(err, FileNotFoundError) else ""
        raise argparse.ArgumentTypeError(f"{err}{hint}") from None


def check_input_file(path: str | os.PathLike, what: str) -> str:
    """`path` if it is an existing, readable file; else an `OSError` naming `what` (one line in the CLI)."""
    text = os.fspath(path)
    if not text:
        raise FileNotFoundError(f"no {what} file given")
    if os.path.isdir(text):
        raise IsADirectoryError(f"{text} is a folder, not a {what} file")
    if not os.path.exists(text):
        raise FileNotFoundError(f"{what} file not found: {text}")
    if not os.access(text, os.R_OK):
        raise PermissionError(f"cannot read the {what} file {text}: no permission")
    return text


def input_file(what: str) -> Callable[[str], str]:
    """An argparse type: an existing, readable file (a folder is an error), kept as text."""

    def parse(text: str) -> str:
        try:
            return check_input_file(text, what)
        except OSError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return _named(parse, f"{what} file")


def output_file(text: str) -> str:
    """An argparse type: a file that can be written (not a folder, in a writable place), kept as text."""
    from .io import check_writable

    try:
        check_writable(text)
    except OSError as err:
        raise argparse.ArgumentTypeError(error_line(err)) from None
    return text


def output_dir(text: str) -> str:
    """An argparse type: a folder that can be written into (not a file, in a writable place), kept as text."""
    from .io import check_writable

    try:
        check_writable(text, directory=True)
    except OSError as err:
        raise argparse.ArgumentTypeError(error_line(err)) from None
    return text


# ------------------------------------------------------------------------------------------------ deprecated names
class _DeprecatedAlias(argparse.Action):
    """An old spelling: warns (FutureWarning, naming the new spelling), then does what the new option does."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str, append: bool = False,
                 convert: Callable[[Any], Any] | None = None, **kwargs: Any) -> None:
        self.new = new
        self.append = append
        self.convert = convert
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        _warn_deprecated(parser, option_string or self.option_strings[0], self.new)
        value = self.const if self.nargs == 0 else values
        if self.convert is not None:
            value = self.convert(value)
        if self.append:
            items = list(getattr(namespace, self.dest, None) or [])
            items.append(value)
            value = items
        setattr(namespace, self.dest, value)


def _warn_deprecated(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    warnings.warn(f"{parser.prog}: {old} is deprecated and will be removed in the next release; use {new}",
                  FutureWarning, stacklevel=3)


def deprecated_alias(parser: Any, old: str, dest: str, new: str, **kwargs: Any) -> argparse.Action:
    """Add `old` as a deprecated spelling that sets `dest` like `new` does (e.g. `--mode` for `--genome`)."""
    kwargs.setdefault("help", f"deprecated spelling of {new}")
    kwargs.setdefault("default", argparse.SUPPRESS)
    return parser.add_argument(old, dest=dest, action=_DeprecatedAlias, new=new, **kwargs)


class _PromptsOrCount(argparse.Action):
    """calibrate / search `--prompts`: a prompt set; a bare integer is the old count spelling (= `--num N`)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        text = str(values).strip()
        if text.lstrip("+-").isdigit() and not os.path.exists(text):
            _warn_deprecated(parser, f"{option_string} N (a number of prompts)", "--num N (--prompts now names the "
                             "prompt set)")
            try:
                setattr(namespace, "num", NUM_PROMPTS(text))
            except argparse.ArgumentTypeError as err:
                raise argparse.ArgumentError(self, str(err)) from None
            return
        setattr(namespace, self.dest, text)


# ------------------------------------------------------------------------------------------------------- options
def add_model_options(parser: Any, *, cpu_alias: bool = False, pipe_arg_alias: bool = False) -> None:
    """`--model`, `--device` and `--pipeline-arg KEY=VALUE` (repeatable): which pipeline runs where, called how.

    `cpu_alias` adds the deprecated `--cpu` (= `--device cpu`), `pipe_arg_alias` the deprecated `--pipe-arg`.
    """
    parser.add_argument(
        "--model", default="digits", metavar="NAME_OR_FOLDER",
        help="bundled model name ('digits', the default; 'digits-video', the video model) or a local diffusers "
             "pipeline folder or a model id already in the Hugging Face cache (nothing is downloaded)")
    parser.add_argument("--device", type=device, default=None,
                        help="torch device to run on (default: the GPU when there is one, under `accelerate launch` "
                             "each process's own; else cpu)")
    if cpu_alias:
        deprecated_alias(parser, "--cpu", "device", "--device cpu", nargs=0, const="cpu")
    parser.add_argument("--pipeline-arg", dest="pipeline_arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra pipeline call setting (value read as JSON when it parses), repeatable, e.g. "
                             "--pipeline-arg max_sequence_length=120; settings the pipeline does not take are "
                             "refused")
    if pipe_arg_alias:
        deprecated_alias(parser, "--pipe-arg", "pipeline_arg", "--pipeline-arg", append=True, metavar="KEY=VALUE")


_PROMPT_SETS = ("digits, digits-video, coco[:captions_val2014.json], mjhq[:meta_data.json], parti[:PartiPrompts.tsv], "
                "drawbench[:FILE], or a .txt/.jsonl/.tsv/.csv/.json file")


def add_prompts(parser: Any, *, num: int, prompt_seed: int, count_alias: bool = False,
                seed_help: str = "seed of the prompt sample") -> None:
    """`--prompts SET_OR_FILE`, `--num N`, `--prompt-seed S`; with `count_alias`, the deprecated `--prompts N` (a
    count) and `--prompt-set` (calibrate and search used to spell them so)."""
    parser.add_argument("--prompts", default="digits", metavar="SET_OR_FILE",
                        action=_PromptsOrCount if count_alias else "store",
                        help=f"prompt set: {_PROMPT_SETS} (default digits; digits-video for --model digits-video)")
    parser.add_argument("--num", type=NUM_PROMPTS, default=num,
                        help=f"number of prompts taken from the set (seeded sample for files; default {num})")
    parser.add_argument("--prompt-seed", type=SEED, default=prompt_seed, help=f"{seed_help} (default {prompt_seed})")
    if count_alias:
        deprecated_alias(parser, "--prompt-set", "prompts", "--prompts", metavar="SET_OR_FILE")


def add_steps(parser: Any, *, default: int | None = 20, required: bool = False,
              help: str = "denoising steps") -> None:
    shown = " (2..1000)" if required or default is None else f" (2..1000, default {default})"
    parser.add_argument("--steps", type=STEPS, default=None if required else default, required=required,
                        help=help + shown)


def add_seed(parser: Any, *, help: str = "noise seed of the first prompt; prompt i uses seed + i") -> None:
    parser.add_argument("--seed", type=SEED, default=0, help=help + " (default 0)")


def add_guidance_scale(parser: Any) -> None:
    parser.add_argument("--guidance-scale", type=GUIDANCE_SCALE, default=None,
                        help="classifier-free guidance scale, 0..100 (default: the model's)")


def add_schedule(parser: Any, *, many: bool = False, default: Any = "none", help: str | None = None) -> None:
    """`--schedule PLAN` (or several with `many`): anything the plan resolver takes, checked while parsing."""
    from .plans import describe_names

    what = help or ("the plan to apply: " + describe_names())
    parser.add_argument("--schedule", type=plan_spec, nargs="+" if many else None, default=default, metavar="PLAN",
                        help=what)


def add_batch_size(parser: Any, *, default: int | None, help: str = "prompts per pipeline call") -> None:
    shown = f"default {default}" if default is not None else "default: all at once"
    parser.add_argument("--batch-size", type=BATCH_SIZE, default=default, help=f"{help} (1..4096, {shown})")


def add_out(parser: Any, *, directory: bool = False, required: bool = False, default: str | None = None,
            help: str = "") -> None:
    """`--out`: a file (or with `directory`, a folder), checked writable while parsing, before any work."""
    parser.add_argument("--out", type=output_dir if directory else output_file, required=required, default=default,
                        help=help)


FPS = number(0.0, 240.0, low_open=True, why="frames per second")
VIDEO_SCALE = integer(1, 64, why="integer nearest-neighbour enlargement of each frame")


def add_video_options(parser: Any) -> None:
    """`--fps` and `--scale`: how a video model's clips are written (see `cachekit.pipelines.video_io`); both default
    to None, which the writer reads as 8 fps and frames enlarged to at least 128 px."""
    parser.add_argument("--fps", type=FPS, default=None,
                        help="frames per second of a video output (.mp4, .webm, .gif), in (0, 240] (default 8)")
    parser.add_argument("--scale", type=VIDEO_SCALE, default=None, metavar="N",
                        help="enlarge a video model's frames N times, nearest-neighbour, 1..64 (default: the "
                             "smallest factor giving 128 px; H.264/VP9 cannot keep detail or colour at 32 px)")


# ---------------------------------------------------------------------------------------------------- after parsing
def pipeline_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline call settings the options say: the bundled model's own (`cachekit.zoo.call_defaults`), then
    `--guidance-scale` (and `--height` / `--width` where a verb has them), then every `--pipeline-arg`."""
    from .keyvalue import parse_key_values
    from .zoo import call_defaults

    items = list(getattr(args, "pipeline_arg", None) or [])
    for item in items:
        key, sep, _ = str(item).partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--pipeline-arg expects KEY=VALUE, got {item!r}")
    given = parse_key_values(items, "--pipeline-arg")
    settings = call_defaults(getattr(args, "model", "digits"))
    for name in ("guidance_scale", "height", "width"):
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    settings.update(given)
    return settings
