"""Every technique over every registered model: static and runtime policies, forecasting, both modes, calibration,
a tiny search, and many requests in one forward (see `cache_tester.py` for the four checks each technique gets)."""

from __future__ import annotations

import pytest
import torch

import cachekit
from cache_tester import COVERAGE_MODELS, MODELS, STEPS, CacheTechniqueTester, run
from cachekit.policies import (
    FirstBlockCacheConfig,
    FirstBlockCachePolicy,
    MagCacheConfig,
    MagCachePolicy,
    TeaCacheConfig,
    TeaCachePolicy,
)
from cachekit.policies.calibration import fit, record_signals
from cachekit.search.calibrate import calibrate_transformer
from cachekit.search.genetic import SearchConfig, run_search, write_outputs
from tiny_models import TINY_MODELS, Request, TinyLoopEvaluator, build, denoise, serve_together, solo


# ------------------------------------------------------------------------------------------------ static policies
class TestFORA(CacheTechniqueTester):
    def plan(self, model, reuse):
        return cachekit.resolve_plan(f"fora:interval={3 if reuse else 1}", model, STEPS)


class TestDeltaDiT(CacheTechniqueTester):
    def plan(self, model, reuse):
        return cachekit.resolve_plan(f"delta-dit:boundary_step=3,num_cached_blocks={1 if reuse else 0},interval=2",
                                     model, STEPS)


class TestTGATE(CacheTechniqueTester):
    def plan(self, model, reuse):
        return cachekit.resolve_plan(f"tgate:gate_step={2 if reuse else STEPS}", model, STEPS)

    def not_applicable(self, model):
        from cachekit.registry import resolve_layout, spec_for

        cross = {c for group in spec_for(model).groups for c in group.cross_attention}
        layout = resolve_layout(model)
        present = any(bool(layout.present[:, layout.components.index(c)].any()) for c in cross
                      if c in layout.components)
        return None if present else "cross-attention"


class TestStaticPolicyByNameAtAnyStepCount(CacheTechniqueTester):
    """A policy spec enabled before the step count is known builds its schedule for the step count it meets."""

    def plan(self, model, reuse):
        return f"fora:interval={2 if reuse else 1}"


# ------------------------------------------------------------------------------------------------ runtime policies
class TestTeaCache(CacheTechniqueTester):
    def plan(self, model, reuse):
        return TeaCachePolicy(TeaCacheConfig(threshold=1.0 if reuse else 0.0, coefficients=(0.0, 0.4)))


class TestMagCache(CacheTechniqueTester):
    def plan(self, model, reuse):
        return MagCachePolicy(MagCacheConfig((1.0,) * STEPS, threshold=0.06 if reuse else 0.0))


class TestFirstBlockCache(CacheTechniqueTester):
    def plan(self, model, reuse):
        return FirstBlockCachePolicy(FirstBlockCacheConfig(threshold=1e9 if reuse else 0.0, warmup_steps=1))


# ------------------------------------------------------------------------------------------------ forecasting
class TestForecastOrder1(CacheTechniqueTester):
    order = 1

    def plan(self, model, reuse):
        return cachekit.resolve_plan(f"fora:interval={3 if reuse else 1},forecast={self.order}", model, STEPS)

    def test_forecast_differs_from_plain_reuse(self, model, name):
        forecast, _ = run(model, name, self.plan(model, True))
        plain, _ = run(model, name, cachekit.resolve_plan("fora:interval=3", model, STEPS))
        assert not torch.equal(forecast, plain)


class TestForecastOrder2(TestForecastOrder1):
    order = 2


# ------------------------------------------------------------------------------------------------ both modes
class TestComponentMode(CacheTechniqueTester):
    mode = "component"

    def plan(self, model, reuse):
        full = cachekit.Schedule.full(model, STEPS, mode=self.mode)
        if not reuse:
            return full
        mask = torch.zeros_like(full.recompute)
        mask[::3] = True
        mask[:, -1, 0] = True  # one unit always computes: partial reuse within a step
        return cachekit.Schedule.from_mask(model, mask, mode=self.mode)


class TestBlockMode(TestComponentMode):
    mode = "block"


# ------------------------------------------------------------------------------------------------ calibration
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("mode", ["component", "block"])
def test_calibration_is_exact_and_measures_every_unit(name, mode):
    _check_calibration(build(name), name, mode)


def _check_calibration(model, name, mode):
    tiny = TINY_MODELS[name]
    scheduler = tiny.scheduler()
    reference, _ = run(model, name)
    seen = []
    calibration = calibrate_transformer(
        model, lambda: seen.append(denoise(model, tiny, STEPS, scheduler=scheduler)), STEPS, scheduler=scheduler,
        mode=mode, progress=False)
    assert torch.equal(seen[0], reference)  # recording changes nothing the model computes
    assert cachekit.sessions(model) == []
    present = calibration.present
    errors = calibration.rel_l1[present]  # [units, steps, steps]
    assert torch.all(errors.diagonal(dim1=-2, dim2=-1) == 0)
    assert torch.all(errors[:, 0, -1] > 0)  # reusing step 0's output at the last step costs something
    assert torch.all(calibration.latency[present] > 0) and calibration.macs["total"] > 0


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("policy", ["teacache", "magcache", "first-block"])
def test_runtime_policy_calibration_fits_every_model(name, policy):
    _check_runtime_calibration(build(name), name, [policy])


def _check_runtime_calibration(model, name, policies):
    tiny = TINY_MODELS[name]
    scheduler = tiny.scheduler()
    recorder = record_signals(model, lambda: denoise(model, tiny, STEPS, scheduler=scheduler), scheduler=scheduler)
    for policy in policies:
        values = fit(policy, recorder, STEPS)
        plan = cachekit.policies.runtime_policy(policy, None,
                                                **{k: v for k, v in values.items() if k != "change_quantiles"})
        out, _ = run(model, name, plan)
        assert torch.isfinite(out).all(), policy


# ------------------------------------------------------------------------------------------------ a tiny search
@pytest.mark.parametrize("name", MODELS)
def test_a_tiny_block_search_finds_valid_schedules(name, tmp_path):
    model = build(name)
    template = cachekit.Schedule.full(model, STEPS, mode="block")
    seeds = {f"fora-{k}": cachekit.resolve_plan(f"fora:interval={k}", model, STEPS) for k in (2, 3)}
    evaluator = TinyLoopEvaluator(model, name, STEPS)
    result = run_search(evaluator, template, seeds, SearchConfig(population=8, generations=1, seed=0,
                                                                quality_floor=0.0), tmp_path, progress=False)
    assert result.front and result.evaluations >= len(seeds)
    assert min(p["cost"] for p in result.front) < 1.0  # something on the front reuses work
    costs = [p["cost"] for p in result.front]
    qualities = [p["quality"] for p in result.front]
    assert costs == sorted(costs) and qualities == sorted(qualities)  # a front: dearer points are better
    for file in write_outputs(result, template, tmp_path):
        schedule = cachekit.Schedule.load(tmp_path / file)
        assert schedule.mode == "block" and schedule.validate_for(model, STEPS) is None


# ------------------------------------------------------------------------------------------------ many requests
@pytest.mark.parametrize("name", MODELS)
def test_mixed_requests_in_one_forward_equal_their_solo_calls(name):
    _check_mixed_requests(build(name), name)


def _check_mixed_requests(model, name):
    tiny = TINY_MODELS[name]
    requests = [
        Request("block", 6, cachekit.resolve_plan("fora:interval=2"), seed=1),
        Request("component", 5, cachekit.resolve_plan("fora:interval=2,mode=component"), seed=2, arrival=1),
        Request("policy", 6, FirstBlockCachePolicy(FirstBlockCacheConfig(threshold=1e9, warmup_steps=1)), seed=3),
        Request("uncached", 4, None, seed=4, arrival=2),
    ]
    expected = {r.key: solo(model, tiny, r) for r in requests}
    with cachekit.cached(model, None):
        together = serve_together(model, tiny, requests)
        assert cachekit.sessions(model)[0].cached_entries == 0
    for key, value in expected.items():
        assert torch.allclose(together[key], value, atol=1e-4, rtol=1e-3), key


# ------------------------------------------------------------------------------------------------ coverage classes
TECHNIQUES = sorted((cls for cls in list(globals().values()) if isinstance(cls, type)
                     and issubclass(cls, CacheTechniqueTester) and cls.__name__.startswith("Test")),
                    key=lambda cls: cls.__name__)


@pytest.mark.parametrize("name", COVERAGE_MODELS)
def test_every_technique_on_every_coverage_class(name):
    """Each coverage class through every technique's four checks (`CacheTechniqueTester.sweep`), both modes'
    calibration, the runtime policies' calibration, and many requests in one forward: one test per class, one
    model build and one uncached reference shared by all."""
    model = build(name)
    reference, _ = run(model, name)
    acted = [technique.__name__ for technique in TECHNIQUES
             if technique().sweep(model, name, reference, check_restore=False)]
    assert len(acted) >= len(TECHNIQUES) - 1  # only TGATE may not apply (no text cross-attention)
    assert torch.equal(run(model, name)[0], reference)  # every technique, once disabled, left nothing behind
    for mode in ("component", "block"):
        _check_calibration(model, name, mode)
    _check_runtime_calibration(model, name, ["teacache", "magcache", "first-block"])
    _check_mixed_requests(model, name)
