"""Reference sets for FID/KID: real images whose feature statistics generated images are compared with.

A reference is named by a string so the CLI and reports can carry it: `digits-heldout` (the embedded model's held-out
real digits, never trained on: the default for the digits prompt set), `digits-train`, a folder of images, or a `.npz`
of precomputed `mu`/`sigma` (published COCO / MJHQ statistics work as-is). Feature extraction is split over
processes and gathered, so every process ends with the same statistics.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from cachekit.errors import UsageError

from .distributed import Dist, global_batches
from .features import FeatureExtractor
from .fid import ReferenceStats
from .images import iter_folder_batches, list_images

__all__ = ["DIGITS_REFERENCES", "build_reference", "reference_images", "features_of"]

DIGITS_REFERENCES = ("digits-heldout", "digits-train")


def reference_images(spec: str, limit: int | None = None) -> torch.Tensor | list[Path]:
    """The reference images of `spec`: a uint8 tensor for the digits splits, a sorted file list for a folder."""
    if spec in DIGITS_REFERENCES:
        from cachekit.zoo.digits_data import load_split

        images, _ = load_split(spec.split("-", 1)[1])
        return images[:limit] if limit else images
    files = list_images(spec)
    return files[:limit] if limit else files


def features_of(
    extractor: FeatureExtractor,
    images: torch.Tensor | list[Path],
    *,
    dist: Dist | None = None,
    batch_size: int = 32,
    desc: str = "reference features",
) -> torch.Tensor:
    """Features `[N, D]` of an image tensor or file list, computed in shards and gathered in order on every rank."""
    dist = dist or Dist()
    mine = dist.my_batches(global_batches(len(images), batch_size))
    out = []
    for idx in tqdm(mine, desc=desc, disable=not dist.is_main, leave=False):
        if torch.is_tensor(images):
            out.append(extractor(images[idx[0] : idx[-1] + 1]).cpu())
        else:
            for batch in iter_folder_batches([images[i] for i in idx], batch_size):
                out.append(extractor(batch).cpu())
    local = torch.cat(out) if out else torch.zeros(0, extractor.num_features)
    return dist.gather_cat(local)


def build_reference(
    spec: str,
    extractor: FeatureExtractor,
    *,
    dist: Dist | None = None,
    batch_size: int = 32,
    limit: int | None = None,
) -> ReferenceStats:
    """Reference statistics for `spec` (see module doc) under `extractor`.

    `.npz` files are loaded, not recomputed; they only serve FID (KID needs the features themselves).
    """
    if spec.endswith(".npz"):
        stats = ReferenceStats.load_npz(spec)
        if stats.dim != extractor.num_features:
            raise UsageError(
                f"{spec} holds {stats.dim}-d statistics but the FID extractor gives {extractor.num_features}-d"
            )
        return stats
    if spec not in DIGITS_REFERENCES and not Path(spec).expanduser().exists():
        raise FileNotFoundError(
            f"FID reference {spec!r} is neither {' / '.join(DIGITS_REFERENCES)}, an image folder, nor a .npz file. "
            "For COCO/MJHQ give a folder of the real images or published mu/sigma statistics (.npz)."
        )
    images = reference_images(spec, limit)
    feats = features_of(extractor, images, dist=dist, batch_size=batch_size)
    source = spec if spec in DIGITS_REFERENCES else f"folder:{Path(spec).expanduser().resolve()}"
    return ReferenceStats.from_features(feats, source, extractor.info())
