"""The `cachekit` command line: every verb has --help, schedule tools work on files, and every verb runs on the
bundled digits model with no extra flag (`generate` draws the prompted digit, `schedule make` measures MACs)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cachekit
from cachekit.cli import build_parser, main
from cachekit.zoo.digits_classifier import recognise
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
    assert ["schedule", "list"] in verbs
    assert ["schedule", "make"] in verbs
    for verb in ("eval", "bench", "calibrate", "solve", "search"):
        assert [verb] in verbs
    for verb in verbs:
        with pytest.raises(SystemExit) as exit_info:
            main([*verb, "--help"])
        assert exit_info.value.code == 0
        assert "usage: cachekit" in capsys.readouterr().out


def test_shared_options_mean_the_same_in_every_verb():
    """--model, --device, --pipeline-arg, --steps, --seed, --guidance-scale, --out: one definition, one check."""
    parser = build_parser()
    verbs = {tuple(v): v for v in _verbs(parser)}
    runs_a_model = [["generate"], ["schedule", "make"], ["calibrate"], ["search"], ["eval"], ["bench"]]
    for verb in runs_a_model:
        sub = parser
        for name in verb:
            sub = next(a for a in sub._subparsers._group_actions).choices[name]
        options = {o for a in sub._actions for o in a.option_strings}
        shared = {"--model", "--device", "--pipeline-arg", "--steps", "--guidance-scale", "--out"}
        assert shared | ({"--seed"} if verb != ["schedule", "make"] else set()) <= options, verb  # make draws no noise
        steps = next(a for a in sub._actions if "--steps" in a.option_strings)
        if verb == ["search"]:  # several step counts: the joint step-count x schedule search
            assert steps.type("2") == (2,) and steps.type("8,6,20") == (6, 8, 20)
        else:
            assert steps.type("2") == 2 and steps.type.__name__ == "integer"
    assert len(verbs) >= 9


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "cachekit.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "generate" in result.stdout


def test_serve_help_runs_in_a_fresh_process_and_names_its_extra():
    """What a newcomer types first: `cachekit serve --help` as its own process (nothing imported before it)."""
    result = subprocess.run([sys.executable, "-m", "cachekit", "serve", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--max-batch" in result.stdout and "cachekit[serve]" in result.stdout


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


def test_schedule_show_takes_a_shipped_name(capsys):
    assert main(["schedule", "show", "digits-fast"]) == 0
    assert "PixArtTransformer2DModel: 20 steps x 28 blocks" in capsys.readouterr().out


def test_schedule_list_shows_each_shipped_schedule_with_the_steps_it_runs(capsys):
    from cachekit import zoo

    assert main(["schedule", "list"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert set(rows) == set(zoo.shipped_schedules())
    assert rows["digits-fastest"][1:3] == ["PixArtTransformer2DModel", "8"]
    assert rows["digits-video-fast"][1:3] == ["WanTransformer3DModel", "20"]
    measured = cachekit.Schedule.load(zoo.schedule_path("digits-fast")).measured["heldout"]
    assert rows["digits-fast"][3] == f"{measured['speedup']:.2f}x"


def test_schedule_resample_writes_new_file(schedule_file, tmp_path, capsys):
    out_path = tmp_path / "twenty.json"
    assert main(["schedule", "resample", str(schedule_file), "--steps", "20", "--out", str(out_path)]) == 0
    assert cachekit.Schedule.load(out_path).num_steps == 20


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    assert main(["schedule", "show", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "schedule file not found" in err


# ------------------------------------------------------------------------------------- on the bundled digits model
def test_schedule_make_fora_on_the_digits_model_with_its_defaults(tmp_path, capsys):
    out = tmp_path / "fora.json"
    assert main(["schedule", "make", "fora", "--steps", "4", "--out", str(out)]) == 0
    schedule = cachekit.Schedule.load(out)
    assert schedule.model_class == "PixArtTransformer2DModel" and schedule.num_steps == 4
    assert schedule.provenance["policy"] == "fora" and schedule.provenance["interval"] == 3
    assert schedule.scheduler == "DPMSolverMultistepScheduler"
    assert 0.4 < schedule.predicted_cost["mac_ratio"] < 0.6  # steps 0 and 3 of 4 compute
    assert f"wrote {out}: fora at 4 steps, predicted MAC ratio" in capsys.readouterr().out


DIGITS = {"a handwritten 3": 3, "the digit seven": 7, "number 5": 5}


def _tiles(path, count):
    """The images of a one-row grid PNG, as a [count, 3, H, W] uint8 tensor (the grid is upscaled by nearest)."""
    grid = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    width = grid.shape[2] // count
    return torch.stack([grid[:, :, i * width:(i + 1) * width] for i in range(count)])


@pytest.mark.parametrize("plan", ["none", "digits-fast", "fora:interval=3"])
def test_generate_draws_the_prompted_digits(tmp_path, capsys, plan):
    out = tmp_path / "digits.png"
    assert main(["generate", "--prompt", *DIGITS, "--schedule", plan, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out}: 3 image(s), 20 steps in ")
    if plan == "none":
        assert printed.rstrip().endswith("uncached")
    else:
        reused = float(printed.split("reused ")[1].split("%")[0])
        assert plan in printed and 10 < reused < 90
    recognised = recognise(_tiles(out, len(DIGITS)))
    assert recognised.tolist() == list(DIGITS.values()), (plan, recognised)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.png"]  # no temporary file left beside it


def test_generate_refuses_a_schedule_for_another_step_count(tmp_path, capsys):
    assert main(["generate", "--schedule", "digits-fast", "--steps", "10", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "schedule resample" in err and not list(tmp_path.iterdir())


def test_a_schedule_file_is_one_of_the_plans_generate_takes(tmp_path, capsys):
    schedule = tmp_path / "fora.json"
    assert main(["schedule", "make", "fora", "--steps", "4", "--interval", "2", "--out", str(schedule)]) == 0
    data = json.loads(schedule.read_text())
    assert data["provenance"]["interval"] == 2
    out = tmp_path / "x.png"
    assert main(["generate", "--schedule", str(schedule), "--steps", "4", "--out", str(out)]) == 0
    assert "fora, reused 50%" in capsys.readouterr().out and out.is_file()
    # without --steps, a schedule runs the step count it records
    assert main(["generate", "--schedule", str(schedule), "--out", str(tmp_path / "own.png")]) == 0
    assert "4 steps" in capsys.readouterr().out
