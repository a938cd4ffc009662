"""`cachekit serve`: argument parsing only; the app is `create_app`, the process is uvicorn's (or Ray Serve's)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from cachekit import cli_options as opts
from cachekit.errors import UsageError

__all__ = ["add_parser"]


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import DrainingServer, create_app
        from .limits import ServerLimits
    except ImportError as err:
        raise UsageError(f"cachekit serve needs the serve extra ({err.name} is missing): "
                         "pip install 'cachekit[serve]'") from None
    api_key = args.api_key or os.environ.get("CACHEKIT_API_KEY") or None
    limits = ServerLimits(max_n=args.max_n, max_steps=args.max_steps, max_streams=args.max_streams)
    runner_options = {"max_batch": args.max_batch, "max_queue": args.max_queue}
    if args.ray:
        from .ray_app import run_on_ray

        return run_on_ray(model=args.model, host=args.host, port=args.port, replicas=args.replicas,
                          api_key=api_key, limits=limits, runner_options=runner_options)
    if args.replicas != 1:
        raise UsageError("--replicas needs --ray (one runner per replica)")
    app = create_app(model=args.model, limits=limits, api_key=api_key, runner_options=runner_options)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=int(limits.shutdown_grace_s))
    DrainingServer(config).run()
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `cachekit serve` on the core CLI's subparsers."""
    serve = subparsers.add_parser(
        "serve", help="serve a model over HTTP and WebSocket (OpenAI images API, streams, web page, metrics)",
        description="Serve a pipeline (the bundled digits model by default) through the streaming batch runner: "
                    "POST /v1/images/generations, WS /v1/stream, GET /metrics, and a web page at /; for a video "
                    "model (--model digits-video) POST /v1/videos jobs and WS /v1/video-stream. Binds to "
                    "127.0.0.1 unless --host says otherwise; reports ready on /healthz once the model is warm. Needs the "
                    "serve extra: pip install 'cachekit[serve]' (--ray: 'cachekit[ray]').")
    serve.add_argument("--model", default="digits",
                       help="a bundled model name or a local diffusers pipeline folder (default digits)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=opts.integer(0, 65535), default=8000, help="port (default 8000)")
    serve.add_argument("--max-batch", type=opts.integer(1, 4096), default=16,
                       help="transformer rows per forward; a request with CFG takes 2 (default 16)")
    serve.add_argument("--max-queue", type=opts.integer(1, 1_000_000), default=256,
                       help="requests waiting before new ones get 429 (default 256)")
    serve.add_argument("--max-n", type=opts.integer(1, 64), default=4, help="images per request, at most (default 4)")
    serve.add_argument("--max-steps", type=opts.integer(2, 1000), default=100,
                       help="num_inference_steps, at most (default 100)")
    serve.add_argument("--max-streams", type=opts.integer(1, 1024), default=8,
                       help="image streams open at once (default 8)")
    serve.add_argument("--api-key", default=None,
                       help="require Authorization: Bearer KEY on every endpoint but /healthz (default: the "
                            "CACHEKIT_API_KEY environment variable, else no key)")
    serve.add_argument("--ray", action="store_true", help="deploy on Ray Serve (needs cachekit[ray])")
    serve.add_argument("--replicas", type=opts.integer(1, 1024), default=1,
                       help="with --ray: replicas, one runner each (default 1)")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                       help="uvicorn's log level (default info)")
    opts.set_handler(serve, _cmd_serve)
    return serve
