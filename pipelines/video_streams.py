"""Video streams: a rolling window of latent frames at staggered noise levels, frames out as they finish.

Diffusion forcing served the way Stream Batch serves images (FIFO-Diffusion / SkyReels-V2's shape). Every tick ONE
transformer forward (two rows with CFG: uncond, cond) runs over a window of `window` latent frames, each at its own
noise level through the 2-D per-token timestep the digits-video model was trained with
(`cachekit.zoo.train_digits_video.per_token_timesteps`: timestep `1000 sigma` per token, frame-major), and denoises
every frame in it one step. Each frame keeps its own scheduler copy (SkyReels-V2's one scheduler per frame), so any
flow scheduler steps it as the stock loop would.

The window: position 0 is an *anchor*, positions 1 .. window-1 are being denoised, `lag = steps // (window - 1)`
steps apart, the newest pure noise. When the oldest denoising frame has had all `steps` steps it leaves: it goes
through a streaming VAE decoder that keeps the causal feature cache across chunks
(`cachekit.compat.WanStreamingDecoder`, so the frames equal a whole-clip `vae.decode` of the same latents), its
pixel frames (1 for the stream's first latent frame, 4 for every later one) are sent in order, its last pixel frame
is encoded by the VAE as the new anchor (clean, timestep 0), and fresh noise joins at the back. Why an anchor: the
model learned position 0 as a clip's first frame (Wan's VAE encodes it from one pixel frame, every later latent frame
from four), so a plain rolling window, whose frames finish their last steps at position 0, pulls every frame after
the first towards a first-frame latent; the re-encoded last frame IS a first-frame latent, and it carries the digit
and its position on (10 prompts, window 3: the frames of the first 9-frame clip show the prompted digit in 67% with
the anchor at 8 steps, against 52% for a plain rolling window at 12 steps and 74-78% for whole clips). The output
rate is 4 pixel frames every `lag` forwards.

The start (no fill frames): the first window is the first clip's noise (drawn as the stock `prepare_latents` draws a
`window`-frame clip from the stream's seed) and is denoised on SkyReels-V2's diagonal schedule: frame j waits, as pure
noise at the highest noise level (a level the model saw in training), for `j * lag` ticks before it starts stepping.
So frame 0, the clip's true first frame, is fully denoised after `steps` ticks with the whole window around it, and
the first frame sent is a real decoded frame; nothing is ever sent before it. A finite clip (`num_frames`) keeps the
window full with pure-noise frames that never step once its last latent frame has joined, so every forward has the
shape the model was trained on.

Caching inside the stream: between two shifts of the window (a *segment*, `lag` ticks) the window holds the same
frames, each one step further along, which is an ordinary denoising trajectory of `lag` steps; across a shift every
token's frame changes. So a stream's rows are keyed `(stream id, segment, branch)`, declared at step `tick % lag` of
a `lag`-step generation with the stream's plan, and a segment's cache is freed when the window shifts: a plan reuses
within a segment and never across a shift (a static policy such as `fora:interval=2` computes at ticks 0 and 2 of a
4-tick segment). With `lag` 1 there is nothing to reuse.

Back-pressure instead of dropped frames: the stream stops ticking while `max_unread` frames wait unread, so a slow
reader slows its stream and frames are never skipped. `close()` (or the runner closing) frees its rows' caches and
its decoder cache before the runner's next forward.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import time
from typing import Any, NamedTuple

import torch

import cachekit
from cachekit.compat import WanStreamingDecoder
from cachekit.errors import UsageError

from .streams import StreamClosed

__all__ = ["VideoStream", "VideoFrame", "StreamClosed", "latent_frames_for", "check_video_stream_args"]

MAX_UNREAD = 16  # output frames a stream may hold unread before it pauses


class VideoFrame(NamedTuple):
    """One streamed pixel frame: its index in the stream (0, 1, 2, ... with no gaps), the image, and when it was
    sent, in seconds since the stream was opened."""

    index: int
    image: Any
    time_s: float


def latent_frames_for(num_frames: int, temporal: int = 4) -> int:
    """Latent frames a causal video VAE needs for `num_frames` pixel frames (1 + 4 + 4 ...: 1 + ceil((F-1)/4))."""
    return 1 + math.ceil((num_frames - 1) / temporal)


@dataclasses.dataclass(eq=False)
class _LatentFrame:
    index: int  # in the stream (-1: padding that never steps, -2: the anchor)
    latents: torch.Tensor  # [1, C, 1, h, w]
    scheduler: Any
    wait: int = 0  # ticks before it starts stepping (the diagonal start)
    done: int = 0  # steps taken

    @property
    def stepping(self) -> bool:
        return self.index >= 0 and self.wait == 0

    @property
    def anchor(self) -> bool:
        return self.index == -2


class VideoStream:
    """One video stream on a runner: `get()` / iterate for `VideoFrame`s, in order, until `close()`.

    Made by `Runner.open_video_stream`; its forwards run on the runner's loop thread between request forwards.
    """

    def __init__(self, runner: Any, stream_id: str, prompt: str, *, steps: int, window: int, guidance_scale: float,
                 negative_prompt: str, seed: int, plan: Any, plan_label: str, num_frames: int | None,
                 max_unread: int = MAX_UNREAD) -> None:
        from cachekit.zoo.train_digits_video import per_token_timesteps

        pipe = runner.pipe
        family = runner.family
        self.id = stream_id
        self.runner, self.pipe, self.family = runner, pipe, family
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.steps, self.window, self.lag = steps, window, steps // (window - 1)
        self.guidance_scale = float(guidance_scale)
        self.cfg = self.guidance_scale > 1.0
        self.plan, self.plan_label = plan, plan_label
        self.num_frames = num_frames
        self.max_unread = max_unread
        self.settings = family.settings(pipe, {})
        self._per_token = per_token_timesteps
        self._tokens_per_frame = family.tokens_per_frame(pipe, self.settings)
        self._temporal = pipe.vae_scale_factor_temporal
        self._latent_total = None if num_frames is None else latent_frames_for(num_frames, self._temporal)
        self._device = runner.device
        self._generator = torch.Generator("cpu").manual_seed(seed)
        first = family.initial_latents(pipe, [self._generator], {**self.settings,
                                                                "num_frames": 1 + self._temporal * (window - 1)}, self._device)
        self._window: list[_LatentFrame] = []
        self._joined = 0
        for j in range(window):
            self._window.append(self._new_frame(first[:, :, j : j + 1], wait=j * self.lag))
        self._decoder = WanStreamingDecoder(pipe.vae)
        self._texts: tuple | None = None
        self._outbox: queue.Queue = queue.Queue()
        self.tick = 0
        self.opened = time.monotonic()
        self.frames_sent = 0
        self._last_sent = self.opened
        self.latent_frames_out = 0
        self.time_to_first_frame_s: float | None = None
        self.closed = False
        self.finished = False

    # ------------------------------------------------------------------ caller side
    def get(self, timeout: float | None = None) -> VideoFrame:
        """The next frame; raises `TimeoutError`, or `StreamClosed` once the stream is closed or its clip is over."""
        try:
            item = self._outbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no frame from stream {self.id} in {timeout} s") from None
        if item is None:
            self._outbox.put_nowait(None)  # every later get() ends the same way
            raise StreamClosed(f"stream {self.id} is {'finished' if self.finished else 'closed'}")
        self.runner._wake()  # room in the outbox: a paused stream goes on
        return item

    def __iter__(self):
        while True:
            try:
                yield self.get()
            except StreamClosed:
                return

    def close(self) -> None:
        """Stop the stream; the runner frees its caches before its next forward."""
        if not self.closed:
            self.closed = True
            self.runner._close_stream(self)

    def __enter__(self) -> "VideoStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def reused_share(self) -> float:
        """The plan's predicted share of the transformer's work served from cache (0 without a plan)."""
        return round(1.0 - self.runner._plan_cost(self.plan, self.lag), 6) if self.lag > 1 else 0.0

    # ------------------------------------------------------------------ runner side (loop thread)
    def has_work(self) -> bool:
        return not self.closed and self._outbox.qsize() < self.max_unread

    def _new_frame(self, latents: torch.Tensor, wait: int) -> _LatentFrame:
        index = -1
        if self._latent_total is None or self._joined < self._latent_total:
            index, self._joined = self._joined, self._joined + 1
        scheduler = self.family.scheduler(self.pipe, self.steps, self.settings, self._device)
        return _LatentFrame(index, latents.to(self._device), scheduler, wait=wait)

    def _keys(self, segment: int) -> list[tuple]:
        return [(self.id, segment, b) for b in (("uncond", "cond") if self.cfg else ("cond",))]

    def advance(self) -> None:
        """One tick: one forward over the window, every frame one step; the finished head out, fresh noise in."""
        if self._texts is None:
            self._texts = self.runner._texts_for(self.negative_prompt, self.prompt, self.settings)
        negative, positive = self._texts
        frames = self._window
        sigmas = torch.stack([f.scheduler.sigmas[-1] if f.anchor else f.scheduler.sigmas[f.done] if f.stepping
                              else f.scheduler.sigmas[0] for f in frames]).reshape(1, -1).float()
        latents = torch.cat([f.latents for f in frames], dim=2)
        texts = [negative, positive] if self.cfg else [positive]
        rows = len(texts)
        timesteps = self._per_token(sigmas, self._tokens_per_frame).expand(rows, -1)
        segment, step = divmod(self.tick, self.lag)
        keys = self._keys(segment)
        with torch.no_grad(), cachekit.rows(self.pipe, [step] * rows, keys, self.lag, [self.plan] * rows):
            prediction = self.family.forward(self.pipe, latents.expand(rows, -1, -1, -1, -1), timesteps.to(
                self._device), texts, self.settings)
        self.runner.metrics.forward(rows)
        if self.cfg:
            uncond, cond = prediction.chunk(2)
            prediction = uncond + self.guidance_scale * (cond - uncond)
        with torch.no_grad():
            for j, frame in enumerate(frames):
                if frame.stepping:
                    t = frame.scheduler.timesteps[frame.done]
                    frame.latents = frame.scheduler.step(prediction[:, :, j : j + 1], t, frame.latents,
                                                         return_dict=False)[0]
                    frame.done += 1
                elif frame.wait > 0:
                    frame.wait -= 1
        self.tick += 1
        if step == self.lag - 1:
            cachekit.release(self.pipe, keys)  # the window shifts: this segment's cache is never read again
        oldest = next((f for f in frames if not f.anchor), None)
        if oldest is not None and oldest.index >= 0 and oldest.done == self.steps:
            last_pixels = self._send(oldest)
            frames[:] = [f for f in frames if not f.anchor and f is not oldest]
            frames.insert(0, self._anchor(last_pixels, oldest.scheduler))
            if len(frames) < self.window:  # the first frame's slot becomes the anchor's; after it, fresh noise joins
                frames.append(self._new_frame(self.family.latent_frame(self.pipe, self._generator, self.settings, self._device),
                                              wait=0))
        if self._latent_total is not None and self.latent_frames_out >= self._latent_total:
            self._finish()

    def _anchor(self, pixels: torch.Tensor, scheduler: Any) -> _LatentFrame:
        """The new position-0 frame: the last sent pixel frame, encoded as a clip's first frame (clean)."""
        with torch.no_grad():
            encoded = self.pipe.vae.encode(pixels).latent_dist.mean
        return _LatentFrame(-2, self.family.normalize(self.pipe, encoded).to(self._device), scheduler)

    def _send(self, frame: _LatentFrame) -> torch.Tensor:
        """Decode a finished latent frame, send its pixel frames; its last pixel frame `[1, 3, 1, H, W]`."""
        with torch.no_grad():
            pixels = self._decoder.decode(self.family.denormalize(self.pipe, frame.latents))
            images = self.pipe.video_processor.postprocess_video(pixels, output_type="pil")[0]
        self.latent_frames_out += 1
        for image in images:
            if self.num_frames is not None and self.frames_sent >= self.num_frames:
                break
            now = time.monotonic()
            if self.time_to_first_frame_s is None:
                self.time_to_first_frame_s = now - self.opened
                self.runner.metrics.first_frame(self.time_to_first_frame_s)
            self.runner.metrics.frame(None if self.frames_sent == 0 else now - self._last_sent)
            self._last_sent = now
            self._outbox.put_nowait(VideoFrame(self.frames_sent, image, now - self.opened))
            self.frames_sent += 1
        return pixels[:, :, -1:]

    def _finish(self) -> None:
        self.finished = True
        self.closed = True
        self._release()
        self._outbox.put_nowait(None)

    def _release(self) -> None:
        segment = self.tick // self.lag
        cachekit.release(self.pipe, self._keys(segment) + self._keys(segment - 1))
        self._decoder.close()
        self._window.clear()

    def _shutdown(self) -> None:
        if not self.finished:
            self.closed = True
            self._release()
            self._outbox.put_nowait(None)


def check_video_stream_args(steps: Any, window: Any, num_frames: Any, temporal: int) -> None:
    """One-line errors for a video stream's shape, before anything is built."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise UsageError(f"steps must be an integer from 1 to 1000, got {steps!r}")
    if isinstance(window, bool) or not isinstance(window, int) or not 2 <= window <= steps + 1:
        raise UsageError(f"window must be an integer from 2 to steps + 1 ({steps + 1}), got {window!r}")
    if steps % (window - 1):
        raise UsageError(f"steps ({steps}) must be a multiple of window - 1 ({window - 1}): the window's anchor "
                         "is followed by frames steps // (window - 1) denoising steps apart")
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int)
                                   or num_frames < 1):
        raise UsageError(f"num_frames must be a positive integer or None (a stream until closed), got "
                         f"{num_frames!r}")
