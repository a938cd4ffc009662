"""Coverage families through their stock pipeline's `__call__`: step tracking, CFG branches kept apart, caches freed.

`test_techniques` runs every technique over each coverage transformer in a plain denoising loop; here the family's
own pipeline drives it, with its scheduler, its CFG convention (both branches batched in one forward, or one forward
per branch, named by `cache_context` or not) and its step callback. The cases are in `stock_pipelines*.py`.
"""

from __future__ import annotations

import diffusers
import pytest
import torch

import cachekit
from cachekit.coverage import PIPELINE_TESTS
from stock_pipelines import StockCase
import stock_pipelines
import stock_pipelines_hunyuan
import stock_pipelines_qwen
import stock_pipelines_t5
import stock_pipelines_vl
import stock_pipelines_wan

STOCK_CASES: list[StockCase] = [*stock_pipelines.CASES, *stock_pipelines_t5.CASES, *stock_pipelines_wan.CASES,
                                *stock_pipelines_qwen.CASES, *stock_pipelines_hunyuan.CASES, *stock_pipelines_vl.CASES]

STEPS = 6


def test_the_families_are_distinct():
    assert len({case.family for case in STOCK_CASES}) == len(STOCK_CASES)


@pytest.mark.parametrize("case", STOCK_CASES, ids=[case.family for case in STOCK_CASES])
def test_a_coverage_family_through_its_stock_pipeline_call(case: StockCase):
    """Nothing reused is bit-exact with the stock call, FORA reuses; the two CFG branches hold one cache each
    (two cache keys after every step with CFG, one without) and the caches are freed after the last step."""
    pipe = case.build()
    model = getattr(pipe, case.denoiser)
    assert PIPELINE_TESTS[type(model).__name__].split()[0] == type(pipe).__name__  # the coverage table
    forwards = []
    model.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(
        (args[0] if args else kwargs["hidden_states"]).shape[0]), with_kwargs=True)
    live_keys = []

    def count_keys(*args):
        live_keys.append(len(cachekit.sessions(model)[0].cached_keys()))
        return args[-1]  # callback_on_step_end hands back its callback_kwargs

    after_each_step = {case.step_callback: count_keys} if case.step_callback else {}

    def keys_after_each_step(guidance: dict) -> torch.Tensor:
        """A call under the cache; with no step callback, the count after each step's last forward."""
        if case.step_callback:
            return call(guidance, **after_each_step)
        after_forward = []
        probe = model.register_forward_hook(lambda *args: after_forward.append(
            len(cachekit.sessions(model)[0].cached_keys())))
        out = call(guidance)
        probe.remove()
        per_step = 2 if guidance is case.cfg and case.cfg_forwards == "two calls" else 1
        live_keys.extend(after_forward[per_step - 1::per_step])
        return out

    def call(guidance: dict, **extra):
        if case.guider_scales:
            from diffusers.guiders import ClassifierFreeGuidance

            guider = ClassifierFreeGuidance(guidance_scale=case.guider_scales[guidance is case.no_cfg])
            if isinstance(pipe, diffusers.ModularPipeline):
                pipe.update_components(guider=guider)
            else:
                pipe.register_modules(guider=guider)
        out = pipe(**case.inputs, num_inference_steps=STEPS, output_type="pt",
                   generator=torch.Generator().manual_seed(0), **case.kwargs, **guidance, **extra)
        return getattr(out, case.output)

    reference = call(case.cfg)
    assert forwards == ([2] * STEPS if case.cfg_forwards == "batched" else [1] * (2 * STEPS))
    with cachekit.cached(model, "fora:interval=1", scheduler=pipe.scheduler):
        exact = call(case.cfg)
    assert torch.equal(exact, reference)
    with cachekit.cached(model, "fora:interval=2", scheduler=pipe.scheduler):
        reused = keys_after_each_step(case.cfg)
        keys_after_each_step(case.no_cfg)
        session = cachekit.sessions(model)[0]
        assert session.stats.reused > 0 and session.cached_entries == 0  # freed after the last step
    assert cachekit.sessions(model) == []
    # after each step but the last (whose end frees them): one cache key per branch, two with CFG, one without
    assert live_keys[: STEPS - 1] == [2] * (STEPS - 1) and live_keys[STEPS: 2 * STEPS - 1] == [1] * (STEPS - 1)
    assert torch.isfinite(reused).all() and not torch.equal(reused, reference)
