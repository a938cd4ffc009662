"""ASGI middleware: API keys, body-size limits and the server's own Prometheus metrics.

Plain ASGI (not Starlette's BaseHTTPMiddleware) so that streaming responses, WebSockets and client disconnects pass
through untouched.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

__all__ = ["ApiKeyMiddleware", "BodyLimitMiddleware", "ServerMetrics"]


async def _send_error(send: Any, status: int, message: str, kind: str, headers: dict[str, str] | None = None,
                      prefix: str = "") -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None,
                                 "retryable": False}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": prefix + "http.response.start", "status": status, "headers": raw})
    await send({"type": prefix + "http.response.body", "body": body})


class ApiKeyMiddleware:
    """`Authorization: Bearer KEY` on every path but the public ones (health checks, the page's static files).

    Browsers cannot set headers on a WebSocket, so `WS /v1/stream` also takes the key as `?api_key=`.
    """

    def __init__(self, app: Any, api_key: str, public: tuple[str, ...]) -> None:
        self.app = app
        self._key = api_key.encode()
        self._public = public

    def _is_public(self, path: str) -> bool:
        return any(path == p or (p != "/" and path.startswith(p + "/")) for p in self._public)

    def _authorized(self, scope: dict[str, Any]) -> bool:
        headers = dict(scope.get("headers") or ())
        given = headers.get(b"authorization", b"")
        if given.startswith(b"Bearer ") and hmac.compare_digest(given[7:].strip(), self._key):
            return True
        if scope["type"] == "websocket":
            from urllib.parse import parse_qs

            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            return any(hmac.compare_digest(k.encode(), self._key) for k in query.get("api_key", []))
        return False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or self._is_public(scope["path"]) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await receive()  # the connect message
            if "websocket.http.response" in (scope.get("extensions") or {}):  # refuse the handshake with a 401
                await _send_error(send, 401, "missing or wrong API key: send ?api_key=KEY or Authorization",
                                  "authentication_error", prefix="websocket.")
            else:
                await send({"type": "websocket.close", "code": 1008, "reason": "missing or wrong API key"})
            return
        await _send_error(send, 401, "missing or wrong API key: send Authorization: Bearer KEY",
                          "authentication_error", {"WWW-Authenticate": "Bearer"})


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`, whether it says its length up front or streams it in chunks."""

    def __init__(self, app: Any, max_bytes: int, exempt: tuple[str, ...] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        length = headers.get(b"content-length")
        message = f"the body is larger than {self.max_bytes} bytes"
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await _send_error(send, 413, message, "invalid_request_error")
            return
        received = 0
        started = False

        class _TooLarge(Exception):
            pass

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return event

        async def tracking_send(event: dict[str, Any]) -> None:
            nonlocal started
            if event["type"] == "http.response.start":
                started = True
            await send(event)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_error(send, 413, message, "invalid_request_error")


class ServerMetrics:
    """The server's own counters (the runner's live in its registry): requests by route and status, streams."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.http = Counter("cachekit_http_requests", "HTTP requests by route and status", ["route", "status"],
                            registry=r)
        self.http_seconds = Histogram("cachekit_http_request_seconds", "HTTP request handling time", ["route"],
                                      registry=r)
        self.in_progress = Gauge("cachekit_http_in_progress", "HTTP requests being handled", registry=r)
        self.disconnects = Counter("cachekit_client_disconnects", "Requests cancelled because the client left",
                                   registry=r)
        self.ws_open = Gauge("cachekit_ws_streams_open", "WebSocket image streams open", registry=r)
        self.ws_frames = Counter("cachekit_ws_frames", "Stream frames by direction and fate", ["kind"], registry=r)

    class Middleware:
        def __init__(self, app: Any, metrics: "ServerMetrics") -> None:
            self.app = app
            self.metrics = metrics

        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            status = {"code": 500}

            async def recording_send(event: dict[str, Any]) -> None:
                if event["type"] == "http.response.start":
                    status["code"] = event["status"]
                await send(event)

            started = time.perf_counter()
            self.metrics.in_progress.inc()
            try:
                await self.app(scope, receive, recording_send)
            finally:
                self.metrics.in_progress.dec()
                route = scope.get("route")
                name = getattr(route, "path", None) or ("/static" if scope["path"].startswith("/static/")
                                                        else "unmatched")
                self.metrics.http.labels(name, str(status["code"])).inc()
                self.metrics.http_seconds.labels(name).observe(time.perf_counter() - started)
