"""The data behind the embedded "digits-video" model: scikit-learn's real handwritten digits moving on a canvas.

Each clip is one real 8x8 sample of ``sklearn.datasets.load_digits`` upscaled to 16x16 (exactly as the image model's
:func:`cachekit.zoo.digits_data.load_split` does) and pasted on a black 32x32 canvas, moving left, right, up or down
at a seeded speed from a seeded start. Nothing is downloaded and nothing is stored: clips are rendered on the fly
from ``(split, n, seed)``, so every run of the trainer, the tests and the benchmarks sees the same clips.

Why these choices:

- **32x32 canvas**: ``WanPipeline`` wants ``height`` and ``width`` divisible by 16, and the digit needs room to move.
- **4k+1 frames (9 by default)**: the Wan VAE encodes time as 1 + 4 + 4 + ... frames, so a clip of ``F = 4k+1``
  frames has ``k+1`` latent frames (9 frames -> 3 latent frames). Fewer than 9 frames would leave two latent frames,
  too few for staggered per-frame noise levels to mean anything.
- **The image model's split**: the held-out *digit samples* of the image model are the held-out samples here too
  (the same seeded stratified split of :mod:`cachekit.zoo.digits_data`), so no sample seen in training of either
  model ever appears in a held-out clip, and evaluation of the two models can share references.
- **Captions name the digit and the motion**, in several phrasings, so the text encoder has to carry both: the
  model sees nothing else about which digit to draw or where to move it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Tuple, Union

import torch

from .digits_data import NUMBER_WORDS, _raw_digits, _split_indices, _to_rgb_uint8
from .digits_data import vocabulary as image_vocabulary

__all__ = [
    "CANVAS_SIZE",
    "DIGIT_SIZE",
    "NUM_FRAMES",
    "DIRECTIONS",
    "SPEEDS",
    "VIDEO_TEMPLATES",
    "Clips",
    "check_num_frames",
    "clips",
    "video_caption_for",
    "all_video_captions",
    "video_prompts",
    "video_vocabulary",
    "direction_of",
]

CANVAS_SIZE = 32
DIGIT_SIZE = 16
NUM_FRAMES = 9
#: Motion directions; index order is the ``direction`` id of :class:`Clips`.
DIRECTIONS: Tuple[str, ...] = ("left", "right", "up", "down")
#: Speeds in canvas pixels per frame, drawn per clip (scaled down when a long clip would not fit on the canvas).
SPEEDS: Tuple[float, ...] = (1.0, 1.5, 2.0)
# Screen-space unit step (dx, dy) per direction; y grows downwards as in image rows.
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# Long form of each direction for the phrasings that read better with it.
_LONG = {"left": "to the left", "right": "to the right", "up": "upward", "down": "downward"}

# Phrasings per (digit, direction). ``{n}`` numeral, ``{w}`` number word, ``{d}`` short direction ("left"),
# ``{dl}`` long direction ("to the left"). Every template names both the digit and the direction.
VIDEO_TEMPLATES: Tuple[str, ...] = (
    "a handwritten {n} moving {d}",
    "the digit {w} drifting {dl}",
    "number {n} sliding {dl}",
    "the number {w} moving {d}",
    "a handwritten digit {w} going {d}",
    "a video of the digit {n} moving {dl}",
    "a {w} written by hand drifting {d}",
    "digit {n} sliding {d}",
    "the numeral {n} moving {dl}",
    "{w} moving {d}",
    "{n} drifting {dl}",
    "a picture of a {w} sliding {dl}",
)


def check_num_frames(num_frames: int) -> int:
    """``num_frames`` if it is ``4k+1`` and at least 9 (what Wan's VAE and the staggered windows need), else raise."""
    num_frames = int(num_frames)
    if num_frames < 9 or num_frames % 4 != 1:
        raise ValueError(f"num_frames must be 4k+1 and at least 9 (9, 13, 17, ...), got {num_frames}")
    return num_frames


def direction_of(direction: Union[int, str]) -> str:
    """The direction name of an id (0..3) or a name; raises on anything else."""
    if isinstance(direction, str):
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        return direction
    d = int(direction)
    if not 0 <= d < len(DIRECTIONS):
        raise ValueError(f"direction id must be 0..{len(DIRECTIONS) - 1}, got {d}")
    return DIRECTIONS[d]


def video_caption_for(label: int, direction: Union[int, str],
                      rng_or_index: Union[int, random.Random, torch.Generator] = 0) -> str:
    """A caption for digit ``label`` moving ``direction``; ``rng_or_index`` is a template index or an RNG."""
    label = int(label)
    if not 0 <= label <= 9:
        raise ValueError(f"label must be a digit 0..9, got {label}")
    d = direction_of(direction)
    if isinstance(rng_or_index, random.Random):
        t = rng_or_index.randrange(len(VIDEO_TEMPLATES))
    elif isinstance(rng_or_index, torch.Generator):
        t = int(torch.randint(len(VIDEO_TEMPLATES), (1,), generator=rng_or_index))
    else:
        t = int(rng_or_index) % len(VIDEO_TEMPLATES)
    return VIDEO_TEMPLATES[t].format(n=label, w=NUMBER_WORDS[label], d=d, dl=_LONG[d])


def all_video_captions(label: int, direction: Union[int, str]) -> List[str]:
    """Every phrasing of digit ``label`` moving ``direction``."""
    return [video_caption_for(label, direction, i) for i in range(len(VIDEO_TEMPLATES))]


def video_prompts(num: int = 40, seed: int = 0) -> List[Tuple[str, int, str]]:
    """A prompt set of ``num`` ``(prompt, label, direction)``: digits 0..9 cycled, directions cycled, seeded phrasings."""
    rng = random.Random(seed)
    out = []
    for i in range(num):
        label, direction = i % 10, DIRECTIONS[(i // 10 + i) % len(DIRECTIONS)]
        out.append((video_caption_for(label, direction, rng), label, direction))
    return out


def video_vocabulary() -> List[str]:
    """Every word of the image and video captions (lower case), sorted: the video tokenizer is built from it.

    Including the image captions' words keeps a prompt written for the image model ("a handwritten 3") in vocabulary.
    """
    words = set(image_vocabulary())
    for label in range(10):
        for d in DIRECTIONS:
            for cap in all_video_captions(label, d):
                words.update(cap.lower().replace(",", " ").split())
    return sorted(words)


@dataclass
class Clips:
    """A batch of rendered clips and what made them.

    ``frames``: ``uint8 [n, F, 3, CANVAS, CANVAS]`` (white digit on black; ``/127.5 - 1`` gives Wan's [-1, 1]).
    ``labels``: ``int64 [n]`` digit classes. ``directions``: ``int64 [n]`` ids into :data:`DIRECTIONS`.
    ``sample_index``: ``int64 [n]`` index of the source sample in ``sklearn.datasets.load_digits()`` (used to check
    that held-out samples never reach training). ``speeds``: ``float [n]`` pixels per frame. ``starts``:
    ``int64 [n, 2]`` top-left ``(x, y)`` of the digit in frame 0. ``captions``: one caption per clip.
    """

    frames: torch.Tensor
    labels: torch.Tensor
    directions: torch.Tensor
    sample_index: torch.Tensor
    speeds: torch.Tensor
    starts: torch.Tensor
    captions: List[str]

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    @property
    def direction_names(self) -> List[str]:
        return [DIRECTIONS[int(d)] for d in self.directions]

    def as_unit(self) -> torch.Tensor:
        """Frames as float in [-1, 1], laid out ``[n, 3, F, H, W]`` as ``AutoencoderKLWan`` takes video."""
        return (self.frames.float() / 127.5 - 1.0).permute(0, 2, 1, 3, 4).contiguous()


_CACHE: dict = {}


def _split_samples(split: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(digits uint8 [N,3,16,16], labels [N], sklearn indices [N])`` of one split of the image model's split."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if split not in _CACHE:
        images, labels = _raw_digits()
        train_idx, held_idx = _split_indices(labels)
        idx = train_idx if split == "train" else held_idx
        _CACHE[split] = (_to_rgb_uint8(images[idx], DIGIT_SIZE), labels[idx], idx)
    return _CACHE[split]


def clips(split: str = "train", n: int = 64, seed: int = 0, num_frames: int = NUM_FRAMES,
          caption_template: Union[int, None] = None) -> Clips:
    """``n`` seeded clips of the ``"train"`` or ``"heldout"`` split.

    Per clip, a seeded generator picks a digit sample of the split, a direction, a speed from :data:`SPEEDS` (scaled
    down so that the whole path fits on the canvas) and a start from which the path stays on the canvas; the digit's
    position in frame ``t`` is ``start + floor(t * speed + 1/2) * step``. The caption's phrasing is seeded too unless
    ``caption_template`` fixes it. The same ``(split, n, seed, num_frames)`` always gives the same clips.
    """
    num_frames = check_num_frames(num_frames)
    digits, labels, sample_idx = _split_samples(split)
    gen = torch.Generator().manual_seed(int(seed))
    rng = random.Random(int(seed))
    pick = torch.randint(len(digits), (n,), generator=gen)
    dirs = torch.randint(len(DIRECTIONS), (n,), generator=gen)
    speed_pick = torch.randint(len(SPEEDS), (n,), generator=gen)
    u = torch.rand(n, 2, generator=gen)
    room = CANVAS_SIZE - DIGIT_SIZE  # the digit's top-left corner moves in [0, room]
    max_speed = room / (num_frames - 1)
    frames = torch.zeros(n, num_frames, 3, CANVAS_SIZE, CANVAS_SIZE, dtype=torch.uint8)
    speeds = torch.empty(n)
    starts = torch.empty(n, 2, dtype=torch.long)
    captions = []
    for i in range(n):
        d = DIRECTIONS[int(dirs[i])]
        dx, dy = _STEP[d]
        speed = min(SPEEDS[int(speed_pick[i])], max_speed)
        travel = int((num_frames - 1) * speed + 0.5)
        # Along the motion the start leaves room for the travel; across it, any position on the canvas.
        lo_x, hi_x = (travel, room) if dx < 0 else (0, room - travel) if dx > 0 else (0, room)
        lo_y, hi_y = (travel, room) if dy < 0 else (0, room - travel) if dy > 0 else (0, room)
        x0 = lo_x + int(u[i, 0] * (hi_x - lo_x + 1 - 1e-6))
        y0 = lo_y + int(u[i, 1] * (hi_y - lo_y + 1 - 1e-6))
        digit = digits[int(pick[i])]
        for t in range(num_frames):
            off = int(t * speed + 0.5)
            x, y = x0 + dx * off, y0 + dy * off
            frames[i, t, :, y:y + DIGIT_SIZE, x:x + DIGIT_SIZE] = digit
        speeds[i] = speed
        starts[i, 0], starts[i, 1] = x0, y0
        label = int(labels[int(pick[i])])
        captions.append(video_caption_for(label, d, rng if caption_template is None else caption_template))
    return Clips(frames=frames, labels=labels[pick].clone(), directions=dirs, sample_index=sample_idx[pick].clone(),
                 speeds=speeds, starts=starts, captions=captions)
