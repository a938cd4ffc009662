"""The data behind the embedded "digits" model: scikit-learn's bundled handwritten digits.

``sklearn.datasets.load_digits`` ships 1797 grey 8x8 images (values 0..16) inside the scikit-learn wheel, so nothing is
downloaded. This module fixes one seeded, stratified split (80 % train, 20 % held out), upsamples the images to 16x16
RGB uint8 (white digit on black, so Inception / CLIP style pipelines accept them) and writes the captions.

The held-out split is never used for training: it is kept for evaluation (FID references, the digit classifier of
``benchmarks/digits_model.py``, the CLIP zero-shot check).
"""

from __future__ import annotations

import random
from typing import List, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "IMAGE_SIZE",
    "SPLIT_SEED",
    "HELDOUT_FRACTION",
    "NUMBER_WORDS",
    "TEMPLATES",
    "load_split",
    "caption_for",
    "all_captions",
    "digit_prompts",
    "vocabulary",
    "downsample_for_classifier",
]

IMAGE_SIZE = 16
SPLIT_SEED = 0
HELDOUT_FRACTION = 0.2
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Phrasings per concept. ``{n}`` is the numeral ("7"), ``{w}`` the word ("seven"). Every template names the digit,
# so the text encoder has to carry the identity: the image model sees nothing else.
TEMPLATES: Tuple[str, ...] = (
    "a handwritten {n}",
    "the digit {w}",
    "number {n}",
    "the number {w}",
    "a handwritten digit {w}",
    "an image of the digit {n}",
    "a picture of a {w}",
    "the numeral {n}",
    "a {w} written by hand",
    "digit {n}",
    "{w}",
    "{n}",
)


def _raw_digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images).float()  # [N, 8, 8] in 0..16
    labels = torch.from_numpy(data.target).long()
    return images, labels


def _split_indices(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Seeded stratified split: per class, a seeded permutation; the first ceil(20 %) of each class is held out."""
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    train, held = [], []
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = -(-len(idx) * int(HELDOUT_FRACTION * 100) // 100)  # ceil
        held.append(idx[:k])
        train.append(idx[k:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(held)).values


def _to_rgb_uint8(images8: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    x = images8[:, None] / 16.0  # [N,1,8,8] in 0..1
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255.0).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous()


def load_split(split: str = "train", size: int = IMAGE_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images ``uint8 [N, 3, size, size]`` (white on black) and labels ``int64 [N]`` of one split.

    ``split`` is ``"train"`` (1433 images) or ``"heldout"`` (364 images, 35-37 per digit). Deterministic.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    images, labels = _raw_digits()
    train_idx, held_idx = _split_indices(labels)
    idx = train_idx if split == "train" else held_idx
    return _to_rgb_uint8(images[idx], size), labels[idx]


def caption_for(label: int, rng_or_index: Union[int, random.Random, torch.Generator] = 0) -> str:
    """A caption for digit ``label``. ``rng_or_index``: a template index (int) or an RNG that picks one."""
    label = int(label)
    if not 0 <= label <= 9:
        raise ValueError(f"label must be a digit 0..9, got {label}")
    if isinstance(rng_or_index, random.Random):
        t = rng_or_index.randrange(len(TEMPLATES))
    elif isinstance(rng_or_index, torch.Generator):
        t = int(torch.randint(len(TEMPLATES), (1,), generator=rng_or_index))
    else:
        t = int(rng_or_index) % len(TEMPLATES)
    return TEMPLATES[t].format(n=label, w=NUMBER_WORDS[label])


def all_captions(label: int) -> List[str]:
    """Every phrasing of digit ``label``."""
    return [caption_for(label, i) for i in range(len(TEMPLATES))]


def digit_prompts(num: int = 40, seed: int = 0) -> List[Tuple[str, int]]:
    """The built-in "digits" prompt set: ``num`` (prompt, label) pairs, digits 0..9 cycled, seeded phrasings."""
    rng = random.Random(seed)
    return [(caption_for(i % 10, rng), i % 10) for i in range(num)]


def vocabulary() -> List[str]:
    """Every word the captions use (lower case), sorted; the tokenizers of the digits models are built from it."""
    words = set()
    for label in range(10):
        for cap in all_captions(label):
            words.update(cap.lower().split())
    return sorted(words)


def downsample_for_classifier(images: torch.Tensor) -> torch.Tensor:
    """``[N,3,H,W]`` uint8/float images -> ``[N, 64]`` float features in 0..1 (grey, area-pooled to 8x8)."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    x = x.mean(dim=1, keepdim=True)
    x = F.adaptive_avg_pool2d(x, (8, 8))
    return x.flatten(1)
