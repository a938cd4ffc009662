"""The `cachekit` command line: every verb has --help, schedule tools work on files, errors are one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import cachekit
from cachekit.cli import build_parser, main
from tiny_models import build


def _verbs(parser):
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            yield [name]
            if sub._subparsers is not None:
                for rest in _verbs(sub):
                    yield [name, *rest]


def test_every_verb_has_help(capsys):
    verbs = list(_verbs(build_parser()))
    assert ["generate"] in verbs and ["schedule", "show"] in verbs and ["schedule", "resample"] in verbs
    for verb in ("eval", "calibrate", "solve", "search"):
        assert [verb] in verbs
    for verb in verbs:
        with pytest.raises(SystemExit) as exit_info:
            main([*verb, "--help"])
        assert exit_info.value.code == 0
        assert "usage: cachekit" in capsys.readouterr().out


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "cachekit.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "generate" in result.stdout


@pytest.fixture()
def schedule_file(tmp_path):
    model = build("PixArtTransformer2DModel")
    full = cachekit.Schedule.full(model, 10)
    mask = torch.zeros_like(full.recompute)
    mask[::2] = True
    path = tmp_path / "every2.json"
    cachekit.Schedule.from_mask(model, mask).save(path)
    return path


def test_schedule_show_prints_summary(schedule_file, capsys):
    assert main(["schedule", "show", str(schedule_file)]) == 0
    out = capsys.readouterr().out
    assert "PixArtTransformer2DModel: 10 steps x 3 blocks x 3 components" in out
    assert "computed: 50.0% of component evaluations" in out
    assert "per step:      0:100% 1:0% 2:100%" in out


def test_schedule_resample_writes_new_file(schedule_file, tmp_path, capsys):
    out_path = tmp_path / "twenty.json"
    assert main(["schedule", "resample", str(schedule_file), "--steps", "20", "--out", str(out_path)]) == 0
    assert cachekit.Schedule.load(out_path).num_steps == 20


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    assert main(["schedule", "show", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "schedule file not found" in err
