"""Composing metrics by name: one `MetricSuite` per schedule, heavy parts (networks, reference) built once.

Metrics need different inputs: distribution metrics (fid, kid) need only the images (their reference is fixed),
text metrics (clip, imagereward) need the prompts, fidelity metrics (psnr, ssim, lpips) need the uncached images of
the same prompts and seeds. `MetricSuite.update(images, prompts, baseline)` routes each input where it belongs, so the
runner treats every metric alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cachekit.errors import UsageError

from .distributed import Dist

__all__ = ["METRICS", "MetricConfig", "MetricSuite", "MetricFactory", "parse_metric_names"]

# name -> kind
METRICS = {
    "fid": "distribution",
    "kid": "distribution",
    "clip": "text",
    "imagereward": "text",
    "psnr": "fidelity",
    "ssim": "fidelity",
    "lpips": "fidelity",
}
LOWER_IS_BETTER = {"fid", "kid", "lpips"}


def parse_metric_names(spec: str | list[str]) -> list[str]:
    """`"fid,kid,clip"` -> `["fid", "kid", "clip"]`, rejecting unknown names with the list of known ones."""
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [n for n in names if n not in METRICS]
    if bad:
        raise UsageError(f"unknown metric(s) {bad}; known: {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


@dataclass
class MetricConfig:
    """Everything that decides what a metric number means (and so goes into the report)."""

    names: list[str]
    fid_reference: str | None = None
    reference_limit: int | None = None
    fid_features: str = "inception"  # or "clip": FID/KID in the CLIP image space of `clip_model`
    inception_weights: str | None = None
    resize_mode: str = "bilinear-tf1x"
    clip_model: str = "digits"
    clip_weights: str | None = None
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    kid_seed: int = 0
    lpips_net: str = "alex"
    imagereward_dir: str | None = None
    batch_size: int = 32


class MetricSuite:
    """A named group of metrics fed from one stream of (images, prompts, baseline) batches."""

    def __init__(self, metrics: dict[str, Any]) -> None:
        self.metrics = metrics

    def update(self, images: torch.Tensor, prompts: list[str], baseline: torch.Tensor | None = None) -> None:
        """Feed a uint8 batch to every metric, with the prompts and the uncached images where a metric needs them."""
        for name, m in self.metrics.items():
            kind = METRICS[name]
            if kind == "distribution":
                m.update(images, real=False)
            elif kind == "text":
                m.update(images, list(prompts))
            else:
                if baseline is None:
                    raise ValueError(f"{name} compares with the uncached images; pass baseline")
                m.update(images, baseline)

    def compute(self) -> dict[str, float]:
        """name -> value (KID adds `kid_std`); states are gathered over processes first, by torchmetrics."""
        out: dict[str, float] = {}
        for name, m in self.metrics.items():
            v = m.compute()
            if name == "kid":
                out["kid"], out["kid_std"] = float(v[0]), float(v[1])
            else:
                out[name] = float(v)
        return out

    def reset(self) -> None:
        """Clear accumulated state of every metric (the fixed references stay)."""
        for m in self.metrics.values():
            m.reset()

    def to(self, device: torch.device | str) -> "MetricSuite":
        """Move every metric (and its networks) to `device`."""
        for m in self.metrics.values():
            m.to(device)
        return self

    def info(self) -> dict[str, dict[str, Any]]:
        """Per-metric backend, weights sha256, resize mode and reference."""
        return {name: m.info() for name, m in self.metrics.items()}


class MetricFactory:
    """Builds the networks and the reference once, then hands out fresh `MetricSuite`s that share them.

    Built on every process: the reference features are computed in shards and gathered, so all ranks agree.
    """

    def __init__(self, config: MetricConfig, dist: Dist | None = None, default_reference: str | None = None) -> None:
        self.config = config
        self.dist = dist or Dist()
        names = config.names
        self._clip = None
        self._extractor = None
        self.reference = None
        if "clip" in names or (config.fid_features == "clip" and {"fid", "kid"} & set(names)):
            from .clip_models import load_clip_model

            self._clip = load_clip_model(config.clip_model, config.clip_weights, device=str(self.dist.device))
        if {"fid", "kid"} & set(names):
            self._extractor = self._build_extractor().to(self.dist.device)
            ref = config.fid_reference or default_reference
            if ref is None:
                raise UsageError(
                    "fid/kid need a reference set: pass fid_reference / --fid-ref (image folder or mu/sigma .npz); "
                    "only the digits prompt set has a default (digits-heldout)"
                )
            if "kid" in names and ref.endswith(".npz"):
                raise UsageError("kid needs reference images (a folder or digits-heldout), not a .npz of statistics")
            from .reference import build_reference

            self.reference = build_reference(
                ref, self._extractor, dist=self.dist, batch_size=config.batch_size, limit=config.reference_limit
            )
        # Fail early on weights that are missing, before any image is generated; the instance serves the first suite.
        self._prebuilt = {n: self._make(n) for n in names if n in ("lpips", "imagereward")}

    def _build_extractor(self):
        from .features import ClipImageFeatures, InceptionFeatures

        if self.config.fid_features == "inception":
            return InceptionFeatures(self.config.inception_weights, resize_mode=self.config.resize_mode)
        if self.config.fid_features == "clip":
            c = self._clip
            return ClipImageFeatures(c.model, c.preprocess, name=c.name, weights=c.weights, weights_sha256=c.sha256)
        raise ValueError(f"fid_features must be 'inception' or 'clip', got {self.config.fid_features!r}")

    def _make(self, name: str):
        c = self.config
        if name == "fid":
            from .fid import FID

            return FID(self._extractor, reference=self.reference)
        if name == "kid":
            from .fid import KID

            return KID(self._extractor, reference=self.reference, subsets=c.kid_subsets,
                       subset_size=c.kid_subset_size, seed=c.kid_seed)
        if name == "clip":
            from .clip_score import CLIPScore

            return CLIPScore(self._clip)
        if name == "psnr":
            from .fidelity import PSNR

            return PSNR()
        if name == "ssim":
            from .fidelity import SSIM

            return SSIM()
        if name == "lpips":
            from .fidelity import LPIPS

            return LPIPS(c.lpips_net)
        if name == "imagereward":
            from .image_reward import ImageRewardScore

            return ImageRewardScore(c.imagereward_dir)
        raise ValueError(name)

    def suite(self, include_fidelity: bool = True) -> MetricSuite:
        """Fresh metric states for one schedule. The uncached model gets no fidelity metrics (it is the baseline)."""
        names = [n for n in self.config.names if include_fidelity or METRICS[n] != "fidelity"]
        built = {n: self._prebuilt.pop(n) if n in self._prebuilt else self._make(n) for n in names}
        return MetricSuite(built).to(self.dist.device)
