"""Image streams on the runner (bundled digits model): Stream Batch against frame by frame, no fill frames, the
similarity filter on a static input, and streams sharing the runner with requests. Tolerance: 1 of 255 per pixel."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cachekit import zoo
from cachekit.errors import UsageError
from cachekit.pipelines import PipelineCall, Runner
from cachekit.pipelines.stream_filters import SimilarityFilterConfig
from cachekit.pipelines.streams import StreamClosed

PIXEL_TOLERANCE = 1


@pytest.fixture(scope="module")
def runner():
    with Runner(max_batch=16) as runner:
        yield runner


@pytest.fixture(scope="module")
def frames(runner):
    return [runner.generate(f"a handwritten {i}", seed=i, num_inference_steps=8, timeout=120) for i in range(5)]


def difference(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def push_taken(stream, frame) -> None:
    """Push and wait until the stream has taken the frame in (so the next push is not dropped as stale)."""
    before = stream.taken
    stream.push(frame)
    deadline = time.monotonic() + 60
    while stream.taken == before:
        assert time.monotonic() < deadline, "the stream never took the frame"
        time.sleep(0.001)


def frame_by_frame(runner, frames, **options):
    with runner.open_stream("a handwritten 8", stream_batch=False, **options) as stream:
        outputs = []
        for frame in frames:
            stream.push(frame)
            outputs.append(stream.get(timeout=60))
    return outputs


@pytest.mark.parametrize("guidance", ["none", "full", "self", "onetime"])
def test_stream_batch_equals_frame_by_frame_and_has_no_fill_frames(runner, frames, guidance):
    expected = frame_by_frame(runner, frames, guidance=guidance)
    with runner.open_stream("a handwritten 8", guidance=guidance, stages=(20, 30, 40)) as three_stage, \
            runner.open_stream("a handwritten 8", guidance=guidance) as stream:
        for frame in frames:
            push_taken(stream, frame)
        outputs = [stream.get(timeout=60) for _ in frames]
        assert stream.batched_forwards >= len(frames) - 1  # frames at different stages shared forwards
        push_taken(three_stage, frames[0])
        first = three_stage.get(timeout=60)
    # one output per input, in order, each the finished frame: the first output is frame 0 itself, not a fill frame
    for output, reference in zip(outputs, expected):
        assert difference(output, reference) <= PIXEL_TOLERANCE
    assert difference(first, frame_by_frame(runner, frames[:1], guidance=guidance, stages=(20, 30, 40))[0]) \
        <= PIXEL_TOLERANCE


def test_residual_cfg_changes_the_output_and_costs_one_row(runner, frames):
    none, self_guided = frame_by_frame(runner, frames[:1], guidance="none"), \
        frame_by_frame(runner, frames[:1], guidance="self", guidance_scale=3.0)
    assert difference(none[0], self_guided[0]) > PIXEL_TOLERANCE
    rows_before, forwards_before = runner.metrics.rows_forwarded, runner.metrics.forwards
    frame_by_frame(runner, frames[:1], guidance="self")
    rows = runner.metrics.rows_forwarded - rows_before
    assert rows == runner.metrics.forwards - forwards_before  # one row per stage: no unconditional pass


def test_similarity_filter_answers_a_static_input_with_the_previous_output(runner, frames):
    with runner.open_stream("a handwritten 8", stream_batch=False,
                            similarity_filter=SimilarityFilterConfig(eta=0.98, max_skips=3)) as stream:
        outputs = []
        for _ in range(8):
            stream.push(frames[2])
            outputs.append(stream.get(timeout=60))
        # identical frames: skip probability 1, so 3 skips then a refresh, and again
        assert stream.skipped == 6 and stream.taken == 8
    assert all(difference(o, outputs[0]) == 0 for o in outputs)


def test_streams_and_requests_share_the_runner_without_cross_talk(runner, frames):
    solo_pipe = zoo.load_pipeline("digits")
    solo_pipe.set_progress_bar_config(disable=True)
    expected_stream = frame_by_frame(runner, frames[:3])
    with runner.open_stream("a handwritten 8") as stream:
        handle = runner.submit("a handwritten 4", seed=12, schedule="digits-fast")
        for frame in frames[:3]:
            push_taken(stream, frame)
        outputs = [stream.get(timeout=60) for _ in range(3)]
        image = handle.result(timeout=120)
    expected = PipelineCall(["a handwritten 4"], num_inference_steps=20, seeds=(12,), output_type="pil")(
        solo_pipe, plan="digits-fast")[0]
    assert difference(image, expected) <= PIXEL_TOLERANCE
    assert all(difference(o, e) <= PIXEL_TOLERANCE for o, e in zip(outputs, expected_stream))


def test_stream_errors_are_clear(runner, frames):
    with pytest.raises(UsageError, match="guidance"):
        runner.open_stream("x", guidance="double")
    with pytest.raises(UsageError, match="stages"):
        runner.open_stream("x", stages=(40, 30))
    with runner.open_stream("x") as stream:
        with pytest.raises(UsageError, match="16x16"):
            stream.push(np.zeros((8, 8, 3), dtype=np.uint8))
        with pytest.raises(UsageError, match="RGB"):
            stream.push(np.zeros((16, 16), dtype=np.uint8))
    with pytest.raises(StreamClosed):
        stream.push(frames[0])
    with pytest.raises(StreamClosed):
        stream.get(timeout=5)


def test_similarity_filter_under_stream_batch_keeps_one_output_per_input_in_order(runner, frames):
    with runner.open_stream("a handwritten 8", similarity_filter=SimilarityFilterConfig(eta=0.98, max_skips=4)) \
            as stream:
        sequence = [frames[0]] * 6 + [frames[1]] * 6
        for frame in sequence:
            push_taken(stream, frame)
        outputs = [stream.get(timeout=60) for _ in sequence]
        assert stream.skipped >= 6  # identical inputs are skipped even while earlier frames are in flight
    kept_first, kept_second = frame_by_frame(runner, [frames[0], frames[1]])
    assert all(difference(o, kept_first) <= PIXEL_TOLERANCE for o in outputs[:6])
    assert all(difference(o, kept_second) <= PIXEL_TOLERANCE for o in outputs[7:])


def test_a_reader_that_falls_behind_loses_the_oldest_frames_not_the_runner(runner, frames, monkeypatch):
    from cachekit.pipelines import streams

    monkeypatch.setattr(streams, "OUTBOX_FRAMES", 2)
    with runner.open_stream("a handwritten 8", stream_batch=False) as stream:
        for frame in frames:  # five in, none read
            push_taken(stream, frame)
        deadline = time.monotonic() + 60
        while stream.unread_dropped < len(frames) - 2:
            assert time.monotonic() < deadline, "the runner stalled on a full outbox"
            time.sleep(0.01)
        newest = [stream.get(timeout=10), stream.get(timeout=10)]
    assert difference(newest[-1], frame_by_frame(runner, frames)[-1]) <= 1  # the newest frame, not a stale one
