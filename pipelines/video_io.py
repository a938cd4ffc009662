"""Video files from generated frames: MP4 (H.264), WebM (VP9) and GIF, written whole or not at all.

    from cachekit.pipelines.video_io import write_video, encode_video
    frames = pipe(prompt, output_type="pt").frames[0]     # [F, 3, H, W] in 0..1 (WanPipeline)
    write_video(frames, "clip.mp4", fps=8)                 # the container follows the suffix
    data = encode_video(frames, "webm", fps=8)             # bytes, for a server to send

Why PyAV (the `video` extra: `pip install 'cachekit[video]'`) and not imageio + imageio-ffmpeg: PyAV binds libav
in-process (its wheels bundle FFmpeg with libx264, libvpx and the GIF encoder): no subprocess per clip, no binary to
find, FFmpeg errors arrive as Python exceptions, the codec options are typed stream settings rather than a command
line, a missing codec is found before any work (`check_video_support`), and the same library reads a clip back
(`read_video`, bytes or file, which the tests use). imageio's ffmpeg plugin pipes raw frames to an ffmpeg binary
found or bundled separately, and reads video only through that plugin or PyAV again.

Why frames are scaled up: H.264 and VP9 store colour as yuv420p, one chroma sample per 2x2 pixels, so an odd size
cannot be encoded and a 32x32 clip (the bundled `digits-video` model) loses its colour edges and, at 2 macroblocks a
side, nearly all detail to compression; browsers and players also refuse or blur such tiny streams. Each frame is
therefore enlarged by an integer nearest-neighbour factor (`scale`; by default the smallest that gives at least
`MIN_SIDE` = 128 pixels on the short side), which keeps every generated pixel a sharp square, then padded by one
edge row or column if a side is still odd. GIF is scaled the same way, so every format shows the same picture.

GIF frames share one palette quantised from the whole clip (no flicker between frames) and every frame is kept,
also repeated ones, so a GIF has exactly the clip's frame count; GIF stores delays in 1/100 s, so 8 fps plays at
8.33. Every file goes through `cachekit.io.atomic_path`:
an error never leaves a half-written video behind.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import tempfile
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from cachekit.errors import CachekitError, UsageError
from cachekit.io import atomic_path

__all__ = [
    "VIDEO_SUFFIXES", "VIDEO_FORMATS", "DEFAULT_FPS", "MIN_SIDE", "MAX_FPS", "VideoFormat", "VideoDependencyError",
    "video_format", "is_video_path", "check_video_support", "check_fps", "to_frames", "upscale_factor", "enlarge",
    "encode_video", "write_video", "numbered_paths", "write_clips", "save_frame_strip", "read_video",
    "video_frame_rate",
]

DEFAULT_FPS = 8
"""Frames per second when none is given: the bundled digits-video model's 9 frames last a little over a second."""
MIN_SIDE = 128
"""Default short side, in pixels, that frames are enlarged to (by an integer nearest-neighbour factor)."""
MAX_FPS = 240.0


@dataclasses.dataclass(frozen=True)
class VideoFormat:
    """One container with its codec: what a suffix means."""

    name: str
    suffix: str
    container: str
    codec: str
    pix_fmt: str
    media_type: str
    codec_options: tuple[tuple[str, str], ...] = ()
    container_options: tuple[tuple[str, str], ...] = ()


VIDEO_FORMATS: dict[str, VideoFormat] = {
    # crf 18: visually lossless for these flat, sharp-edged frames; faststart puts the index first, for browsers
    "mp4": VideoFormat("mp4", ".mp4", "mp4", "libx264", "yuv420p", "video/mp4",
                       (("crf", "18"), ("preset", "medium")), (("movflags", "+faststart"),)),
    # constant quality (crf with a zero bit rate); cpu-used 4 keeps encoding fast at good quality
    "webm": VideoFormat("webm", ".webm", "webm", "libvpx-vp9", "yuv420p", "video/webm",
                        (("crf", "24"), ("b", "0"), ("deadline", "good"), ("cpu-used", "4"))),
    "gif": VideoFormat("gif", ".gif", "gif", "gif", "pal8", "image/gif"),
}
VIDEO_SUFFIXES: tuple[str, ...] = tuple(f.suffix for f in VIDEO_FORMATS.values())
"""The file suffixes `write_video` knows: .mp4, .webm, .gif."""

_EXTRA_HINT = "pip install 'cachekit[video]'"


class VideoDependencyError(CachekitError, ImportError):
    """PyAV, which encodes and decodes the videos, is not installed; the message names the extra to install."""


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise VideoDependencyError(f"writing videos needs PyAV, which is not installed: {_EXTRA_HINT}") from None
    return av


# ------------------------------------------------------------------------------------------------------ formats
def video_format(path_or_name: str | os.PathLike) -> VideoFormat:
    """The format a path's suffix (`clip.mp4`) or a bare name (`"webm"`, `".gif"`) says; else a one-line error."""
    text = os.fspath(path_or_name)
    suffix = Path(text).suffix
    key = (suffix or text).lower().lstrip(".")
    if key in VIDEO_FORMATS:
        return VIDEO_FORMATS[key]
    what = f"suffix {suffix!r} of {text}" if suffix else repr(text)
    raise UsageError(f"unknown video format: {what}; use one of {', '.join(VIDEO_SUFFIXES)}")


def is_video_path(path: str | os.PathLike) -> bool:
    """Whether `path` ends in one of `VIDEO_SUFFIXES` (case-insensitive)."""
    return Path(os.fspath(path)).suffix.lower() in VIDEO_SUFFIXES


def check_video_support(path_or_name: str | os.PathLike) -> VideoFormat:
    """Before any work: the format is known and its encoder is installed (`VideoDependencyError` naming the extra)."""
    fmt = video_format(path_or_name)
    av = _av()
    try:
        av.codec.Codec(fmt.codec, "w")
    except ValueError:  # UnknownCodecError: an FFmpeg build without the codec (PyAV's own wheels have all three)
        raise VideoDependencyError(
            f"this PyAV's FFmpeg has no {fmt.codec} encoder for {fmt.suffix}: reinstall PyAV from its wheels "
            f"({_EXTRA_HINT})") from None
    return fmt


def check_fps(fps: float) -> Fraction:
    """`fps` as an exact rate (0 < fps <= 240); NaN, inf and out-of-range values are a one-line `UsageError`."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)) or not math.isfinite(float(fps)) \
            or not 0 < float(fps) <= MAX_FPS:
        raise UsageError(f"fps must be a number in (0, {MAX_FPS:g}], got {fps!r}")
    return Fraction(fps).limit_denominator(1001)


# ------------------------------------------------------------------------------------------------------- frames
def to_frames(frames: Any) -> np.ndarray:
    """One clip as a `[F, H, W, 3]` uint8 array.

    Takes what a video pipeline returns for one prompt (`out.frames[0]`): a `[F, 3, H, W]` tensor (`output_type="pt"`,
    floats in 0..1, or uint8), a `[F, H, W, 3]` array (`"np"`), or a list of PIL images (`"pil"`); also 1-channel
    (grey) frames and lists of arrays or tensors. Floats are clipped to 0..1. A batch of clips is refused.
    """
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise UsageError("a video needs at least one frame, got none")
        return np.stack([_one_frame(frame, i) for i, frame in enumerate(frames)])
    array, channels_first = _as_array(frames)
    if array.ndim == 5:
        raise UsageError(f"frames of shape {tuple(array.shape)} are a batch of {array.shape[0]} clips; "
                         "write one clip at a time (e.g. out.frames[0])")
    if array.ndim == 3:  # [F, H, W] grey
        array = array[..., None]
        channels_first = False
    if array.ndim != 4:
        raise UsageError(f"frames must be [F, C, H, W] or [F, H, W, C], got shape {tuple(array.shape)}")
    if array.shape[0] == 0:
        raise UsageError("a video needs at least one frame, got none")
    if channels_first and array.shape[1] in (1, 3, 4):
        array = array.transpose(0, 2, 3, 1)
    elif not (array.shape[-1] in (1, 3, 4)) and array.shape[1] in (1, 3, 4):
        array = array.transpose(0, 2, 3, 1)
    return _rgb_uint8(array)


def _as_array(value: Any) -> tuple[np.ndarray, bool]:
    """A numpy view of a tensor (diffusers' tensors are channel-first) or of an array (channel-last)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        torch = None
    if torch is not None and isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.dtype != torch.uint8:
            tensor = tensor.float()
        return tensor.numpy(), True
    return np.asarray(value), False


def _one_frame(frame: Any, index: int) -> np.ndarray:
    from PIL import Image

    if isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"))
    array, channels_first = _as_array(frame)
    if array.ndim == 2:
        array = array[..., None]
    elif array.ndim == 3 and ((channels_first and array.shape[0] in (1, 3, 4))
                              or (array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4))):
        array = array.transpose(1, 2, 0)
    if array.ndim != 3:
        raise UsageError(f"frame {index} must be [C, H, W], [H, W, C] or a PIL image, got shape {tuple(array.shape)}")
    return _rgb_uint8(array[None])[0]


def _rgb_uint8(array: np.ndarray) -> np.ndarray:
    """[F, H, W, C] with C in 1/3/4 -> [F, H, W, 3] uint8."""
    if array.shape[-1] not in (1, 3, 4):
        raise UsageError(f"frames need 1, 3 or 4 channels, got {array.shape[-1]}")
    if array.dtype == np.uint8:
        out = array
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise UsageError("frames contain NaN or infinite values")
        out = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif array.dtype == np.bool_:
        out = array.astype(np.uint8) * 255
    else:
        raise UsageError(f"frames must be uint8 or floats in 0..1, got {array.dtype}")
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    elif out.shape[-1] == 4:
        out = out[..., :3]
    if out.shape[1] < 1 or out.shape[2] < 1:
        raise UsageError(f"frames must be at least 1x1 pixels, got {out.shape[2]}x{out.shape[1]}")
    return np.ascontiguousarray(out)


def upscale_factor(height: int, width: int, min_side: int = MIN_SIDE) -> int:
    """The smallest integer factor that makes the short side at least `min_side` pixels (1 if it already is)."""
    return max(1, math.ceil(min_side / max(1, min(height, width))))


def enlarge(frames: Any, scale: int | None = None) -> np.ndarray:
    """`to_frames(frames)` enlarged `scale` times by nearest neighbour (default: `upscale_factor`, to `MIN_SIDE`)."""
    clip = to_frames(frames)
    if scale is None:
        scale = upscale_factor(clip.shape[1], clip.shape[2])
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or not 1 <= scale <= 64:
        raise UsageError(f"scale must be an integer factor in 1..64, got {scale!r}")
    if scale > 1:
        clip = clip.repeat(scale, axis=1).repeat(scale, axis=2)
    return clip


def _prepared(frames: Any, fmt: VideoFormat, scale: int | None) -> np.ndarray:
    clip = enlarge(frames, scale)
    if fmt.pix_fmt == "yuv420p" and (clip.shape[1] % 2 or clip.shape[2] % 2):
        clip = np.pad(clip, ((0, 0), (0, clip.shape[1] % 2), (0, clip.shape[2] % 2), (0, 0)), mode="edge")
    return clip


# ------------------------------------------------------------------------------------------------------ writing
def _encode_into(target: Any, clip: np.ndarray, fmt: VideoFormat, rate: Fraction) -> None:
    """Encode `clip` into `target`; FFmpeg refusing the frames (a size past the codec's limits) is a one-line
    `UsageError` naming the format and the size, not a traceback."""
    av = _av()
    height, width = clip.shape[1:3]
    try:
        _encode_frames(av, target, clip, fmt, rate)
    except av.error.FFmpegError as err:
        reason = " ".join(re.sub(r"^\[Errno -?\d+\] ", "", str(err)).split())
        raise UsageError(f"cannot encode {len(clip)} frames of {width}x{height} as {fmt.suffix} ({fmt.codec}): "
                         f"{reason}") from None


def _encode_frames(av: Any, target: Any, clip: np.ndarray, fmt: VideoFormat, rate: Fraction) -> None:
    height, width = clip.shape[1:3]
    with av.open(target, mode="w", format=fmt.container, options=dict(fmt.container_options)) as container:
        stream = container.add_stream(fmt.codec, rate=rate, options=dict(fmt.codec_options))
        stream.width, stream.height, stream.pix_fmt = width, height, fmt.pix_fmt
        if fmt.pix_fmt == "pal8":
            frames = _palette_frames(av, clip)
        else:
            frames = (av.VideoFrame.from_ndarray(frame, format="rgb24") for frame in clip)
        for index, frame in enumerate(frames):
            frame.pts = index
            frame.time_base = 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _palette_frames(av: Any, clip: np.ndarray) -> list[Any]:
    """GIF frames: one palette for the whole clip (Pillow's median cut over all frames, no dithering)."""
    from PIL import Image

    count, height, width = clip.shape[:3]
    strip = Image.fromarray(clip.reshape(count * height, width, 3))
    quantised = strip.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    indices = np.asarray(quantised, dtype=np.uint8).reshape(count, height, width)
    rgb = np.zeros((256, 3), np.uint8)
    used = np.asarray(quantised.getpalette() or [], dtype=np.uint8)[: 256 * 3].reshape(-1, 3)
    rgb[: len(used)] = used
    argb = np.concatenate([np.full((256, 1), 255, np.uint8), rgb], axis=1)
    return [av.VideoFrame.from_ndarray([np.ascontiguousarray(frame), argb], format="pal8") for frame in indices]


def encode_video(frames: Any, fmt: str = "mp4", fps: float = DEFAULT_FPS, scale: int | None = None) -> bytes:
    """One clip encoded in memory as `fmt` (`"mp4"`, `"webm"`, `"gif"`, or a file name with that suffix).

    `frames` is anything `to_frames` takes; `scale` the integer nearest-neighbour enlargement (default: to at least
    `MIN_SIDE` pixels on the short side, see the module docstring). The media type is `video_format(fmt).media_type`.
    """
    spec = check_video_support(fmt)
    rate = check_fps(fps)
    clip = _prepared(frames, spec, scale)
    # through a private temporary file: MP4's faststart rewrites the finished file to put its index first, which
    # FFmpeg does by reopening the file by name; the bytes are then exactly what write_video puts in a file
    with tempfile.TemporaryDirectory(prefix="cachekit-video-") as folder:
        tmp = Path(folder) / f"clip{spec.suffix}"
        _encode_into(str(tmp), clip, spec, rate)
        return tmp.read_bytes()


def write_video(frames: Any, path: str | os.PathLike, fps: float = DEFAULT_FPS, scale: int | None = None) -> Path:
    """Write one clip to `path`, in the container its suffix names (.mp4 H.264, .webm VP9, .gif); returns the path.

    Checks the suffix, the encoder and the frames before writing; the file appears only once complete.
    """
    spec = check_video_support(path)
    rate = check_fps(fps)
    clip = _prepared(frames, spec, scale)
    target = Path(os.fspath(path)).expanduser()
    with atomic_path(target) as tmp:
        _encode_into(str(tmp), clip, spec, rate)
    return target


def numbered_paths(path: str | os.PathLike, count: int) -> list[Path]:
    """Where `count` clips go: `path` itself for one; `clip-0.mp4`, `clip-1.mp4`, ... beside it for several (clip i
    is the i-th output, the one made with seed + i)."""
    target = Path(os.fspath(path)).expanduser()
    if count < 1:
        raise UsageError(f"no clips to write to {target}")
    if count == 1:
        return [target]
    width = len(str(count - 1))
    return [target.with_name(f"{target.stem}-{i:0{width}d}{target.suffix}") for i in range(count)]


def write_clips(clips: Sequence[Any], path: str | os.PathLike, fps: float = DEFAULT_FPS,
                scale: int | None = None) -> list[Path]:
    """Write several clips (e.g. a pipeline's `out.frames`) to `numbered_paths(path, len(clips))`.

    Every clip is encoded before the first file is written, so a bad clip or a codec error writes none of them; each
    file then appears whole (atomic rename).
    """
    from cachekit.io import atomic_write

    spec = check_video_support(path)
    paths = numbered_paths(path, len(clips))
    encoded = [encode_video(clip, spec.name, fps=fps, scale=scale) for clip in clips]
    for target, data in zip(paths, encoded):
        with atomic_write(target, "wb") as f:
            f.write(data)
    return paths


def save_frame_strip(clips: Sequence[Any], path: str | os.PathLike, scale: int | None = None) -> Path:
    """A PNG for people: one row per clip, its frames left to right, enlarged like the videos (`enlarge`)."""
    from cachekit.images import save_image_grid

    enlarged = [enlarge(clip, scale) for clip in clips]
    if not enlarged:
        raise UsageError("no clips to put in a strip")
    save_image_grid([frame for clip in enlarged for frame in clip], path, columns=enlarged[0].shape[0])
    return Path(os.fspath(path))


# ------------------------------------------------------------------------------------------------------ reading
def read_video(source: str | os.PathLike | bytes) -> np.ndarray:
    """Decode a video file (or its bytes) back to `[F, H, W, 3]` uint8 frames, at the size it was stored."""
    av = _av()
    target: Any = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else os.fspath(source)
    try:
        with av.open(target, mode="r") as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except av.error.FFmpegError as err:
        raise UsageError(f"cannot read video {target if isinstance(target, str) else '(bytes)'}: {err}") from None
    if not frames:
        raise UsageError("the video has no frames")
    return np.stack(frames)


def video_frame_rate(source: str | os.PathLike | bytes) -> Fraction:
    """The stored frame rate of a video file or its bytes."""
    av = _av()
    target: Any = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else os.fspath(source)
    with av.open(target, mode="r") as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return Fraction(rate) if rate is not None else Fraction(0)

