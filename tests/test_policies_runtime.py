"""Runtime policies (TeaCache, MagCache, first-block cache): exactness, skip counts, per-row decisions, calibration."""

from __future__ import annotations

import pytest
import torch

import cachekit
from cachekit.policies import (
    FirstBlockCacheConfig,
    FirstBlockCachePolicy,
    MagCacheConfig,
    MagCachePolicy,
    PolicyCalibration,
    TeaCacheConfig,
    TeaCachePolicy,
    resolve_plan,
)
from cachekit.policies.calibration import fit, record_signals
from cachekit.plans import PlanError
from cachekit.state import CallRowKey, StepRows
from tiny_models import TINY_MODELS, build, denoise

NAME = "PixArtTransformer2DModel"
STEPS = 10


def _run(model, plan=None, name=NAME, steps=STEPS):
    tiny = TINY_MODELS[name]
    if plan is None:
        return denoise(model, tiny, steps)
    scheduler = tiny.scheduler()
    with cachekit.cached(model, plan, scheduler=scheduler):
        out = denoise(model, tiny, steps, scheduler=scheduler)
        stats = cachekit.sessions(model)[0].stats
    return out, stats


def _skipped_steps(policy, key=CallRowKey(None, 0)):
    return [step for k, step, skipped in policy.decisions if k == key and skipped]


@pytest.mark.parametrize("name", [NAME, "FluxTransformer2DModel", "WanTransformer3DModel"])
def test_never_skipping_is_exact(name):
    model = build(name)
    reference = _run(model, name=name)
    for policy in (
        TeaCachePolicy(TeaCacheConfig(threshold=0.0)),
        FirstBlockCachePolicy(FirstBlockCacheConfig(threshold=0.0)),
        MagCachePolicy(MagCacheConfig(magnitude_ratios=(1.0,) * STEPS, threshold=0.0)),
    ):
        out, stats = _run(model, policy, name=name)
        assert torch.equal(out, reference), type(policy).__name__
        assert stats.reused == 0 and policy.skipped_steps == 0


def test_first_block_skip_pattern_follows_warmup_and_cap():
    model = build(NAME)
    policy = FirstBlockCachePolicy(FirstBlockCacheConfig(threshold=1e9, warmup_steps=2, max_consecutive_skips=3))
    out, stats = _run(model, policy)
    assert _skipped_steps(policy) == [2, 3, 4, 6, 7, 8]
    blocks = len(model.transformer_blocks)
    rows = 2
    assert stats.reused == 6 * rows * (blocks - 1)  # the first block always runs
    assert not torch.equal(out, _run(model))


def test_teacache_accumulates_rescaled_change():
    model = build(NAME)
    # the polynomial is a constant 0.4: every step adds 0.4; reaching 1.0 runs everything and resets
    policy = TeaCachePolicy(TeaCacheConfig(threshold=1.0, coefficients=(0.0, 0.4)))
    _, stats = _run(model, policy)
    assert _skipped_steps(policy) == [1, 2, 4, 5, 7, 8]  # step 9 is the last step: always computed
    assert stats.reused == 6 * 2 * (len(model.transformer_blocks) - 1)


def test_magcache_retention_error_and_max_skips():
    model = build(NAME)
    steady = MagCachePolicy(MagCacheConfig((1.0,) * STEPS, threshold=0.06, max_skip_steps=3, retention_ratio=0.2))
    _, stats = _run(model, steady)
    assert _skipped_steps(steady) == [2, 3, 4, 6, 7, 8]
    assert stats.reused == 6 * 2 * len(model.transformer_blocks)  # MagCache can skip the first block too
    drifting = MagCachePolicy(MagCacheConfig((0.5,) * STEPS, threshold=0.06))
    _run(model, drifting)
    assert drifting.skipped_steps == 0


def test_decisions_are_per_row():
    policy = FirstBlockCachePolicy(FirstBlockCacheConfig(threshold=0.1, warmup_steps=1))
    states = {}  # what the cache session keeps per request between forwards
    rows0 = StepRows(torch.tensor([0, 0]), ("steady", "odd"), 10).for_forward(states)
    residual = torch.ones(2, 4, 8)
    assert policy._skip_rows(rows0, (residual,)).tolist() == [False, False]
    rows1 = StepRows(torch.tensor([1, 1]), ("steady", "odd"), 10).for_forward(states)
    moved = residual.clone()
    moved[1] *= 3.0  # the odd request's first block changed a lot; the steady one did not
    assert policy._skip_rows(rows1, (moved,)).tolist() == [True, False]


def test_mixed_rows_run_in_one_forward():
    """Two requests in one batch where only one reuses: both get what they would get alone."""
    model = build(NAME)
    tiny = TINY_MODELS[NAME]
    policy = FirstBlockCachePolicy(FirstBlockCacheConfig(threshold=1e9, warmup_steps=1, max_consecutive_skips=1))
    scheduler = tiny.scheduler()
    scheduler.set_timesteps(STEPS)
    gen = torch.Generator().manual_seed(0)
    latents, cond = tiny.latents(2, gen), tiny.conditioning(2, gen)
    t = scheduler.timesteps
    with cachekit.cached(model, policy, scheduler=scheduler), torch.no_grad():
        with cachekit.rows(model, steps=[0], keys=["a"], num_steps=STEPS):
            model(latents[:1], timestep=t[:1], encoder_hidden_states=cond["encoder_hidden_states"][:1],
                  added_cond_kwargs=cond["added_cond_kwargs"])
        with cachekit.rows(model, steps=[1, 0], keys=["a", "b"], num_steps=STEPS):
            both = model(latents, timestep=torch.stack([t[1], t[0]]), return_dict=False, **cond)[0]
        stats = cachekit.sessions(model)[0].stats
    with torch.no_grad():
        b_alone = model(latents[1:], timestep=t[:1], encoder_hidden_states=cond["encoder_hidden_states"][1:],
                        added_cond_kwargs=cond["added_cond_kwargs"], return_dict=False)[0]
    assert [(k, s, skip) for k, s, skip in policy.decisions][-2:] == [("a", 1, True), ("b", 0, False)]
    assert torch.allclose(both[1:], b_alone, atol=1e-5)
    assert stats.reused == len(model.transformer_blocks) - 1


@pytest.mark.parametrize("policy", ["teacache", "magcache", "first-block"])
def test_calibration_round_trips_through_a_file(policy, tmp_path):
    model = build(NAME)
    tiny = TINY_MODELS[NAME]
    scheduler = tiny.scheduler()
    recorder = record_signals(model, lambda: denoise(model, tiny, STEPS, scheduler=scheduler), scheduler=scheduler)
    assert len(recorder.records) == 2 and all(len(steps) == STEPS for steps in recorder.records.values())
    values = fit(policy, recorder, STEPS)
    calibration = PolicyCalibration(policy, NAME, STEPS, values, samples=2)
    path = tmp_path / f"{policy}.json"
    calibration.save(path)
    plan = resolve_plan(str(path), model, STEPS)
    config = plan.config
    if policy == "teacache":
        assert list(config.coefficients) == values["coefficients"] and len(values["coefficients"]) == 5
    elif policy == "magcache":
        ratios = values["magnitude_ratios"]
        assert list(config.magnitude_ratios) == ratios and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    else:
        assert config.threshold == values["threshold"] > 0
    out, _ = _run(model, plan)
    assert torch.isfinite(out).all()


def test_plan_specs():
    model = build(NAME)
    assert resolve_plan("none", model, STEPS) is None
    fora = resolve_plan("fora:interval=2,mode=component", model, STEPS)
    assert isinstance(fora, cachekit.Schedule) and fora.compute_fraction() == 0.5
    tea = resolve_plan("teacache:threshold=0.3", model, STEPS)
    assert isinstance(tea, TeaCachePolicy) and tea.config.threshold == 0.3
    with pytest.raises(ValueError, match="unknown plan 'nope'"):
        resolve_plan("nope", model, STEPS)
    with pytest.raises(ValueError, match="needs calibrated magnitude ratios"):
        resolve_plan("magcache", model, STEPS)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        resolve_plan("fora:3", model, STEPS)
    with pytest.raises(PlanError, match="not found"):
        resolve_plan("missing.json", model, STEPS)


@pytest.mark.parametrize("name", ["CogView4Transformer2DModel", "HunyuanImageTransformer2DModel",
                                  "FluxTransformer2DModel"])
def test_the_policies_signal_is_the_image_stream_whatever_order_the_block_returns(name):
    """CogView4 and HunyuanImage blocks return (hidden_states, encoder_hidden_states), FLUX the other way round: the
    residual a policy judges is the image stream's in both, never the text's (they differ in token count here)."""
    tiny = TINY_MODELS[name]
    model = build(name)
    first = cachekit.registry.resolve_layout(model, "block").blocks[0]
    image_position = first.group.residual_outputs.index("hidden_states")
    outputs = []
    handle = first.module.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        recorder = record_signals(model, lambda: denoise(model, tiny, 3), scheduler=tiny.scheduler())
    finally:
        handle.remove()
    image, text = outputs[0][image_position], outputs[0][1 - image_position]
    assert image.shape[1] != text.shape[1]
    recorded = [record["first_residual"] for steps in recorder.records.values() for record in steps.values()]
    assert len(recorded) == 2 * 3  # two rows, three steps
    assert all(residual.shape == image.shape[1:] for residual in recorded)
