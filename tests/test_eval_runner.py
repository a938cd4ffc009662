"""The evaluation runner and `cachekit eval` on the real embedded digits model.

Small on purpose (4 prompts, 4 steps): the point is what the numbers mean, not their statistical power. A schedule
that recomputes everything must reproduce the uncached images exactly; a caching schedule must differ but stay close;
two processes must give the numbers one process gives.
"""

from __future__ import annotations

import json
import math
import os

import pytest

import cachekit
from cachekit.eval.cli import main as eval_main
from cachekit.eval.prompts import digits_prompts
from cachekit.eval.runner import evaluate
from cachekit.eval.suite import MetricConfig
from cachekit.policies import static_schedule
from cachekit.zoo import call_defaults, load_pipeline
from launch import accelerate_launch

STEPS = 4
PIPE_KWARGS = call_defaults("digits")


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("digits")


@pytest.fixture(scope="module")
def report(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    schedules = {
        "full": cachekit.Schedule.full(pipe.transformer, STEPS),
        "fora2": static_schedule("fora", pipe.transformer, STEPS, interval=2),
    }
    config = MetricConfig(names=["fid", "kid", "clip", "psnr", "ssim"], fid_features="clip", clip_model="digits",
                          kid_subsets=10)
    rep = evaluate(pipe, schedules, digits_prompts(4), STEPS, config, out, batch_size=2, pipe_kwargs=PIPE_KWARGS,
                   model_name="digits", default_reference="digits-heldout", warmup=1, repeats=2,
                   latency_batch_size=1, grid_samples=4)
    return rep, out


def test_report_files_and_machine_keys(report):
    rep, out = report
    for name in ("report.json", "report.md", "grid.png", "tradeoff.png"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "report.json").read_text())
    assert list(on_disk["schedules"]) == ["uncached", "full", "fora2"]
    for s in on_disk["schedules"].values():
        assert {"speedup", "latency_s", "macs_ratio", "metrics"} <= set(s)
        assert s["speedup"] > 0 and s["latency_s"] > 0 and len(s["latency"]["samples_s"]) == 2
    assert on_disk["schedules"]["uncached"]["speedup"] == 1.0
    assert on_disk["reference"]["source"] == "digits-heldout" and on_disk["reference"]["num_images"] == 364
    for info in on_disk["metrics_info"].values():
        assert info["num_images"] == 4
    assert len(on_disk["metrics_info"]["fid"]["sha256"]) == 64


def test_full_schedule_reproduces_the_uncached_model(report):
    rep, _ = report
    base, full = rep["schedules"]["uncached"], rep["schedules"]["full"]
    assert math.isinf(full["metrics"]["psnr"]) and full["metrics"]["ssim"] == pytest.approx(1.0)
    for name in ("fid", "kid", "clip"):
        assert full["metrics"][name] == pytest.approx(base["metrics"][name], rel=1e-9, abs=1e-12)
    assert full["macs_ratio"] == 1.0
    assert "psnr" not in base["metrics"]  # the baseline is not compared with itself


def test_caching_schedule_changes_images_and_computes_less(report):
    rep, _ = report
    fora = rep["schedules"]["fora2"]
    assert math.isfinite(fora["metrics"]["psnr"]) and fora["metrics"]["psnr"] > 10
    assert 0 < fora["metrics"]["ssim"] < 1
    assert fora["macs_ratio"] < 0.9  # half the transformer steps reuse cached blocks
    assert fora["plan"]["compute_fraction"] == 0.5


def _cli_args(out) -> list[str]:
    return ["--model", "digits", "--schedule", "none", "fora:interval=2", "--prompts", "digits", "--num", "4",
            "--batch-size", "2", "--steps", str(STEPS), "--metrics", "fid,kid,clip,psnr,ssim", "--fid-features",
            "clip", "--kid-subsets", "10", "--no-latency", "--no-macs", "--grid", "2", "--device", "cpu", "--out", str(out)]


def _launch(args: list[str], nproc: int) -> dict:
    """One process: the CLI in this one; more: under accelerate's launcher."""
    if nproc == 1:
        assert eval_main(args) == 0
    else:
        accelerate_launch("cachekit.eval", args, nproc)
    out = args[args.index("--out") + 1]
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def test_two_processes_give_the_numbers_of_one(tmp_path):
    one = _launch(_cli_args(tmp_path / "one"), 1)
    two = _launch(_cli_args(tmp_path / "two"), 2)
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert list(one["schedules"]) == list(two["schedules"]) == ["uncached", "fora:interval=2"]
    for name, s in one["schedules"].items():
        other = two["schedules"][name]["metrics"]
        assert set(s["metrics"]) == set(other)
        for key, value in s["metrics"].items():
            print(f"{name} {key}: 1 process {value!r}, 2 processes {other[key]!r}")
            assert other[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (name, key)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert eval_main(["--schedule", str(tmp_path / "missing.json"), "--num", "2", "--no-latency",
                      "--metrics", "psnr", "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    assert eval_main(["--metrics", "fid,sharpness", "--out", str(tmp_path)]) == 2
    assert "unknown metric" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("a cat\n")
    assert eval_main(["--prompts", str(tmp_path / "p.txt"), "--metrics", "fid", "--out", str(tmp_path)]) == 2
    assert "need a reference set" in capsys.readouterr().err
