"""Static policies (FORA, Delta-DiT, TGATE): the masks they build, and that they run exactly as scheduled."""

from __future__ import annotations

import pytest
import torch

import cachekit
from cachekit.policies import (
    DeltaDiTConfig,
    FORAConfig,
    TGATEConfig,
    delta_dit_schedule,
    fora_schedule,
    static_schedule,
    tgate_schedule,
)
from tiny_models import TINY_MODELS, build, denoise


@pytest.fixture(scope="module")
def pixart():
    return build("PixArtTransformer2DModel")


def test_fora_computes_every_interval(pixart):
    schedule = fora_schedule(pixart, 10, FORAConfig(interval=3))
    assert schedule.mode == "block" and schedule.provenance == {"method": "policy", "policy": "fora", "interval": 3,
                                                                "mode": "block"}
    assert schedule.recompute[:, :, 0].all(1).nonzero().flatten().tolist() == [0, 3, 6, 9]
    assert not schedule.recompute[[1, 2, 4, 5, 7, 8]].any()
    component = fora_schedule(pixart, 10, FORAConfig(interval=2, mode="component"))
    assert component.components == ("attn1", "attn2", "ff") and component.compute_fraction() == 0.5
    with pytest.raises(ValueError, match="interval must be >= 1"):
        FORAConfig(interval=0)


def test_delta_dit_caches_back_then_front_blocks(pixart):
    schedule = delta_dit_schedule(pixart, 8, DeltaDiTConfig(boundary_step=4, num_cached_blocks=1, interval=2))
    computed = schedule.recompute[:, :, 0]
    # steps 1, 3 (before the boundary): last block cached; steps 5, 7: first block cached; even steps compute all
    assert computed.tolist() == [
        [True, True, True], [True, True, False], [True, True, True], [True, True, False],
        [True, True, True], [False, True, True], [True, True, True], [False, True, True],
    ]
    with pytest.raises(ValueError, match="exceeds the model's 3 blocks"):
        delta_dit_schedule(pixart, 8, DeltaDiTConfig(num_cached_blocks=4))


def test_tgate_caches_cross_attention_after_gate(pixart):
    schedule = tgate_schedule(pixart, 6, TGATEConfig(gate_step=2))
    attn2 = schedule.components.index("attn2")
    assert schedule.recompute[:2, :, attn2].all() and not schedule.recompute[2:, :, attn2].any()
    others = [c for c in range(3) if c != attn2]
    assert schedule.recompute[:, :, others].all()
    with pytest.raises(ValueError, match="needs separate cross-attention.*FluxTransformer2DModel"):
        tgate_schedule(build("FluxTransformer2DModel"), 6)


def test_static_schedule_by_name_rejects_unknown_options(pixart):
    assert static_schedule("fora", pixart, 6, interval=2).num_steps == 6
    with pytest.raises(ValueError, match="unknown static policy"):
        static_schedule("nope", pixart, 6)
    with pytest.raises(ValueError, match="not \\['every'\\]"):
        static_schedule("fora", pixart, 6, every=2)


@pytest.mark.parametrize("policy", ["fora", "delta-dit", "tgate"])
def test_policy_schedule_runs_and_skips_what_it_says(policy):
    name = "PixArtTransformer2DModel"
    tiny = TINY_MODELS[name]
    model = build(name)
    options = {"fora": {"interval": 2}, "delta-dit": {"boundary_step": 3, "num_cached_blocks": 1, "interval": 2},
               "tgate": {"gate_step": 3}}[policy]
    schedule = static_schedule(policy, model, 6, **options)
    scheduler = tiny.scheduler()
    reference = denoise(model, tiny, 6)
    with cachekit.cached(model, schedule, scheduler=scheduler):
        out = denoise(model, tiny, 6, scheduler=scheduler)
        stats = cachekit.sessions(model)[0].stats
    batch = 2
    expected_reused = int((~schedule.effective)[:, schedule.present].sum()) * batch
    assert stats.reused == expected_reused and stats.misses == 0
    assert not torch.equal(out, reference)
