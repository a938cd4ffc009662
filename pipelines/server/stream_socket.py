"""`WS /v1/stream`: an image stream over a WebSocket (frames in as PNG/JPEG bytes, frames out as PNG bytes).

The protocol, all JSON text messages but the frames:
    client -> {"prompt": "...", "guidance"?: "self", "stages"?: [30, 40], "seed"?: 0, "similarity_filter"?: false}
    server -> {"type": "ready", "stream_id": ..., "width": W, "height": H, "max_frames_per_s": F}
    client -> binary frames (any size: they are resized to the model's), as fast as it likes
    server -> binary PNG frames as they finish, in order; {"type": "error", "message", "retryable"} for a bad frame
    client -> {"type": "close"} (or just closing the socket) ends the stream and frees its state
A frame over the size or rate limits is dropped with an error message; the stream goes on. The runner keeps only
the latest waiting frame of a stream, so a client flooding frames costs the others nothing, and at most
`OUTBOX_FRAMES` unread outputs (the oldest go first), so a client that never reads costs nothing either.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from cachekit.errors import UsageError

from .limits import ServerLimits

__all__ = ["add_stream_route", "next_output", "png_bytes"]

_OPTIONS = {"prompt", "guidance", "stages", "seed", "similarity_filter", "negative_prompt", "guidance_scale"}


def _decode_frame(data: bytes, limits: ServerLimits, size: tuple[int, int]) -> Any:
    """Bytes to an RGB PIL image of the model's size; UsageError with a one-line reason otherwise."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_frame_bytes:
        raise UsageError(f"frame is {len(data)} bytes, over the limit of {limits.max_frame_bytes}")
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ("PNG", "JPEG"):
            raise UsageError(f"frames must be PNG or JPEG, got {image.format}")
        if image.width * image.height > limits.max_frame_pixels:
            raise UsageError(f"frame is {image.width}x{image.height}, over {limits.max_frame_pixels} pixels")
        image = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise UsageError(f"frame is not a readable PNG or JPEG image ({type(err).__name__})") from None
    height, width = size
    return image if image.size == (width, height) else image.resize((width, height), Image.BILINEAR)


async def refuse(socket: WebSocket, message: str) -> None:
    """A stream that cannot open: one error message, then close with 1008 (policy violation)."""
    with contextlib.suppress(Exception):
        await socket.send_json({"type": "error", "message": message, "retryable": False})
        await socket.close(1008)


@contextlib.asynccontextmanager
async def serving(stream: Any, send_frames: Any, open_streams: dict, metrics: Any) -> AsyncIterator[asyncio.Future]:
    """An open stream's lifetime on a socket, for image and video streams alike: counted among the open streams,
    its frames sent by a task (yielded, for a caller that waits on it), and on the way out (a disconnect included)
    the stream closed, freeing its state in the runner, and the sender stopped."""
    open_streams["count"] += 1
    metrics.ws_open.inc()
    sender = asyncio.ensure_future(send_frames)
    try:
        yield sender
    except WebSocketDisconnect:
        pass
    finally:
        stream.close()
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
        open_streams["count"] -= 1
        metrics.ws_open.dec()


def is_close(text: str) -> bool:
    """`{"type": "close"}`: the client is done sending and wants the stream closed cleanly."""
    try:
        message = json.loads(text)
    except ValueError:
        return False
    return isinstance(message, dict) and message.get("type") == "close"


def add_stream_route(app: FastAPI, served: Any, limits: ServerLimits, metrics: Any,
                     runner_or_503: Callable[[], Any]) -> None:
    open_streams = {"count": 0}

    @app.websocket("/v1/stream")
    async def stream_socket(socket: WebSocket) -> None:
        await socket.accept()
        try:
            runner = runner_or_503()
        except Exception as err:  # noqa: BLE001 - the server is not ready: say so and close
            await socket.send_json({"type": "error", "message": str(err), "retryable": True})
            await socket.close(1013)
            return
        if open_streams["count"] >= limits.max_streams:
            await socket.send_json({"type": "error", "message": f"{limits.max_streams} streams are open already",
                                    "retryable": True})
            await socket.close(1013)
            return
        try:
            options = json.loads(await asyncio.wait_for(socket.receive_text(), timeout=30))
            if not isinstance(options, dict):
                raise UsageError("the first message must be a JSON object of stream options")
            unknown = set(options) - _OPTIONS
            if unknown:
                raise UsageError(f"unknown stream option(s): {', '.join(sorted(unknown))}")
            prompt = options.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > limits.max_prompt_chars:
                raise UsageError(f"prompt: a non-empty string of at most {limits.max_prompt_chars} characters")
            kwargs = {k: options[k] for k in ("guidance", "seed", "negative_prompt", "guidance_scale") if k in options}
            if "stages" in options:
                kwargs["stages"] = options["stages"]
            kwargs["similarity_filter"] = True if options.get("similarity_filter") else None
            stream = runner.open_stream(prompt, **kwargs)
        except (UsageError, ValueError, TypeError, KeyError) as err:
            await refuse(socket, str(err))
            return
        except (asyncio.TimeoutError, WebSocketDisconnect):
            with contextlib.suppress(Exception):
                await socket.close(1008)
            return

        size = (stream.settings["height"], stream.settings["width"])
        async with serving(stream, _send_frames(socket, stream, metrics), open_streams, metrics):
            await socket.send_json({"type": "ready", "stream_id": stream.id, "height": size[0], "width": size[1],
                                    "max_frames_per_s": limits.max_frames_per_s})
            rate = limits.max_frames_per_s
            tokens, refilled, warned = max(rate, 1.0), time.monotonic(), 0.0  # a token bucket: bursts up to 1 s
            count = 0
            while True:
                message = await socket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("bytes")
                if data is None:
                    if is_close(message.get("text") or ""):
                        break
                    await socket.send_json({"type": "error", "message": "send frames as binary messages",
                                            "retryable": False})
                    continue
                count += 1
                now = time.monotonic()
                tokens, refilled = min(max(rate, 1.0), tokens + (now - refilled) * rate), now
                if tokens < 1.0:
                    metrics.ws_frames.labels("dropped_rate").inc()
                    if now - warned >= 1.0:  # one notice a second, not one per dropped frame
                        warned = now
                        await socket.send_json({"type": "error", "retryable": True, "frame": count,
                                                "message": f"frame {count} dropped: over {rate:g} frames per second"})
                    continue
                tokens -= 1.0
                try:
                    image = await asyncio.to_thread(_decode_frame, data, limits, size)
                except UsageError as err:
                    metrics.ws_frames.labels("rejected").inc()
                    await socket.send_json({"type": "error", "message": f"frame {count}: {err}", "frame": count,
                                            "retryable": False})
                    continue
                metrics.ws_frames.labels("in").inc()
                stream.push(image)


async def next_output(stream: Any) -> Any:
    """A stream's next output (image or video), waited for off the event loop; None once the stream is closed."""
    from cachekit.pipelines.streams import StreamClosed

    while True:
        try:
            return await asyncio.to_thread(stream.get, 0.25)
        except TimeoutError:
            continue
        except StreamClosed:
            return None


def png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def _send_frames(socket: WebSocket, stream: Any, metrics: Any) -> None:
    """Each finished frame as PNG bytes, in order, until the stream closes."""
    while (image := await next_output(stream)) is not None:
        await socket.send_bytes(png_bytes(image))
        metrics.ws_frames.labels("out").inc()
