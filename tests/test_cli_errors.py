"""Bad input is one line on stderr and exit status 2, before any work and with nothing written; Ctrl-C is one line
and status 130; a programming error keeps its traceback. Old option spellings still work, with a FutureWarning.

Almost every case fails while the command line is parsed (milliseconds); the few that need the pipeline (a setting
it does not take) load the bundled digits model and stop before generating.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import pytest
import torch

import cachekit
from cachekit import cli_options as opts
from cachekit.cli import build_parser, main
from cachekit.errors import UsageError
from cachekit.search.calibrate import calibrate_transformer
from tiny_models import TINY_MODELS, build, denoise

PIXART = "PixArtTransformer2DModel"
_PROGRESS = re.compile(r"(it/s|s/it|\d+%\|)")  # tqdm bars (loading a pipeline shows one)


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def one_line_error(capsys, argv, expected, *, verb=None, folder=None):
    """Run `cachekit argv`: exit status 2, exactly one error line `cachekit VERB: error: ...expected...`, no traceback,
    and (with `folder`) nothing new in `folder`, not even a temporary file."""
    before = _listing(folder) if folder is not None else None
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip() and not _PROGRESS.search(line)]
    assert len(lines) == 1, err
    verb = verb or argv[0]
    assert lines[0].startswith(f"cachekit {verb}: error: "), lines[0]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    if folder is not None:
        assert _listing(folder) == before, "something was written"
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A schedule of the tiny PixArt, a calibration of it (8 steps) and a plain file to put outputs 'under'."""
    root = tmp_path_factory.mktemp("inputs")
    model = build(PIXART)
    schedule = root / "every2.json"
    mask = torch.zeros_like(cachekit.Schedule.full(model, 10).recompute)
    mask[::2] = True
    cachekit.Schedule.from_mask(model, mask).save(schedule)
    scheduler = TINY_MODELS[PIXART].scheduler()
    calibration = calibrate_transformer(
        model, lambda: denoise(model, TINY_MODELS[PIXART], num_steps=8, batch=2, scheduler=scheduler), 8,
        scheduler=scheduler, progress=False)
    calibration.save(root / "calib.pt")
    (root / "plain.txt").write_text("not a folder\n")
    return {"root": root, "schedule": schedule, "calibration": root / "calib.pt", "calib": calibration,
            "plain": root / "plain.txt"}


# ------------------------------------------------------------------------------------------------ outputs
def _out_cases(files, target):
    s, c = str(files["schedule"]), str(files["calibration"])
    return {
        "schedule make": ["schedule", "make", "fora", "--steps", "4", "--out", target],
        "schedule resample": ["schedule", "resample", s, "--steps", "20", "--out", target],
        "calibrate": ["calibrate", "--steps", "2", "--num", "1", "--out", target],
        "solve": ["solve", "--calibration", c, "--budget", "0.5", "--out", target],
        "generate": ["generate", "--steps", "2", "--out", target],
    }


@pytest.mark.parametrize("verb", ["schedule make", "schedule resample", "calibrate", "solve", "generate"])
def test_an_output_that_is_a_folder_or_unwritable(files, tmp_path, capsys, verb):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    argv = _out_cases(files, str(folder))[verb]
    one_line_error(capsys, argv, "it is a folder", verb=verb, folder=tmp_path)
    under_a_file = str(files["plain"]) + "/out.json"  # unwritable whoever runs the test (root ignores modes)
    argv = _out_cases(files, under_a_file)[verb]
    one_line_error(capsys, argv, "is a file, not a folder", verb=verb, folder=files["root"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_output_folder_without_write_permission(files, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        one_line_error(capsys, ["generate", "--out", str(locked / "x.png")], "no permission", folder=tmp_path)
    finally:
        locked.chmod(0o700)


def test_search_and_eval_outputs_must_be_folders(files, capsys):
    plain = str(files["plain"])
    one_line_error(capsys, ["search", "--out", plain], "it is a file, not a folder", folder=files["root"])
    one_line_error(capsys, ["eval", "--out", plain], "it is a file, not a folder", folder=files["root"])


# ------------------------------------------------------------------------------------------------ inputs
def test_a_folder_given_as_the_schedule(tmp_path, capsys):
    one_line_error(capsys, ["schedule", "show", str(tmp_path)], "is a folder, not a schedule file", verb="schedule show")
    one_line_error(capsys, ["generate", "--schedule", str(tmp_path), "--out", str(tmp_path / "x.png")],
                   "is a folder, not a schedule file", folder=tmp_path)
    one_line_error(capsys, ["solve", "--calibration", str(tmp_path), "--budget", "0.5", "--out",
                            str(tmp_path / "s.json")], "is a folder, not a calibration file", folder=tmp_path)


def test_a_schedule_of_an_unregistered_model(files, tmp_path, capsys):
    data = json.loads(files["schedule"].read_text())
    data["model_class"] = "NoSuchTransformer2DModel"
    path = tmp_path / "alien.json"
    path.write_text(json.dumps(data))
    line = one_line_error(capsys, ["schedule", "show", str(path)], "no registry entry for NoSuchTransformer2DModel",
                          verb="schedule show")
    assert str(path) in line


def test_unknown_plans_and_prompt_sets(tmp_path, capsys):
    one_line_error(capsys, ["generate", "--schedule", "fast-please", "--out", str(tmp_path / "x.png")],
                   "unknown plan 'fast-please'", folder=tmp_path)
    one_line_error(capsys, ["generate", "--schedule", "fora:interval=0", "--out", str(tmp_path / "x.png")],
                   "interval", folder=tmp_path)
    one_line_error(capsys, ["eval", "--prompts", "nosuch-set", "--metrics", "psnr", "--out", str(tmp_path / "e")],
                   "neither a built-in name", folder=tmp_path)


# ------------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize("argv, expected", [
    (["calibrate", "--steps", "1"], "--steps: must be at least 2"),
    (["search", "--steps", "1"], "--steps: step counts separated by commas, e.g. 6,8,10,20: each must be at least 2"),
    (["eval", "--steps", "0"], "--steps: must be at least 2"),
    (["eval", "--steps", "-1"], "--steps: must be at least 2"),
    (["generate", "--steps", "1000000000"], "--steps: must be at most 1000"),
    (["calibrate", "--steps", "1000000000"], "--steps: must be at most 1000"),
    (["generate", "--num-images", "0"], "--num-images: must be a positive integer"),
    (["generate", "--num-images", "-1"], "--num-images: must be a positive integer"),
    (["generate", "--num-images", "1000"], "--num-images: must be at most 256"),
    (["search", "--population", "1000000000"], "--population: must be at most 4096"),
    (["search", "--population", "6"], "multiple of 4"),
    (["search", "--generations", "-1"], "--generations: must be a non-negative integer"),
    (["search", "--seed", "-1"], "--seed: must be a non-negative integer"),
    (["generate", "--seed", str(2**63)], "--seed: must be at most"),
    (["eval", "--batch-size", "0"], "--batch-size: must be a positive integer"),
    (["search", "--dp-budgets", "1.5"], "fraction in (0, 1]"),
    (["eval", "--num", "0"], "--num: must be a positive integer"),
    (["calibrate", "--prompts", "0"], "--prompts: must be a positive integer"),
    (["generate", "--device", "tpu9"], "unknown device"),
])
def test_numbers_out_of_range(tmp_path, capsys, argv, expected):
    out = ["--out", str(tmp_path / ("o" if argv[0] in ("search", "eval") else "o.png"))]
    one_line_error(capsys, [*argv, *out], expected, folder=tmp_path)


@pytest.mark.parametrize("verb", [["generate"], ["schedule", "make", "fora"], ["calibrate"], ["search"], ["eval"],
                                  ["bench"]])
@pytest.mark.parametrize("value", ["nan", "inf", "-1", "1000"])
def test_guidance_scale_is_finite_and_bounded(tmp_path, capsys, verb, value):
    out = str(tmp_path / ("o" if verb[0] in ("search", "eval", "bench") else "o.json"))
    expected = "finite number" if value in ("nan", "inf") else "must be in [0, 100]"
    one_line_error(capsys, [*verb, "--guidance-scale", value, "--out", out], expected,
                   verb=" ".join(verb[:2]) if verb[0] == "schedule" else verb[0], folder=tmp_path)


def test_pipeline_arg_must_be_key_value_and_finite(tmp_path, capsys):
    one_line_error(capsys, ["generate", "--pipeline-arg", "height", "--out", str(tmp_path / "x.png")],
                   "--pipeline-arg expects KEY=VALUE, got 'height'", folder=tmp_path)
    one_line_error(capsys, ["generate", "--pipeline-arg", "guidance_scale=NaN", "--out", str(tmp_path / "x.png")],
                   "not a finite number", folder=tmp_path)
    one_line_error(capsys, ["generate", "--pipeline-arg", "prompt=x", "--out", str(tmp_path / "x.png")],
                   "set by the call itself", folder=tmp_path)


# ------------------------------------------------------------------------------------------------ the pipeline
@pytest.mark.parametrize("verb", [["generate"], ["schedule", "make", "fora"], ["calibrate"], ["search", "--no-dp"],
                                  ["eval", "--metrics", "psnr"]])
def test_a_pipeline_setting_the_pipeline_does_not_take(tmp_path, capsys, verb):
    out = str(tmp_path / ("o" if verb[0] in ("search", "eval") else "o.json"))
    one_line_error(capsys, [*verb, "--steps", "2", "--num", "1", "--pipeline-arg", "bogus=1", "--out", out]
                   if verb[0] in ("calibrate", "search", "eval") else
                   [*verb, "--steps", "2", "--pipeline-arg", "bogus=1", "--out", out],
                   "PixArtAlphaPipeline does not take bogus",
                   verb=" ".join(verb[:2]) if verb[0] == "schedule" else verb[0], folder=tmp_path)


# ------------------------------------------------------------------------------------------------ solve
def test_solve_refuses_settings_the_calibration_cannot_serve(files, tmp_path, capsys):
    base = ["solve", "--calibration", str(files["calibration"]), "--out", str(tmp_path / "s.json")]
    one_line_error(capsys, [*base, "--budget", "0.5", "--bubble-threshold", "nan"], "finite number", folder=tmp_path)
    one_line_error(capsys, [*base, "--updates", "99"], "updates=99 is more than the calibration's 8 steps",
                   folder=tmp_path)
    one_line_error(capsys, [*base, "--budget", "0.5", "--force", "99"], "forced step(s) [99] outside",
                   folder=tmp_path)
    one_line_error(capsys, [*base, "--budget", "0.5", "--force", "-9"], "forced step(s) [-9] outside",
                   folder=tmp_path)
    one_line_error(capsys, [*base, "--budget", "0.01"], "budget 0.010 is below", folder=tmp_path)
    one_line_error(capsys, [*base], "needs a budget", folder=tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), -1.0])
def test_solve_refuses_a_calibration_with_impossible_latencies(files, tmp_path, capsys, bad):
    calibration = files["calib"]
    broken = type(calibration)(**{**calibration.__dict__, "latency": calibration.latency.clone()})
    broken.latency[0, 0] = bad
    broken.save(tmp_path / "broken.pt")
    one_line_error(capsys, ["solve", "--calibration", str(tmp_path / "broken.pt"), "--budget", "0.5", "--cost",
                            "latency", "--out", str(tmp_path / "s.json")], "latency table has NaN, infinite or negative",
                   folder=tmp_path)


def test_a_file_that_is_not_a_calibration(tmp_path, capsys):
    (tmp_path / "c.pt").write_text("hello")
    one_line_error(capsys, ["solve", "--calibration", str(tmp_path / "c.pt"), "--budget", "0.5", "--out",
                            str(tmp_path / "s.json")], "is not a cachekit calibration", folder=tmp_path)


# ------------------------------------------------------------------------------------------------ how verbs fail
def _tiny_cli(handler, on_interrupt=None):
    parser = opts.ArgumentParser(prog="cachekit")
    sub = parser.add_subparsers(dest="command", required=True)
    verb = sub.add_parser("verb")
    verb.add_argument("--n", type=opts.integer(1, 3), default=1)
    opts.set_handler(verb, handler, on_interrupt)
    return parser


@pytest.mark.parametrize("error, expected", [
    (PermissionError(13, "Permission denied", "/data/out.png"), "cachekit verb: error: Permission denied: /data/out.png"),
    (FileExistsError(17, "File exists", "runs/x"), "cachekit verb: error: File exists: runs/x"),
    (IsADirectoryError(21, "Is a directory", "runs"), "cachekit verb: error: Is a directory: runs"),
    (NotADirectoryError(20, "Not a directory", "a.txt/b"), "cachekit verb: error: Not a directory: a.txt/b"),
    (UsageError("two lines\nbecome one"), "cachekit verb: error: two lines become one"),
])
def test_os_and_cachekit_errors_are_one_line(capsys, error, expected):
    def handler(args):
        raise error

    assert opts.run(_tiny_cli(handler), ["verb"]) == 2
    assert capsys.readouterr().err == expected + "\n"


def test_a_programming_error_keeps_its_traceback():
    def handler(args):
        raise TypeError("a bug")

    with pytest.raises(TypeError, match="a bug"):
        opts.run(_tiny_cli(handler), ["verb"])


def test_argument_errors_are_one_line_naming_the_verb_help(capsys):
    assert opts.run(_tiny_cli(lambda args: 0), ["verb", "--n", "9"]) == 2
    assert capsys.readouterr().err == ("cachekit verb: error: argument --n: must be at most 3, got 9 "
                                       "(see cachekit verb --help)\n")
    assert opts.run(_tiny_cli(lambda args: 0), ["verb", "--m"]) == 2
    assert capsys.readouterr().err == "cachekit verb: error: unrecognized arguments: --m (see cachekit verb --help)\n"


def test_ctrl_c_is_one_line_and_status_130(capsys):
    def handler(args):
        raise KeyboardInterrupt

    assert opts.run(_tiny_cli(handler, lambda args: "rerun it"), ["verb"]) == 130
    assert capsys.readouterr().err.strip() == "cachekit verb: interrupted; rerun it"


def test_ctrl_c_during_a_search_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import cachekit.search.run as run

    def interrupted_after_a_generation(pipe, prompts, num_steps, out_dir, *args, **kwargs):
        os.makedirs(out_dir, exist_ok=True)
        (out_dir / "checkpoint.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "search_pipeline", interrupted_after_a_generation)
    out = tmp_path / "search"
    assert main(["search", "--no-dp", "--steps", "2", "--num", "1", "--population", "4", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip() and not _PROGRESS.search(line)]
    assert lines == [f"cachekit search: interrupted; the checkpoint in {out} is complete up to the last finished "
                     "generation; rerun the same command with --resume to continue from there"]
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------------ old spellings
def _parsed(argv):
    args = build_parser().parse_args(argv)
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


@pytest.mark.parametrize("old, new, named", [
    (["eval", "--pipe-arg", "max_sequence_length=16"], ["eval", "--pipeline-arg", "max_sequence_length=16"],
     "--pipeline-arg"),
    (["bench", "--pipe-arg", "a=1", "--pipe-arg", "b=2"], ["bench", "--pipeline-arg", "a=1", "--pipeline-arg", "b=2"],
     "--pipeline-arg"),
    (["eval", "--cpu"], ["eval", "--device", "cpu"], "--device cpu"),
    (["bench", "--cpu"], ["bench", "--device", "cpu"], "--device cpu"),
    (["calibrate", "--prompts", "3", "--out", "c.pt"], ["calibrate", "--num", "3", "--out", "c.pt"], "--num"),
    (["search", "--prompts", "3", "--out", "s"], ["search", "--num", "3", "--out", "s"], "--num"),
    (["calibrate", "--prompt-set", "digits", "--out", "c.pt"], ["calibrate", "--prompts", "digits", "--out", "c.pt"],
     "--prompts"),
    (["search", "--prompt-set", "digits", "--out", "s"], ["search", "--prompts", "digits", "--out", "s"], "--prompts"),
    (["search", "--mode", "block", "--out", "s"], ["search", "--genome", "block", "--out", "s"], "--genome"),
    (["solve", "--mode", "bac", "--calibration", "CAL", "--out", "s.json"],
     ["solve", "--preset", "bac", "--calibration", "CAL", "--out", "s.json"], "--preset"),
])
def test_old_spellings_still_work_and_warn(files, tmp_path, monkeypatch, old, new, named):
    monkeypatch.chdir(tmp_path)
    old = [str(files["calibration"]) if a == "CAL" else a for a in old]
    new = [str(files["calibration"]) if a == "CAL" else a for a in new]
    with pytest.warns(FutureWarning, match=re.escape(f"use {named}")):
        from_old = _parsed(old)
    assert from_old == _parsed(new)


def test_solve_with_the_old_mode_spelling_runs(files, tmp_path, capsys):
    out = tmp_path / "bac.json"
    with pytest.warns(FutureWarning, match="--preset"):
        assert main(["solve", "--calibration", str(files["calibration"]), "--budget", "0.6", "--mode", "bac",
                     "--out", str(out)]) == 0
    assert cachekit.Schedule.load(out).provenance["preset"] == "bac"
    assert "bac preset" in capsys.readouterr().out


def test_choice_lists_come_from_the_registries():
    from cachekit.eval.bench import POLICY_SWEEPS
    from cachekit.eval.peers import PEERS
    from cachekit.policies import STATIC_POLICIES
    from cachekit.policies.calibration import CALIBRATED_POLICIES
    from cachekit.search.dp import PRESETS
    from cachekit.search.fitness import COSTS, QUALITIES

    parser = build_parser()

    def sub(*names):
        p = parser
        for name in names:
            p = next(a for a in p._subparsers._group_actions).choices[name]
        return p

    def choices(p, dest):
        return list(next(a for a in p._actions if a.dest == dest and a.help != argparse.SUPPRESS).choices)

    assert choices(sub("schedule", "make"), "policy") == sorted(STATIC_POLICIES)
    assert choices(sub("calibrate"), "policy") == list(CALIBRATED_POLICIES)
    assert choices(sub("search"), "quality") == list(QUALITIES)
    assert choices(sub("search"), "cost") == list(COSTS)
    assert choices(sub("solve"), "preset") == list(PRESETS)
    bench_help = "".join(sub("bench").format_help().split())  # argparse wraps long names at their hyphens
    for name in [s.family for s in POLICY_SWEEPS] + [p.name for p in PEERS]:
        assert name in bench_help
