"""The runner on families other than the bundled PixArt: real stock pipelines built from tiny configs (random
weights, no download), a live loop thread, real schedulers.

Every result is compared with the same request as a solo stock pipeline call (`PipelineCall`) with the same prompt,
seed, steps, guidance and plan. Tolerance: at most 1 of 255 on every uint8 pixel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cachekit
from cachekit.errors import UsageError
from cachekit.pipelines import PipelineCall, Runner
from cachekit.pipelines.families import FluxFamily, SanaFamily, StableDiffusion3Family, family_of
from tiny_models import tiny_flux_pipeline, tiny_sana_pipeline, tiny_sd3_pipeline

PIXEL_TOLERANCE = 1  # of 255


def max_pixel_difference(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def solo(pipe, prompt, seed, steps, guidance, plan=None, negative="", **settings):
    kwargs = {"guidance_scale": guidance, **settings}
    if negative:
        kwargs["negative_prompt"] = negative
    return PipelineCall([prompt], num_inference_steps=steps, seeds=(seed,), kwargs=kwargs, output_type="pil",
                        model_defaults=False)(pipe, plan=plan)[0]


def wait_for_step(handle, step: int) -> None:
    for event in handle.events(timeout=120):
        if event["type"] == "step" and event["step"] >= step:
            return
    raise AssertionError(f"{handle.id} ended before step {step}")


def serve_mixed(pipe, requests, max_batch=8):
    """Serve the requests from one runner, the later ones joining the first mid-denoise; images and forwards."""
    with Runner(pipe, max_batch=max_batch) as runner:
        first = runner.submit(**requests[0])
        wait_for_step(first, 2)
        handles = [first] + [runner.submit(**r) for r in requests[1:]]
        images = [h.result(timeout=300) for h in handles]
        forwards = runner.stats()["forwards"]
        assert set().union(*(s.cached_keys() for s in cachekit.sessions(pipe))) == set()
    assert forwards < sum(r["num_inference_steps"] for r in requests)  # they shared forwards
    return handles, images


@pytest.fixture(scope="module")
def sd3_pipe():
    return tiny_sd3_pipeline()


# ----------------------------------------------------------------------------- Stable Diffusion 3
SD3_REQUESTS = [
    dict(prompt="a handwritten 3", seed=0, num_inference_steps=6, guidance_scale=5.0, schedule=None),
    dict(prompt="the digit 7", seed=11, num_inference_steps=4, guidance_scale=3.0, schedule=None,
         negative_prompt="blurry"),
    dict(prompt="a handwritten 3", seed=0, num_inference_steps=6, guidance_scale=5.0, schedule="fora:interval=2"),
    dict(prompt="a handwritten 8", seed=3, num_inference_steps=4, guidance_scale=1.0, schedule="fora:interval=2"),
]


def test_sd3_mixed_requests_in_one_runner_match_solo_calls(sd3_pipe):
    assert isinstance(family_of(sd3_pipe), StableDiffusion3Family)
    handles, images = serve_mixed(sd3_pipe, SD3_REQUESTS)
    assert cachekit.sessions(sd3_pipe) == []  # the runner took cachekit off on close
    for request, handle, image in zip(SD3_REQUESTS, handles, images):
        expected = solo(sd3_pipe, request["prompt"], request["seed"], request["num_inference_steps"],
                        request["guidance_scale"], request["schedule"], request.get("negative_prompt", ""))
        assert max_pixel_difference(image, expected) <= PIXEL_TOLERANCE, request
        assert handle.info.steps_computed == request["num_inference_steps"]
    assert handles[2].info.reused_share > 0
    assert max_pixel_difference(images[0], images[2]) > PIXEL_TOLERANCE  # the plan changed the image


def test_sd3_default_guidance_is_the_stock_call_default_and_previews_decode(sd3_pipe):
    with Runner(sd3_pipe, max_batch=4, preview=True) as runner:
        handle = runner.submit("a handwritten 5", seed=2, num_inference_steps=4)
        events = list(handle.events(timeout=300))
        image = handle.result()
        with pytest.raises(UsageError, match="image streams"):
            runner.open_stream("a handwritten 5")
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert all(e["preview"].size == image.size for e in steps)
    # the last preview is x0 at sigma 0: the finished image itself
    assert max_pixel_difference(steps[-1]["preview"], image) <= PIXEL_TOLERANCE
    expected = PipelineCall(["a handwritten 5"], num_inference_steps=4, seeds=(2,), output_type="pil",
                            model_defaults=False)(sd3_pipe)[0]  # guidance 7.0, StableDiffusion3Pipeline's default
    assert max_pixel_difference(image, expected) <= PIXEL_TOLERANCE


def test_sd3_with_a_dynamically_shifting_scheduler_uses_the_stock_shift(sd3_pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler

    stock = sd3_pipe.scheduler
    sd3_pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4,
                                                         max_image_seq_len=64, base_shift=0.2, max_shift=2.0)
    try:
        with Runner(sd3_pipe, max_batch=2) as runner:
            image = runner.submit("a handwritten 2", seed=4, num_inference_steps=4, guidance_scale=4.0).result(300)
        expected = solo(sd3_pipe, "a handwritten 2", 4, 4, 4.0)
    finally:
        sd3_pipe.scheduler = stock
    assert max_pixel_difference(image, expected) <= PIXEL_TOLERANCE


# ----------------------------------------------------------------------------- Sana
@pytest.fixture(scope="module")
def sana_pipe():
    return tiny_sana_pipeline()


SANA_REQUESTS = [
    dict(prompt="a handwritten 3", seed=0, num_inference_steps=6, guidance_scale=4.5, schedule=None),
    dict(prompt="the digit 7", seed=11, num_inference_steps=4, guidance_scale=3.0, schedule=None,
         negative_prompt="blurry"),
    dict(prompt="a handwritten 3", seed=0, num_inference_steps=6, guidance_scale=4.5, schedule="fora:interval=2"),
    dict(prompt="a handwritten 8", seed=3, num_inference_steps=4, guidance_scale=1.0, schedule=None),
    # the same text as a positive and as a negative prompt: Sana encodes the two differently
    dict(prompt="blurry", seed=5, num_inference_steps=4, guidance_scale=2.0, schedule=None,
         negative_prompt="a handwritten 3"),
]


def test_sana_mixed_requests_in_one_runner_match_solo_calls(sana_pipe):
    assert isinstance(family_of(sana_pipe), SanaFamily)
    handles, images = serve_mixed(sana_pipe, SANA_REQUESTS)
    for request, handle, image in zip(SANA_REQUESTS, handles, images):
        expected = solo(sana_pipe, request["prompt"], request["seed"], request["num_inference_steps"],
                        request["guidance_scale"], request["schedule"], request.get("negative_prompt", ""),
                        height=32, width=32, use_resolution_binning=False)
        assert max_pixel_difference(image, expected) <= PIXEL_TOLERANCE, request
    assert handles[2].info.reused_share > 0


# ----------------------------------------------------------------------------- FLUX
@pytest.fixture(scope="module")
def flux_pipe():
    return tiny_flux_pipeline()


FLUX_REQUESTS = [  # guidance-distilled: one row each, the guidance scale embedded (3.5 and 7.0 share a forward)
    dict(prompt="a handwritten 3", seed=0, num_inference_steps=6, guidance_scale=3.5, schedule=None),
    dict(prompt="the digit 7", seed=11, num_inference_steps=4, guidance_scale=7.0, schedule=None),
    dict(prompt="a handwritten 3", seed=0, num_inference_steps=6, guidance_scale=3.5, schedule="fora:interval=2"),
    dict(prompt="a handwritten 3", seed=0, num_inference_steps=6, guidance_scale=7.0, schedule=None),
    dict(prompt="a handwritten 8", seed=3, num_inference_steps=4, guidance_scale=1.0, schedule="fora:interval=2"),
]


def test_flux_mixed_requests_in_one_runner_match_solo_calls(flux_pipe):
    assert isinstance(family_of(flux_pipe), FluxFamily)
    handles, images = serve_mixed(flux_pipe, FLUX_REQUESTS, max_batch=4)
    for request, handle, image in zip(FLUX_REQUESTS, handles, images):
        expected = solo(flux_pipe, request["prompt"], request["seed"], request["num_inference_steps"],
                        request["guidance_scale"], request["schedule"])
        assert max_pixel_difference(image, expected) <= PIXEL_TOLERANCE, request
    assert handles[2].info.reused_share > 0
    assert max_pixel_difference(images[0], images[3]) > PIXEL_TOLERANCE  # the embedded guidance is each row's own


def test_flux_requests_take_one_row_and_preview_their_x0(flux_pipe):
    with Runner(flux_pipe, max_batch=1, preview=True) as runner:  # one row: no CFG rows to fit
        handle = runner.submit("a handwritten 5", seed=2, num_inference_steps=4, guidance_scale=5.0)
        events = list(handle.events(timeout=300))
        image = handle.result()
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4] and steps[-1]["preview"].size == image.size
    assert max_pixel_difference(steps[-1]["preview"], image) <= PIXEL_TOLERANCE  # x0 at sigma 0: the image
    assert max_pixel_difference(image, solo(flux_pipe, "a handwritten 5", 2, 4, 5.0)) <= PIXEL_TOLERANCE


def test_a_pipeline_without_an_adapter_gets_a_one_line_error():
    with pytest.raises(UsageError, match="no adapter for Linear") as err:
        Runner(torch.nn.Linear(1, 1))
    assert "\n" not in str(err.value)
    assert all(name in str(err.value) for name in ("StableDiffusion3Pipeline", "SanaPipeline", "FluxPipeline"))
