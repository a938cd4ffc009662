"""The one seeded pipeline call: reproducible, model defaults applied, settings checked, plans per call."""

from __future__ import annotations

import pytest
import torch

from cachekit.errors import UsageError
from cachekit.pipelines import PipelineCall
from cachekit.zoo import call_defaults, load_pipeline


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline("digits")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_bundled_model_needs_no_settings_and_seeds_are_per_prompt(pipe):
    both = PipelineCall(("a handwritten 3", "the digit 7"), 4, seeds=(5, 6))(pipe)
    alone = PipelineCall(("the digit 7",), 4, seeds=(6,))(pipe)
    assert both.shape == (2, 3, 16, 16)
    assert torch.allclose(both[1:], alone, atol=1e-5)  # an image does not depend on its batch-mates
    stock = pipe(["the digit 7"], num_inference_steps=4, generator=[torch.Generator().manual_seed(6)],
                 output_type="pt", **call_defaults("digits")).images
    assert torch.equal(alone, stock)


def test_a_plan_applies_to_one_call_only(pipe):
    call = PipelineCall(("a handwritten 3",), 20)
    plain = call(pipe)
    cached = call(pipe, plan="digits-fast")
    assert not torch.equal(plain, cached) and torch.equal(call(pipe), plain)


def test_settings_the_pipeline_does_not_take_are_refused(pipe):
    with pytest.raises(UsageError, match="does not take bogus; it takes .*guidance_scale"):
        PipelineCall(("a 3",), 2, {"bogus": 1})(pipe)


def test_resolution_binning_is_explained_in_one_line(pipe):
    with pytest.raises(UsageError, match="use_resolution_binning=False") as info:
        PipelineCall(("a 3",), 2, model_defaults=False)(pipe)
    assert "\n" not in str(info.value)


def test_a_call_validates_itself():
    with pytest.raises(UsageError, match="set by the call itself"):
        PipelineCall(["a 3"], 4, kwargs={"output_type": "pil"})
    with pytest.raises(UsageError, match="num_inference_steps is 4, but kwargs say 20"):
        PipelineCall(["a 3"], 4, kwargs={"num_inference_steps": 20})
    with pytest.raises(UsageError, match="2 seeds for 1 prompts"):
        PipelineCall(["a 3"], 4, seeds=(0, 1))
    chunks = PipelineCall(("a", "b", "c"), 4, seeds=(7, 8, 9)).chunks(2)
    assert [c.prompts for c in chunks] == [("a", "b"), ("c",)] and [c.seeds for c in chunks] == [(7, 8), (9,)]
