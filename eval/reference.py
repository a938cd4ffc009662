"""Reference sets for FID/KID: real images whose feature statistics generated images are compared with.

A reference is named by a string so the CLI and reports can carry it: `digits-heldout` (the embedded model's held-out
real digits, never trained on: the default for the digits prompt set), `digits-train`, `digits-video-heldout` /
`digits-video-train` (the frames of real moving-digit clips of either split, the video model's per-frame
reference), a folder of images, or a `.npz` of precomputed `mu`/`sigma` (published COCO / MJHQ statistics work
as-is). Feature extraction is split over
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

__all__ = ["DIGITS_REFERENCES", "VIDEO_REFERENCES", "VIDEO_REFERENCE_CLIPS", "VIDEO_REFERENCE_SEED",
           "build_reference", "reference_images", "reference_clips", "features_of"]

VIDEO_REFERENCES = ("digits-video-heldout", "digits-video-train")
DIGITS_REFERENCES = ("digits-heldout", "digits-train") + VIDEO_REFERENCES
VIDEO_REFERENCE_CLIPS = 100
"""Real clips a video reference renders unless told otherwise (900 frames at 9 frames a clip)."""
VIDEO_REFERENCE_SEED = 0


def reference_clips(spec: str, num_clips: int = VIDEO_REFERENCE_CLIPS, seed: int = VIDEO_REFERENCE_SEED):
    """`num_clips` real clips (`cachekit.zoo.digits_video_data.Clips`) of a video reference split, seeded.

    Why clips are rendered, not stored: `clips(split, n, seed)` is a pure function, so every run, process and
    machine sees the same reference; the held-out split's digit samples never appear in the video model's training.
    """
    if spec not in VIDEO_REFERENCES:
        raise UsageError(f"video reference must be one of {', '.join(VIDEO_REFERENCES)}, got {spec!r}")
    from cachekit.zoo.digits_video_data import clips

    return clips(spec.rsplit("-", 1)[1], int(num_clips), seed=seed)


def reference_images(spec: str, limit: int | None = None) -> torch.Tensor | list[Path]:
    """The reference images of `spec`: a uint8 tensor for the digits splits, a sorted file list for a folder.

    A video split gives the frames of `VIDEO_REFERENCE_CLIPS` real clips (or of as many as `limit` frames need), clip
    after clip, `[clips * F, 3, H, W]`.
    """
    if spec in VIDEO_REFERENCES:
        from cachekit.zoo.digits_video_data import NUM_FRAMES

        num_clips = -(-limit // NUM_FRAMES) if limit else VIDEO_REFERENCE_CLIPS
        frames = reference_clips(spec, num_clips).frames.flatten(0, 1)
        return frames[:limit] if limit else frames
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
