"""What a digits-video clip shows: the digit in each frame and the direction it moves, read off the pixels.

The check behind the video model's benchmark and `cachekit eval --model digits-video`'s motion score. It needs no
learned video model: the digit of a frame is the held-out SVM of :mod:`cachekit.zoo.digits_classifier` (trained on
held-out digit samples only) applied to a 16x16 crop, and the direction is the motion of the tracked ink centre.

Why the crop is centred on the ink's bounding box and not on its centre of mass: the classifier pools its input to
8x8, so it expects the digit framed the way scikit-learn's samples are, and those are framed by their box. On real
clips of the (classifier-unseen) train split, box-centred crops are read right in 96% of frames; mass-centred crops
in only 77%. :func:`check_real_clips` reports that ceiling next to every model figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import torch

from .digits_classifier import recognise
from .digits_video_data import DIGIT_SIZE, clips

__all__ = ["INK_THRESHOLD", "ClipCheck", "ink_centres", "digit_crops", "frame_digits", "direction_of_clip",
           "check_clips", "check_real_clips"]

#: Grey level (0..1) above which a pixel counts as ink for the bounding box and the tracked centre.
INK_THRESHOLD = 0.25


def _grey(frames: torch.Tensor) -> torch.Tensor:
    """``[F, 3, H, W]`` uint8 or float-in-0..1 frames -> ``[F, H, W]`` float grey in 0..1."""
    x = frames.float()
    if frames.dtype == torch.uint8:
        x = x / 255.0
    return x.mean(1)


def ink_centres(frames: torch.Tensor) -> torch.Tensor:
    """``[F, 2]`` brightness-weighted ``(x, y)`` centre of each frame's ink, in pixels (the tracked position)."""
    grey = _grey(frames)
    grey = grey * (grey > INK_THRESHOLD)
    height, width = grey.shape[-2:]
    ys = torch.arange(height, dtype=grey.dtype)[:, None]
    xs = torch.arange(width, dtype=grey.dtype)[None, :]
    mass = grey.sum((1, 2)).clamp_min(1e-6)
    return torch.stack([(grey * xs).sum((1, 2)) / mass, (grey * ys).sum((1, 2)) / mass], 1)


def digit_crops(frames: torch.Tensor, size: int = DIGIT_SIZE) -> torch.Tensor:
    """``[F, 3, size, size]`` crops centred on each frame's ink bounding box (kept inside the canvas)."""
    grey = _grey(frames)
    height, width = grey.shape[-2:]
    crops = []
    for f in range(frames.shape[0]):
        ink = grey[f] > INK_THRESHOLD
        if ink.any():
            rows = torch.nonzero(ink.any(1)).flatten()
            cols = torch.nonzero(ink.any(0)).flatten()
            cy = (int(rows[0]) + int(rows[-1]) + 1) / 2
            cx = (int(cols[0]) + int(cols[-1]) + 1) / 2
        else:
            cy, cx = height / 2, width / 2
        y0 = int(min(max(round(cy - size / 2), 0), height - size))
        x0 = int(min(max(round(cx - size / 2), 0), width - size))
        crops.append(frames[f, :, y0:y0 + size, x0:x0 + size])
    return torch.stack(crops)


def frame_digits(frames: torch.Tensor) -> np.ndarray:
    """The digit each frame of ``[F, 3, H, W]`` shows, as an ``[F]`` int array."""
    return recognise(digit_crops(frames))


def direction_of_clip(frames: torch.Tensor) -> str:
    """``"left"``, ``"right"``, ``"up"`` or ``"down"``: the main axis and sign of the ink centre's net motion."""
    centres = ink_centres(frames)
    move = centres[-1] - centres[0]
    axis = 0 if abs(float(move[0])) >= abs(float(move[1])) else 1
    return (("left", "right"), ("up", "down"))[axis][int(float(move[axis]) > 0)]


@dataclass
class ClipCheck:
    """Scores of a set of clips against what their captions asked for (each a share in 0..1)."""

    clips: int
    digit_frames: float  # share of all frames whose digit is the prompted one
    digit_clips: float  # share of clips whose most frequent digit is the prompted one
    direction: float  # share of clips that move the prompted way

    def as_dict(self) -> dict:
        return {"clips": self.clips, "digit_frames": round(self.digit_frames, 4),
                "digit_clips": round(self.digit_clips, 4), "direction": round(self.direction, 4)}


def check_clips(videos: Sequence[torch.Tensor], labels: Sequence[int], directions: Sequence[str]) -> ClipCheck:
    """Score ``videos`` (each ``[F, 3, H, W]``, uint8 or float in 0..1) against their prompted digits and motions."""
    if not (len(videos) == len(labels) == len(directions)) or not videos:
        raise ValueError(f"need as many labels and directions as videos (and at least one), got {len(videos)}, "
                         f"{len(labels)} and {len(directions)}")
    frame_hits: List[float] = []
    clip_hits = direction_hits = 0
    for video, label, direction in zip(videos, labels, directions):
        digits = frame_digits(video)
        frame_hits.extend((digits == int(label)).tolist())
        clip_hits += int(np.bincount(digits, minlength=10).argmax() == int(label))
        direction_hits += int(direction_of_clip(video) == direction)
    n = len(videos)
    return ClipCheck(clips=n, digit_frames=float(np.mean(frame_hits)), digit_clips=clip_hits / n,
                     direction=direction_hits / n)


def check_real_clips(n: int = 100, seed: int = 0) -> ClipCheck:
    """The check's own ceiling: real clips of the train split, whose samples the classifier never saw."""
    real = clips("train", n, seed=seed)
    return check_clips(list(real.frames), real.labels.tolist(), real.direction_names)
