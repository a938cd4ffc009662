"""`create_app`: the HTTP and WebSocket front of one `Runner`.

A thin layer, as the design asks: parsing, validation, auth, limits and transport live here; batching, scheduling
and cache lifetimes stay in the runner, so every request, from this server or from Python, is served the same way.

    uvicorn "cachekit.pipelines.server:create_app" --factory        # or: cachekit serve

Endpoints: `POST /v1/images/generations` (OpenAI's images API, with `stream: true` for server-sent progress),
`POST /v1/requests/{id}/cancel`, `GET /v1/models`, `GET /healthz`, `GET /metrics`, `WS /v1/stream` (image
streams), for a video model `POST /v1/videos` and its job routes (`videos.py`) and `WS /v1/video-stream`
(`video_socket.py`), `GET /openapi.json`, and the web page at `/`.
"""


import asyncio
import base64
import contextlib
import io
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Body, FastAPI, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from fastapi.staticfiles import StaticFiles

from cachekit.errors import UsageError
from cachekit.plans import PlanError, resolve_plan

from ..requests import RequestCancelled, RequestFailed, RequestHandle
from ..runner import QueueFull, Runner, RunnerClosed
from .errors import ApiError, install_error_handlers
from .limits import ServerLimits
from .middleware import ApiKeyMiddleware, BodyLimitMiddleware, ServerMetrics
from .schemas import ErrorBody, ImagesResponse, generation_request_model, parse_size

__all__ = ["create_app", "png_base64", "DrainingServer"]

logger = logging.getLogger("cachekit.server")
STATIC = Path(__file__).parent / "static"
_ERRORS = {status: {"model": ErrorBody} for status in (401, 404, 409, 413, 422, 429, 503)}


def png_base64(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class _Served:
    """The server's side of its runner: what is in flight, by request id, and whether it takes work."""

    def __init__(self, runner: Runner | None, model: str, runner_options: dict[str, Any]) -> None:
        self.runner = runner
        self.owns_runner = runner is None
        self.model = model
        self.runner_options = runner_options
        self.ready = False
        self.draining = False
        self.inflight: dict[str, list[RequestHandle]] = {}
        self.model_id = model
        self.schedules: list[dict[str, Any]] = []

    def begin_drain(self) -> None:
        """Shutdown has begun: take no new work; say what is still in flight."""
        if self.draining:
            return
        self.draining = True
        ids = sorted(self.inflight)
        logger.info("shutting down: %d request(s) in flight%s", len(ids), f" ({', '.join(ids)})" if ids else "")

    def start(self) -> None:
        from cachekit import zoo

        if self.runner is None:
            self.runner = Runner(self.model, **self.runner_options)  # loaded on the runner's own thread

        self.model_id = zoo.bundled_name(self.runner.pipe) or type(self.runner.pipe).__name__
        transformer = getattr(self.runner.pipe, "transformer", None)
        if transformer is not None:  # what the page offers as cache tiers, each with the step count it runs
            self.schedules = [{key: row[key] for key in ("id", "num_inference_steps", "speedup")}
                              for row in zoo.shipped_schedule_rows(type(transformer).__name__)]


def create_app(
    runner: Runner | None = None,
    *,
    model: str = "digits",
    limits: ServerLimits = ServerLimits(),
    api_key: str | None = None,
    runner_options: dict[str, Any] | None = None,
    warm: bool = True,
) -> FastAPI:
    """The server app over `runner` (or over a runner it makes for `model` at start-up and closes at shutdown).

    `api_key`: every endpoint but `/healthz` and the page's static files then needs `Authorization: Bearer KEY`.
    `warm`: run one short generation before `/healthz` reports ready (the first forward pays one-off costs).
    """
    served = _Served(runner, model, dict(runner_options or {}))
    metrics = ServerMetrics()
    GenerationRequest = generation_request_model(limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(served.start)
        if warm:
            await served.runner.submit("warm-up", seed=0, num_inference_steps=2)
        served.ready = True
        logger.info("serving %s on the runner (max_batch=%d, max_queue=%d)", served.model_id,
                    served.runner.max_batch, served.runner.max_queue)
        try:
            yield
        finally:
            from .videos import cancel_video_jobs

            served.begin_drain()
            await cancel_video_jobs(app)
            await _shut_down(served, limits)

    app = FastAPI(title="cachekit", version="1", lifespan=lifespan,
                  description="Image generation with learned feature caching, batched across requests.")
    app.state.served = served
    install_error_handlers(app)
    app.add_middleware(ServerMetrics.Middleware, metrics=metrics)
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes, exempt=("/v1/stream",))
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key, public=("/healthz", "/", "/static"))

    def runner_or_503() -> Runner:
        if not served.ready or served.draining or served.runner is None:
            raise ApiError(503, "the server is starting or shutting down; retry shortly", type="unavailable",
                           retryable=True, headers={"Retry-After": str(limits.retry_after_s)})
        return served.runner

    # ------------------------------------------------------------------ generation
    @app.post("/v1/images/generations", response_model=ImagesResponse, responses=_ERRORS,
              summary="Create images (OpenAI-compatible)")
    async def generations(request: Request, body: GenerationRequest = Body(...)) -> Any:  # type: ignore[valid-type]
        runner = runner_or_503()
        if body.model is not None and body.model != served.model_id:
            raise ApiError(404, f"model: this server serves {served.model_id!r}, not {body.model!r}", param="model",
                           type="not_found_error")
        if getattr(runner.family, "supports_video_streams", False):
            raise ApiError(422, f"this server serves {served.model_id!r}, a video model: use POST /v1/videos or "
                                "WS /v1/video-stream", param="model")
        try:
            plan = resolve_plan(body.cache, allow_files=False)
        except PlanError as err:
            raise ApiError(422, f"cache: {err}", param="cache") from None
        size: dict[str, int] = {}
        if body.size is not None:
            height, width = parse_size(body.size)
            if max(height, width) > limits.max_side:
                raise ApiError(422, f"size: at most {limits.max_side} pixels a side, got {body.size}", param="size")
            size = {"height": height, "width": width}
        request_id = body.request_id or f"req-{uuid.uuid4().hex[:16]}"
        if request_id in served.inflight:
            raise ApiError(409, f"request_id: {request_id!r} is already in flight", param="request_id")
        handles: list[RequestHandle] = []
        try:
            for i in range(body.n):
                handles.append(runner.submit(
                    body.prompt, seed=body.seed + i, num_inference_steps=body.num_inference_steps,
                    guidance_scale=body.guidance_scale, negative_prompt=body.negative_prompt, schedule=plan,
                    deadline_s=None if body.deadline_ms is None else body.deadline_ms / 1000.0,
                    allow_degrade=body.allow_degrade, **size))
        except QueueFull as err:
            _cancel_all(handles)
            raise ApiError(429, str(err), type="rate_limit_error", retryable=True,
                           headers={"Retry-After": str(limits.retry_after_s)}) from None
        except RunnerClosed as err:
            _cancel_all(handles)
            raise ApiError(503, str(err), type="unavailable", retryable=True) from None
        except UsageError as err:
            _cancel_all(handles)
            raise ApiError(422, _field_line(str(err)), param=_field_of(str(err))) from None
        served.inflight[request_id] = handles
        seeds = [body.seed + i for i in range(body.n)]
        if body.stream:
            return EventSourceResponse(_progress(served, request_id, handles, seeds, body.preview))
        try:
            images = await _wait_or_disconnect(request, handles)
        except asyncio.CancelledError:
            if served.draining:
                logger.info("shutdown: request %s cancelled", request_id)
            raise
        finally:
            served.inflight.pop(request_id, None)
        if served.draining:
            logger.info("shutdown: request %s %s", request_id, "finished" if images is not None else "cancelled")
        if images is None:  # the client went away: its rows and caches are already freed
            metrics.disconnects.inc()
            return Response(status_code=499)
        return {"created": int(time.time()),
                "data": [_image_entry(image, handle, seed) for image, handle, seed in zip(images, handles, seeds)]}

    @app.post("/v1/requests/{request_id}/cancel", responses=_ERRORS, summary="Cancel a request's images")
    async def cancel(request_id: str) -> dict[str, Any]:
        handles = served.inflight.get(request_id)
        if handles is None:
            raise ApiError(404, f"no request {request_id!r} in flight", type="not_found_error")
        cancelled = sum(handle.cancel() for handle in handles)
        return {"id": request_id, "cancelled": cancelled}

    # ------------------------------------------------------------------ the rest
    @app.get("/v1/models", summary="The served model, and the shipped schedules it takes as `cache` (each with "
                                   "the step count it runs)")
    async def models() -> dict[str, Any]:
        video = served.runner is not None and getattr(served.runner.family, "supports_video_streams", False)
        return {"object": "list", "data": [{"id": served.model_id, "object": "model", "created": 0,
                                            "owned_by": "cachekit", "kind": "video" if video else "image",
                                            "schedules": served.schedules}]}

    @app.get("/healthz", summary="200 once the model is loaded and warm, 503 before and while shutting down")
    async def healthz() -> JSONResponse:
        ok = served.ready and not served.draining
        body = {"status": "ok" if ok else "unavailable", "model": served.model_id}
        if ok:
            stats = served.runner.stats()
            body.update(queued=stats["queued"], active=stats["active"])
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics: the runner's and the server's")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        runner_text = generate_latest(served.runner.prometheus_registry) if served.runner is not None else b""
        return Response(runner_text + generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/stats", summary="The runner's figures as JSON (what the page's chart reads)")
    async def stats() -> dict[str, Any]:
        return runner_or_503().stats()

    from .stream_socket import add_stream_route

    add_stream_route(app, served, limits, metrics, runner_or_503)
    from .video_socket import add_video_stream_route
    from .videos import add_video_routes

    add_video_routes(app, served, limits, runner_or_503)
    add_video_stream_route(app, served, limits, metrics, runner_or_503)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app the moment shutdown begins.

    uvicorn lets open connections finish (up to `timeout_graceful_shutdown`) before it runs the lifespan's shutdown,
    so without this the app would hear of the shutdown only after they closed, too late to refuse new work on
    kept-alive connections or to say which requests were finished and which cancelled.
    """

    def handle_exit(self, sig: int, frame: Any) -> None:
        served = getattr(getattr(self.config.app, "state", None), "served", None)
        if served is not None:
            served.begin_drain()
        super().handle_exit(sig, frame)


# ---------------------------------------------------------------------------------------------------- helpers
def _cancel_all(handles: list[RequestHandle]) -> None:
    for handle in handles:
        handle.cancel()


def _field_of(message: str) -> str | None:
    for name in ("num_inference_steps", "guidance_scale", "height", "width", "seed", "prompt", "schedule"):
        if name in message:
            return {"schedule": "cache", "height": "size", "width": "size"}.get(name, name)
    return None


def _field_line(message: str) -> str:
    field = _field_of(message)
    return message if field is None or message.startswith(field) else f"{field}: {message}"


def _image_entry(image: Any, handle: RequestHandle, seed: int) -> dict[str, Any]:
    info = handle.info
    return {"b64_json": png_base64(image), "revised_prompt": None,
            "cachekit": {"request_id": info.request_id, "seed": seed, "plan": info.plan,
                         "requested_plan": info.requested_plan, "degraded": info.degraded,
                         "num_inference_steps": info.num_inference_steps, "latency_s": round(info.latency_s, 4),
                         "queue_wait_s": round(info.queue_wait_s, 4),
                         "time_to_first_step_s": round(info.time_to_first_step_s, 4),
                         "reused_share": info.reused_share, "deadline_missed": info.deadline_missed}}


async def _wait_or_disconnect(request: Request, handles: list[RequestHandle]) -> list[Any] | None:
    """The images, or None (with every handle cancelled) if the client disconnects first."""
    waiting = asyncio.ensure_future(asyncio.gather(*(_result(h) for h in handles)))
    try:
        while not waiting.done():
            done, _ = await asyncio.wait({waiting}, timeout=0.1)
            if not done and await request.is_disconnected():
                _cancel_all(handles)
                waiting.cancel()
                with contextlib.suppress(BaseException):
                    await waiting
                return None
        return waiting.result()
    except asyncio.CancelledError:  # the server is cancelling this handler (client gone, shutdown)
        _cancel_all(handles)
        waiting.cancel()
        with contextlib.suppress(BaseException):  # retrieve its outcome, so asyncio logs no lost exception
            await waiting
        raise


async def _result(handle: RequestHandle) -> Any:
    try:
        return await handle
    except RequestFailed as err:
        raise ApiError(500, str(err), type="server_error", retryable=False) from None
    except RequestCancelled as err:
        raise ApiError(503, str(err), type="cancelled", retryable=True) from None


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return format_sse_event(event=event, data_str=json.dumps(data))


async def _progress(served: _Served, request_id: str, handles: list[RequestHandle], seeds: list[int],
                    preview: bool) -> AsyncIterator[bytes]:
    """Server-sent events: queue position while waiting, each step, each image, errors with `retryable`.

    When the client goes away, Starlette cancels this generator: its requests are cancelled with it.
    """
    finished = 0
    try:
        yield _sse("queued", {"request_id": request_id, "ids": [h.id for h in handles],
                                                    "position": served.runner.queue_position(handles[0])})
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, handle: RequestHandle) -> None:
            async for event in handle.aevents():
                await merged.put((index, event))

        pumps = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
        try:
            last_position = None
            while finished < len(handles):
                try:
                    index, event = await asyncio.wait_for(merged.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    position = served.runner.queue_position(handles[0])
                    if position is not None and position != last_position:
                        last_position = position
                        yield _sse("queued", {"request_id": request_id, "position": position})
                    continue
                kind = event["type"]
                if kind == "step":
                    data = {"index": index, "step": event["step"], "num_steps": event["num_steps"]}
                    if preview and event.get("preview") is not None:
                        data["preview_b64"] = png_base64(event["preview"])
                    yield _sse("step", data)
                elif kind == "started":
                    yield _sse("started", {"index": index, "queue_wait_s": event["queue_wait_s"]})
                elif kind == "done":
                    finished += 1
                    image = handles[index].result(timeout=0)
                    yield _sse("image", {"index": index, **_image_entry(
                        image, handles[index], seeds[index])})
                elif kind in ("failed", "cancelled"):
                    finished += 1
                    message = event.get("error") or f"cancelled: {event.get('reason', '')}"
                    yield _sse("error", {"index": index, "message": message,
                                                               "retryable": kind == "cancelled"})
            yield _sse("done", {"request_id": request_id})
        finally:
            for task in pumps:
                task.cancel()
    finally:
        _cancel_all(handles)  # a no-op for finished ones; frees the rest when the client left early
        served.inflight.pop(request_id, None)


async def _shut_down(served: _Served, limits: ServerLimits) -> None:
    """Stop taking work; give in-flight requests `shutdown_grace_s` to finish, then cancel the rest; log which."""
    served.begin_drain()
    handles = [(rid, h) for rid, hs in list(served.inflight.items()) for h in hs]
    deadline = time.monotonic() + limits.shutdown_grace_s
    while any(not h.done() for _, h in handles) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    late = [(rid, h) for rid, h in handles if not h.done()]
    for _, handle in late:
        handle.cancel()
    finished = len(handles) - len(late)
    logger.info("shutdown: %d in-flight image(s) finished, %d cancelled%s", finished, len(late),
                f" ({', '.join(sorted({rid for rid, _ in late}))})" if late else "")
    if served.owns_runner and served.runner is not None:
        await asyncio.to_thread(served.runner.close)
