"""`WS /v1/video-stream`: a video stream over a WebSocket, frames sent as they finish, for as long as it is open.

The protocol:
    client -> {"prompt": "...", "seed"?: 0, "steps"?: 8, "window"?: 3, "cache"?: "none", "guidance_scale"?,
               "negative_prompt"?, "num_frames"?: N}           (the fields of POST /v1/videos; no num_frames: endless)
    server -> {"type": "ready", "stream_id", "height", "width", "steps", "window", "lag", "plan"}
    server -> per frame, in order: {"type": "frame", "index": i, "time_s": t} then the frame as binary PNG
    server -> {"type": "done", "frames": n} when a finite stream has sent its last frame
    client -> {"type": "close"} (or closing the socket) cancels the stream: its rows, caches and decoder cache are
              freed before the runner's next forward
Errors are `{"type": "error", "message", "retryable"}` and close the socket (1008 for a bad request, 1013 when the
server is busy or not ready). The runner's stream pauses while frames wait unread (back-pressure), so a client that
reads slowly slows only its own stream, and never loses frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from cachekit.errors import UsageError

from .errors import ApiError, validation_message
from .limits import ServerLimits
from .schemas import video_request_model
from .stream_socket import is_close, next_output, png_bytes, refuse, serving
from .videos import refuse_unless_video, video_stream_kwargs

__all__ = ["add_video_stream_route"]


def add_video_stream_route(app: FastAPI, served: Any, limits: ServerLimits, metrics: Any,
                           runner_or_503: Callable[[], Any]) -> None:
    VideoRequest = video_request_model(limits)
    open_streams = {"count": 0}

    @app.websocket("/v1/video-stream")
    async def video_stream_socket(socket: WebSocket) -> None:
        await socket.accept()
        try:
            runner = runner_or_503()
            refuse_unless_video(runner, served.model_id)
        except ApiError as err:
            await socket.send_json({"type": "error", "message": err.message, "retryable": err.retryable})
            await socket.close(1013 if err.retryable else 1008)
            return
        if open_streams["count"] >= limits.max_streams:
            await socket.send_json({"type": "error", "message": f"{limits.max_streams} video streams are open "
                                                                "already", "retryable": True})
            await socket.close(1013)
            return
        try:
            options = json.loads(await asyncio.wait_for(socket.receive_text(), timeout=30))
            if not isinstance(options, dict):
                raise UsageError("the first message must be a JSON object of stream options")
            num_frames = options.pop("num_frames", None)
            body = VideoRequest(**options)
            if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int)
                                           or not 1 <= num_frames):
                raise UsageError("num_frames: a positive integer, or none for a stream until it is closed")
            stream = runner.open_video_stream(body.prompt, num_frames=num_frames,
                                              **video_stream_kwargs(body, limits))
        except ValidationError as err:
            message, _ = validation_message(err.errors())
            await refuse(socket, message)
            return
        except ApiError as err:
            await refuse(socket, err.message)
            return
        except (UsageError, ValueError, TypeError) as err:
            await refuse(socket, str(err))
            return
        except (asyncio.TimeoutError, WebSocketDisconnect):
            with contextlib.suppress(Exception):
                await socket.close(1008)
            return

        try:
            async with serving(stream, _send_frames(socket, stream, metrics), open_streams, metrics) as sender:
                await socket.send_json({"type": "ready", "stream_id": stream.id,
                                        "height": stream.settings["height"], "width": stream.settings["width"],
                                        "steps": stream.steps, "window": stream.window, "lag": stream.lag,
                                        "plan": stream.plan_label, "num_frames": num_frames})
                receiver = asyncio.ensure_future(_until_closed(socket))
                await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
                receiver.cancel()
                with contextlib.suppress(BaseException):
                    await receiver
        finally:
            with contextlib.suppress(Exception):
                await socket.close(1000)


async def _until_closed(socket: WebSocket) -> None:
    """Return when the client closes the socket or sends {"type": "close"}; other messages are ignored."""
    while True:
        message = await socket.receive()
        if message["type"] == "websocket.disconnect":
            return
        if is_close(message.get("text") or ""):
            return


async def _send_frames(socket: WebSocket, stream: Any, metrics: Any) -> None:
    """Every frame, in order, as a JSON header and PNG bytes, until the stream ends or closes."""
    while (frame := await next_output(stream)) is not None:
        data = await asyncio.to_thread(png_bytes, frame.image)
        await socket.send_json({"type": "frame", "index": frame.index, "time_s": round(frame.time_s, 4)})
        await socket.send_bytes(data)
        metrics.ws_frames.labels("video_out").inc()
    if stream.finished:
        await socket.send_json({"type": "done", "frames": stream.frames_sent})
