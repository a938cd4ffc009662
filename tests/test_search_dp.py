"""The DP solver: exact against brute force, the BAC / CacheQuant modes on matrices with known optima, the global
budget, Bubbling Union, and solved schedules that run on a tiny real PixArt with the predicted cost."""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import pytest
import torch

import cachekit
from cachekit.cost import count_macs
from cachekit.schedule import Schedule
from cachekit.search.calibrate import Calibration, calibrate_transformer
from cachekit.search.cli import add_parser
from cachekit.search.dp import (
    InfeasibleError,
    SolverConfig,
    bubbling_union,
    schedule_error,
    solve,
    solve_units,
    volatility,
)
from tiny_models import TINY_MODELS, build, denoise

PIXART = "PixArtTransformer2DModel"


# ---------------------------------------------------------------------------------------------------------- helpers
def brute_force(err: np.ndarray, penalty: float, min_stretch: int, max_stretch: int | None, forced: tuple[int, ...],
                min_updates: int | None, max_updates: int | None) -> tuple[float, np.ndarray | None]:
    """Enumerate every mask of one unit; return the least `error + penalty * computes` among admissible ones."""
    steps = err.shape[0]
    best, best_mask = np.inf, None
    for bits in itertools.product((False, True), repeat=steps - 1):
        mask = np.array((True, *bits))
        if not admissible(mask, min_stretch, max_stretch, forced, min_updates, max_updates):
            continue
        computes = np.flatnonzero(mask)
        error, source = 0.0, 0
        for t in range(steps):
            if mask[t]:
                source = t
            else:
                error += err[source, t]
        value = error + penalty * len(computes)
        if value < best - 1e-12:
            best, best_mask = value, mask
    return best, best_mask


def admissible(mask: np.ndarray, min_stretch: int, max_stretch: int | None, forced: tuple[int, ...],
               min_updates: int | None, max_updates: int | None) -> bool:
    """The constraints as documented: stretch = a compute step and the reuses after it, up to the next compute."""
    steps = len(mask)
    computes = np.flatnonzero(mask)
    lengths = np.diff(np.append(computes, steps))
    return bool(
        mask[0]
        and all(mask[f % steps] for f in forced)
        and (lengths <= (max_stretch or steps)).all()
        and (lengths[:-1] >= min_stretch).all()  # the last stretch is cut off by the end of sampling
        and not (min_updates and len(computes) < min_updates)
        and not (max_updates and len(computes) > max_updates)
    )


def synthetic(rel_l1: np.ndarray, cosine: np.ndarray | None = None, macs: np.ndarray | None = None,
              latency: np.ndarray | None = None, outside: float = 0.1, components=("attn1", "attn2", "ff"),
              ) -> Calibration:
    """A calibration with given `[blocks, components, T, T]` errors and per-unit costs (outside: the rest's share)."""
    blocks, comps, steps, _ = rel_l1.shape
    macs = np.full((blocks, comps), 900.0) if macs is None else macs * 900.0  # MAC totals are integers
    latency = macs / 900.0 if latency is None else latency
    total = macs.sum() / (1 - outside)
    return Calibration(
        model_class=PIXART, mode="component", components=tuple(components),
        present=torch.ones(blocks, comps, dtype=torch.bool), num_steps=steps,
        rel_l1=torch.tensor(np.triu(rel_l1, 1)), cosine=torch.tensor(np.triu(rel_l1 if cosine is None else cosine, 1)),
        pair_counts=torch.ones(steps, steps), num_samples=1,
        latency=torch.tensor(latency, dtype=torch.float64),
        latency_remainder=float(latency.sum() / (1 - outside) - latency.sum()),
        macs={"model_class": PIXART, "components": tuple(components), "total": int(round(total)),
              "per_component": torch.tensor(macs, dtype=torch.float64),
              "per_block": torch.tensor(macs.sum(1), dtype=torch.float64)},
        meta={"scheduler": "DPMSolverMultistepScheduler"},
    )


def computes(solution, block: int, comp: int) -> list[int]:
    return solution.schedule.recompute[:, block, comp].nonzero().flatten().tolist()


# ---------------------------------------------------------------------------------------------------------- one unit
CASES = [  # steps, penalty, min_stretch, max_stretch, forced, min_updates, max_updates
    (12, 0.05, 1, None, (0, -1), None, None),
    (12, 0.0, 2, 4, (0,), 4, 4),
    (11, 0.1, 1, 3, (0, 5, -1), None, 6),
    (10, 0.2, 3, 6, (0,), 2, None),
    (12, 0.3, 2, 5, (0, -1), None, None),
    (9, 0.0, 1, None, (0,), 3, 3),
    (8, 0.0, 1, None, (0,), None, None),
]


@pytest.mark.parametrize("steps,penalty,min_stretch,max_stretch,forced,min_updates,max_updates", CASES)
def test_dp_equals_brute_force(steps, penalty, min_stretch, max_stretch, forced, min_updates, max_updates):
    rng = np.random.default_rng(steps * 100 + min_stretch)
    err = np.triu(rng.random((3, steps, steps)) * rng.uniform(0.2, 2.0, (3, 1, 1)), 1)
    solution = solve_units(err, penalty, min_stretch=min_stretch, max_stretch=max_stretch, forced=forced,
                           min_updates=min_updates, max_updates=max_updates)
    for u in range(3):
        best, _ = brute_force(err[u], penalty, min_stretch, max_stretch, forced, min_updates, max_updates)
        mask = solution.masks[u]
        assert solution.error[u] + penalty * solution.updates[u] == pytest.approx(best, abs=1e-9)
        # the DP's own mask is admissible and scores what it claims
        assert admissible(mask, min_stretch, max_stretch, forced, min_updates, max_updates)
        assert solution.error[u] == pytest.approx(schedule_error(err[u : u + 1], mask[None])[0])


def test_infeasible_constraints_are_reported():
    err = np.triu(np.ones((1, 4, 4)), 1)
    assert brute_force(err[0], 0.0, 2, 2, (0, -1), None, None)[1] is None
    with pytest.raises(InfeasibleError, match=r"no 4-step schedule has stretches in \[2, 2\]"):
        solve_units(err, 0.0, min_stretch=2, max_stretch=2, forced=(0, -1))


def test_error_is_measured_against_the_cached_step_not_the_previous_one():
    # serving step 2 from step 0 is bad even though steps 1 -> 2 barely change
    err = np.zeros((1, 3, 3))
    err[0, 0, 1], err[0, 1, 2], err[0, 0, 2] = 0.1, 0.0, 5.0
    assert schedule_error(err, np.array([[True, False, False]]))[0] == pytest.approx(5.1)
    solution = solve_units(err, 0.5, forced=(0,))
    assert solution.masks[0].tolist() == [True, True, False]  # compute at 1, serve 2 from it: 0 + 2 * 0.5


# ---------------------------------------------------------------------------------------------------------- modes
def phase_errors(steps: int, starts: list[int], blocks: int = 2, comps: int = 3) -> np.ndarray:
    """Reuse is free within a phase and costs 1 across phases: the best computes are the phase starts."""
    phase = np.searchsorted(starts, np.arange(steps), side="right")
    err = (phase[:, None] != phase[None, :]).astype(float) + 1e-3 * np.abs(np.subtract.outer(np.arange(steps),
                                                                                              np.arange(steps)))
    return np.broadcast_to(err, (blocks, comps, steps, steps)).copy()


def test_bac_computes_at_phase_starts_with_s_updates():
    calib = synthetic(np.zeros((2, 3, 10, 10)), cosine=phase_errors(10, [0, 4, 7]))
    solution = solve(calib, SolverConfig.from_preset("bac", updates=3))
    for b, c in itertools.product(range(2), range(3)):
        assert computes(solution, b, c) == [0, 4, 7]
    assert solution.schedule.provenance["preset"] == "bac" and solution.schedule.provenance["metric"] == "cosine"
    assert solution.predicted_error == pytest.approx(6 * 1e-3 * (1 + 2 + 3 + 1 + 2 + 1 + 2))


def test_bac_maximises_summed_similarity():
    rng = np.random.default_rng(3)
    steps, updates = 9, 4
    similarity = rng.uniform(0.5, 1.0, (steps, steps))
    calib = synthetic(np.zeros((1, 1, steps, steps)), cosine=(1 - similarity)[None, None], components=("ff",))
    solution = solve(calib, SolverConfig.from_preset("bac", updates=updates))
    mask = solution.schedule.recompute[:, 0, 0].numpy()
    best = max(  # BAC's objective: the summed similarity of skipped steps to the step they are served from
        sum(similarity[max(s for s in chosen if s <= t), t] for t in range(steps) if t not in chosen)
        for chosen in ((0, *rest) for rest in itertools.combinations(range(1, steps), updates - 1))
    )
    source = np.maximum.accumulate(np.where(mask, np.arange(steps), 0))
    achieved = sum(similarity[source[t], t] for t in range(steps) if not mask[t])
    assert mask.sum() == updates and achieved == pytest.approx(best)


def test_cachequant_interval_gives_uniform_stretches_for_uniform_drift():
    steps = 12
    drift = np.abs(np.subtract.outer(np.arange(steps), np.arange(steps))).astype(float)  # err grows with distance
    calib = synthetic(np.broadcast_to(drift, (2, 3, steps, steps)).copy())
    solution = solve(calib, SolverConfig.from_preset("cachequant", interval=3))
    assert all(computes(solution, b, c) == [0, 3, 6, 9] for b in range(2) for c in range(3))
    provenance = solution.schedule.provenance
    assert provenance["preset"] == "cachequant" and provenance["shared"] and provenance["interval_used"] == 3


def test_cachequant_stretch_limits_match_brute_force():
    rng = np.random.default_rng(7)
    steps, interval = 12, 2.5  # ceil(12 / 2.5) = 5 updates, stretches in [2, 5]
    rel_l1 = np.triu(rng.random((2, 3, steps, steps)), 1)
    calib = synthetic(rel_l1)
    solution = solve(calib, SolverConfig.from_preset("cachequant", interval=interval))
    best, best_mask = brute_force(rel_l1.sum((0, 1)), 0.0, 2, 5, (0,), 5, 5)
    mask = solution.schedule.recompute[:, 0, 0].numpy()
    assert solution.predicted_error == pytest.approx(best)
    assert (solution.schedule.recompute == torch.from_numpy(mask)[:, None, None]).all()  # one model-wide schedule
    assert mask.sum() == 5 and np.diff(np.append(np.flatnonzero(mask), steps))[:-1].min() >= 2


def test_fixed_count_modes_take_the_most_updates_the_budget_allows():
    steps = 10
    calib = synthetic(phase_errors(steps, [0, 4, 7]), outside=0.1)
    for mode in ("bac", "cachequant"):
        solution = solve(calib, SolverConfig.from_preset(mode, budget=0.46))
        # cost = 0.1 + 0.9 * S / 10 <= 0.46  =>  S = 4
        assert solution.updates.min() == solution.updates.max() == 4, mode
        assert solution.mac_ratio == pytest.approx(0.1 + 0.9 * 0.4)
    assert solve(calib, SolverConfig.from_preset("cachequant", budget=0.46)).schedule.provenance["interval_used"] == 2.5


# ---------------------------------------------------------------------------------------------------------- budget
def test_global_budget_spends_updates_where_errors_are_large():
    steps = 12
    rng = np.random.default_rng(0)
    drift = np.triu(np.abs(np.subtract.outer(np.arange(steps), np.arange(steps))) + rng.random((steps, steps)), 1)
    scale = np.array([[10.0, 1.0, 0.1]])[..., None, None]  # attn1 drifts most, ff least
    calib = synthetic(np.broadcast_to(drift, (1, 3, steps, steps)) * scale)
    errors, ratios = [], []
    for budget in (0.9, 0.7, 0.5, 0.3):
        solution = solve(calib, budget=budget)
        assert solution.mac_ratio <= budget + 1e-9 and solution.cost_ratio == solution.mac_ratio
        assert solution.schedule.predicted_cost["mac_ratio"] == pytest.approx(solution.mac_ratio, abs=1e-6)
        assert solution.schedule.recompute[-1].all()  # the default mode forces the last step
        attn1, attn2, ff = solution.updates[0]
        assert attn1 >= attn2 >= ff
        errors.append(solution.predicted_error)
        ratios.append(solution.mac_ratio)
    assert errors == sorted(errors) and ratios == sorted(ratios, reverse=True)
    assert ratios[-1] > 0.25  # the budget is met without wasting it


def test_latency_budget_uses_measured_latency():
    steps = 10
    drift = np.triu(np.abs(np.subtract.outer(np.arange(steps), np.arange(steps))).astype(float), 1)
    rel_l1 = np.broadcast_to(drift, (1, 2, steps, steps)).copy()
    macs, latency = np.array([[1.0, 1.0]]), np.array([[9.0, 1.0]])  # same MACs, the first unit is 9x slower
    calib = synthetic(rel_l1, macs=macs, latency=latency, components=("attn1", "ff"))
    by_macs = solve(calib, budget=0.5)
    by_latency = solve(calib, budget=0.5, cost="latency")
    assert by_macs.updates[0, 0] == by_macs.updates[0, 1]
    assert by_latency.updates[0, 0] < by_latency.updates[0, 1]
    assert by_latency.latency_ratio <= 0.5 + 1e-9 and by_latency.cost_ratio == by_latency.latency_ratio


def test_max_updates_caps_every_unit():
    calib = synthetic(phase_errors(10, [0, 3, 5, 7, 9]))
    solution = solve(calib, budget=0.95, max_updates=3)
    assert solution.updates.max() <= 3


def test_unreachable_budget_is_a_clear_error():
    calib = synthetic(phase_errors(10, [0, 5]), outside=0.3)
    with pytest.raises(InfeasibleError, match="below the cheapest schedule") as err:
        solve(calib, budget=0.2)
    assert "0.300" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InfeasibleError, match="below the cheapest bac schedule"):
        solve(calib, SolverConfig.from_preset("bac", budget=0.2))


@pytest.mark.parametrize("overrides,message", [
    ({}, "needs a budget"),
    ({"budget": 0.0}, r"fraction of the uncached cost in \(0, 1\]"),
    ({"budget": 0.5, "updates": 3}, "either a budget or a fixed number of updates"),
    ({"budget": 0.5, "metric": "l2"}, "unknown error metric 'l2'"),
    ({"budget": 0.5, "min_stretch": 3, "max_stretch": 2}, r"max_stretch \(2\) is below min_stretch \(3\)"),
    ({"budget": 0.5, "bubble_threshold": 0.1, "bubble_top_k": 1}, "either bubble_threshold or bubble_top_k"),
])
def test_bad_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        solve(synthetic(phase_errors(6, [0, 3])), **overrides)
    with pytest.raises(ValueError, match="unknown solver mode 'fast'"):
        SolverConfig.from_preset("fast")


# ---------------------------------------------------------------------------------------------------------- bubbling
def test_bubbling_union_adds_downstream_feed_forward_steps():
    masks = np.zeros((6, 8), dtype=bool)
    masks[:, 0] = True
    masks[1, 2] = masks[3, 4] = masks[5, 6] = True  # feed-forwards of blocks 0, 1, 2
    masks[2, 5] = True  # an attention of block 1
    blocks = np.array([0, 0, 1, 1, 2, 2])
    ff = np.array([False, True, False, True, False, True])
    selected = np.array([False, True, False, False, False, False])
    out = bubbling_union(masks, blocks, ff, selected)
    assert np.flatnonzero(out[1]).tolist() == [0, 2, 4, 6]  # its own, plus the later feed-forwards'
    assert (np.delete(out, 1, 0) == np.delete(masks, 1, 0)).all()  # nothing else changes
    bubbled_all = bubbling_union(masks, blocks, ff, ff)
    assert np.flatnonzero(bubbled_all[3]).tolist() == [0, 4, 6] and np.flatnonzero(bubbled_all[5]).tolist() == [0, 6]


def test_bubbling_threshold_selects_volatile_feed_forwards_within_budget():
    steps = 10
    drift = np.triu(np.abs(np.subtract.outer(np.arange(steps), np.arange(steps))).astype(float), 1)
    scale = np.array([[1.0, 1.0, 8.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.5]])[..., None, None]
    calib = synthetic(np.broadcast_to(drift, (3, 3, steps, steps)) * scale)
    vol = volatility((np.broadcast_to(drift, (3, 3, steps, steps)) * scale).reshape(9, steps, steps))
    threshold = float(vol[2]) * 0.99  # block 0's ff only
    solution = solve(calib, budget=0.6, bubble_threshold=threshold)
    assert solution.details["bubbled"].tolist() == [False, False, True] + [False] * 6
    assert solution.schedule.provenance["bubbled_units"] == 1 and solution.mac_ratio <= 0.6 + 1e-9
    recompute = solution.schedule.recompute
    later_ff = recompute[:, 1:, 2].any(1)
    assert bool((recompute[:, 0, 2] | ~later_ff).all())  # computes whenever a later block's ff does
    top = solve(calib, budget=0.6, bubble_top_k=1)
    assert top.details["bubbled"].tolist() == solution.details["bubbled"].tolist()


# ---------------------------------------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def pixart():
    model = build(PIXART)
    scheduler = TINY_MODELS[PIXART].scheduler()
    calib = calibrate_transformer(
        model, lambda: denoise(model, TINY_MODELS[PIXART], num_steps=8, batch=2, scheduler=scheduler), 8,
        scheduler=scheduler, progress=False,
    )
    return model, scheduler, calib


def test_solved_schedule_runs_with_the_predicted_macs(pixart, tmp_path):
    model, scheduler, calib = pixart
    solution = solve(calib, budget=0.5)
    schedule = solution.schedule
    schedule.validate_for(model, 8)
    assert schedule.provenance["method"] == "solver" and schedule.scheduler == "DPMSolverMultistepScheduler"
    assert schedule.predicted_cost["mac_ratio"] == pytest.approx(calib.mac_profile().predict(schedule), abs=1e-6)
    assert "latency_ratio" in schedule.predicted_cost
    run = lambda: denoise(model, TINY_MODELS[PIXART], num_steps=8, batch=2, scheduler=scheduler)  # noqa: E731
    with count_macs() as uncached:
        run()
    with cachekit.cached(model, schedule, scheduler=scheduler), count_macs() as cached:
        run()
    assert cached.macs / uncached.macs == pytest.approx(schedule.predicted_cost["mac_ratio"], abs=0.01)
    schedule.save(tmp_path / "s.json")
    assert Schedule.load(tmp_path / "s.json") == schedule


def test_block_mode_calibration_solves_block_schedules(pixart):
    model, scheduler, _ = pixart
    calib = calibrate_transformer(
        model, lambda: denoise(model, TINY_MODELS[PIXART], num_steps=8, batch=2, scheduler=scheduler), 8,
        scheduler=scheduler, mode="block", progress=False,
    )
    solution = solve(calib, SolverConfig.from_preset("bac", budget=0.6))
    assert solution.schedule.mode == "block" and solution.schedule.components == ("block",)
    solution.schedule.validate_for(model, 8)
    assert solution.mac_ratio <= 0.6 and solution.schedule.predicted_cost["mac_ratio"] == pytest.approx(
        solution.mac_ratio, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="cachekit")
    add_parser(root.add_subparsers(dest="command", required=True))
    return root


def test_cli_solve_writes_a_schedule(pixart, tmp_path, capsys):
    _, _, calib = pixart
    calib.save(tmp_path / "calib.pt")
    out = tmp_path / "schedule.json"
    for mode in ("default", "bac", "cachequant"):
        args = parser().parse_args(["solve", "--calibration", str(tmp_path / "calib.pt"), "--budget", "0.5",
                                    "--preset", mode, "--out", str(out)])
        assert args.handler(args) == 0
        schedule = Schedule.load(out)
        assert schedule.provenance["preset"] == mode and schedule.predicted_cost["mac_ratio"] <= 0.5
        assert f"wrote {out}: {mode} preset, predicted MAC ratio" in capsys.readouterr().out
    args = parser().parse_args(["solve", "--calibration", str(tmp_path / "calib.pt"), "--updates", "3", "--force",
                                "0", "5", "--bubble-top-k", "1", "--out", str(out)])
    args.handler(args)
    schedule = Schedule.load(out)
    assert schedule.provenance["forced"] == [0, 5] and schedule.recompute[5].all()


def test_cli_solve_errors(pixart, tmp_path, capsys):
    with pytest.raises(SystemExit):  # checked while parsing, before anything is read
        parser().parse_args(["solve", "--calibration", str(tmp_path / "nope.pt"), "--budget", "0.4", "--out",
                             str(tmp_path / "s.json")])
    assert "calibration file not found" in capsys.readouterr().err
    pixart[2].save(tmp_path / "calib.pt")
    args = parser().parse_args(["solve", "--calibration", str(tmp_path / "calib.pt"), "--out", str(tmp_path / "s.json"),
                                "--budget", "0.4", "--updates", "3"])
    with pytest.raises(ValueError, match="either a budget or a fixed number of updates"):
        args.handler(args)
    assert not (tmp_path / "s.json").exists()
    with pytest.raises(SystemExit):
        parser().parse_args(["solve", "--calibration", str(tmp_path / "calib.pt"), "--out", "s.json", "--budget",
                             "1.5"])
    assert "must be a fraction in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser().parse_args(["solve", "--help"])
    assert "Bubbling Union" in capsys.readouterr().out
