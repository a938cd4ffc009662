"""Image grids: the one place that turns a list of generated images into a PNG a person looks at."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .io import atomic_path

__all__ = ["to_pil", "image_grid", "save_image_grid"]


def to_pil(image: Image.Image | np.ndarray | torch.Tensor) -> Image.Image:
    """Accept PIL images, HWC uint8/float arrays, or CHW tensors in [0, 1] (diffusers' `output_type='pt'`)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array).convert("RGB")


def image_grid(images: Sequence, columns: int | None = None) -> Image.Image:
    if not images:
        raise ValueError("no images to put in a grid")
    pils = [to_pil(image) for image in images]
    columns = columns or math.ceil(math.sqrt(len(pils)))
    rows = math.ceil(len(pils) / columns)
    width, height = pils[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, pil in enumerate(pils):
        grid.paste(pil.resize((width, height)), ((i % columns) * width, (i // columns) * height))
    return grid


def save_image_grid(images: Sequence, path: str | os.PathLike, columns: int | None = None) -> None:
    """Write a grid PNG atomically; small images (the digits model draws 16x16) are upscaled to be visible."""
    grid = image_grid(images, columns)
    scale = max(1, 256 // max(grid.width, grid.height, 1)) if max(grid.size) < 256 else 1
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    with atomic_path(path, suffix=".png") as tmp:
        grid.save(tmp, format="PNG")
