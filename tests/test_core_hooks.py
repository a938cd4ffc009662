"""The caching hooks on tiny configs of every registered diffusers transformer class."""

from __future__ import annotations

import pytest
import torch

import cachekit
from cachekit.cost import MacProfile, count_macs
from cachekit.hooks import session_of
from cachekit.registry import supported_models
from tiny_models import TINY_MODELS, build, denoise

NUM_STEPS = 6
ALL_MODELS = sorted(TINY_MODELS)


def test_every_registered_class_has_a_tiny_model():
    assert sorted(supported_models()) == ALL_MODELS


def _reuse_mask(schedule: cachekit.Schedule) -> torch.Tensor:
    """FORA-like: recompute every 3rd step; and the last block's first component always computes."""
    mask = torch.zeros_like(schedule.recompute)
    mask[::3] = True
    mask[:, -1, 0] = True
    return mask


def _run(model, tiny, plan=None, **kwargs):
    if plan is None:
        return denoise(model, tiny, NUM_STEPS, **kwargs)
    scheduler = tiny.scheduler()
    with cachekit.cached(model, plan, scheduler=scheduler):
        return denoise(model, tiny, NUM_STEPS, scheduler=scheduler, **kwargs)


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("mode", ["component", "block"])
def test_full_schedule_is_exact_and_reuse_changes_output(name, mode):
    tiny = TINY_MODELS[name]
    model = build(name)
    reference = _run(model, tiny)
    full = cachekit.Schedule.full(model, NUM_STEPS, mode=mode)
    assert torch.equal(_run(model, tiny, full), reference)

    reuse = cachekit.Schedule.from_mask(model, _reuse_mask(full), mode=mode)
    cached_out = _run(model, tiny, reuse)
    assert not torch.allclose(cached_out, reference)
    assert torch.isfinite(cached_out).all()
    # disable restores exactness: the model computes what a never-hooked model computes
    assert torch.equal(_run(model, tiny), reference)
    assert torch.equal(_run(build(name), tiny), reference)


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("mode", ["component", "block"])
def test_counted_macs_match_prediction(name, mode):
    tiny = TINY_MODELS[name]
    model = build(name)
    gen = torch.Generator().manual_seed(0)
    latents = tiny.latents(2, gen)
    profile = MacProfile.measure(
        model, latents, timestep=torch.full((2,), 500.0) / tiny.timestep_scale, return_dict=False,
        **tiny.conditioning(2, gen),
    )
    schedule = cachekit.Schedule.full(model, NUM_STEPS, mode=mode)
    schedule = cachekit.Schedule.from_mask(model, _reuse_mask(schedule), mode=mode)
    predicted = profile.predict(schedule)
    assert 0.0 < predicted < 1.0

    with count_macs() as uncached:
        _run(model, tiny)
    with count_macs() as cached_run:
        _run(model, tiny, schedule)
    measured = cached_run.macs / uncached.macs
    assert uncached.macs == profile.total * NUM_STEPS
    assert measured == pytest.approx(predicted, rel=0.01)


@pytest.mark.parametrize("name", ["PixArtTransformer2DModel", "FluxTransformer2DModel", "WanTransformer3DModel"])
def test_cfg_branches_never_share_caches(name):
    tiny = TINY_MODELS[name]
    model = build(name)
    schedule = cachekit.Schedule.from_mask(model, _reuse_mask(cachekit.Schedule.full(model, NUM_STEPS)))
    from cachekit.registry import resolve_layout

    # block 1's second component: its input already depends on the branch's conditioning
    component = getattr(resolve_layout(model).blocks[1].module, schedule.components[1])
    seen: list[tuple[str, torch.Tensor]] = []
    current = {}

    def record(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        seen.append((current["label"], out.detach().clone()))

    handle = component.register_forward_hook(record)
    try:
        _run(model, tiny, schedule, branches=("cond", "uncond"), on_call=lambda step, label: current.update(label=label))
    finally:
        handle.remove()

    assert len(seen) == 2 * NUM_STEPS
    by_label = {"cond": [o for l, o in seen if l == "cond"], "uncond": [o for l, o in seen if l == "uncond"]}
    for step in range(NUM_STEPS):
        last_compute = step - step % 3
        for label, other in (("cond", "uncond"), ("uncond", "cond")):
            assert torch.equal(by_label[label][step], by_label[label][last_compute])
            assert not torch.equal(by_label[label][step], by_label[other][last_compute])


@pytest.mark.parametrize("name", ["PixArtTransformer2DModel", "FluxTransformer2DModel"])
def test_rows_at_different_steps_share_a_forward(name):
    """Stream Batch: request A at a reuse step and request B at step 0 in one batch."""
    tiny = TINY_MODELS[name]
    model = build(name)
    gen = torch.Generator().manual_seed(3)
    latents = tiny.latents(2, gen)
    cond = tiny.conditioning(2, gen)
    t = torch.tensor([900.0, 700.0]) / tiny.timestep_scale
    mask = torch.ones(NUM_STEPS, *cachekit.Schedule.full(model, NUM_STEPS).recompute.shape[1:], dtype=torch.bool)
    mask[1] = False
    schedule = cachekit.Schedule.from_mask(model, mask)

    def row(i, tree):
        return {k: (v[i : i + 1] if isinstance(v, torch.Tensor) and v.shape[0] == 2 else v) for k, v in tree.items()}

    with torch.no_grad():
        expected_b = model(latents[1:], timestep=t[1:], return_dict=False, **row(1, cond))[0]
        expected_a_step0 = model(latents[:1], timestep=t[:1], return_dict=False, **row(0, cond))[0]
        cachekit.enable(model, schedule)
        try:
            with cachekit.rows(model, steps=[0], keys=["A"], num_steps=NUM_STEPS):
                a0 = model(latents[:1], timestep=t[:1], return_dict=False, **row(0, cond))[0]
            with cachekit.rows(model, steps=[1, 0], keys=["A", "B"], num_steps=NUM_STEPS):
                both = model(latents, timestep=t, return_dict=False, **cond)[0]
            stats = cachekit.sessions(model)[0].stats
        finally:
            cachekit.disable(model)
    assert torch.equal(a0, expected_a_step0)
    # B computed everything on its own row: identical to running B alone
    assert torch.allclose(both[1:], expected_b, atol=1e-5)
    # A reused every component from step 0 with the same inputs: identical to its step-0 output
    assert torch.allclose(both[:1], expected_a_step0, atol=1e-5)
    assert stats.reused > 0 and stats.misses == 0


def test_interrupted_generation_leaves_no_cache_and_next_is_exact():
    name = "PixArtTransformer2DModel"
    tiny = TINY_MODELS[name]
    model = build(name)
    schedule = cachekit.Schedule.from_mask(model, _reuse_mask(cachekit.Schedule.full(model, NUM_STEPS)))
    expected = _run(build(name), tiny, schedule, seed=1)

    scheduler = tiny.scheduler()
    cachekit.enable(model, schedule, scheduler=scheduler)
    session = cachekit.sessions(model)[0]
    calls = {"n": 0}

    def explode(module, args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("user pressed ctrl-c mid-loop")

    block = model.transformer_blocks[1]
    handle = block.register_forward_pre_hook(explode)
    with pytest.raises(KeyboardInterrupt):
        denoise(model, tiny, NUM_STEPS, seed=7, scheduler=scheduler)
    handle.remove()
    assert session.cached_entries == 0

    # an exception outside the transformer (a step callback) is cleared by the next generation's first step
    def fail(step):
        if step == 2:
            raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError):
        denoise(model, tiny, NUM_STEPS, seed=7, scheduler=scheduler, on_step=fail)
    assert session.cached_entries > 0
    cachekit.reset(model)
    assert session.cached_entries == 0
    with pytest.raises(RuntimeError):
        denoise(model, tiny, NUM_STEPS, seed=7, scheduler=scheduler, on_step=fail)
    assert torch.equal(denoise(model, tiny, NUM_STEPS, seed=1, scheduler=scheduler), expected)
    assert session.cached_entries == 0  # the last step frees every row's cache
    cachekit.disable(model)


def test_callback_exception_inside_context_manager_frees_caches():
    name = "DiTTransformer2DModel"
    tiny = TINY_MODELS[name]
    model = build(name)
    schedule = cachekit.Schedule.from_mask(model, _reuse_mask(cachekit.Schedule.full(model, NUM_STEPS)))
    scheduler = tiny.scheduler()
    sessions = []

    def fail(step):
        sessions.extend(cachekit.sessions(model))
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        with cachekit.cached(model, schedule, scheduler=scheduler):
            denoise(model, tiny, NUM_STEPS, scheduler=scheduler, on_step=fail)
    assert sessions and sessions[0].cached_entries == 0
    assert cachekit.sessions(model) == []


def test_enable_twice_raises_and_disable_is_idempotent():
    model = build("PixArtTransformer2DModel")
    schedule = cachekit.Schedule.full(model, NUM_STEPS)
    cachekit.enable(model, schedule)
    with pytest.raises(RuntimeError, match="already enabled"):
        cachekit.enable(model, schedule)
    cachekit.disable(model)
    cachekit.disable(model)
    assert cachekit.sessions(model) == []


def test_wrong_model_and_wrong_step_count_raise_clear_errors():
    pixart = build("PixArtTransformer2DModel")
    dit = build("DiTTransformer2DModel")
    schedule = cachekit.Schedule.full(pixart, NUM_STEPS)
    with pytest.raises(cachekit.ScheduleError, match="made for PixArtTransformer2DModel.*DiTTransformer2DModel"):
        cachekit.enable(dit, schedule)
    assert cachekit.sessions(dit) == []

    tiny = TINY_MODELS["PixArtTransformer2DModel"]
    scheduler = tiny.scheduler()
    with cachekit.cached(pixart, schedule, scheduler=scheduler):
        with pytest.raises(cachekit.ScheduleError, match="schedule has 6 steps but the pipeline runs 4"):
            denoise(pixart, tiny, 4, scheduler=scheduler)


def test_unsupported_model_lists_supported_and_how_to_add():
    with pytest.raises(TypeError, match="Supported: .*PixArtTransformer2DModel.*register_model"):
        cachekit.Schedule.full(torch.nn.Linear(2, 2), 4)


def test_bare_transformer_without_scheduler_explains_how_to_give_the_step():
    name = "PixArtTransformer2DModel"
    model = build(name)
    with cachekit.cached(model, cachekit.Schedule.full(model, NUM_STEPS)):
        with pytest.raises(RuntimeError, match="cannot tell the denoising step"):
            denoise(model, TINY_MODELS[name], NUM_STEPS)


@pytest.mark.parametrize("mode", ["component", "block"])
def test_static_plans_store_only_values_that_a_later_step_reads(mode):
    """An all-recompute schedule keeps nothing (no per-row bookkeeping on its forwards); a reusing one keeps a value
    only at the step right before a reuse, and the result is the same as keeping everything would give."""
    name = "PixArtTransformer2DModel"
    tiny = TINY_MODELS[name]
    model = build(name)
    full = cachekit.Schedule.full(model, NUM_STEPS, mode=mode)
    reuse = cachekit.Schedule.from_mask(model, _reuse_mask(full), mode=mode)
    for plan, expect_stored in ((full, False), (reuse, True)):
        scheduler = tiny.scheduler()
        entries = []
        with cachekit.cached(model, plan, scheduler=scheduler):
            session = session_of(model)
            denoise(model, tiny, NUM_STEPS, scheduler=scheduler, on_step=lambda _: entries.append(
                session.cached_entries))
        assert (max(entries) > 0) == expect_stored, (plan, entries)
    # the same reuse served from a forecast-free runtime copy that keeps every value gives the same output
    keep_all = reuse.with_forecast(1, where=torch.zeros_like(full.recompute))
    assert torch.equal(_run(model, tiny, reuse), _run(model, tiny, keep_all))


@pytest.mark.parametrize("mode", ["component", "block"])
def test_forwards_that_compute_everything_are_known_when_they_begin(mode):
    """A step where every hook computes and nothing is kept for a later step is marked when its forward begins, so
    the hooks run the stock forward without deciding per call; the counts and the output stay those of deciding."""
    name = "PixArtTransformer2DModel"
    tiny, model = TINY_MODELS[name], build(name)
    full = cachekit.Schedule.full(model, NUM_STEPS, mode=mode)
    mask = full.recompute.clone()
    mask[3] = False  # step 3 reuses everything: step 2 keeps its values for it
    reuse = cachekit.Schedule.from_mask(model, mask, mode=mode)
    hooked, batch = int(full.recompute[0].sum()), 2
    for plan, expected in ((full, [True] * NUM_STEPS), (reuse, [True, True, False, False, True, True])):
        scheduler, marked = tiny.scheduler(), []
        with cachekit.cached(model, plan, scheduler=scheduler):
            session = session_of(model)
            first_block = model.transformer_blocks[0]
            probe = first_block.register_forward_pre_hook(
                lambda module, args: marked.append(session.current_rows().computes_all))
            try:
                out = denoise(model, tiny, NUM_STEPS, batch=batch, scheduler=scheduler)
            finally:
                probe.remove()
            stats = session.stats
        assert marked == expected, (plan, marked)
        if plan is full:
            assert torch.equal(out, denoise(model, tiny, NUM_STEPS, batch=batch))
            assert stats.reused == 0 and stats.computed == NUM_STEPS * hooked * batch
        else:
            assert stats.reused == hooked * batch
            assert stats.computed == (NUM_STEPS - 1) * hooked * batch


@pytest.mark.parametrize("name", ["PixArtTransformer2DModel", "SanaTransformer2DModel", "WanTransformer3DModel"])
def test_feeders_of_a_reused_component_are_skipped_and_change_nothing(name):
    """The registry's feeders (the norm in front of an attention or feed-forward) are skipped when every row
    reuses their component, and the output is exactly what computing them gives."""
    from dataclasses import replace

    from cachekit.registry import register_model, spec_for

    tiny = TINY_MODELS[name]
    model = build(name)
    spec = spec_for(model)
    assert any(group.feeders for group in spec.groups)
    without = type(f"NoFeeders{name}", (type(model),), {})  # the same model, registered without feeders
    register_model(replace(spec, class_name=without.__name__,
                           groups=tuple(replace(g, feeders=()) for g in spec.groups)), overwrite=True)
    plain = without.from_config(model.config).eval()
    plain.load_state_dict(model.state_dict())

    full = cachekit.Schedule.full(model, NUM_STEPS, mode="component")
    mask = torch.zeros_like(full.recompute)
    mask[::2] = True  # every other step reuses every component
    skipped, skipped_norms, _ = _count_layer_norms(lambda: _run(model, tiny, cachekit.Schedule.from_mask(model, mask)))
    computed, computed_norms, _ = _count_layer_norms(
        lambda: _run(plain, tiny, cachekit.Schedule.from_mask(plain, mask)))
    assert torch.equal(skipped, computed)
    feeders = sum(1 for group in spec.groups for block in getattr(model, group.attr) for _, names in group.feeders
                  for n in names if not isinstance(getattr(block, n, None), (type(None), torch.nn.Identity)))
    reuse_steps = int((~mask[:, 0, 0]).sum())  # one transformer call per step
    assert feeders > 0 and computed_norms - skipped_norms == reuse_steps * feeders
    assert torch.equal(_run(model, tiny), _run(build(name), tiny))


@pytest.mark.parametrize("name", ["PixArtTransformer2DModel", "WanTransformer3DModel"])
def test_skipped_feeders_shrink_the_modulation_in_front_of_a_reused_component(name):
    """Where the registry says the modulation after a feeder broadcasts, a skipped feeder hands on one token per row:
    the block's live modulation then runs on that token alone, and the output is still exact."""
    from dataclasses import replace

    from cachekit.registry import register_model, spec_for

    tiny = TINY_MODELS[name]
    model = build(name)
    spec = spec_for(model)
    assert all(group.feeders_broadcast for group in spec.groups if group.feeders)
    whole = type(f"WholeFeeders{name}", (type(model),), {})  # the same model, its skipped feeders passing every token
    register_model(replace(spec, class_name=whole.__name__,
                           groups=tuple(replace(g, feeders_broadcast=False) for g in spec.groups)), overwrite=True)
    plain = whole.from_config(model.config).eval()
    plain.load_state_dict(model.state_dict())

    full = cachekit.Schedule.full(model, NUM_STEPS, mode="component")
    mask = torch.zeros_like(full.recompute)
    mask[::2] = True
    one_token, norms, fewer = _count_layer_norms(lambda: _run(model, tiny, cachekit.Schedule.from_mask(model, mask)))
    every_token, same_norms, more = _count_layer_norms(
        lambda: _run(plain, tiny, cachekit.Schedule.from_mask(plain, mask)))
    assert torch.equal(one_token, every_token)
    assert norms == same_norms and fewer < more


def _count_layer_norms(fn):
    """`fn()`, how many layer norms it ran (counted at the torch function level, where a skipped module is not) and
    how many tensor elements all its torch functions produced."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        calls = 0
        elements = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.layer_norm:
                Count.calls += 1
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor):
                Count.elements += result.numel()
            return result

    with Count():
        out = fn()
    return out, Count.calls, Count.elements


@pytest.mark.parametrize("name", ["PixArtTransformer2DModel", "FluxTransformer2DModel"])
def test_unlabelled_cfg_calls_keep_their_branches_apart(name):
    """Two transformer calls per step with no branch named (Chroma's, Krea 2's stock loops) get caches of their own:
    the result equals the same loop with each call labelled."""
    tiny = TINY_MODELS[name]
    model = build(name)
    full = cachekit.Schedule.full(model, NUM_STEPS, mode="component")
    reuse = cachekit.Schedule.from_mask(model, _reuse_mask(full), mode="component")
    labelled = _run(model, tiny, reuse, branches=("cond", "uncond"))
    unlabelled = _run(model, tiny, reuse, branches=("cond", "uncond"), label_branches=False)
    assert torch.equal(unlabelled, labelled)
    assert not torch.equal(labelled, _run(model, tiny, branches=("cond", "uncond")))
