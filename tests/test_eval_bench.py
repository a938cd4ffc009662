"""`cachekit bench` end to end on the real embedded digits model, at a tiny size (2 prompts, 4 steps).

One bench run carries every kind of row: the uncached model, a static and a runtime (calibrated) policy sweep, an
extra schedule, peers that act (diffusers' PAB, cache-dit's DBCache, taking turns on one transformer copy), a peer that
runs but skips nothing, and a peer whose package is missing. The assertions are about what the numbers mean: the
schedule that recomputes everything reproduces the uncached images at MAC ratio 1, the policies and the peers that
acted compute less, the rows that cannot be compared are not, and say why.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

import cachekit
from cachekit.cli import main as cachekit_main
from cachekit.errors import UsageError
from cachekit.eval.bench import get_sweep, parse_selection, run_bench
from cachekit.eval.peers import get_peer
from cachekit.eval.prompts import digits_prompts
from cachekit.eval.suite import MetricConfig
from cachekit.policies import PolicyCalibration
from cachekit.zoo import call_defaults, load_pipeline

STEPS = 4
PIPE_KWARGS = call_defaults("digits")
MISSING = dataclasses.replace(get_peer("cache-dit.dbcache-taylorseer"),
                              requires=("cachekit_no_such_package:enable_cache",))


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("digits")


@pytest.fixture(scope="module")
def bench(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    config = MetricConfig(names=["fid", "clip", "psnr"], fid_features="clip", clip_model="digits")
    report = run_bench(
        pipe, digits_prompts(2), STEPS, config, out,
        policies=["fora", "teacache", "steps"], policy_knobs={"fora": (2,), "teacache": (0.4,), "steps": (2,)},
        schedules={"full": cachekit.Schedule.full(pipe.transformer, STEPS)},
        peers=["diffusers.fbcache", "diffusers.pab", "cache-dit.dbcache", MISSING],
        peer_knobs={"diffusers.fbcache": (0.0,), "diffusers.pab": (2,), "cache-dit.dbcache": (0.24,)},
        batch_size=2, pipe_kwargs=PIPE_KWARGS, model_name="digits", default_reference="digits-heldout",
        warmup=0, repeats=1, grid_samples=2, progress=False)
    return report, out


def _rows(report) -> dict[str, dict]:
    return {row["name"]: row for row in report["rows"]}


def test_rows_cover_every_method_in_order(bench):
    report, _ = bench
    names = [row["name"] for row in report["rows"]]
    assert names == [
        "uncached", "fora:interval=2", "teacache:threshold=0.4", "steps:num_inference_steps=2",
        "full", "diffusers.fbcache:threshold=0.0", "diffusers.pab:spatial_attention_block_skip_range=2",
        "cache-dit.dbcache:residual_diff_threshold=0.24", "cache-dit.dbcache-taylorseer"]
    base = _rows(report)["uncached"]
    assert base["speedup"] == 1.0 and base["macs_ratio"] == 1.0 and base["status"] == "ok"
    assert set(base["metrics"]) == {"fid", "clip"}  # fidelity is never measured against itself


def test_policies_compute_less_and_the_full_schedule_reproduces_uncached(bench):
    report, _ = bench
    rows = _rows(report)
    for name in ("fora:interval=2", "teacache:threshold=0.4"):
        row = rows[name]
        assert row["status"] == "ok" and row["counts"] and row["kind"] == "policy"
        assert row["macs_ratio"] < 1 and row["speedup"] > 0
        assert math.isfinite(row["metrics"]["psnr"]) and row["metrics"]["fid"] > 0
    assert rows["fora:interval=2"]["macs_ratio"] < 0.7  # every other step reuses all blocks
    fewer = rows["steps:num_inference_steps=2"]  # uniform step-skipping: the uncached model at half the steps
    assert fewer["status"] == "ok" and fewer["counts"] and 0.4 < fewer["macs_ratio"] < 0.7
    assert math.isfinite(fewer["metrics"]["psnr"])
    assert report["eval"]["schedules"][fewer["name"]]["plan"]["num_steps"] == 2
    full = rows["full"]
    assert full["kind"] == "schedule" and full["macs_ratio"] == 1.0 and math.isinf(full["metrics"]["psnr"])
    assert full["metrics"]["fid"] == pytest.approx(rows["uncached"]["metrics"]["fid"], rel=1e-9)
    teacache = report["calibration"]["teacache"]  # calibrated on the probe call before the sweep
    assert len(teacache["values"]["coefficients"]) > 1
    assert report["probe"]["prompts"] == digits_prompts(2).prompts


def test_peers_that_acted_are_compared_and_the_others_say_why(bench, pipe):
    report, _ = bench
    rows = _rows(report)
    acted = ("diffusers.pab:spatial_attention_block_skip_range=2", "cache-dit.dbcache:residual_diff_threshold=0.24")
    for name in acted:
        row = rows[name]
        assert row["status"] == "acted" and row["counts"], row["reason"]
        assert row["macs_ratio"] < 1 and row["work"]["mac_ratio"] < 1 and row["work"]["skipped_linear_calls"] > 0
        assert math.isfinite(row["metrics"]["psnr"]) and row["speedup"] > 0
        assert report["eval"]["schedules"][name]["plan"]["kind"] == "peer"
    idle = rows["diffusers.fbcache:threshold=0.0"]
    assert idle["status"] == "no-skip" and not idle["counts"] and "skipped nothing" in idle["reason"]
    assert idle["metrics"] == {} and idle["work"]["mac_ratio"] == 1.0
    assert idle["name"] not in report["eval"]["schedules"]  # not evaluated: it would only repeat the uncached row
    missing = rows["cache-dit.dbcache-taylorseer"]
    assert missing["status"] == "unavailable" and missing["value"] is None and not missing["counts"]
    assert "cachekit_no_such_package is not installed" in missing["reason"]
    # peers ran on copies and were removed: the bench leaves the pipeline unhooked
    assert [n for m in pipe.transformer.modules() for n in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})] \
        == []


def test_files_for_machines_and_people(bench):
    report, out = bench
    for name in ("bench.json", "bench.md", "bench.png", "eval/report.json", "eval/grid.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "bench.json").read_text())
    assert on_disk["format"] == "cachekit.bench" and on_disk["plot"] == "bench.png"
    assert [r["name"] for r in on_disk["rows"]] == [r["name"] for r in report["rows"]]
    assert _rows(on_disk)["full"]["metrics"]["psnr"] == "inf"  # JSON has no inf
    calibration = PolicyCalibration.load(out / on_disk["calibration"]["teacache"]["file"])
    assert calibration.policy == "teacache" and calibration.num_steps == STEPS
    md = (out / "bench.md").read_text()
    assert "| method | setting | status | speedup | MAC ratio | fid ↓ | clip ↑ | psnr ↑ |" in md
    assert "| diffusers.fbcache | threshold=0 | no-skip |" in md and "cachekit_no_such_package is not installed" in md
    assert "block linear calls skipped" in md and "![quality vs speedup](bench.png)" in md
    memory = on_disk["memory"]  # the process's peak, for the person sizing a machine for the bench
    assert isinstance(memory["peak_rss_kib"], int) and memory["peak_rss_kib"] > 0
    assert memory["cuda_max_allocated_bytes"] is None  # measured on CUDA only
    assert f"- memory: {memory['peak_rss_kib'] / 1024:.0f} MiB peak resident" in md


def test_the_step_skipping_baseline_runs_at_least_two_steps_below_the_run():
    sweep = get_sweep("steps")
    assert [sweep.values(28, s, None) for s in (20, 6, 5, 4)] == [(10, 6), (3, 2), (2,), (2,)]
    with pytest.raises(ValueError, match="at least 2 steps below the run's 3"):
        sweep.values(28, 3, None)


def test_selections_parse_names_and_numbers():
    assert parse_selection(["fora=2,3", "teacache", "fora"], ["fora", "teacache"], "policy") == \
        (["fora", "teacache"], {"fora": (2, 3)})
    for bad in ("fora=two", "fora=", "fora=nan", "fora=true"):
        with pytest.raises(UsageError, match="give numbers after '='"):
            parse_selection([bad], ["fora"], "policy")
    with pytest.raises(UsageError, match="unknown peer 'x'; known: a, b"):
        parse_selection(["x=1"], ["a", "b"], "peer")


def test_bad_selections_fail_before_any_work(pipe):
    with pytest.raises(UsageError, match="unknown policy 'fora3'"):
        run_bench(pipe, ["a 3"], STEPS, "psnr", policies=["fora3"])
    with pytest.raises(ValueError, match="not selected"):
        run_bench(pipe, ["a 3"], STEPS, "psnr", policies=["fora"], policy_knobs={"tgate": (2,)}, peers=[])
    with pytest.raises(ValueError, match=r"tgate at gate_step=\[0\]: TGATE gate_step must be >= 1"):
        run_bench(pipe, ["a 3"], STEPS, "psnr", policies=["tgate"], policy_knobs={"tgate": (0,)}, peers=[],
                  progress=False)
    with pytest.raises(UsageError, match="no peer 'teacache'"):
        run_bench(pipe, ["a 3"], STEPS, "psnr", peers=["teacache"])
    with pytest.raises(UsageError, match="fewer steps means 2 to 3, not 1"):
        run_bench(pipe, ["a 3"], STEPS, "psnr", policies=["steps"], policy_knobs={"steps": (1,)}, peers=[],
                  progress=False)


def test_cli_help_error_and_a_tiny_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        cachekit_main(["bench", "--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    assert "usage: cachekit bench" in shown and "--no-peers" in shown and "cache-dit.dbcache" in shown

    assert cachekit_main(["bench", "--peers", "diffusers.fbcache", "nosuch", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown peer 'nosuch'" in err
    assert cachekit_main(["bench", "--policies", "fora=two", "--out", str(tmp_path)]) == 2
    assert "give numbers after '='" in capsys.readouterr().err

    out = tmp_path / "cli"
    assert cachekit_main(["bench", "--policies", "fora=2,3", "--no-peers", "--schedule", "tgate:gate_step=2",
                          "--num", "2", "--batch-size", "2", "--steps", str(STEPS), "--metrics", "psnr",
                          "--no-latency", "--grid", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fora:interval=3 [ok]" in printed and "bench.json" in printed
    report = json.loads((out / "bench.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["uncached", "fora:interval=2", "fora:interval=3",
                                                   "tgate:gate_step=2"]
    assert report["x_axis"] == "compute_speedup" and report["peers"] == {}
    assert all(r["macs_ratio"] < 1 for r in report["rows"][1:])
    assert (out / "bench.png").is_file() and (out / "bench.md").is_file()


def test_cli_default_step_skipping_at_four_steps(tmp_path, capsys):
    """`cachekit bench --steps 4` once died with an IndexError: its step-skipping baseline ran PixArt's DPM-Solver
    at 1 step. It runs 2 (half of 4; a third of 4 would be 1)."""
    out = tmp_path / "steps"
    assert cachekit_main(["bench", "--policies", "steps", "--no-peers", "--num", "2", "--batch-size", "2",
                          "--steps", str(STEPS), "--metrics", "psnr", "--no-latency", "--grid", "0",
                          "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["uncached", "steps:num_inference_steps=2"]
    fewer = report["rows"][1]
    assert fewer["status"] == "ok" and 0.4 < fewer["macs_ratio"] < 0.7 and math.isfinite(fewer["metrics"]["psnr"])
    assert report["memory"]["peak_rss_kib"] > 0
