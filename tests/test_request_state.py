"""Request-scoped cache state: many requests in one forward, each with its own steps, plan and cache lifetime."""

from __future__ import annotations

import threading

import pytest
import torch

import cachekit
from cachekit.policies import FirstBlockCacheConfig, FirstBlockCachePolicy, TeaCacheConfig, TeaCachePolicy
from cachekit.state import CallRowKey, RowCache
from tiny_models import TINY_MODELS, Request, build, denoise, serve_together, solo, tiny_pixart_pipeline

NAME = "PixArtTransformer2DModel"
TOLERANCE = dict(atol=1e-5, rtol=1e-4)
"""Batched and solo forwards run different matrix shapes, so float32 results may differ in the last bits."""


def _component_schedule(model, steps):
    full = cachekit.Schedule.full(model, steps)
    mask = torch.zeros_like(full.recompute)
    mask[::2] = True
    return cachekit.Schedule.from_mask(model, mask)


def test_rows_of_different_step_counts_and_plans_share_a_forward_and_each_equals_its_solo_call():
    model = build(NAME)
    tiny = TINY_MODELS[NAME]
    requests = [
        Request("fora-6", 6, cachekit.plans.resolve_plan("fora:interval=2"), seed=1),
        Request("component-4", 4, _component_schedule(model, 4), seed=2, arrival=1),
        Request("uncached-5", 5, None, seed=3, arrival=2),
        Request("teacache-6", 6, TeaCachePolicy(TeaCacheConfig(threshold=1.0, coefficients=(0.0, 0.4))), seed=4),
        Request("forecast-7", 7, cachekit.plans.resolve_plan("fora:interval=3,forecast=1"), seed=5, arrival=3),
        Request("same-seed-other-plan", 6, None, seed=1),  # same noise as fora-6, no cache: its own result
    ]
    solos = {r.key: solo(model, tiny, r) for r in requests}
    sizes = []
    with cachekit.cached(model, None):
        session = cachekit.sessions(model)[0]
        assert session.modes == ("component", "block")
        together = serve_together(model, tiny, requests, after_forward=lambda tick, keys: sizes.append(len(keys)))
        assert session.cached_entries == 0 and not session.request_states  # every request ended with its last step
    assert max(sizes) >= 5  # requests really shared forwards
    for request in requests:
        assert torch.allclose(together[request.key], solos[request.key], **TOLERANCE), request.key
    assert not torch.allclose(together["fora-6"], together["same-seed-other-plan"], **TOLERANCE)
    assert stats_of(requests, solos)


def stats_of(requests, solos):
    """Sanity: the cached requests really differ from their uncached selves (the plans acted)."""
    model = build(NAME)
    tiny = TINY_MODELS[NAME]
    plain = {r.key: solo(model, tiny, Request(r.key, r.num_steps, None, r.seed)) for r in requests if r.plan}
    return all(not torch.allclose(solos[k], v, **TOLERANCE) for k, v in plain.items())


def test_a_cancelled_request_frees_its_cache_and_leaves_the_others_alone():
    model = build(NAME)
    tiny = TINY_MODELS[NAME]
    keep = Request("keep", 6, cachekit.plans.resolve_plan("fora:interval=3"), seed=1)
    cancel = Request("cancel", 6, cachekit.plans.resolve_plan("fora:interval=3"), seed=2)
    expected = solo(model, tiny, keep)

    def after(tick, keys):
        if tick == 3:
            cachekit.release(model, ["cancel"])  # the runner cancels a request between ticks
            assert session.cached_keys() == {"keep"}

    with cachekit.cached(model, None):
        session = cachekit.sessions(model)[0]
        results = serve_together(model, tiny, [keep, cancel], after_forward=after)
        assert session.cached_entries == 0
    assert torch.allclose(results["keep"], expected, **TOLERANCE)


def test_a_forward_that_raises_leaves_declared_rows_to_their_owner_and_frees_a_calls_rows():
    model = build(NAME)
    tiny = TINY_MODELS[NAME]
    scheduler = tiny.scheduler()
    scheduler.set_timesteps(6)
    gen = torch.Generator().manual_seed(0)
    latents, cond = tiny.latents(1, gen), tiny.conditioning(1, gen)
    t = scheduler.timesteps
    plan = cachekit.plans.resolve_plan("fora:interval=3")
    with cachekit.cached(model, None), torch.no_grad():
        session = cachekit.sessions(model)[0]
        for key in ("bystander", "doomed"):
            with cachekit.rows(model, [0], [key], 6, [plan]):
                model(latents, timestep=t[:1], return_dict=False, **cond)
        assert session.cached_keys() == {"bystander", "doomed"}
        with cachekit.rows(model, [1], ["doomed"], 6, [plan]):
            with pytest.raises(ValueError, match="got a batch of 0"):  # refused before the forward starts
                model(latents[:0], timestep=t[:1], return_dict=False, **cond)
        assert session.cached_keys() == {"bystander", "doomed"}
        with cachekit.rows(model, [1], ["doomed"], 6, [plan]):
            with pytest.raises(TypeError):
                model(latents, timestep=t[1:2], return_dict=False, encoder_hidden_states=None,
                      added_cond_kwargs=cond["added_cond_kwargs"])
        # declared rows stay the caller's: a runner retries the step or releases the request
        assert session.cached_keys() == {"bystander", "doomed"}
        with cachekit.rows(model, [1], ["doomed"], 6, [plan]):
            retried = model(latents, timestep=t[1:2], return_dict=False, **cond)[0]
        with cachekit.rows(model, [1], ["bystander"], 6, [plan]):
            never_failed = model(latents, timestep=t[1:2], return_dict=False, **cond)[0]
        assert torch.equal(retried, never_failed)
        cachekit.release(model, ["doomed"])
        assert session.cached_keys() == {"bystander"}

    # a plain call's rows end with the call
    with cachekit.cached(model, "fora:interval=3", scheduler=scheduler), torch.no_grad():
        session = cachekit.sessions(model)[0]
        model(latents, timestep=t[:1], return_dict=False, **cond)
        assert len(session.cached_keys()) == 1
        with pytest.raises(TypeError):
            model(latents, timestep=t[:1], return_dict=False, encoder_hidden_states=None,
                  added_cond_kwargs=cond["added_cond_kwargs"])
        assert session.cached_keys() == set()


def test_a_pipeline_call_ending_frees_its_own_rows_never_other_requests():
    pipe = tiny_pixart_pipeline()
    settings = dict(height=16, width=16, max_sequence_length=16, use_resolution_binning=False, clean_caption=False)
    transformer = pipe.transformer
    with cachekit.cached(pipe, "fora:interval=2"):
        session = cachekit.sessions(pipe)[0]
        session.request_states["runner-request"] = {"accumulated": 0.5}  # a request the runner has in flight
        cache = session.caches[0]
        cache.store(["runner-request"], torch.zeros(1, 4), [1])
        seen = []
        pipe("a handwritten 3", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
             output_type="latent", callback=lambda i, t, latents: seen.append(session.cached_entries),
             callback_steps=1, **settings)
        assert max(seen) > 1  # the call's own rows were cached while it ran
        assert session.cached_keys() == {"runner-request"}  # its end freed its rows (CallRowKey) only
        assert not any(isinstance(k, CallRowKey) for k in session.cached_keys())
    assert transformer is pipe.transformer


def test_rows_declared_in_one_thread_are_invisible_to_another():
    model = build(NAME)
    tiny = TINY_MODELS[NAME]
    requests = [Request(f"r{i}", 5, cachekit.plans.resolve_plan("fora:interval=2"), seed=i) for i in range(2)]
    expected = {r.key: solo(model, tiny, r) for r in requests}
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def serve(request):
        try:
            barrier.wait()
            results.update(serve_together(model, tiny, [request]))
        except BaseException as err:  # surfaced below
            errors.append(err)

    with cachekit.cached(model, None):
        threads = [threading.Thread(target=serve, args=(r,)) for r in requests]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors
    for key, value in expected.items():
        assert torch.allclose(results[key], value, **TOLERANCE), key


def test_a_cached_row_keeps_memory_in_proportion_to_itself():
    cache = RowCache()
    batch = torch.randn(64, 1000)
    keys = [f"r{i}" for i in range(64)]
    cache.store(keys, batch, [0] * 64)
    assert cache.nbytes() == batch.numel() * 4
    cache.drop(keys[1:])  # 63 requests left; one is still being served
    assert cache.nbytes() == 1000 * 4  # its row was copied out and the batch let go
    assert torch.equal(cache.gather(["r0"]), batch[:1])


def test_runtime_policy_state_is_per_live_request_and_bounded():
    model = build(NAME)
    tiny = TINY_MODELS[NAME]
    policy = FirstBlockCachePolicy(FirstBlockCacheConfig(threshold=1e9, warmup_steps=1, max_consecutive_skips=2))
    requests = [Request(f"r{i}", 6, policy, seed=i, arrival=i) for i in range(6)]
    peak = []
    with cachekit.cached(model, None):
        session = cachekit.sessions(model)[0]
        serve_together(model, tiny, requests, after_forward=lambda t, k: peak.append(len(session.request_states)))
        assert not session.request_states
    assert max(peak) <= 6 and policy.skipped_steps > 0
    assert not hasattr(policy, "states")  # the policy object holds no per-request state


@pytest.mark.parametrize("plan", ["digits-fast", "fora:interval=3", "teacache:threshold=0.3", "none"])
def test_enable_takes_names_and_specs(plan):
    from cachekit.zoo import call_defaults, load_pipeline

    pipe = load_pipeline("digits")
    pipe.set_progress_bar_config(disable=True)
    settings = dict(call_defaults("digits"), num_inference_steps=20, output_type="latent")
    reference = pipe(["a handwritten 3"], generator=[torch.Generator().manual_seed(0)], **settings).images
    with cachekit.cached(pipe, plan):
        out = pipe(["a handwritten 3"], generator=[torch.Generator().manual_seed(0)], **settings).images
        stats = cachekit.sessions(pipe)[0].stats
    if plan == "none":
        assert torch.equal(out, reference) and stats.reused == 0
    else:
        assert stats.reused > 0 and not torch.equal(out, reference)


def test_an_unknown_plan_name_lists_the_known_ones():
    model = build(NAME)
    with pytest.raises(cachekit.plans.PlanError, match="digits-fast.*fora"):
        cachekit.enable(model, "digits-fastest-ever")
    assert not cachekit.sessions(model)


def test_a_plan_of_a_mode_not_attached_is_refused_before_it_runs():
    model = build(NAME)
    tiny = TINY_MODELS[NAME]
    with cachekit.cached(model, _component_schedule(model, 4)):  # component hooks only
        with pytest.raises(cachekit.ScheduleError, match="modes=\\('block', 'component'\\)"):
            serve_together(model, tiny, [Request("r", 4, cachekit.plans.resolve_plan("fora:interval=2"))])
        assert cachekit.sessions(model)[0].cached_entries == 0
    assert torch.equal(denoise(model, tiny, 4), denoise(build(NAME), tiny, 4))
