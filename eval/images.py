"""Image plumbing shared by metrics and reports: one canonical in-memory format, `uint8 [N, 3, H, W]` on CPU.

Pipelines return PIL lists, numpy arrays or float tensors depending on `output_type`; metrics must see the same pixels a
user would save as PNG, so everything is quantised to uint8 once, here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["to_uint8", "IMAGE_EXTENSIONS", "list_images", "iter_folder_batches", "save_png"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def to_uint8(images: Any) -> torch.Tensor:
    """Pipeline output (float tensor in [0,1] NCHW, numpy NHWC in [0,1], PIL list, uint8) -> uint8 [N,3,H,W] CPU.

    A batch of clips (a video pipeline's ``frames``: ``[N, F, C, H, W]`` tensor or ``[N, F, H, W, C]`` numpy) comes
    out as its frames, clip after clip (``[N*F, 3, H, W]``): every image metric then judges each frame as an image
    (PSNR per frame against the uncached clip's frame), with one code path for images and videos.
    """
    if torch.is_tensor(images) and images.ndim == 5:
        images = images.flatten(0, 1)
    elif isinstance(images, np.ndarray) and images.ndim == 5:
        images = images.reshape(-1, *images.shape[2:])
    if isinstance(images, (list, tuple)) and images and not torch.is_tensor(images[0]):
        if hasattr(images[0], "convert"):  # PIL
            images = np.stack([np.asarray(im.convert("RGB")) for im in images])
        else:
            images = np.stack([np.asarray(im) for im in images])
    if isinstance(images, (list, tuple)):
        images = torch.stack(list(images))
    if isinstance(images, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(images))
        if t.ndim == 3:
            t = t[None]
        if t.shape[-1] in (1, 3, 4) and t.shape[1] not in (1, 3, 4):  # NHWC
            t = t.permute(0, 3, 1, 2)
        images = t
    if not torch.is_tensor(images) or images.ndim != 4:
        raise ValueError(f"expected a batch of images, got {type(images).__name__}")
    x = images.detach().cpu()
    if x.shape[1] == 4:
        x = x[:, :3]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.dtype != torch.uint8:
        x = (x.float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return x.contiguous()


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under `folder` (recursive), sorted so every process and run sees the same order."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return files


def _load(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def iter_folder_batches(files: list[Path], batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 batches from image files; a batch is cut early where the image size changes (batches stack)."""
    batch: list[torch.Tensor] = []
    for p in files:
        img = _load(p)
        if batch and (len(batch) == batch_size or img.shape != batch[0].shape):
            yield torch.stack(batch)
            batch = []
        batch.append(img)
    if batch:
        yield torch.stack(batch)


def save_png(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Write one uint8 [3,H,W] image as PNG (lossless, so a re-read gives the same metric)."""
    from PIL import Image

    from cachekit.io import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(tmp, format="PNG")
