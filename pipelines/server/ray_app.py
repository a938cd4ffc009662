"""`create_app` on Ray Serve: one `Runner` per replica (and per GPU), Ray's autoscaling, 429 backpressure.

    cachekit serve --ray --replicas 2                                  # or, with Ray's own CLI:
    serve run cachekit.pipelines.server.ray_app:build_app model=digits replicas=2

Each replica is one process holding one pipeline and one runner; the server app inside it is the very app
`cachekit serve` runs under uvicorn, so every endpoint (SSE, WebSocket streams, cancel, metrics) behaves the same.
The runner batches within a replica; Ray's proxy spreads requests over replicas and queues the rest:

- `max_ongoing_requests` (per replica) is two batches' worth (one running, one waiting in the runner to fill rows
  as they free up), and at most the runner's `max_queue`, so the runner's own queue never fills. More would only
  move the queue from Ray's proxy, where it can go to any replica, into one runner.
- `max_queued_requests` (per proxy) is the runner's `max_queue`; past it Ray's proxy answers itself, before any
  replica sees the request. Ray's default for that answer is 503; `BackpressureConfig(status_code=429)` makes it
  429 with `Retry-After`, what the uvicorn server answers when its runner's queue is full. Ray counts a request
  as queued until its router has picked a replica, so a burst can meet a 429 before every replica is busy.
- `replicas="auto"` (or "MIN-MAX") lets Ray's autoscaler add replicas when ongoing requests per replica pass one
  batch (`target_ongoing_requests = max_batch`).

Metrics (`/metrics`, `/v1/stats`) are per replica, like the runner: each response says which replica served it
in the `x-cachekit-replica` header. Needs a Ray whose `serve.ingress()` takes no app (tested on Ray 2.60).
"""

from __future__ import annotations

import signal
import time
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from .limits import ServerLimits

__all__ = ["CachekitReplica", "build_app", "deployment", "run_on_ray", "run_within", "REPLICA_HEADER"]

REPLICA_HEADER = "x-cachekit-replica"


class _ReplicaHeader:
    """Pure ASGI middleware naming the replica on every HTTP response (a `BaseHTTPMiddleware` would wrap
    streamed bodies and hide client disconnects from the app, which cancels a request's rows on them)."""

    def __init__(self, app: Any, replica_id: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica_id.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_with_header)


@serve.deployment(name="cachekit")
@serve.ingress()
class CachekitReplica:
    """One replica: the runner, built in `__init__`, and the server app over it.

    `@serve.ingress()` with no app, plus `__serve_build_asgi_app__`, is Ray's late-bound ingress: the app is built in
    the replica, after `__init__`, so it can close over this replica's runner. `@serve.ingress(app)` needs the app at
    decoration time (one app, pickled to every replica, with no runner yet), and a plain `async __call__(request)`
    deployment gets `Request` objects only, no WebSockets. Ray runs the app's lifespan (warm-up, then readiness; at
    shutdown the drain) around the replica's life, as uvicorn does.
    """

    def __init__(self, model: str, limits: ServerLimits, api_key: str | None,
                 runner_options: dict[str, Any]) -> None:
        from ..runner import Runner

        self.limits, self.api_key = limits, api_key
        self.runner = Runner(model, **runner_options)  # loaded on the runner's own thread
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self) -> Any:
        from .app import create_app

        app = create_app(runner=self.runner, limits=self.limits, api_key=self.api_key)
        app.add_middleware(_ReplicaHeader, replica_id=self.replica_id)
        return app

    def __del__(self) -> None:  # after the app's lifespan has drained (Ray calls it then)
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.close()


def deployment(*, model: str = "digits", limits: ServerLimits = ServerLimits(), api_key: str | None = None,
               runner_options: dict[str, Any] | None = None, replicas: int | str = 1,
               num_cpus: float = 1.0, autoscaling_config: dict[str, Any] | None = None) -> Application:
    """The bound application: `replicas` an int (fixed), "auto" or "MIN-MAX" (autoscaled between them)."""
    import torch

    runner_options = dict(runner_options or {})
    max_batch, max_queue = runner_options.get("max_batch", 16), runner_options.get("max_queue", 256)
    options: dict[str, Any] = dict(
        max_ongoing_requests=min(2 * max_batch, max_queue), max_queued_requests=max_queue,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=limits.retry_after_s),
        graceful_shutdown_timeout_s=limits.shutdown_grace_s + 5,
        health_check_timeout_s=60,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": 1 if torch.cuda.is_available() else 0})
    if isinstance(replicas, str) and not replicas.isdigit():
        low, _, high = ("1-8" if replicas == "auto" else replicas).partition("-")
        options["autoscaling_config"] = {"min_replicas": int(low), "max_replicas": int(high or low),
                                         "target_ongoing_requests": max_batch, **(autoscaling_config or {})}
    else:
        options["num_replicas"] = int(replicas)
    return CachekitReplica.options(**options).bind(model, limits, api_key, runner_options)


def build_app(args: dict[str, str]) -> Application:
    """Ray's app-builder for `serve run ...ray_app:build_app key=value ...`: model, replicas, api_key, num_cpus,
    max_batch, max_queue, cpu_threads, and any `ServerLimits` field (max_n, max_steps, max_streams, ...)."""
    args = dict(args)
    runner_options: dict[str, Any] = {k: int(args.pop(k)) for k in ("max_batch", "max_queue") if k in args}
    if "cpu_threads" in args:
        threads = args.pop("cpu_threads")
        runner_options["cpu_threads"] = threads if threads == "auto" else int(threads)
    fields = {name: type(value) for name, value in vars(ServerLimits()).items()}
    limits = ServerLimits(**{k: fields[k](args.pop(k)) for k in list(args) if k in fields})
    app = deployment(model=args.pop("model", "digits"), replicas=args.pop("replicas", "1"),
                     api_key=args.pop("api_key", None), num_cpus=float(args.pop("num_cpus", 1)),
                     limits=limits, runner_options=runner_options)
    if args:
        raise ValueError(f"build_app: unknown argument(s) {', '.join(sorted(args))}")
    return app


def run_within(app: Application, timeout_s: float) -> None:
    """`serve.run(app)`, but raise instead of waiting forever when the replicas are not running in `timeout_s`.

    `serve.run` blocks until every replica is healthy; a replica that cannot start (no CPU left for it, a model
    that fails to load) would hold a test or a benchmark indefinitely.
    """
    import threading

    failure: list[BaseException] = []

    def deploy() -> None:
        try:
            serve.run(app, name="cachekit", route_prefix="/")
        except BaseException as err:  # noqa: BLE001 - raised in the caller's thread below
            failure.append(err)

    thread = threading.Thread(target=deploy, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"the deployment was not running within {timeout_s} s")
    if failure:
        raise failure[0]


def run_on_ray(*, model: str, limits: ServerLimits, api_key: str | None, runner_options: dict[str, Any],
               host: str, port: int, replicas: int | str) -> int:
    """`cachekit serve --ray`: a local Ray (or the cluster `RAY_ADDRESS` names), Serve's proxy on host:port,
    until Ctrl-C or SIGTERM; then Serve shuts down, which drains every replica through the app's lifespan."""
    import ray

    for signum in (signal.SIGINT, signal.SIGTERM):  # both drain; SIGINT too where a shell started us ignoring it
        signal.signal(signum, signal.default_int_handler)
    ray.init()
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(model=model, limits=limits, api_key=api_key, runner_options=runner_options,
                             replicas=replicas), name="cachekit", route_prefix="/")
        print(f"serving {model} on Ray Serve at http://{host}:{port} ({replicas} replica(s)); Ctrl-C stops",
              flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
