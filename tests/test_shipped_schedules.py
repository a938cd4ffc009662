"""The searched schedules shipped for the digits model: valid for it, labelled with what was measured, and usable by
name wherever a schedule file is."""

from __future__ import annotations

import pytest
import torch

import cachekit
from cachekit import Schedule
from cachekit.policies import resolve_plan
from cachekit.zoo import DIGITS_DEFAULTS, ModelNotFoundError, load_pipeline, schedule_path, shipped_schedules

NAMES = ("digits-lossless", "digits-fast", "digits-fastest")


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline("digits")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_three_shipped_schedules_fit_the_digits_model_and_say_what_was_measured(pipe):
    shipped = shipped_schedules()
    assert set(NAMES) <= set(shipped)
    costs, steps = [], []
    for name in NAMES:
        schedule = Schedule.load(shipped[name])
        schedule.validate_for(pipe.transformer, schedule.num_steps)
        assert schedule.provenance["method"] == "search"
        heldout = schedule.measured["heldout"]
        assert {"speedup", "psnr", "fid", "kid"} <= set(heldout)
        # every point was judged against the uncached model at the model's own step count, whatever it runs
        assert heldout["num_steps"] == DIGITS_DEFAULTS["num_inference_steps"]
        costs.append(heldout["macs_ratio"])
        steps.append(schedule.num_steps)
    assert costs == sorted(costs, reverse=True)  # lossless computes most, fastest least
    assert steps == [20, 20, 8]  # points of the joint step-count x schedule front: digits-fastest runs 8 steps


def test_a_shipped_name_is_a_plan(pipe, capsys):
    plan = resolve_plan("digits-fast", pipe.transformer, 20)
    assert plan == Schedule.load(schedule_path("digits-fast"))
    with pytest.raises(ModelNotFoundError, match="shipped: digits-fast"):
        schedule_path("digits-nope")
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with cachekit.cached(pipe, plan):
        images = pipe(["a handwritten 3", "the digit seven"], generator=gens, output_type="pt",
                      **DIGITS_DEFAULTS).images
        stats = cachekit.sessions(pipe)[0].stats
    assert images.shape == (2, 3, 16, 16) and stats.reuse_fraction > 0.3


def test_the_video_model_ships_a_searched_schedule_usable_by_name():
    """`digits-video-fast`: searched on the digits-video model (a stock WanPipeline), labelled with the held-out
    figures and the weights it was searched on, and enabled by name like any schedule file."""
    from cachekit.zoo import DIGITS_VIDEO_DEFAULTS

    video = load_pipeline("digits-video")
    video.set_progress_bar_config(disable=True)
    steps = DIGITS_VIDEO_DEFAULTS["num_inference_steps"]
    schedule = Schedule.load(schedule_path("digits-video-fast"))
    schedule.validate_for(video.transformer, steps)
    assert schedule.model_class == "WanTransformer3DModel" and schedule.provenance["method"] == "search"
    heldout = schedule.measured["heldout"]
    assert {"speedup", "macs_ratio", "psnr", "ssim", "prompts", "seeds"} <= set(heldout)
    assert heldout["prompts"]["name"] == "digits-video" and heldout["macs_ratio"] < 1
    assert len(schedule.provenance["searched_on"]["transformer_sha256"]) == 64
    assert resolve_plan("digits-video-fast", video.transformer, steps) == schedule
    with cachekit.cached(video, "digits-video-fast"):
        clips = video("a handwritten 3 moving left", generator=torch.Generator().manual_seed(0), output_type="pt",
                      **DIGITS_VIDEO_DEFAULTS).frames
        stats = cachekit.sessions(video)[0].stats
    assert clips.shape == (1, 9, 3, 32, 32) and stats.reuse_fraction > 0.3
