"""Video streams on the runner (bundled digits-video model, a stock WanPipeline): the streaming VAE decode equals the
whole-clip decode, frames arrive in order with no fill frames, caching applies inside a stream, a stream cancelled
mid-way frees its rows and caches, back-pressure instead of dropped frames, and requests for whole clips equal the
stock call.

Tolerance of the streamed decode: 1e-5 in the VAE's [-1, 1] output (it is the same computation in another order;
measured 0.0 on CPU).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from cachekit import zoo
from cachekit.compat import WanStreamingDecoder
from cachekit.errors import UsageError
from cachekit.pipelines import Runner
from cachekit.pipelines.video_streams import StreamClosed, latent_frames_for
from cachekit.zoo.digits_video_check import INK_THRESHOLD, frame_digits

DECODE_TOLERANCE = 1e-5
PROMPT = "a handwritten 3 moving left"


@pytest.fixture(scope="module")
def runner():
    with Runner("digits-video", max_batch=8) as runner:
        yield runner


def as_tensor(frames) -> torch.Tensor:
    """`[F, 3, H, W]` uint8 of streamed frames (what the digit check reads)."""
    return torch.stack([torch.from_numpy(np.array(f.image)).permute(2, 0, 1) for f in frames])


def wait_until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_streamed_decode_equals_whole_clip_decode(runner):
    pipe = runner.pipe
    defaults = {**zoo.call_defaults("digits-video"), "num_frames": 17}  # 5 latent frames
    with torch.no_grad():
        latents = pipe("a handwritten 5 moving up", num_inference_steps=4, output_type="latent",
                       generator=torch.Generator().manual_seed(1), **defaults).frames
        latents = runner.family.denormalize(pipe, latents)
        whole = pipe.vae.decode(latents, return_dict=False)[0]
        for chunks in ((1, 1, 1, 1, 1), (2, 3), (1, 4)):
            decoder = WanStreamingDecoder(pipe.vae)
            parts, start = [], 0
            for size in chunks:
                parts.append(decoder.decode(latents[:, :, start : start + size]))
                start += size
            streamed = torch.cat(parts, dim=2)
            assert streamed.shape == whole.shape == (1, 3, 17, 32, 32)
            assert float((streamed - whole).abs().max()) <= DECODE_TOLERANCE, chunks
            assert decoder.cached_bytes > 0
            decoder.close()
            assert decoder.cached_bytes == 0


def test_frames_arrive_in_order_with_no_fill_frames(runner):
    with runner.open_video_stream(PROMPT, seed=0, steps=8, window=3, num_frames=9) as stream:
        first = stream.get(timeout=120)
        ticks_at_first = stream.tick
        frames = [first, *stream]
    assert [f.index for f in frames] == list(range(9))
    assert all(a.time_s <= b.time_s for a, b in zip(frames, frames[1:]))
    # the first frame is sent only once its latent frame had all its steps (the diagonal start), and it is real
    assert ticks_at_first >= 8
    video = as_tensor(frames)
    assert bool((video[0].float().mean(0) / 255 > INK_THRESHOLD).any())
    assert int(frame_digits(video[:1])[0]) == 3
    assert stream.finished and stream.frames_sent == 9
    assert stream.tick == 8 + 2 * 4  # the last of 3 latent frames started 2 lags (of 8 // 2 steps) late
    with pytest.raises(StreamClosed):
        stream.get(timeout=1)


def test_a_stream_runs_past_one_clip_until_closed(runner):
    with runner.open_video_stream(PROMPT, seed=2, steps=8, window=2) as stream:
        frames = [stream.get(timeout=120) for _ in range(21)]  # 6 latent frames: twice the model's clip
    assert [f.index for f in frames] == list(range(21))
    assert latent_frames_for(21) == 6


def test_caching_applies_inside_the_stream(runner):
    sessions_before = runner.stats()["reused_share_measured"] or 0.0
    with runner.open_video_stream(PROMPT, seed=0, steps=8, window=3, num_frames=9,
                                  schedule="fora:interval=2") as stream:
        cached = list(stream)
    assert stream.reused_share > 0
    stats = runner.stats()
    assert stats["reused_share_measured"] > sessions_before
    assert [f.index for f in cached] == list(range(9))
    assert int(frame_digits(as_tensor(cached[:1]))[0]) == 3


def test_a_schedule_is_for_the_ticks_between_two_shifts_of_the_window(runner):
    from cachekit.plans import resolve_plan

    fora = resolve_plan("fora:interval=2")
    segment = fora.schedule_for(4, runner.pipe.transformer)  # steps 8, window 3: the window shifts every 4 ticks
    with runner.open_video_stream(PROMPT, seed=0, steps=8, window=3, num_frames=5, schedule=segment) as stream:
        assert [f.index for f in stream] == list(range(5))
    assert stream.reused_share > 0
    with pytest.raises(UsageError, match="runs 4"):
        runner.open_video_stream(PROMPT, steps=8, window=3, schedule=fora.schedule_for(8, runner.pipe.transformer))


def test_a_cancelled_stream_frees_its_rows_and_caches(runner):
    stream = runner.open_video_stream(PROMPT, seed=4, steps=8, window=3, schedule="fora:interval=2")
    frames = [stream.get(timeout=120) for _ in range(3)]
    assert runner.stats()["streams"] == 1
    stream.close()
    assert wait_until(lambda: runner.stats()["streams"] == 0)
    assert runner.stats()["cached_bytes"] == 0
    assert stream._decoder.cached_bytes == 0
    assert [f.index for f in frames] == [0, 1, 2]
    gauge = runner.prometheus_registry.get_sample_value("cachekit_open_streams")
    assert gauge == 0
    # what was already sent can still be read, then the stream says it is closed
    with pytest.raises(StreamClosed):
        for _ in range(64):
            stream.get(timeout=5)


def test_a_slow_reader_pauses_the_stream_instead_of_losing_frames(runner):
    with runner.open_video_stream(PROMPT, seed=5, steps=4, window=2, max_unread=4) as stream:
        assert wait_until(lambda: stream.frames_sent >= 4)
        time.sleep(0.3)
        paused_at = stream.tick
        time.sleep(0.5)
        assert stream.tick == paused_at
        frames = [stream.get(timeout=60) for _ in range(12)]
    assert [f.index for f in frames] == list(range(12))


def test_bad_stream_arguments_are_one_line_errors(runner):
    for kwargs, message in (({"steps": 9, "window": 3}, "multiple of window - 1"),
                            ({"window": 1}, "window must be"),
                            ({"num_frames": 0}, "num_frames must be"),
                            ({"schedule": "no-such-plan"}, "no-such-plan"),
                            ({"guidance_scale": -1.0}, "guidance_scale")):
        with pytest.raises(UsageError, match=message):
            runner.open_video_stream(PROMPT, **kwargs)
    with pytest.raises(UsageError, match="prompt"):
        runner.open_video_stream(" ")
    assert wait_until(lambda: runner.stats()["streams"] == 0)  # nothing half-opened stays (earlier ones leave)


def test_whole_clip_requests_equal_the_stock_call(runner):
    pipe = runner.pipe
    defaults = zoo.call_defaults("digits-video")
    frames = runner.generate(PROMPT, seed=3, num_inference_steps=4, timeout=120)
    stock = pipe(PROMPT, num_inference_steps=4, output_type="pil", generator=torch.Generator().manual_seed(3),
                 **defaults).frames[0]
    assert len(frames) == len(stock) == 9
    assert max(int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()) for a, b in zip(frames, stock)) <= 1


def test_image_models_refuse_video_streams():
    with Runner(max_batch=2) as image_runner, pytest.raises(UsageError, match="video streams need"):
        image_runner.open_video_stream("a handwritten 3")
