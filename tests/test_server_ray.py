"""The server app on Ray Serve: a local Ray on this machine, 2 CPU replicas of the digits model, loopback only.

One deployment for the module (starting Ray and two replicas is most of the time): requests spread over both
replicas and come back in the OpenAI shape with the prompted digit; the WebSocket route works through Ray's proxy;
past the replicas' `max_ongoing_requests` and the proxy's `max_queued_requests`, Ray's proxy answers 429 with
`Retry-After`. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("ray.serve")
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import ray  # noqa: E402
from ray import serve  # noqa: E402

from cachekit.pipelines.server import ServerLimits  # noqa: E402
from cachekit.pipelines.server.ray_app import REPLICA_HEADER, deployment, run_within  # noqa: E402
from cachekit.zoo.digits_classifier import recognise  # noqa: E402

API = "/v1/images/generations"
DEPLOY_TIMEOUT_S = 120
# max_batch 2 (one CFG request) and max_queue 2: each replica takes 2 requests at once, the proxy queues 2 more,
# so concurrent requests must use both replicas and a burst of 16 must meet Ray's backpressure.
RUNNER_OPTIONS = {"max_batch": 2, "max_queue": 2, "cpu_threads": 1}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_server():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment(model="digits", limits=ServerLimits(), runner_options=RUNNER_OPTIONS, replicas=2,
                         num_cpus=0.5)
        run_within(app, DEPLOY_TIMEOUT_S)
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/healthz", timeout=30).status_code == 200
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def as_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in images])


async def post_many(url: str, count: int, steps: int, retry_429: bool = False) -> list[httpx.Response]:
    """`count` requests at once; with `retry_429`, each retried after its `Retry-After` as a client would."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async def call(seed: int) -> httpx.Response:
            for _ in range(20):
                response = await client.post(API, json={"prompt": "a handwritten 7", "seed": seed,
                                                        "num_inference_steps": steps})
                if response.status_code != 429 or not retry_429:
                    return response
                await asyncio.sleep(float(response.headers["retry-after"]))
            return response

        return await asyncio.wait_for(asyncio.gather(*(call(i) for i in range(count))), timeout=90)


def test_two_replicas_serve_concurrent_requests(ray_server):
    status = serve.status().applications["cachekit"]
    assert status.status == "RUNNING"
    assert status.deployments["cachekit"].replica_states == {"RUNNING": 2}

    # Ray counts a request as queued until its router has picked a replica, so even 4 at once may meet a 429.
    responses = asyncio.run(post_many(ray_server, 8, steps=8, retry_429=True))
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]
    images = []
    for response in responses:
        body = response.json()
        assert set(body) == {"created", "data"} and abs(body["created"] - time.time()) < 600
        assert len(body["data"]) == 1 and body["data"][0]["cachekit"]["num_inference_steps"] == 8
        images.append(decode(body["data"][0]["b64_json"]))
    assert recognise(as_tensor(images)).tolist() == [7] * 8
    # at most 2 requests run on a replica at once, and the router sends none to wait while another has room
    assert len({r.headers[REPLICA_HEADER] for r in responses}) == 2


def test_a_websocket_stream_through_rays_proxy(ray_server):
    from websockets.sync.client import connect

    with connect(ray_server.replace("http", "ws") + "/v1/stream", open_timeout=30) as stream:
        stream.send(json.dumps({"prompt": "a handwritten 6", "guidance": "self"}))
        ready = json.loads(stream.recv(timeout=30))
        assert ready["type"] == "ready" and (ready["height"], ready["width"]) == (16, 16)
        stream.send(b"this is not an image")
        error = json.loads(stream.recv(timeout=30))
        assert error["type"] == "error" and "PNG or JPEG" in error["message"]


def test_rays_proxy_answers_429_with_retry_after_when_full(ray_server):
    responses = asyncio.run(post_many(ray_server, 16, steps=40))
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 429} and codes.count(200) >= 2, codes
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["retry-after"] == str(ServerLimits().retry_after_s)
    assert "backpressure" in rejected.text  # Ray's proxy's answer, not the runner's queue
