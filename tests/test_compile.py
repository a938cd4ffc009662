"""Caches under `torch.compile`: exactness, bounded compiles, enable/disable on a compiled model.

The hooks' decisions and bookkeeping run in eager Python (`torch.compiler.disable`) and only the modules' own
forwards are compiled, so the compiled graphs depend on tensor shapes alone. What that buys, tested here on real
dynamo:

- the all-recompute schedule under compile matches the compiled never-hooked model: bitwise with the `aot_eager`
  backend (the same aten ops run, so graph breaks cannot change a value), and within float rounding with inductor,
  whose fused kernels differ where the hooks split the graph (`INDUCTOR_RTOL`, as between compiled and eager);
- a reusing schedule under compile matches the same schedule in eager, within the same rounding;
- the compile bound: a plain generation compiles each piece once, so the number of graphs of a first generation
  does not depend on the step count or the schedule, and later generations (any step count, same shapes) compile
  nothing (`error_on_recompile` holds).

Inductor needs a C++ compiler; the `aot_eager` tests run real dynamo without one.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import cachekit
from tiny_models import TINY_MODELS, Request, build, denoise, serve_together

INDUCTOR_RTOL = 1e-5  # inductor's fused kernels vs the same ops split at the hooks: float rounding over a few steps,
# relative to the output's largest magnitude (float32 epsilon is 1.2e-7)
HAS_CXX = shutil.which("g++") is not None or shutil.which("c++") is not None


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _reuse_mask(model: torch.nn.Module, steps: int, mode: str) -> torch.Tensor:
    """Every other step reuses everything after the first component (component mode) / every block (block mode)."""
    full = cachekit.Schedule.full(model, steps, mode=mode).recompute.clone()
    full[1::2] = False
    if mode == "component":
        full[1::2, :, 0] = True
    return full


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference, relative to the largest magnitude of `b`."""
    return float((a - b).abs().max() / b.abs().max())


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def _generate(model, tiny, plan, steps: int, seed: int = 0) -> torch.Tensor:
    scheduler = tiny.scheduler()
    cachekit.enable(model, plan, scheduler=scheduler)
    try:
        return denoise(model, tiny, steps, seed=seed, scheduler=scheduler)
    finally:
        cachekit.disable(model)


@pytest.mark.parametrize("how", ["regional", "full"])
@pytest.mark.parametrize("mode", ["component", "block"])
def test_all_recompute_under_compile_is_bitwise_the_compiled_unhooked_model(how, mode):
    name = "PixArtTransformer2DModel"
    tiny, model = TINY_MODELS[name], build(name)
    cachekit.compile(model, how, backend="aot_eager")
    reference = denoise(model, tiny, 4)
    out = _generate(model, tiny, cachekit.Schedule.full(model, 4, mode=mode), 4)
    assert torch.equal(out, reference)
    assert torch.equal(denoise(model, tiny, 4), reference)  # disabled: the compiled model as before


@pytest.mark.skipif(not HAS_CXX, reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("how", ["regional", "full"])
def test_inductor_all_recompute_and_reuse_match_within_rounding(how):
    name = "PixArtTransformer2DModel"
    tiny, model = TINY_MODELS[name], build(name)
    eager_reference = denoise(model, tiny, 4)
    reuse = cachekit.Schedule.from_mask(model, _reuse_mask(model, 4, "component"))
    eager_reused = _generate(model, tiny, reuse, 4)

    cachekit.compile(model, how)  # inductor
    reference = denoise(model, tiny, 4)
    out = _generate(model, tiny, cachekit.Schedule.full(model, 4), 4)
    assert _gap(out, reference) <= INDUCTOR_RTOL
    reused = _generate(model, tiny, reuse, 4)
    assert _gap(reused, eager_reused) <= INDUCTOR_RTOL
    assert _gap(reused, reference) > 100 * INDUCTOR_RTOL  # the reuse itself still shows
    assert _gap(reference, eager_reference) <= INDUCTOR_RTOL


@pytest.mark.parametrize("name, mode", [("PixArtTransformer2DModel", "component"), ("PixArtTransformer2DModel", "block"),
                                        ("FluxTransformer2DModel", "block"), ("WanTransformer3DModel", "component")])
def test_reusing_schedule_under_compile_equals_eager(name, mode):
    tiny, model = TINY_MODELS[name], build(name)
    schedule = cachekit.Schedule.from_mask(model, _reuse_mask(model, 4, mode), mode=mode)
    eager = _generate(model, tiny, schedule, 4, seed=1)
    cachekit.compile(model, "regional", backend="aot_eager")
    assert torch.equal(_generate(model, tiny, schedule, 4, seed=1), eager)


@pytest.mark.parametrize("name, how", [("PixArtTransformer2DModel", "regional"), ("PixArtTransformer2DModel", "full"),
                                       ("FluxTransformer2DModel", "regional"), ("WanTransformer3DModel", "full")])
def test_compiles_are_bounded_independent_of_step_count(name, how):
    """The bound: a first generation compiles G graphs, and every later generation at the same shapes compiles none,
    whatever its step count, seed or plan of the same mode (all-recompute or reusing). So G does not depend
    on the step count: the graphs a first generation at 8 or 3 steps would compile are among those of 4 steps."""
    tiny, model = TINY_MODELS[name], build(name)
    cachekit.compile(model, how, backend="aot_eager")
    plan = "fora:interval=2,mode=component"
    _generate(model, tiny, plan, 4)
    first = _graphs()
    assert first > 0
    with torch._dynamo.config.patch(error_on_recompile=True):
        _generate(model, tiny, plan, 8, seed=1)  # another step count and seed: nothing new to compile
        _generate(model, tiny, cachekit.Schedule.full(model, 3), 3)  # nor for another plan of the same mode
    assert _graphs() == first


def test_rows_at_different_steps_under_compile_equal_eager_and_stop_compiling():
    """The runner's mixed batches: rows computing alone change the batch size; dynamo's automatic dynamic shapes
    compile a piece at most twice (the first size, then a size-generic graph), so a second identical serving
    compiles nothing."""
    name = "PixArtTransformer2DModel"
    tiny, model = TINY_MODELS[name], build(name)
    plan = cachekit.resolve_plan("fora:interval=2,mode=component")
    requests = [Request("a", 4, plan, seed=1), Request("b", 3, plan, seed=2, arrival=1),
                Request("c", 2, None, seed=3, arrival=1)]
    cachekit.enable(model, None)
    eager = serve_together(model, tiny, requests)
    cachekit.disable(model)
    cachekit.compile(model, "regional", backend="aot_eager")
    cachekit.enable(model, None)
    compiled = serve_together(model, tiny, requests)
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = serve_together(model, tiny, requests)
    cachekit.disable(model)
    for key in eager:
        assert torch.equal(compiled[key], eager[key]) and torch.equal(again[key], eager[key])


def test_enable_and_disable_on_a_compiled_model_and_through_torch_compile_wrapper():
    name = "WanTransformer3DModel"
    tiny, model = TINY_MODELS[name], build(name)
    wrapped = torch.compile(model, backend="aot_eager")  # the OptimizedModule wrapper, not the instance
    reference = denoise(wrapped, tiny, 4)
    schedule = cachekit.Schedule.from_mask(model, _reuse_mask(model, 4, "component"))
    scheduler = tiny.scheduler()
    cachekit.enable(wrapped, schedule, scheduler=scheduler)
    assert cachekit.sessions(model)  # the hooks sit on the instance inside
    reused = denoise(wrapped, tiny, 4, scheduler=scheduler)
    assert cachekit.sessions(wrapped)[0].stats.reused > 0
    cachekit.disable(wrapped)
    assert not cachekit.sessions(model)
    assert not torch.equal(reused, reference)
    assert torch.equal(denoise(wrapped, tiny, 4), reference)
    assert torch.equal(denoise(model, tiny, 4), reference)  # eager, never compiled: the same ops, the same values


def test_compile_rejects_unknown_mode_and_fullgraph():
    model = build("WanTransformer3DModel")
    with pytest.raises(ValueError, match="regional, full"):
        cachekit.compile(model, "everything")
    with pytest.raises(ValueError, match="fullgraph"):
        cachekit.compile(model, fullgraph=True)
