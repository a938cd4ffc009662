"""The streaming batch runner on the bundled digits model: a live loop thread, real pipelines, real schedulers.

Every result is compared with the same request as a solo stock pipeline call with the same plan enabled
(`PipelineCall`, what `cachekit generate` runs). Tolerance: at most 1 of 255 on every uint8 pixel (on this CPU the
runner's images are in fact bit-identical).
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

import cachekit
from cachekit import zoo
from cachekit.errors import UsageError
from cachekit.policies.runtime import BlockSkipPolicy
from cachekit.pipelines import PipelineCall, QueueFull, RequestCancelled, RequestFailed, Runner

PIXEL_TOLERANCE = 1  # of 255


@pytest.fixture(scope="module")
def solo_pipe():
    pipe = zoo.load_pipeline("digits")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def runner():
    with Runner(max_batch=16) as runner:
        yield runner


def solo(pipe, prompt, seed=0, steps=None, guidance=4.0, plan=None, negative=""):
    """The request as one plain pipeline call; without `steps`, a schedule's own step count (as the runner)."""
    if steps is None:
        resolved = cachekit.resolve_plan(plan)
        steps = resolved.num_steps if isinstance(resolved, cachekit.Schedule) else 20
    kwargs = {"guidance_scale": guidance}
    if negative:
        kwargs["negative_prompt"] = negative
    return PipelineCall([prompt], num_inference_steps=steps, seeds=(seed,), kwargs=kwargs,
                        output_type="pil")(pipe, plan=plan)[0]


def max_pixel_difference(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def wait_for_step(handle, step: int) -> None:
    for event in handle.events(timeout=60):
        if event["type"] == "step" and event["step"] >= step:
            return
    raise AssertionError(f"{handle.id} ended before step {step}")


def live_keys(runner) -> set:
    return set().union(*(s.cached_keys() for s in cachekit.sessions(runner.pipe)))


# ----------------------------------------------------------------------------- mixed batches equal solo calls
def test_mixed_requests_arriving_at_different_times_match_solo_calls(runner, solo_pipe):
    requests = [
        dict(prompt="a handwritten 3", seed=0, num_inference_steps=20, guidance_scale=4.0, schedule=None),
        dict(prompt="the digit 7", seed=11, num_inference_steps=10, guidance_scale=2.5, schedule=None,
             negative_prompt="blurry"),
        dict(prompt="a handwritten 3", seed=0, num_inference_steps=20, guidance_scale=4.0, schedule="digits-fast"),
        dict(prompt="a handwritten 5", seed=5, num_inference_steps=20, guidance_scale=4.0,
             schedule="teacache:threshold=0.2"),
        dict(prompt="a handwritten 8", seed=3, num_inference_steps=10, guidance_scale=1.0, schedule="fora:interval=2"),
    ]
    forwards_before = runner.stats()["forwards"]
    first = runner.submit(**requests[0])
    wait_for_step(first, 4)  # the others join a request already mid-denoise
    handles = [first] + [runner.submit(**r) for r in requests[1:3]]
    wait_for_step(handles[2], 2)
    handles += [runner.submit(**r) for r in requests[3:]]
    images = [h.result(timeout=120) for h in handles]

    forwards = runner.stats()["forwards"] - forwards_before
    assert forwards < sum(r["num_inference_steps"] for r in requests)  # they shared forwards
    for request, handle, image in zip(requests, handles, images):
        expected = solo(solo_pipe, request["prompt"], request["seed"], request["num_inference_steps"],
                        request["guidance_scale"], request["schedule"], request.get("negative_prompt", ""))
        assert max_pixel_difference(image, expected) <= PIXEL_TOLERANCE, request
        assert handle.info.steps_computed == request["num_inference_steps"]
        assert handle.info.degraded is False
    assert handles[2].info.plan == "digits-fast" and handles[2].info.reused_share > 0
    assert live_keys(runner) == set()  # no cache entry outlives its request


def test_same_prompt_and_seed_under_different_plans_get_their_own_images(runner, solo_pipe):
    handles = {plan: runner.submit("the digit 4", seed=9, schedule=plan)
               for plan in (None, "digits-fastest", "fora:interval=3")}
    images = {plan: h.result(timeout=120) for plan, h in handles.items()}
    for plan, image in images.items():
        assert max_pixel_difference(image, solo(solo_pipe, "the digit 4", 9, plan=plan)) <= PIXEL_TOLERANCE
    assert max_pixel_difference(images[None], images["digits-fastest"]) > PIXEL_TOLERANCE


def test_requests_admitted_together_step_as_one_cohort_and_each_still_matches_its_solo_call(runner, solo_pipe):
    """Requests admitted in one tick share one scheduler step and one guidance combination (a cohort), with
    their own guidance scales; one that leaves mid-way leaves its cohort-mates' results unchanged."""
    busy = runner.submit("a handwritten 0", seed=30)
    wait_for_step(busy, 2)  # the next four arrive within one forward of it, so they are admitted together
    specs = [("a handwritten 1", 31, 2.0), ("the digit 5", 32, 4.0), ("a handwritten 7", 33, 7.5)]
    handles = [runner.submit(prompt, seed=seed, guidance_scale=scale) for prompt, seed, scale in specs]
    leaving = runner.submit("a handwritten 9", seed=34)
    wait_for_step(leaving, 3)
    assert leaving.cancel() is True
    for (prompt, seed, scale), handle in zip(specs, handles):
        expected = solo(solo_pipe, prompt, seed, guidance=scale)
        assert max_pixel_difference(handle.result(timeout=120), expected) <= PIXEL_TOLERANCE, prompt
    assert max_pixel_difference(busy.result(timeout=120), solo(solo_pipe, "a handwritten 0", 30)) <= PIXEL_TOLERANCE
    assert live_keys(runner) == set()


def test_a_stochastic_scheduler_draws_each_cohort_row_from_its_own_requests_generator():
    """SDE-DPM-Solver++ draws noise at every step: a cohort's one step draws each row from its request's own
    generator, so each request still equals its solo call."""
    from diffusers import DPMSolverMultistepScheduler

    def sde_pipe():
        pipe = zoo.load_pipeline("digits")
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config,
                                                                 algorithm_type="sde-dpmsolver++")
        return pipe

    reference = sde_pipe()
    with Runner(sde_pipe(), max_batch=8) as sde_runner:
        busy = sde_runner.submit("a handwritten 0", seed=40, num_inference_steps=10)
        wait_for_step(busy, 1)
        handles = {d: sde_runner.submit(f"a handwritten {d}", seed=d, num_inference_steps=10) for d in (1, 2, 3)}
        images = {d: h.result(timeout=120) for d, h in handles.items()}
    for d, image in images.items():
        assert max_pixel_difference(image, solo(reference, f"a handwritten {d}", d, steps=10)) <= PIXEL_TOLERANCE


# ----------------------------------------------------------------------------- isolation: cancel and failure
def test_cancel_frees_the_request_at_once_and_leaves_the_others_unchanged(runner, solo_pipe):
    keep = runner.submit("a handwritten 2", seed=4, schedule="digits-fast")
    doomed = runner.submit("a handwritten 6", seed=2, schedule="digits-fast")
    wait_for_step(doomed, 3)
    assert doomed.cancel() is True
    with pytest.raises(RequestCancelled):
        doomed.result(timeout=60)
    assert [e["type"] for e in doomed.events()][-1] == "cancelled"
    image = keep.result(timeout=120)
    assert max_pixel_difference(image, solo(solo_pipe, "a handwritten 2", 4, plan="digits-fast")) <= PIXEL_TOLERANCE
    assert live_keys(runner) == set()
    assert doomed.cancel() is False  # already over


def test_a_failing_request_fails_alone(runner, solo_pipe):
    def explode(step, latents):
        if step == 5:
            raise RuntimeError("a client callback broke")

    mate = runner.submit("a handwritten 1", seed=8, schedule="teacache:threshold=0.2")
    failing = runner.submit("a handwritten 9", seed=1, schedule="digits-fast", on_step=explode)
    with pytest.raises(RequestFailed, match="client callback broke"):
        failing.result(timeout=120)
    image = mate.result(timeout=120)
    expected = solo(solo_pipe, "a handwritten 1", 8, plan="teacache:threshold=0.2")
    assert max_pixel_difference(image, expected) <= PIXEL_TOLERANCE
    assert live_keys(runner) == set()
    assert runner.stats()["requests"].get("failed", 0) >= 1


class _BrokenPolicy(BlockSkipPolicy):
    """A runtime policy that raises inside the transformer forward, from step 3 on."""

    def _skip_rows(self, rows, signal):
        if min(rows.step_list) >= 3:
            raise RuntimeError("this policy is broken")
        return torch.zeros(len(rows.keys), dtype=torch.bool)


def test_a_request_whose_forward_raises_fails_alone(runner, solo_pipe):
    mates = [runner.submit(f"a handwritten {d}", seed=d, schedule=plan)
             for d, plan in ((2, None), (4, "digits-fast"))]
    broken = runner.submit("a handwritten 6", seed=6, schedule=_BrokenPolicy())
    with pytest.raises(RequestFailed, match="this policy is broken"):
        broken.result(timeout=120)
    for (d, plan), handle in zip(((2, None), (4, "digits-fast")), mates):
        expected = solo(solo_pipe, f"a handwritten {d}", d, plan=plan)
        assert max_pixel_difference(handle.result(timeout=120), expected) <= PIXEL_TOLERANCE
    assert live_keys(runner) == set()


# ----------------------------------------------------------------------------- limits and clean errors
@pytest.mark.parametrize("bad, match", [
    (dict(prompt=""), "prompt"),
    (dict(prompt="x", seed=-1), "seed"),
    (dict(prompt="x", num_inference_steps=1), "num_inference_steps"),
    (dict(prompt="x", guidance_scale="high"), "guidance_scale"),
    (dict(prompt="x", deadline_s=0), "deadline_s"),
    (dict(prompt="x", schedule="no-such-plan"), "unknown plan"),
    (dict(prompt="x", schedule="digits-fast", num_inference_steps=10), "has 20 steps"),
    (dict(prompt="x", schedule="fora:interval=banana"), "fora"),
    (dict(prompt="x", height=15), "multiples"),
])
def test_bad_arguments_raise_a_clear_error_and_queue_nothing(runner, bad, match):
    before = runner.stats()
    with pytest.raises(UsageError, match=match):
        runner.submit(**bad)
    after = runner.stats()
    assert after["queued"] == before["queued"] == 0 and after["requests"] == before["requests"]


def test_a_full_queue_refuses_new_requests_with_nothing_half_done():
    with Runner(max_batch=2, max_queue=1) as small:
        running = small.submit("a handwritten 0", seed=0)
        wait_for_step(running, 1)  # admitted: it fills the batch's two rows
        waiting = small.submit("a handwritten 1", seed=1)
        with pytest.raises(QueueFull, match="queue is full"):
            small.submit("a handwritten 2", seed=2)
        assert small.stats()["queued"] == 1
        assert running.result(timeout=120) is not None and waiting.result(timeout=120) is not None
        assert small.stats()["requests"]["rejected"] == 1


def test_tiering_picks_a_faster_plan_only_when_allowed_and_says_so(runner, solo_pipe):
    runner.submit("a handwritten 7", seed=0).result(timeout=120)  # the runner has measured its speed
    strict = runner.submit("a handwritten 7", seed=3, schedule="digits-lossless", deadline_s=1e-4)
    degraded = runner.submit("a handwritten 7", seed=3, schedule="digits-lossless", deadline_s=1e-4,
                             allow_degrade=True)
    relaxed = runner.submit("a handwritten 7", seed=3, schedule="digits-lossless", deadline_s=3600,
                            allow_degrade=True)
    strict_image, degraded_image = strict.result(timeout=120), degraded.result(timeout=120)
    relaxed.result(timeout=120)
    assert strict.info.plan == "digits-lossless" and not strict.info.degraded and strict.info.deadline_missed
    assert degraded.info.degraded and degraded.info.requested_plan == "digits-lossless"
    assert degraded.info.plan == "digits-fastest"  # no tier meets a 0.1 ms deadline: the fastest serves
    assert degraded.info.num_inference_steps == 8 and strict.info.num_inference_steps == 20  # at its own count
    assert not relaxed.info.degraded and relaxed.info.plan == "digits-lossless"
    assert max_pixel_difference(degraded_image, solo(solo_pipe, "a handwritten 7", 3, plan="digits-fastest")) \
        <= PIXEL_TOLERANCE
    assert max_pixel_difference(strict_image, degraded_image) > 0
    assert runner.stats()["degraded"] >= 1


def test_a_schedule_runs_the_step_count_it_records(runner, solo_pipe):
    from cachekit.policies import FORAConfig, fora_schedule

    schedule = fora_schedule(runner.pipe.transformer, 6, FORAConfig(interval=2, mode="block"))
    handle = runner.submit("a handwritten 2", seed=1, schedule=schedule)  # no num_inference_steps
    image = handle.result(timeout=120)
    assert handle.info.num_inference_steps == 6 and handle.info.steps_computed == 6
    assert max_pixel_difference(image, solo(solo_pipe, "a handwritten 2", 1, steps=6, plan=schedule)) \
        <= PIXEL_TOLERANCE
    plain = runner.submit("a handwritten 2", seed=1)
    plain.result(timeout=120)
    assert plain.info.num_inference_steps == 20  # no schedule: the default


def test_a_cfg_request_needs_two_rows():
    with Runner(max_batch=1) as tiny:
        with pytest.raises(UsageError, match="2 rows"):
            tiny.submit("a handwritten 3")
        assert tiny.submit("a handwritten 3", guidance_scale=1.0).result(timeout=120) is not None


def test_cachekit_already_enabled_is_refused():
    pipe = zoo.load_pipeline("digits")
    cachekit.enable(pipe, "digits-fast")
    with pytest.raises(UsageError, match="already enabled"):
        Runner(pipe)


# ----------------------------------------------------------------------------- threads, asyncio, events, metrics
def test_many_threads_and_asyncio_tasks_at_once(runner, solo_pipe):
    results: dict[int, object] = {}

    def client(i: int) -> None:
        results[i] = runner.generate(f"a handwritten {i}", seed=i, num_inference_steps=10, timeout=120)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()

    async def tasks():
        return await asyncio.gather(*(runner.submit(f"the digit {i}", seed=20 + i, num_inference_steps=10)
                                      for i in range(3)))

    awaited = asyncio.run(tasks())
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1, 2, 3]
    expected = solo(solo_pipe, "the digit 1", 21, steps=10)
    assert max_pixel_difference(awaited[1], expected) <= PIXEL_TOLERANCE
    assert max_pixel_difference(results[2], solo(solo_pipe, "a handwritten 2", 2, steps=10)) <= PIXEL_TOLERANCE


def test_events_report_every_step_and_a_preview():
    with Runner(preview=True) as previewing:
        handle = previewing.submit("a handwritten 3", seed=0, num_inference_steps=6)
        events = list(handle.events(timeout=60))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "done"
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 7))
    assert steps[-1]["preview"].size == handle.result().size


def test_stats_and_prometheus_metrics(runner):
    from prometheus_client import generate_latest

    runner.submit("a handwritten 4", seed=4, num_inference_steps=10).result(timeout=120)
    stats = runner.stats()
    assert stats["requests"]["done"] >= 1 and stats["images_per_s"] > 0
    assert 0 < stats["batch_occupancy"] <= 1
    assert stats["latency_s"]["p50"] <= stats["latency_s"]["p99"]
    assert stats["prompt_cache"]["hits"] > 0  # the empty negative prompt, at least, came from the cache
    text = generate_latest(runner.prometheus_registry).decode()
    assert 'cachekit_requests_total{outcome="done"}' in text
    assert "cachekit_request_latency_seconds_bucket" in text and "cachekit_batch_rows_count" in text


def test_a_non_bundled_pixart_pipeline_and_an_unknown_family():
    from tiny_models import tiny_pixart_pipeline

    pipe = tiny_pixart_pipeline()
    with Runner(pipe, max_batch=4) as other:
        assert other.tiers == ()
        image = other.submit("a 3", seed=0, num_inference_steps=4, height=16, width=16,
                             schedule="fora:interval=2").result(timeout=120)
    expected = PipelineCall(["a 3"], num_inference_steps=4, seeds=(0,), output_type="pil",
                            kwargs=dict(height=16, width=16, use_resolution_binning=False, guidance_scale=4.5,
                                        max_sequence_length=120))(pipe, plan="fora:interval=2")[0]
    assert max_pixel_difference(image, expected) <= PIXEL_TOLERANCE
    with pytest.raises(UsageError, match="no adapter for"):
        Runner(torch.nn.Linear(1, 1))


def test_forecasting_requests_joining_mid_way_match_solo_calls(runner, solo_pipe):
    """digits-fast forecasts features (TaylorSeer genes): a request that joins later has a shorter history than
    its batch-mates, and each row must extrapolate from its own points, as it would alone."""
    first = runner.submit("a handwritten 0", seed=30, schedule="digits-fast")
    wait_for_step(first, 6)
    second = runner.submit("a handwritten 6", seed=31, schedule="digits-fast")
    wait_for_step(second, 3)
    third = runner.submit("a handwritten 9", seed=32, schedule="digits-fast")
    for handle, (prompt, seed) in zip((first, second, third),
                                      (("a handwritten 0", 30), ("a handwritten 6", 31), ("a handwritten 9", 32))):
        expected = solo(solo_pipe, prompt, seed, plan="digits-fast")
        assert max_pixel_difference(handle.result(timeout=120), expected) <= PIXEL_TOLERANCE


def test_a_gathering_cohort_never_makes_the_queue_refuse_arrivals():
    """Requests held for a step-aligned cohort take queue places: once they fill half the queue they go in, so a
    hold (here as long as 100,000 forwards) cannot fill the queue while rows are free."""
    with Runner(max_batch=32, max_queue=4, align_steps=100_000) as runner:
        runner.generate("a handwritten 1", seed=0, num_inference_steps=2, timeout=60)  # the tick time is known
        held = [runner.submit(f"a handwritten {d}", seed=d, schedule="digits-fast") for d in (2, 3)]
        assert all(h.result(timeout=120) is not None for h in held)
        assert runner.stats()["requests"].get("rejected", 0) == 0


def test_a_runner_given_a_name_loads_it_on_its_own_thread_and_a_missing_one_is_one_clear_error(tmp_path):
    from cachekit.zoo import ModelNotFoundError

    with Runner("digits", max_batch=2) as named:
        assert named.generate("a handwritten 5", seed=0, num_inference_steps=4, timeout=60).size == (16, 16)
    before = threading.active_count()
    with pytest.raises(ModelNotFoundError, match="not found"):
        Runner(str(tmp_path / "no-such-model"))
    assert threading.active_count() == before  # no loop thread left behind
