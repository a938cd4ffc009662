"""TaylorSeer-style forecasting on top of any schedule: exact on polynomials, served by the hooks, stored in files."""

from __future__ import annotations

import pytest
import torch

import cachekit
from cachekit.policies import fora_schedule, FORAConfig
from cachekit.registry import resolve_layout
from cachekit.state import RowCache
from tiny_models import TINY_MODELS, build, denoise


def test_newton_forecast_is_exact_on_polynomials_of_its_order():
    cache = RowCache(depth=3)
    keys = ["a", "b"]
    coeffs = torch.randn(2, 5)
    def quadratic(s):
        return torch.full_like(coeffs, 1.5 + 0.3 * s - 0.05 * s * s)

    for step in (0, 3, 6):
        cache.store(keys, quadratic(step) + coeffs, [step, step])
    target = torch.tensor([8, 7])
    out = cache.forecast(keys, target, order=2)
    expected = torch.stack([quadratic(8)[0] + coeffs[0], quadratic(7)[1] + coeffs[1]])
    assert torch.allclose(out, expected, atol=1e-5)
    linear = cache.forecast(keys, target, order=1)  # through steps 3 and 6 only
    slope = (quadratic(6) - quadratic(3)) / 3
    assert torch.allclose(linear, quadratic(6) + coeffs + slope * (target[:, None] - 6), atol=1e-5)
    assert torch.equal(cache.gather(keys), quadratic(6) + coeffs)  # plain reuse: the newest value


def test_forecast_with_too_little_history_reuses():
    cache = RowCache(depth=2)
    cache.store(["a"], torch.ones(1, 3), [0])
    assert torch.equal(cache.forecast(["a"], torch.tensor([2]), order=1), torch.ones(1, 3))


def test_schedule_file_keeps_forecast_entries(tmp_path):
    model = build("PixArtTransformer2DModel")
    schedule = fora_schedule(model, 7, FORAConfig(interval=3, mode="component")).with_forecast(order=2)
    path = tmp_path / "f.json"
    schedule.save(path)
    text = path.read_text()
    assert '"fff fff fff"' in text and '"forecast_order": 2' in text
    loaded = cachekit.Schedule.load(path)
    assert loaded == schedule and torch.equal(loaded.forecast, ~schedule.recompute)
    with pytest.raises(cachekit.ScheduleError, match="order must be >= 1"):
        schedule.with_forecast(order=0)


@pytest.mark.parametrize("name", ["PixArtTransformer2DModel", "FluxTransformer2DModel"])
def test_hooks_serve_linear_extrapolation(name):
    tiny = TINY_MODELS[name]
    model = build(name)
    steps = 7
    schedule = fora_schedule(model, steps, FORAConfig(interval=3, mode="component")).with_forecast(order=1)
    component = getattr(resolve_layout(model).blocks[1].module, schedule.components[0])
    outputs = []
    handle = component.register_forward_hook(
        lambda m, a, o: outputs.append((o[0] if isinstance(o, tuple) else o).detach().clone())
    )
    scheduler = tiny.scheduler()
    try:
        with cachekit.cached(model, schedule, scheduler=scheduler):
            forecast_out = denoise(model, tiny, steps, scheduler=scheduler)
    finally:
        handle.remove()
    # computed at 0, 3, 6; at step 4 and 5 the hook serves f(3) + (f(3) - f(0)) / 3 * (step - 3)
    f0, f3 = outputs[0], outputs[3]
    for step in (4, 5):
        assert torch.allclose(outputs[step], f3 + (f3 - f0) / 3 * (step - 3), atol=1e-5)
    assert torch.equal(outputs[1], outputs[0])  # only one computed point yet: plain reuse
    with cachekit.cached(model, fora_schedule(model, steps, FORAConfig(interval=3, mode="component")),
                         scheduler=scheduler):
        reuse_out = denoise(model, tiny, steps, scheduler=scheduler)
    assert not torch.equal(forecast_out, reuse_out) and torch.isfinite(forecast_out).all()


def test_plan_spec_adds_forecast_to_any_static_policy():
    from cachekit.policies import resolve_plan

    model = build("PixArtTransformer2DModel")
    plain = resolve_plan("fora:interval=3", model, 7)
    forecast = resolve_plan("fora:interval=3,forecast=1", model, 7)
    assert plain.forecast is None and forecast.forecast_order == 1
    assert torch.equal(forecast.recompute, plain.recompute) and torch.equal(forecast.forecast, ~plain.recompute)
    assert resolve_plan("delta-dit:num_cached_blocks=1,forecast=2", model, 7).forecast_order == 2
