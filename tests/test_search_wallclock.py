"""The wall-clock cost model: its features, its fit, and a real fit on the bundled digits pipeline.

No timing is asserted: the fit is checked for exactness on known data, and for consistency on measured data.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cachekit
from cachekit.policies import FORAConfig, fora_schedule
from cachekit.search.fitness import PipelineEvaluator
from cachekit.search.wallclock import FEATURES, WallClockModel, _fit, fit_wallclock, probe_schedules, schedule_features
from cachekit.zoo import call_defaults, load_pipeline

STEPS = 4


@pytest.fixture(scope="module")
def evaluator():
    pipe = load_pipeline("digits")
    pipe.set_progress_bar_config(disable=True)
    return PipelineEvaluator(pipe, ["a handwritten 3", "a handwritten 8"], STEPS, cost="wallclock",
                             **call_defaults("digits"))


def test_features_count_computed_work_in_forwards(evaluator):
    transformer = evaluator.pipe.transformer
    full = cachekit.Schedule.full(transformer, STEPS, mode="block")
    assert schedule_features(full, evaluator.profile) == pytest.approx([1.0, STEPS, STEPS, 0.0])
    fora = fora_schedule(transformer, STEPS, FORAConfig(interval=2, mode="block"))
    assert schedule_features(fora, evaluator.profile) == pytest.approx([1.0, 2.0, 2.0, 0.0])
    # computed at steps 0 and 2: step 1 has one point (plain reuse), step 3 two (extrapolates)
    assert schedule_features(fora.with_forecast(1), evaluator.profile)[3] == pytest.approx(1.0)
    longer = fora_schedule(transformer, 7, FORAConfig(interval=2, mode="block")).with_forecast(1)
    assert schedule_features(longer, evaluator.profile)[3] == pytest.approx(2.0)  # steps 3 and 5
    component = cachekit.Schedule.full(transformer, STEPS)  # component mode: MAC-weighted units, blocks touched
    mask = component.recompute.clone()
    mask[1:, :, 0] = False  # self-attention reused after step 0; every block still touched
    partial = cachekit.Schedule.from_mask(transformer, mask)
    x = schedule_features(partial, evaluator.profile)
    assert 1.0 < x[1] < STEPS and x[2] == pytest.approx(STEPS)


def test_non_negative_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    x = np.column_stack([np.ones(12), rng.uniform(0, 20, 12), rng.uniform(0, 20, 12), rng.uniform(0, 5, 12)])
    truth = np.array([0.2, 0.05, 0.01, 0.003])
    assert _fit(x, x @ truth) == pytest.approx(truth, abs=1e-9)


def test_fit_on_the_digits_pipeline_predicts_its_probes(evaluator, tmp_path):
    template = cachekit.Schedule.full(evaluator.pipe.transformer, STEPS, mode="block")
    probes = probe_schedules(template, forecast_order=1)
    assert {"full", "step0-only", "every-2", "every-3+forecast", "random-0.3+forecast"} <= set(probes)
    model = fit_wallclock(evaluator.call, evaluator.apply, probes, evaluator.profile, batch_size=2, repeats=1,
                          progress=False)
    assert set(model.coefficients) == set(FEATURES) and all(c >= 0 for c in model.coefficients.values())
    assert [p["name"] for p in model.probes] == list(probes) and model.uncached_seconds > 0
    assert np.isfinite(model.loo_relative_error)
    evaluator.set_wallclock(model)
    # the cost is the model's prediction, in units of the stock call timed beside the probes
    x = schedule_features(probes["step0-only"], evaluator.profile)
    expected = sum(model.coefficients[name] * v for name, v in zip(FEATURES, x))
    assert evaluator.cost(probes["step0-only"]) == pytest.approx(expected)
    assert model.predict_seconds(probes["step0-only"], evaluator.profile) == pytest.approx(
        expected * model.uncached_seconds)
    model.save(tmp_path / "wallclock.json")
    assert WallClockModel.load(tmp_path / "wallclock.json") == model
    with pytest.raises(ValueError, match="wall-clock model is for"):
        model.ratio(cachekit.Schedule.full(evaluator.pipe.transformer, STEPS), evaluator.profile)  # component mode


def test_clip_constraint_marks_schedules_that_lose_clip_infeasible(evaluator):
    """Tolerance 0: a schedule is feasible exactly when its CLIP score is at least the uncached model's."""
    pipe = evaluator.pipe
    constrained = PipelineEvaluator(pipe, evaluator.prompts, STEPS, clip_tolerance=0.0, **evaluator.call_kwargs)
    template = cachekit.Schedule.full(pipe.transformer, STEPS, mode="block")
    full, reused = constrained.evaluate([template, probe_schedules(template)["step0-only"]])
    assert full.feasible and full.quality == 60.0 and full.details["clip_score"] == pytest.approx(
        constrained.reference_clip)
    shortfall = constrained.reference_clip - reused.details["clip_score"]
    assert reused.feasible == (shortfall <= 0)
    if not reused.feasible:
        assert reused.quality == pytest.approx(-shortfall, abs=1e-3)
    assert constrained.describe()["constraint"] == "clip_score >= uncached - 0"
