"""schemathesis against the live server's own /openapi.json: no input, valid or not, gets a 5xx.

A server with small limits (few steps, small sizes), so that every valid request the fuzzer makes is cheap.
"""

from __future__ import annotations

import httpx
import pytest

from cachekit.pipelines import Runner

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from cachekit.pipelines.server import ServerLimits, ServerThread, create_app  # noqa: E402

LIMITS = ServerLimits(max_n=2, max_steps=4, max_side=32, max_prompt_chars=64)


@pytest.fixture(scope="module")
def server():
    with Runner(max_batch=8, max_queue=64) as runner, \
            ServerThread(create_app(runner=runner, limits=LIMITS, warm=False)) as live:
        yield live


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzing_the_openapi_schema_finds_no_server_error(server, mode):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    seen: list[tuple[str, int]] = []

    @given(case=schema.as_strategy(generation_mode=mode))
    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call(base_url=server.url, timeout=60)
        seen.append((case.operation.label, response.status_code))
        assert response.status_code < 500, (case.operation.label, case.body, response.text[:300])

    check()
    if mode is GenerationMode.POSITIVE:
        assert len({label for label, _ in seen}) >= 5  # every operation was reached
    else:  # only the generation endpoints take input that can be wrong
        labels = {label for label, _ in seen}
        assert "POST /v1/images/generations" in labels
        assert labels <= {"POST /v1/images/generations", "POST /v1/videos", "GET /v1/videos/{video_id}/content"}
        assert all(400 <= status < 500 for _, status in seen)
    assert httpx.get(server.url + "/healthz").status_code == 200
