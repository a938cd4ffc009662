"""Caching on the bundled video model: `digits-video`, a stock diffusers `WanPipeline` (12-block
`WanTransformer3DModel`, 9 frames of 32x32), through the very code that serves the image model.

Exactness is checked on the trained model through the stock pipeline, which calls the transformer once per CFG
branch under `cache_context("cond")` / `("uncond")`: a schedule that recomputes everything, in either mode, gives
the unhooked pipeline's clips bit for bit (tolerance: none, `torch.equal`), and so does the model after `disable`.
The runtime policies also see the 2-D, per-token timesteps the model was trained with (diffusion forcing: each
frame at its own noise level), which is how the runner's video streams call it.
"""

from __future__ import annotations

import json

import pytest
import torch

import cachekit
from cachekit import Schedule
from cachekit.eval.bench import get_sweep, run_bench
from cachekit.eval.prompts import digits_video_prompts
from cachekit.pipelines import PipelineCall, calibrate_policy
from cachekit.policies import (
    FirstBlockCacheConfig,
    FirstBlockCachePolicy,
    MagCacheConfig,
    MagCachePolicy,
    TeaCacheConfig,
    TeaCachePolicy,
    resolve_plan,
    runtime_policy,
)
from cachekit.registry import resolve_layout
from cachekit.zoo import load_pipeline, pipeline_path
from cachekit.zoo.digits_video_data import video_prompts

pytestmark = pytest.mark.skipif(not (pipeline_path("digits-video") / "model_index.json").is_file(),
                                reason="the digits-video model is not shipped")

STEPS = 6
PROMPTS = tuple(prompt for prompt, _, _ in video_prompts(2, seed=3))


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline("digits-video")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def call():
    return PipelineCall(PROMPTS, STEPS, seeds=(0, 1))


@pytest.fixture(scope="module")
def reference(pipe, call):
    return call(pipe)


def test_nothing_reused_is_the_unhooked_pipeline_exactly(pipe, call, reference):
    assert reference.shape == (2, 9, 3, 32, 32)
    for mode in ("component", "block"):
        full = Schedule.full(pipe.transformer, STEPS, mode=mode)
        assert torch.equal(call(pipe, full), reference), mode
    # a runtime policy that never skips computes what the unhooked model does, too
    never = runtime_policy("first-block", None, threshold=0.0)
    assert torch.equal(call(pipe, never), reference) and never.skipped_steps == 0


def test_reuse_acts_in_both_modes_and_disable_restores(pipe, call, reference):
    for spec in ("fora:interval=3", "fora:interval=3,mode=block", "fora:interval=3,forecast=1,mode=block"):
        plan = resolve_plan(spec, pipe.transformer, STEPS)
        cachekit.enable(pipe, plan)
        try:
            clips = call(pipe)
            stats = cachekit.sessions(pipe)[0].stats
        finally:
            cachekit.disable(pipe)
        assert stats.reuse_fraction > 0.3, spec
        assert torch.isfinite(clips).all() and not torch.equal(clips, reference), spec
        assert torch.equal(call(pipe), reference), spec  # the hooks are gone: the stock model again


@pytest.mark.parametrize("family,threshold", [("teacache", 1.0), ("magcache", 0.5), ("first-block", None)])
def test_each_runtime_policy_calibrates_and_reuses(pipe, call, reference, family, threshold):
    calibration = calibrate_policy(family, pipe, call)
    assert calibration.model_class == "WanTransformer3DModel" and calibration.num_steps == STEPS
    if threshold is None:  # first-block: the bench's sweep, the calibrated quartiles of the first block's change
        sweep = get_sweep(family)
        threshold = sweep.values(resolve_layout(pipe.transformer, "block").num_blocks, STEPS, calibration)[-1]
    policy = runtime_policy(family, calibration, threshold=threshold)
    clips = call(pipe, policy)
    assert policy.skipped_steps > 0, (family, threshold)
    assert torch.isfinite(clips).all() and not torch.equal(clips, reference)


@pytest.mark.parametrize("spec", ["tgate:gate_step=3", "delta-dit:boundary_step=3,num_cached_blocks=6,interval=2"])
def test_static_policies_reuse_on_the_video_model(pipe, call, reference, spec):
    plan = resolve_plan(spec, pipe.transformer, STEPS)
    assert plan.compute_fraction() < 1
    clips = call(pipe, plan)
    assert torch.isfinite(clips).all() and not torch.equal(clips, reference)


# ------------------------------------------------------------------------- per-token (2-D) timesteps
def _inputs(pipe):
    """The transformer's inputs for one prompt, as the stock pipeline builds them (9 frames -> 3 latent frames)."""
    embeds, _ = pipe.encode_prompt(PROMPTS[0], do_classifier_free_guidance=False, max_sequence_length=16)
    latents = torch.randn(1, pipe.transformer.config.in_channels, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    p_t, p_h, p_w = pipe.transformer.config.patch_size
    tokens = (3 // p_t) * (8 // p_h) * (8 // p_w)
    frame_tokens = tokens // 3
    return embeds, latents, tokens, frame_tokens


def _denoise(pipe, plan, per_frame_lag: int, declared: bool) -> torch.Tensor:
    """A little diffusion-forcing loop on the bare transformer with 2-D timesteps: latent frame f sits `lag * f`
    steps behind frame 0 (0: every token at the same level). Steps come from the timestep argument (matched to
    the scheduler, the plain path) or are declared with `cachekit.rows` (the runner's path)."""
    embeds, latents, tokens, frame_tokens = _inputs(pipe)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    timesteps = scheduler.timesteps
    cachekit.enable(pipe.transformer, plan, scheduler=scheduler)
    try:
        out = None
        for step in range(STEPS):
            lagged = [max(0, step - per_frame_lag * f) for f in range(3)]
            per_token = torch.cat([timesteps[s].expand(frame_tokens) for s in lagged])[None]
            assert per_token.shape == (1, tokens)
            with torch.no_grad():
                if declared:
                    with cachekit.rows(pipe.transformer, [step], ["clip"], STEPS):
                        out = pipe.transformer(latents, per_token, embeds, return_dict=False)[0]
                else:
                    out = pipe.transformer(latents, per_token, embeds, return_dict=False)[0]
        return out
    finally:
        cachekit.disable(pipe.transformer)


@pytest.mark.parametrize("declared", [False, True], ids=["matched", "declared"])
def test_policies_take_per_token_timesteps(pipe, declared):
    """Per-token timesteps reach every policy unharmed, on the plain path (a row's step is its noisiest token's,
    matched to the scheduler) and on the runner's (steps declared with `cachekit.rows`)."""
    full = Schedule.full(pipe.transformer, STEPS, mode="block")
    uncached = _denoise(pipe, None, 1, declared)
    assert torch.equal(_denoise(pipe, full, 1, declared), uncached)
    # settings that reuse on any signal, so that what is checked is that the 2-D timestep reaches them unharmed
    plans = {
        "fora": resolve_plan("fora:interval=2,mode=block", pipe.transformer, STEPS),
        "teacache": TeaCachePolicy(TeaCacheConfig(threshold=1.0, coefficients=(0.0, 0.4))),
        "magcache": MagCachePolicy(MagCacheConfig((1.0,) * STEPS, threshold=0.06)),
        "first-block": FirstBlockCachePolicy(FirstBlockCacheConfig(threshold=1e9, warmup_steps=1)),
    }
    for name, plan in plans.items():
        for lag in (0, 1):  # one noise level for the clip, then one level per frame, each a step behind the last
            out = _denoise(pipe, plan, lag, declared)
            assert torch.isfinite(out).all(), (name, lag)
            if name != "fora":
                assert plan.skipped_steps > 0, (name, lag)
                plan.skipped_steps = 0


# ------------------------------------------------------------------------------------ search and bench
def test_clips_are_judged_frame_by_frame_and_the_model_has_its_own_prompts():
    from cachekit.eval.images import to_uint8
    from cachekit.eval.prompts import load_prompts, prompts_for_model

    clips = torch.rand(2, 9, 3, 32, 32)
    frames = to_uint8(clips)
    assert frames.shape == (18, 3, 32, 32) and torch.equal(frames[9], to_uint8(clips[1, :1])[0])
    assert torch.equal(to_uint8(clips.permute(0, 1, 3, 4, 2).numpy()), frames)  # numpy NFHWC, output_type="np"
    assert prompts_for_model("digits", "digits-video") == "digits-video"
    assert prompts_for_model("digits", "digits") == "digits" and prompts_for_model("x.txt", "digits-video") == "x.txt"
    video = load_prompts("digits-video", 3, seed=2)
    assert video.name == "digits-video" and len(video) == 3
    assert {"label", "direction"} <= set(video.meta[0]) and video.prompts == digits_video_prompts(3, 2).prompts


def test_the_search_cli_runs_on_the_video_model_and_writes_usable_schedules(tmp_path, pipe, capsys):
    from cachekit.cli import main

    out = tmp_path / "search"
    assert main(["search", "--model", "digits-video", "--steps", "4", "--num", "1", "--genome", "block",
                 "--forecast-order", "1", "--population", "4", "--generations", "1", "--dp-budgets", "0.6",
                 "--out", str(out)]) == 0
    front = json.loads((out / "front.json").read_text())
    assert {s["name"] for s in front["seeds"]} >= {"fora-2", "dp-0.6"}
    # the model's own prompts (a digit and a motion each), not the image model's default set
    prompts = json.loads((out / "checkpoint.json").read_text())["settings"]["prompts"]
    assert prompts == digits_video_prompts(1, seed=1).prompts
    for point in front["front"]:
        schedule = Schedule.load(out / point["file"])
        schedule.validate_for(pipe.transformer, 4)
        assert schedule.model_class == "WanTransformer3DModel" and schedule.mode == "block"
    fastest = Schedule.load(out / front["front"][0]["file"])
    assert fastest.compute_fraction() < 1
    clips = PipelineCall(PROMPTS[:1], 4)(pipe, fastest)
    assert clips.shape == (1, 9, 3, 32, 32) and torch.isfinite(clips).all()
    assert "evaluations, hypervolume" in capsys.readouterr().out


def test_the_bench_compares_diffusers_caches_and_cache_dit_on_wan(tmp_path, pipe):
    peers = ("diffusers.fbcache", "diffusers.taylorseer", "diffusers.magcache", "diffusers.fastercache",
             "diffusers.pab", "cache-dit.dbcache")
    report = run_bench(pipe, PROMPTS[:1], 4, "psnr,ssim", tmp_path / "bench", policies=["fora"],
                       policy_knobs={"fora": [2]}, peers=peers,
                       peer_knobs={"diffusers.fbcache": [0.5], "diffusers.taylorseer": [2],
                                   "diffusers.magcache": [0.5], "diffusers.fastercache": [2],
                                   "diffusers.pab": [2], "cache-dit.dbcache": [0.5]},
                       batch_size=1, latency=False, macs=False, grid_samples=1, progress=False)
    rows = {row["method"]: row for row in report["rows"]}
    assert rows["fora"]["metrics"]["psnr"] < 60
    for name in ("diffusers.fbcache", "diffusers.taylorseer", "diffusers.magcache", "cache-dit.dbcache"):
        row = rows[name]
        assert row["status"] == "acted", (name, row["reason"])
        assert row["work"]["mac_ratio"] < 1 and row["metrics"]["psnr"] > 10, name
    # diffusers' caches go through Wan's CacheMixin.enable_cache, and the block caches keep one state per
    # cache_context the pipeline opens ("cond", "uncond"): applied as their docs show
    for name in ("diffusers.fbcache", "diffusers.magcache", "diffusers.taylorseer"):
        assert rows[name]["config"]["applied_through"] == "WanTransformer3DModel.enable_cache", name
    assert rows["diffusers.fastercache"]["status"] == "cannot-act"
    assert "per CFG branch" in rows["diffusers.fastercache"]["reason"]
    assert rows["diffusers.pab"]["status"] == "acted" and "cache_context" in rows["diffusers.pab"]["caveat"]
    table = (tmp_path / "bench" / "bench.md").read_text()
    assert "cannot-act" in table and "cache_context" in table
