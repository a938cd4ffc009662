"""Loading a CLIP for CLIP score / FD-CLIP from local files only.

Three sources: the digits CLIP the project ships (`cachekit.zoo.load_clip("digits")`), an open_clip architecture with a
local checkpoint (`ViT-B-32` + path to OpenAI's `ViT-B-32.pt` or an open_clip `.bin`/`.safetensors`), or the same
architecture found in open_clip's/OpenAI's usual cache folder. Nothing is downloaded: a missing file is a
`MissingWeightsError` that gives the official URL and where to put it.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from cachekit.errors import UsageError

from .weights import MissingWeightsError, sha256_of

__all__ = ["ClipBundle", "load_clip_model", "CLIP_CACHE_DIR"]

# OpenAI's `clip` package and open_clip's `load_openai_model` both cache here.
CLIP_CACHE_DIR = Path(os.environ.get("CACHEKIT_CLIP_DIR", Path.home() / ".cache" / "clip"))


@dataclass
class ClipBundle:
    """A CLIP model with its own preprocessing and tokenizer, and where its weights came from."""

    model: nn.Module
    preprocess: Callable
    tokenizer: Callable
    name: str
    weights: str | None
    sha256: str | None

    def info(self) -> dict[str, Any]:
        """Backend and weight fingerprint for the report."""
        return {"backend": f"open_clip ({self.name})", "weights": self.weights, "sha256": self.sha256}


def _load_digits(device: str) -> ClipBundle:
    """The digits CLIP shipped in `cachekit.zoo` (trained on the same digits as the embedded pipeline)."""
    try:
        from cachekit.zoo import clip_checkpoint, load_clip
    except ImportError as e:
        raise MissingWeightsError(f"the digits CLIP needs cachekit.zoo.load_clip, missing from this install ({e})") from e
    ckpt = clip_checkpoint("digits")  # raises ModelNotFoundError (a FileNotFoundError) with how to retrain
    model, preprocess, tokenizer = load_clip("digits", device=device)
    return ClipBundle(model.eval(), preprocess, tokenizer, "digits", str(ckpt), sha256_of(ckpt))


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n for n in z.namelist())


def load_clip_model(name: str = "digits", weights: str | os.PathLike | None = None, device: str = "cpu") -> ClipBundle:
    """Load a CLIP from local files: `"digits"`, or an open_clip architecture name (`ViT-B-32`, `ViT-L-14`, ...).

    For an architecture, `weights` is a local checkpoint; if omitted, OpenAI's file name is looked up in
    `~/.cache/clip` (or `$CACHEKIT_CLIP_DIR`). OpenAI's TorchScript `.pt` files and open_clip state dicts both work.
    """
    if name == "digits":
        if weights is not None:
            raise UsageError("the digits CLIP is bundled with cachekit; do not pass weights for it")
        return _load_digits(device)

    import open_clip

    if name not in open_clip.list_models():
        raise UsageError(f"unknown open_clip architecture {name!r}; e.g. ViT-B-32, ViT-L-14 (open_clip.list_models())")
    url = open_clip.get_pretrained_url(name.removesuffix("-quickgelu"), "openai") or ""
    if weights is None:
        candidate = CLIP_CACHE_DIR / os.path.basename(url) if url else None
        if candidate is None or not candidate.is_file():
            raise MissingWeightsError(
                f"no local weights for CLIP {name}: pass --clip-weights PATH, or put the checkpoint at "
                f"{candidate or CLIP_CACHE_DIR / (name + '.pt')}"
                + (f" (OpenAI's file: {url})" if url else "")
                + ". cachekit never downloads CLIP weights."
            )
        path = candidate
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise MissingWeightsError(
                f"CLIP checkpoint {path} does not exist" + (f"; OpenAI's {name} is at {url}" if url else "")
            )
    if _is_torchscript(path):
        # OpenAI's original release format; open_clip converts it to its own model (with QuickGELU).
        model = open_clip.load_openai_model(str(path), device=device)
        preprocess = open_clip.image_transform(
            model.visual.image_size,
            is_train=False,
            mean=open_clip.OPENAI_DATASET_MEAN,
            std=open_clip.OPENAI_DATASET_STD,
        )
    else:
        # OpenAI weights saved as a state dict need the `-quickgelu` architecture name (e.g. ViT-B-32-quickgelu).
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(path), device=device)
    tokenizer = open_clip.get_tokenizer(name)
    return ClipBundle(model.eval(), preprocess, tokenizer, name, str(path), sha256_of(path))
