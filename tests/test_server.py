"""`cachekit serve`'s app, live: a real uvicorn on a loopback port, httpx and a WebSocket client, the digits model.

Images are checked with the project's own digit classifier and against the same request as a solo stock pipeline
call (`PipelineCall`, what `cachekit generate` runs) within 1/255 per uint8 pixel.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from cachekit import zoo
from cachekit.pipelines import PipelineCall, Runner
from cachekit.zoo.digits_classifier import recognise

fastapi = pytest.importorskip("fastapi")
websockets = pytest.importorskip("websockets")

from cachekit.pipelines.server import ServerLimits, ServerThread, create_app  # noqa: E402

PIXEL_TOLERANCE = 1  # of 255
API = "/v1/images/generations"


@pytest.fixture(scope="module")
def server():
    with Runner(max_batch=16) as runner, ServerThread(create_app(runner=runner)) as live:
        live.runner = runner
        yield live


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def solo_pipe():
    pipe = zoo.load_pipeline("digits")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def as_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(i)).permute(2, 0, 1) for i in images])


def max_pixel_difference(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" ([0-9.e+-]+)"
    match = re.search(r"^" + pattern + "$", text, re.M)
    return float(match.group(1)) if match else 0.0


# ----------------------------------------------------------------------------- the API
def test_generations_return_the_openai_shape_and_the_prompted_digits(client, solo_pipe):
    response = client.post(API, json={"prompt": "a handwritten 3", "n": 2, "seed": 5, "cache": "digits-fast",
                                      "response_format": "b64_json", "size": "16x16"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"created", "data"} and abs(body["created"] - time.time()) < 600
    assert len(body["data"]) == 2
    images = [decode(entry["b64_json"]) for entry in body["data"]]
    assert recognise(as_tensor(images)).tolist() == [3, 3]
    for seed, entry, image in zip((5, 6), body["data"], images):
        info = entry["cachekit"]
        assert info["seed"] == seed and info["plan"] == "digits-fast" and not info["degraded"]
        assert 0.3 < info["reused_share"] < 0.8 and info["latency_s"] > 0 and info["num_inference_steps"] == 20
        expected = PipelineCall(["a handwritten 3"], num_inference_steps=20, seeds=(seed,),
                                kwargs={"guidance_scale": 4.0}, output_type="pil")(solo_pipe, plan="digits-fast")[0]
        assert max_pixel_difference(image, expected) <= PIXEL_TOLERANCE


def test_same_prompt_and_seed_give_the_runners_solo_result(client, server):
    expected = server.runner.submit("a handwritten 8", seed=11, num_inference_steps=10).result(timeout=120)
    response = client.post(API, json={"prompt": "a handwritten 8", "seed": 11, "num_inference_steps": 10})
    assert response.status_code == 200
    assert max_pixel_difference(decode(response.json()["data"][0]["b64_json"]), expected) <= PIXEL_TOLERANCE


def test_a_schedule_without_steps_runs_the_step_count_it_was_searched_at(client, solo_pipe):
    """digits-fastest is a joint-search point at 8 steps: a request that leaves num_inference_steps out runs 8."""
    response = client.post(API, json={"prompt": "a handwritten 4", "seed": 2, "cache": "digits-fastest",
                                      "response_format": "b64_json"})
    assert response.status_code == 200, response.text
    entry = response.json()["data"][0]
    assert entry["cachekit"]["num_inference_steps"] == 8 and entry["cachekit"]["plan"] == "digits-fastest"
    expected = PipelineCall(["a handwritten 4"], num_inference_steps=8, seeds=(2,), kwargs={"guidance_scale": 4.0},
                            output_type="pil")(solo_pipe, plan="digits-fastest")[0]
    assert max_pixel_difference(decode(entry["b64_json"]), expected) <= PIXEL_TOLERANCE


def test_models_healthz_stats_metrics_and_openapi(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "digits"
    offered = {row["id"]: row["num_inference_steps"] for row in models["data"][0]["schedules"]}
    assert offered == {"digits-lossless": 20, "digits-fast": 20, "digits-fastest": 8}  # not the video model's
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    stats = client.get("/v1/stats").json()
    assert stats["requests"].get("done", 0) >= 1 and "latency_s" in stats
    text = client.get("/metrics").text
    assert metric(text, "cachekit_requests_total", 'outcome="done"') >= 1
    assert "cachekit_http_requests_total" in text and "cachekit_cached_bytes" in text
    spec = client.get("/openapi.json").json()
    body = spec["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    assert body["n"]["maximum"] == ServerLimits().max_n and "cache" in body
    assert {API, "/v1/models", "/healthz", "/metrics", "/v1/requests/{request_id}/cancel"} <= set(spec["paths"])
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


def test_progress_events_stream_queue_steps_image_and_done(client):
    events = []
    with client.stream("POST", API, json={"prompt": "a handwritten 5", "num_inference_steps": 6, "stream": True,
                                          "preview": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    kinds = [k for k, _ in events]
    assert kinds[0] == "queued" and kinds[-1] == "done" and kinds.count("image") == 1
    steps = [d["step"] for k, d in events if k == "step"]
    assert steps == list(range(1, 7))
    image = next(d for k, d in events if k == "image")
    assert recognise(as_tensor([decode(image["b64_json"])])).tolist() == [5]


def test_cancel_by_request_id_frees_rows_and_caches(client, server):
    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            call = asyncio.ensure_future(http.post(API, json={
                "prompt": "a handwritten 1", "num_inference_steps": 100, "n": 2, "cache": "fora:interval=2",
                "request_id": "cancel-me"}))
            for _ in range(200):
                await asyncio.sleep(0.05)
                if (await http.post("/v1/requests/cancel-me/cancel")).status_code == 200:
                    break
            return await call

    response = asyncio.run(scenario())
    assert response.status_code == 503 and response.json()["error"]["retryable"] is True
    assert client.post("/v1/requests/cancel-me/cancel").status_code == 404
    assert wait_until_idle(client)


def wait_until_idle(client, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = client.get("/v1/stats").json()  # live counts; the gauges below are set as requests leave
        text = client.get("/metrics").text
        if stats["active"] == 0 and stats["queued"] == 0 and stats["cached_bytes"] == 0 and \
                metric(text, "cachekit_active_requests") == 0 and metric(text, "cachekit_cached_bytes") == 0:
            return True
        time.sleep(0.1)
    return False


def test_a_client_that_disconnects_mid_generation_has_its_request_cancelled(client, server):
    import socket

    before = client.get("/metrics").text
    body = json.dumps({"prompt": "a handwritten 4", "num_inference_steps": 100, "n": 4}).encode()
    raw = socket.create_connection(("127.0.0.1", server.port))
    raw.sendall(b"POST " + API.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    deadline = time.monotonic() + 30
    while client.get("/v1/stats").json()["active"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    raw.close()  # gone mid-generation
    assert wait_until_idle(client)
    after = client.get("/metrics").text
    assert metric(after, "cachekit_requests_total", 'outcome="cancelled"') >= \
        metric(before, "cachekit_requests_total", 'outcome="cancelled"') + 4
    assert metric(after, "cachekit_client_disconnects_total") >= metric(before, "cachekit_client_disconnects_total") + 1
    assert metric(after, "cachekit_requests_total", 'outcome="done"') == \
        metric(before, "cachekit_requests_total", 'outcome="done"')


def test_a_client_that_leaves_a_progress_stream_has_its_request_cancelled(client, server):
    before = client.get("/metrics").text
    with httpx.Client(base_url=server.url, timeout=60) as own:
        with own.stream("POST", API, json={"prompt": "a handwritten 2", "num_inference_steps": 100,
                                           "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("event: step"):
                    break  # leave after the first step
    assert wait_until_idle(client)
    after = client.get("/metrics").text
    assert metric(after, "cachekit_requests_total", 'outcome="cancelled"') >= \
        metric(before, "cachekit_requests_total", 'outcome="cancelled"') + 1


# ----------------------------------------------------------------------------- bad input
BAD_REQUESTS = [
    # (description, how to send it, expected status, a word the one-line message must name)
    ("malformed JSON", dict(content=b'{"prompt": "a', headers={"content-type": "application/json"}), 422, "JSON"),
    ("a JSON list", dict(json=["a handwritten 1"]), 422, ""),
    ("no body", dict(), 422, ""),
    ("missing prompt", dict(json={"n": 1}), 422, "prompt"),
    ("prompt not a string", dict(json={"prompt": 7}), 422, "prompt"),
    ("blank prompt", dict(json={"prompt": "   "}), 422, "prompt"),
    ("huge prompt", dict(json={"prompt": "7" * 5000}), 422, "prompt"),
    ("n zero", dict(json={"prompt": "a 1", "n": 0}), 422, "n"),
    ("n too many", dict(json={"prompt": "a 1", "n": 1000}), 422, "n"),
    ("n a string", dict(json={"prompt": "a 1", "n": "two"}), 422, "n"),
    ("steps one", dict(json={"prompt": "a 1", "num_inference_steps": 1}), 422, "num_inference_steps"),
    ("steps huge", dict(json={"prompt": "a 1", "num_inference_steps": 10**6}), 422, "num_inference_steps"),
    ("size malformed", dict(json={"prompt": "a 1", "size": "big"}), 422, "size"),
    ("size not a multiple", dict(json={"prompt": "a 1", "size": "17x16"}), 422, "size"),
    ("size too large", dict(json={"prompt": "a 1", "size": "4096x4096"}), 422, "size"),
    ("url response format", dict(json={"prompt": "a 1", "response_format": "url"}), 422, "response_format"),
    ("negative seed", dict(json={"prompt": "a 1", "seed": -3}), 422, "seed"),
    ("guidance out of range", dict(json={"prompt": "a 1", "guidance_scale": 1e9}), 422, "guidance_scale"),
    ("unknown cache name", dict(json={"prompt": "a 1", "cache": "warp-speed"}), 422, "cache"),
    ("a path as cache", dict(json={"prompt": "a 1", "cache": "/etc/passwd"}), 422, "cache"),
    ("a schedule file as cache", dict(json={"prompt": "a 1", "cache": "cachekit/zoo/schedules/digits-fast.json"}),
     422, "cache"),
    ("a calibration file in a policy", dict(json={"prompt": "a 1", "cache": "teacache:calibration=/tmp/x.json"}),
     422, "cache"),
    ("bad policy option", dict(json={"prompt": "a 1", "cache": "fora:interval=banana"}), 422, "cache"),
    ("schedule for other steps", dict(json={"prompt": "a 1", "cache": "digits-fast", "num_inference_steps": 10}),
     422, "cache"),
    ("unknown field", dict(json={"prompt": "a 1", "colour": "red"}), 422, "colour"),
    ("deadline zero", dict(json={"prompt": "a 1", "deadline_ms": 0}), 422, "deadline_ms"),
    ("bad request id", dict(json={"prompt": "a 1", "request_id": "../../etc"}), 422, "request_id"),
    ("another model", dict(json={"prompt": "a 1", "model": "dall-e-3"}), 404, "model"),
    ("huge body", dict(json={"prompt": "a 1", "negative_prompt": "x" * 200_000}), 413, "bytes"),
]


@pytest.mark.parametrize("description, send, status, word", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_their_status_and_one_clear_line(client, description, send, status, word):
    before = client.get("/v1/stats").json()["requests"]
    response = client.post(API, **send)
    assert response.status_code == status, (description, response.text)
    error = response.json()["error"]
    assert "\n" not in error["message"] and len(error["message"]) < 400
    assert word in error["message"], error["message"]
    assert client.get("/healthz").status_code == 200
    assert client.get("/v1/stats").json()["requests"] == before  # nothing was queued


def test_unknown_paths_and_cancels_are_404(client):
    assert client.get("/v1/nothing").status_code == 404
    assert client.post("/v1/requests/never-was/cancel").json()["error"]["type"] == "not_found_error"


# ----------------------------------------------------------------------------- streams over the WebSocket
def digit_frames(count: int) -> list[bytes]:
    from cachekit.zoo.digits_data import load_split

    images, _ = load_split("heldout")
    frames = []
    for image in images[:count]:
        array = (image.permute(1, 2, 0).numpy() * 255).clip(0, 255).astype(np.uint8) \
            if image.dtype.is_floating_point else image.permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(array).convert("RGB").save(buffer, format="PNG")
        frames.append(buffer.getvalue())
    return frames


def test_an_image_stream_over_the_websocket(server):
    from websockets.sync.client import connect

    frames = digit_frames(4)
    with connect(server.ws_url + "/v1/stream", open_timeout=30) as socket:
        socket.send(json.dumps({"prompt": "a handwritten 6", "guidance": "self"}))
        ready = json.loads(socket.recv(timeout=30))
        assert ready["type"] == "ready" and (ready["height"], ready["width"]) == (16, 16)
        socket.send(b"this is not an image")
        error = json.loads(socket.recv(timeout=30))
        assert error["type"] == "error" and "PNG or JPEG" in error["message"] and not error["retryable"]
        received = []
        for frame in frames:
            socket.send(frame)
            reply = socket.recv(timeout=60)
            assert isinstance(reply, bytes), reply
            received.append(Image.open(io.BytesIO(reply)))
        assert all(image.size == (16, 16) for image in received)
    assert wait_until_idle(httpx.Client(base_url=server.url))


def test_stream_options_are_checked(server):
    from websockets.sync.client import connect

    with connect(server.ws_url + "/v1/stream", open_timeout=30) as socket:
        socket.send(json.dumps({"prompt": "a 1", "guidance": "sideways"}))
        error = json.loads(socket.recv(timeout=30))
        assert error["type"] == "error" and "guidance" in error["message"]


# ----------------------------------------------------------------------------- API keys and a full queue
def test_an_api_key_guards_every_endpoint_but_healthz(server):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    with ServerThread(create_app(runner=server.runner, api_key="sesame", warm=False)) as guarded:
        with httpx.Client(base_url=guarded.url, timeout=120) as http:
            assert http.get("/healthz").status_code == 200
            for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/v1/stats"),
                                 ("POST", API), ("GET", "/openapi.json")):
                response = http.request(method, path, json={"prompt": "a 1"} if method == "POST" else None)
                assert response.status_code == 401, path
                assert "API key" in response.json()["error"]["message"]
            wrong = http.get("/v1/models", headers={"Authorization": "Bearer open-sesame"})
            assert wrong.status_code == 401
            ok = http.post(API, json={"prompt": "a handwritten 9", "num_inference_steps": 4},
                           headers={"Authorization": "Bearer sesame"})
            assert ok.status_code == 200
        with pytest.raises(InvalidStatus) as refused:
            connect(guarded.ws_url + "/v1/stream", open_timeout=30)
        assert refused.value.response.status_code == 401
        with connect(guarded.ws_url + "/v1/stream?api_key=sesame", open_timeout=30) as socket:
            socket.send(json.dumps({"prompt": "a 1"}))
            assert json.loads(socket.recv(timeout=30))["type"] == "ready"


def test_a_full_queue_answers_429_with_retry_after_and_loses_nothing_accepted():
    async def burst(url):
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            return await asyncio.gather(*(http.post(API, json={"prompt": f"a handwritten {i % 10}", "seed": i,
                                                               "num_inference_steps": 10})
                                          for i in range(12)))

    with Runner(max_batch=2, max_queue=2) as runner, ServerThread(create_app(runner=runner, warm=False)) as small:
        responses = asyncio.run(burst(small.url))
        statuses = [r.status_code for r in responses]
        assert statuses.count(429) >= 1 and statuses.count(200) >= 2 and set(statuses) <= {200, 429}
        for response in responses:
            if response.status_code == 429:
                assert response.headers["Retry-After"].isdigit() and response.json()["error"]["retryable"]
            else:
                assert len(response.json()["data"]) == 1
        assert httpx.get(small.url + "/healthz").status_code == 200


def test_graceful_shutdown_finishes_or_cancels_in_flight_requests_and_logs_which(caplog):
    import logging
    import threading

    caplog.set_level(logging.INFO, logger="cachekit.server")
    results = {}
    with Runner(max_batch=4) as runner:
        # a 3 s grace: "quick" (10 steps) ends well inside it even on a loaded 2-core machine (it did not always
        # inside 1 s); "slow" (100 steps of at least 0.1 s) cannot
        live = ServerThread(create_app(runner=runner, warm=False, limits=ServerLimits(shutdown_grace_s=3)),
                          grace_s=3)
        with live:
            def post(name, steps):
                results[name] = httpx.post(live.url + API, timeout=60, json={
                    "prompt": "a handwritten 0", "num_inference_steps": steps, "request_id": name})

            threads = [threading.Thread(target=post, args=a) for a in (("quick", 10), ("slow", 100))]
            for thread in threads:
                thread.start()
            while runner.stats()["active"] < 2:
                time.sleep(0.005)
            runner.pipe.transformer.register_forward_pre_hook(lambda *_: time.sleep(0.1))  # "slow" outlasts 3 s
        for thread in threads:
            thread.join(60)
        deadline = time.monotonic() + 10  # the cancelled request leaves at the runner's next tick
        while (runner.stats()["active"] or runner.stats()["queued"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runner.stats()["active"] == 0 and runner.stats()["queued"] == 0
    assert results["quick"].status_code == 200
    assert "slow" not in results or results["slow"].status_code != 200  # cut off at the grace period
    log = caplog.text
    assert "shutting down: 2 request(s) in flight (quick, slow)" in log
    assert "shutdown: request quick finished" in log and "shutdown: request slow cancelled" in log


def test_misbehaving_clients_cannot_stall_the_others(server, client):
    """A stream that floods frames, one that sends a huge frame and one that never reads its output, all open
    while another client's request is served and a well-behaved stream gets its frames back."""
    from websockets.sync.client import connect

    frames = digit_frames(2)
    huge = b"\x89PNG" + bytes(3 * 1024 * 1024)
    with connect(server.ws_url + "/v1/stream", open_timeout=30, max_size=None) as flood, \
            connect(server.ws_url + "/v1/stream", open_timeout=30) as never_reads, \
            connect(server.ws_url + "/v1/stream", open_timeout=30) as polite:
        for socket in (flood, never_reads, polite):
            socket.send(json.dumps({"prompt": "a handwritten 2"}))
            assert json.loads(socket.recv(timeout=30))["type"] == "ready"
        flood.send(huge)
        for _ in range(200):  # far over 30 frames per second
            flood.send(frames[0])
        for _ in range(100):
            never_reads.send(frames[1])
        response = client.post(API, json={"prompt": "a handwritten 4", "n": 2, "num_inference_steps": 10})
        assert response.status_code == 200
        assert recognise(as_tensor([decode(d["b64_json"]) for d in response.json()["data"]])).tolist() == [4, 4]
        polite.send(frames[0])
        while isinstance(reply := polite.recv(timeout=60), str):  # skip notices, if any
            pass
        assert Image.open(io.BytesIO(reply)).size == (16, 16)
        notices = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (any("over the limit" in n for n in notices)
                                                   and any("frames per second" in n for n in notices)):
            message = flood.recv(timeout=30)
            if isinstance(message, str):
                notices.append(json.loads(message)["message"])
        assert any("frames per second" in n for n in notices), notices
        assert any("bytes, over the limit of" in n for n in notices), notices
    assert wait_until_idle(client)
    text = client.get("/metrics").text
    assert metric(text, "cachekit_ws_frames_total", 'kind="dropped_rate"') > 0
    assert metric(text, "cachekit_ws_frames_total", 'kind="rejected"') >= 1
