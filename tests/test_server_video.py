"""The server's video API, live on loopback with the bundled digits-video model: `/v1/videos` jobs (202, progress,
mp4/webm/gif results, cancel, delete, errors with their status codes, the job limit) and `WS /v1/video-stream`
(frames in order as they finish, no fill frames, closing the socket frees the stream's rows and caches)."""

from __future__ import annotations

import io
import json
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from cachekit.pipelines import Runner
from cachekit.zoo.digits_video_check import frame_digits

fastapi = pytest.importorskip("fastapi")
websockets = pytest.importorskip("websockets")

from cachekit.pipelines.server import ServerLimits, ServerThread, create_app  # noqa: E402

PROMPT = "a handwritten 3 moving left"


@pytest.fixture(scope="module")
def server():
    limits = ServerLimits(max_video_jobs=2, max_video_frames=64)
    with Runner("digits-video", max_batch=8) as runner, ServerThread(create_app(runner=runner, limits=limits)) as live:
        live.runner = runner
        yield live


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def wait_for(client, video_id: str, status: str, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/videos/{video_id}").json()
        if body["status"] == status:
            return body
        time.sleep(0.1)
    raise AssertionError(f"video {video_id} did not become {status}: {body}")


def wait_until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_a_video_job_runs_to_a_clip_in_every_format(client):
    from cachekit.pipelines.video_io import read_video

    response = client.post("/v1/videos", json={"prompt": PROMPT, "num_frames": 9, "seed": 0, "fps": 8})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["object"] == "video" and job["status"] == "in_progress" and job["num_frames"] == 9
    assert response.headers["location"] == f"/v1/videos/{job['id']}"
    done = wait_for(client, job["id"], "completed")
    assert done["progress"] == 1.0 and done["frames_done"] == 9 and done["time_to_first_frame_s"] > 0
    for fmt, media in (("mp4", "video/mp4"), ("webm", "video/webm"), ("gif", "image/gif")):
        content = client.get(f"/v1/videos/{job['id']}/content", params={"format": fmt})
        assert content.status_code == 200, content.text
        assert content.headers["content-type"] == media
        frames = read_video(content.content)
        assert frames.shape[0] == 9
    gif = read_video(client.get(f"/v1/videos/{job['id']}/content", params={"format": "gif"}).content)
    first = Image.fromarray(gif[0]).resize((32, 32), Image.NEAREST)  # the GIF is enlarged by an integer factor
    digit = frame_digits(torch.from_numpy(np.array(first)).permute(2, 0, 1)[None])
    assert int(digit[0]) == 3
    assert client.delete(f"/v1/videos/{job['id']}").json()["deleted"] is True
    assert client.get(f"/v1/videos/{job['id']}").status_code == 404


def test_a_cancelled_job_frees_its_stream(client, server):
    job = client.post("/v1/videos", json={"prompt": PROMPT, "num_frames": 64, "cache": "fora:interval=2"}).json()
    wait_until(lambda: client.get(f"/v1/videos/{job['id']}").json()["frames_done"] > 0, 60)
    cancelled = client.post(f"/v1/videos/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert wait_until(lambda: server.runner.stats()["streams"] == 0)
    assert server.runner.stats()["cached_bytes"] == 0
    content = client.get(f"/v1/videos/{job['id']}/content")
    assert content.status_code == 409 and "cancelled" in content.json()["error"]["message"]
    again = client.post(f"/v1/videos/{job['id']}/cancel")
    assert again.status_code == 200  # cancelling a cancelled job changes nothing


@pytest.mark.parametrize("body, status, word", [
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": PROMPT, "num_frames": 65}, 422, "num_frames"),
    ({"prompt": PROMPT, "steps": 9, "window": 3}, 422, "multiple of window - 1"),
    ({"prompt": PROMPT, "window": 1}, 422, "window"),
    ({"prompt": PROMPT, "cache": "/etc/passwd"}, 422, "cache"),
    ({"prompt": PROMPT, "model": "other"}, 404, "serves"),
    ({"prompt": PROMPT, "colour": "red"}, 422, "unknown field"),
])
def test_bad_video_requests_get_their_status_and_one_line(client, body, status, word):
    response = client.post("/v1/videos", json=body)
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert word in message and "\n" not in message


def test_unknown_videos_bad_formats_and_unfinished_content(client):
    assert client.get("/v1/videos/video_nope").status_code == 404
    assert client.post("/v1/videos/video_nope/cancel").status_code == 404
    job = client.post("/v1/videos", json={"prompt": PROMPT, "num_frames": 33}).json()
    unfinished = client.get(f"/v1/videos/{job['id']}/content")
    assert unfinished.status_code == 409 and unfinished.json()["error"]["retryable"] is True
    assert client.get(f"/v1/videos/{job['id']}/content", params={"format": "avi"}).status_code == 422
    client.delete(f"/v1/videos/{job['id']}")


def test_the_job_limit_answers_429_with_retry_after(client, server):
    ids = [client.post("/v1/videos", json={"prompt": PROMPT, "num_frames": 64}).json()["id"] for _ in range(2)]
    refused = client.post("/v1/videos", json={"prompt": PROMPT})
    assert refused.status_code == 429 and refused.headers["retry-after"]
    for video_id in ids:
        client.delete(f"/v1/videos/{video_id}")
    assert wait_until(lambda: server.runner.stats()["streams"] == 0)


def test_images_are_refused_by_a_video_model(client):
    response = client.post("/v1/images/generations", json={"prompt": PROMPT})
    assert response.status_code == 422 and "/v1/videos" in response.json()["error"]["message"]


def test_a_video_stream_over_the_websocket_in_order_then_closed(server):
    from websockets.sync.client import connect

    with connect(server.ws_url + "/v1/video-stream", open_timeout=30) as socket:
        socket.send(json.dumps({"prompt": PROMPT, "seed": 0, "cache": "fora:interval=2"}))
        ready = json.loads(socket.recv(timeout=60))
        assert ready["type"] == "ready" and ready["lag"] == 4 and ready["num_frames"] is None
        indices, images = [], []
        while len(images) < 14:  # more than one clip of the model: the stream goes on
            header = json.loads(socket.recv(timeout=60))
            assert header["type"] == "frame"
            indices.append(header["index"])
            images.append(Image.open(io.BytesIO(socket.recv(timeout=60))).convert("RGB"))
        assert indices == list(range(14))
        assert int(frame_digits(torch.from_numpy(np.array(images[0])).permute(2, 0, 1)[None])[0]) == 3
        assert server.runner.stats()["streams"] == 1
    # closing the socket cancels the stream: its rows and caches go before the runner's next forward
    assert wait_until(lambda: server.runner.stats()["streams"] == 0)
    assert server.runner.stats()["cached_bytes"] == 0


def test_a_finite_websocket_stream_ends_with_done_and_bad_options_are_refused(server):
    from websockets.sync.client import connect

    with connect(server.ws_url + "/v1/video-stream", open_timeout=30) as socket:
        socket.send(json.dumps({"prompt": PROMPT, "num_frames": 5, "steps": 8, "window": 2}))
        assert json.loads(socket.recv(timeout=60))["type"] == "ready"
        headers = []
        while True:
            message = json.loads(socket.recv(timeout=60))
            if message["type"] == "done":
                break
            headers.append(message["index"])
            socket.recv(timeout=60)
        assert headers == list(range(5)) and message["frames"] == 5
    for options, word in (({"prompt": PROMPT, "window": 6, "steps": 12}, "multiple of window - 1"),
                          ({"prompt": ""}, "prompt"), ({"prompt": PROMPT, "num_frames": 0}, "num_frames")):
        with connect(server.ws_url + "/v1/video-stream", open_timeout=30) as socket:
            socket.send(json.dumps(options))
            error = json.loads(socket.recv(timeout=30))
            assert error["type"] == "error" and word in error["message"], error
