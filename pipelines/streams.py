"""Image streams (StreamDiffusion's use): frames in, frames out, through a short list of denoising stages.

Each input frame is encoded by the VAE, noised to the first stage's timestep and denoised through the stages; a
stage predicts x0 from the noise prediction and re-noises it to the next stage's timestep with that stage's fixed
noise (deterministic, as StreamDiffusion does). Stream Batch puts the frames in flight at their different stages
into ONE transformer forward per tick; a frame's output appears when its last stage has run, so the first output
is a real frame, never a fill frame. Guidance: "none", "full" (ordinary CFG, two rows per frame), "self" (residual
CFG: the stored noise residual stands in for the unconditional prediction) or "onetime" (one real unconditional
row for the newest frame, its residual reused at its later stages). Input is latest-frame-wins; the similarity
filter may answer a near-duplicate input with the previous output.

The stream's state is its own (its noise, its buffer, its filter, its cache keys), and its forwards run on the
runner's loop thread between request forwards, so streams and requests share one pipeline without cross-talk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

import cachekit
from cachekit.errors import UsageError

from .stream_filters import SimilarityFilter, SimilarityFilterConfig, residual_cfg

__all__ = ["ImageStream", "StreamClosed", "GUIDANCE_MODES"]

GUIDANCE_MODES = ("none", "full", "self", "onetime")
OUTBOX_FRAMES = 64  # unread output frames a stream holds; a live view wants the newest, not a backlog


class StreamClosed(UsageError):
    """The stream (or its runner) was closed."""


@dataclasses.dataclass(eq=False)
class _Frame:
    index: int
    latents: torch.Tensor  # x at the frame's current stage
    stage: int = 0
    stock_noise: torch.Tensor | None = None  # residual CFG's stand-in for the unconditional prediction
    received: float = 0.0
    echoes: int = 0  # later input frames the similarity filter skipped: they get this frame's output


class ImageStream:
    """One image stream on a runner: `push(frame)` in, `get()` / iterate for frames out."""

    def __init__(self, runner: Any, stream_id: str, prompt: str, *, stages: Sequence[int], num_inference_steps: int,
                 guidance: str, guidance_scale: float, delta: float, negative_prompt: str, seed: int,
                 similarity_filter: SimilarityFilterConfig | None, stream_batch: bool) -> None:
        pipe = runner.pipe
        if guidance not in GUIDANCE_MODES:
            raise UsageError(f"guidance must be one of {', '.join(GUIDANCE_MODES)}, got {guidance!r}")
        if not stages or sorted(set(stages)) != list(stages) or stages[0] < 0 or stages[-1] >= num_inference_steps:
            raise UsageError(f"stages must be increasing indices into {num_inference_steps} timesteps, got {stages}")
        self.id = stream_id
        self.runner = runner
        self.pipe = pipe
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.guidance, self.guidance_scale, self.delta = guidance, float(guidance_scale), float(delta)
        self.stream_batch = stream_batch
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(num_inference_steps)
        self.timesteps = scheduler.timesteps[list(stages)].to(torch.long)
        alphas = scheduler.alphas_cumprod[self.timesteps]
        self._sqrt_alpha = alphas.sqrt()
        self._sqrt_one_minus = (1 - alphas).sqrt()
        self.settings = runner.family.settings(pipe, {})
        self._device = device = runner.device
        shape = runner.family.initial_latents(pipe, [torch.Generator("cpu").manual_seed(seed)], self.settings,
                                              device).shape
        generator = torch.Generator("cpu").manual_seed(seed)
        self._stage_noise = [torch.randn(shape, generator=generator).to(device) for _ in self.timesteps]
        self._filter = SimilarityFilter(similarity_filter, seed) if similarity_filter is not None else None
        self._texts: tuple | None = None
        self._inbox: queue.Queue = queue.Queue(maxsize=1)  # latest frame wins
        self._outbox: queue.Queue = queue.Queue(maxsize=OUTBOX_FRAMES)  # a reader that falls behind loses the oldest
        self._in_flight: list[_Frame] = []
        self._count = 0
        self._last_output: Any = None
        self._last_output_time: float | None = None
        self.closed = False
        self.taken = 0  # input frames taken in (skipped ones included)
        self.skipped = 0
        self.dropped = 0  # input frames replaced by a later one before they were taken
        self.unread_dropped = 0  # output frames the caller was too slow to read
        self.batched_forwards = 0  # forwards that carried frames at more than one stage
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ caller side
    def push(self, image: Any) -> None:
        """Offer an input frame (PIL image or uint8 array); a frame not yet taken is replaced (latest wins)."""
        if self.closed:
            raise StreamClosed(f"stream {self.id} is closed")
        pixels = _to_tensor(image, (self.settings["height"], self.settings["width"]), self._device,
                            self.pipe.vae.dtype)
        with self._lock:
            try:
                self._inbox.get_nowait()
                self.dropped += 1
            except queue.Empty:
                pass
            self._inbox.put_nowait((pixels, time.monotonic()))
        self.runner._wake()

    def get(self, timeout: float | None = None) -> Any:
        """The next output frame (a PIL image); raises `TimeoutError` or `StreamClosed`."""
        try:
            item = self._outbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no frame from stream {self.id} in {timeout} s") from None
        if item is None:
            raise StreamClosed(f"stream {self.id} is closed")
        return item

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.runner._close_stream(self)

    def __enter__(self) -> "ImageStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ runner side (loop thread)
    def has_work(self) -> bool:
        return not self.closed and (bool(self._in_flight) or not self._inbox.empty())

    def _keys(self, frame: _Frame, branch: str) -> tuple:
        return (self.id, frame.index, branch)

    def _take_input(self) -> None:
        try:
            pixels, received = self._inbox.get_nowait()
        except queue.Empty:
            return
        self.taken += 1
        if self._filter is not None and self._filter.should_skip(pixels):
            # answered with the output of the last frame let through, in order: now if it is out, else when it is
            self.skipped += 1
            if self._in_flight:
                self._in_flight[-1].echoes += 1
            else:
                self._emit(self._last_output)
            return
        with torch.no_grad():
            encoded = self.pipe.vae.encode(pixels.unsqueeze(0) * 2 - 1).latent_dist.mean
        x0 = encoded * self.pipe.vae.config.scaling_factor
        latents = self._sqrt_alpha[0] * x0 + self._sqrt_one_minus[0] * self._stage_noise[0]
        frame = _Frame(self._count, latents, received=received)
        frame.stock_noise = self._stage_noise[0]
        self._count += 1
        self._in_flight.append(frame)

    def advance(self) -> None:
        """One tick: take the newest input, then one forward over the frames in flight (Stream Batch)."""
        if self._texts is None:
            self._texts = self.runner._texts_for(self.negative_prompt, self.prompt, self.settings)
        if self.stream_batch or not self._in_flight:  # frame by frame: the next frame waits for the last
            self._take_input()
        if not self._in_flight:
            return
        frames = list(self._in_flight) if self.stream_batch else [self._in_flight[0]]
        if len(frames) > 1:
            self.batched_forwards += 1
        negative, positive = self._texts
        latents, timesteps, texts, keys, rows_of = [], [], [], [], []
        newest = max(frames, key=lambda f: f.index) if frames else None
        for frame in frames:
            t = self.timesteps[frame.stage]
            branches = ["cond"]
            if self.guidance == "full" or (self.guidance == "onetime" and frame is newest and frame.stage == 0):
                branches = ["uncond", "cond"]
            for branch in branches:
                latents.append(frame.latents)
                timesteps.append(t.reshape(1))
                texts.append(negative if branch == "uncond" else positive)
                keys.append(self._keys(frame, branch))
            rows_of.append(branches)
        n = len(self.timesteps)
        steps = [self._frame_of_key(frames, k).stage for k in keys]
        with torch.no_grad(), cachekit.rows(self.pipe, steps, keys, n, [None] * len(keys)):
            prediction = self.runner.family.forward(self.pipe, torch.cat(latents), torch.cat(timesteps), texts,
                                                    self.settings)
        self.runner.metrics.forward(len(keys))
        offset = 0
        finished: list[_Frame] = []
        for frame, branches in zip(frames, rows_of):
            rows = prediction[offset : offset + len(branches)]
            offset += len(branches)
            noise = self._guided(frame, rows, branches)
            i = frame.stage
            x0 = (frame.latents - self._sqrt_one_minus[i] * noise) / self._sqrt_alpha[i]
            if i + 1 == n:
                frame.latents = x0
                finished.append(frame)
                continue
            frame.stage = i + 1
            frame.latents = self._sqrt_alpha[i + 1] * x0 + self._sqrt_one_minus[i + 1] * self._stage_noise[i + 1]
            if self.guidance == "self":
                frame.stock_noise = self._stage_noise[i + 1]  # the residual the re-noising put in
        for frame in finished:
            self._in_flight.remove(frame)
            cachekit.release(self.pipe, [self._keys(frame, b) for b in ("uncond", "cond")])
            with torch.no_grad():
                image = self.runner.family.decode(self.pipe, frame.latents)[0]
            self._last_output = image
            for _ in range(1 + frame.echoes):
                self._emit(image)

    @staticmethod
    def _frame_of_key(frames: list[_Frame], key: tuple) -> _Frame:
        return next(f for f in frames if f.index == key[1])

    def _guided(self, frame: _Frame, rows: torch.Tensor, branches: list[str]) -> torch.Tensor:
        if len(branches) == 2:
            uncond, cond = rows[0:1], rows[1:2]
            if self.guidance == "onetime":
                # the real unconditional prediction at the first stage stands in at the later ones
                frame.stock_noise = uncond / self.delta if self.delta else uncond
            return uncond + self.guidance_scale * (cond - uncond)
        cond = rows[0:1]
        if self.guidance in ("self", "onetime") and frame.stock_noise is not None:
            return residual_cfg(cond, frame.stock_noise, self.guidance_scale, self.delta)
        return cond

    def _emit(self, image: Any) -> None:
        now = time.monotonic()
        gap = None if self._last_output_time is None else now - self._last_output_time
        self._last_output_time = now
        self.runner.metrics.frame(gap)
        self._put_output(image)

    def _put_output(self, item: Any) -> None:
        """Never block the runner's loop on a slow reader: past `OUTBOX_FRAMES` unread, the oldest goes."""
        while True:
            try:
                self._outbox.put_nowait(item)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._outbox.get_nowait()
                    self.unread_dropped += 1

    def _shutdown(self) -> None:
        self.closed = True
        if self._in_flight:
            cachekit.release(self.pipe, [self._keys(f, b) for f in self._in_flight for b in ("uncond", "cond")])
            self._in_flight.clear()
        self._put_output(None)


def _to_tensor(image: Any, size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A frame as float pixels in [0, 1], channels first, on the pipeline's device in the VAE's dtype."""
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise UsageError(f"a stream frame must be an RGB image (uint8 HxWx3), got {array.dtype} {array.shape}")
    if tuple(array.shape[:2]) != size:
        raise UsageError(f"a stream frame must be {size[0]}x{size[1]} for this model, got "
                         f"{array.shape[0]}x{array.shape[1]}")
    tensor = torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1)
    return tensor.to(device, dtype)
