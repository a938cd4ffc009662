"""`cachekit search` and `cachekit calibrate --policy` end to end on the bundled digits model, through the real CLI."""

from __future__ import annotations

import json

import pytest

from cachekit import Schedule
from cachekit.cli import main
from cachekit.policies import PolicyCalibration, resolve_plan
from cachekit.zoo import load_pipeline
from launch import accelerate_launch

SMALL = ["--steps", "4", "--num", "2"]


@pytest.fixture(scope="module")
def transformer():
    return load_pipeline("digits").transformer


def _search(out, *extra):
    return main(["search", *SMALL, "--population", "8", "--generations", "2", "--dp-budgets", "0.3", "0.6",
                 "--out", str(out), *extra])


def test_search_writes_a_front_of_valid_schedules_and_resumes_to_the_same_front(tmp_path, transformer, capsys):
    out = tmp_path / "search"
    assert _search(out) == 0
    front = json.loads((out / "front.json").read_text())
    assert front["objectives"] == {"quality": "psnr_vs_uncached", "cost": "mac_ratio"}
    names = {s["name"] for s in front["seeds"]}
    assert names >= {"fora-2", "tgate", "dp-0.6"}
    assert "dp-0.3" not in names  # first and last of 4 steps are forced: 0.3 is infeasible, skipped with a warning
    assert [h["generation"] for h in front["history"]] == [0, 1, 2]
    assert front["evaluations"] == front["history"][-1]["evaluations"] > len(front["seeds"])
    assert front["history"][-1]["hypervolume"] >= front["history"][0]["hypervolume"]
    for point in front["front"]:
        schedule = Schedule.load(out / point["file"])
        schedule.validate_for(transformer, 4)
        assert schedule.provenance["method"] == "search"
        assert schedule.predicted_cost["mac_ratio"] == pytest.approx(point["cost"], abs=1e-6)
        assert point["file"].endswith(f"_x{1 / point['cost']:.2f}.json")
    costs = [p["cost"] for p in front["front"]]
    assert costs == sorted(costs) and costs[0] < 0.7
    for name in ("front.png", "summary.md", "calibration.pt", "checkpoint.json"):
        assert (out / name).is_file()
    assert "evaluations, hypervolume" in capsys.readouterr().out

    # A finished run resumed gives the same front without new evaluations.
    assert _search(out, "--resume") == 0
    again = json.loads((out / "front.json").read_text())
    assert again["front"] == front["front"] and again["evaluations"] == front["evaluations"]


def test_search_refuses_to_overwrite_a_checkpoint_and_bad_options(tmp_path, capsys):
    out = tmp_path / "search"
    out.mkdir()
    (out / "checkpoint.json").write_text("{}")
    assert _search(out) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert main(["search", "--no-dp", "--cost", "latency", "--out", str(tmp_path / "x")]) == 2
    assert "--cost latency needs a calibration" in capsys.readouterr().err
    assert main(["search", *SMALL, "--population", "6", "--out", str(tmp_path / "y")]) == 2
    assert "multiple of 4" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("policy", ["teacache", "magcache", "first-block"])
def test_calibrate_policy_round_trips_through_its_file(tmp_path, transformer, policy, capsys):
    out = tmp_path / f"{policy}.json"
    assert main(["calibrate", "--policy", policy, *SMALL, "--out", str(out)]) == 0
    fitted = PolicyCalibration.load(out)
    assert fitted.policy == policy and fitted.num_steps == 4 and fitted.model_class == "PixArtTransformer2DModel"
    assert fitted.values and fitted.samples > 0
    plan = resolve_plan(f"{policy}:calibration={out}", transformer, 4)
    for key, value in fitted.values.items():
        if hasattr(plan.config, key):
            expected = tuple(value) if isinstance(value, list) else value
            assert getattr(plan.config, key) == expected
    assert f"--schedule {policy}:calibration={out}" in capsys.readouterr().out


def test_block_search_on_wall_clock_cost_with_forecast_genes_and_a_clip_constraint(tmp_path, transformer, capsys):
    out = tmp_path / "block"
    assert _search(out, "--genome", "block", "--cost", "wallclock", "--forecast-order", "1",
                   "--clip-tolerance", "2") == 0
    front = json.loads((out / "front.json").read_text())
    assert front["objectives"] == {"quality": "psnr_vs_uncached", "cost": "wallclock_ratio"}
    assert front["evaluator"]["constraint"] == "clip_score >= uncached - 2"
    assert {"fora-2+forecast", "delta-dit-0.25"} <= {s["name"] for s in front["seeds"]}
    assert (out / "wallclock.json").is_file() and (out / "calibration.pt.json").is_file()
    for point in front["front"]:
        schedule = Schedule.load(out / point["file"])
        assert schedule.mode == "block" and schedule.validate_for(transformer, 4) is None
        assert schedule.measured["clip_score"] == point["clip_score"]
        assert point["clip_score"] >= front["evaluator"]["uncached_clip_score"] - 2
    # the saved wall-clock model is reused by a new search (no probes timed again)
    again = tmp_path / "again"
    assert _search(again, "--genome", "block", "--cost", "wallclock", "--no-dp", "--wallclock",
                   str(out / "wallclock.json")) == 0
    assert (again / "wallclock.json").read_text() == (out / "wallclock.json").read_text()
    assert main(["search", *SMALL, "--wallclock", str(out / "wallclock.json"), "--out", str(tmp_path / "z")]) == 2
    assert "add --cost wallclock" in capsys.readouterr().err


def test_two_processes_find_the_front_of_one(tmp_path):
    """Under accelerate, candidates are spread over processes; the search and its front do not change."""
    args = ["search", *SMALL, "--population", "8", "--generations", "1", "--no-dp"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0  # one process: this one, with one intra-op thread
    accelerate_launch("cachekit", [*args, "--out", str(tmp_path / "two")], 2)
    a, b = (json.loads((tmp_path / n / "front.json").read_text()) for n in ("one", "two"))
    assert a["evaluator"]["processes"] == 1 and b["evaluator"]["processes"] == 2
    assert a["front"] == b["front"] and a["history"] == b["history"]
