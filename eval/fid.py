"""FID and KID as torchmetrics objects, against a fixed reference computed once.

The torchmetrics classes keep real and fake feature statistics as synchronised states. An evaluation compares many
schedules with one reference set (held-out digits, COCO statistics from a published `.npz`), so the reference is
computed once, held outside the synchronised state (`ReferenceStats`), and shared: summing it across processes would
count it once per process. Without a reference, `update(imgs, real=True)` works exactly as in torchmetrics.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd
from torchmetrics.utilities import dim_zero_cat

from cachekit.errors import UsageError

from .features import FeatureExtractor, InceptionFeatures

__all__ = ["ReferenceStats", "FID", "KID", "frechet_distance", "sqrt_factor"]


def sqrt_factor(sigma: torch.Tensor, features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(V, s)` with `sigma^(1/2) = V diag(s) V^T`, V with orthonormal columns, for a covariance matrix.

    From the features when there are fewer samples than dimensions (an SVD of the centred `[N, D]` features: rank
    N-1, milliseconds), else from a symmetric eigendecomposition of `sigma`. Computed once per reference, it makes
    every later FID against that reference cheap.
    """
    if features is not None and features.shape[0] - 1 < features.shape[1]:
        a = features.double()
        a = a - a.mean(0, keepdim=True)
        _, sv, vh = torch.linalg.svd(a, full_matrices=False)
        return vh.T, sv / math.sqrt(features.shape[0] - 1)
    e, v = torch.linalg.eigh(sigma.double())
    return v, e.clamp(min=0).sqrt()


def frechet_distance(
    mu1: torch.Tensor,
    sigma1: torch.Tensor,
    mu2: torch.Tensor,
    sigma2: torch.Tensor,
    factor1: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> float:
    """||mu1-mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^1/2), in float64.

    Tr((S1 S2)^1/2) is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    R S2 R with R = S1^(1/2) (same non-zero spectrum as S1 S2), restricted to the range of R: with `factor1`
    (see `sqrt_factor`) that is a small `r x r` problem, which matters on CPU, where the general non-symmetric
    eigensolver torchmetrics uses takes tens of seconds at D = 2048. Tiny negative round-off eigenvalues count as 0.
    """
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    v, s = factor1 if factor1 is not None else sqrt_factor(sigma1)
    v, s = v.to(sigma2.device), s.to(sigma2.device)
    inner = (v.T @ sigma2 @ v) * s[:, None] * s[None, :]
    ev = torch.linalg.eigvalsh((inner + inner.T) / 2)
    tr_sqrt = ev.clamp(min=0).sqrt().sum()
    diff = (mu1 - mu2).square().sum()
    return float(diff + sigma1.trace() + sigma2.trace() - 2 * tr_sqrt)


@dataclass
class ReferenceStats:
    """Mean and covariance of a reference set's features (and the features themselves when KID needs them).

    `.npz` files with `mu` and `sigma` (what pytorch-fid and clean-fid write) load as-is; their provenance
    (extractor, resize) is unknown unless cachekit wrote them, and the report says so.
    """

    mu: torch.Tensor
    sigma: torch.Tensor
    num_images: int | None
    source: str
    features: torch.Tensor | None = None
    extractor: dict[str, Any] | None = field(default=None)
    _factor: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_features(
        cls, features: torch.Tensor, source: str, extractor: dict[str, Any] | None = None
    ) -> "ReferenceStats":
        """Statistics of `[N, D]` features (unbiased covariance, as torchmetrics and pytorch-fid use)."""
        if features.ndim != 2 or features.shape[0] < 2:
            raise UsageError(f"need at least 2 reference feature vectors [N, D], got {tuple(features.shape)}")
        f = features.double()
        return cls(f.mean(0), torch.cov(f.T), int(f.shape[0]), source, features.float().cpu(), extractor)

    @classmethod
    def load_npz(cls, path: str | os.PathLike) -> "ReferenceStats":
        """Read `mu`/`sigma` statistics from `.npz` (pytorch-fid, clean-fid, or `save_npz`)."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(
                f"FID reference statistics {p} do not exist. Precompute them with cachekit "
                "(`ReferenceStats.save_npz`), pytorch-fid (`--save-stats`) or clean-fid, or use an image folder."
            )
        with np.load(p, allow_pickle=False) as z:
            if "mu" not in z or "sigma" not in z:
                raise UsageError(f"{p} has keys {sorted(z.keys())}; FID statistics need 'mu' and 'sigma'")
            mu, sigma = torch.from_numpy(z["mu"]).double(), torch.from_numpy(z["sigma"]).double()
            num = int(z["num_images"]) if "num_images" in z else None
            extractor = {"sha256": str(z["extractor_sha256"]), "resize_mode": str(z["resize_mode"])} if (
                "extractor_sha256" in z and "resize_mode" in z
            ) else None
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise UsageError(f"{p}: mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} are not [D] and [D, D]")
        return cls(mu, sigma, num, f"npz:{p}", None, extractor)

    def save_npz(self, path: str | os.PathLike) -> None:
        """Write `mu`, `sigma` (readable by pytorch-fid / clean-fid) plus cachekit's provenance keys."""
        extra: dict[str, Any] = {}
        if self.num_images is not None:
            extra["num_images"] = np.asarray(self.num_images)
        if self.extractor:
            extra["extractor_sha256"] = np.asarray(str(self.extractor.get("sha256")))
            extra["resize_mode"] = np.asarray(str(self.extractor.get("resize_mode")))
        np.savez(path, mu=self.mu.numpy(), sigma=self.sigma.numpy(), **extra)

    def factor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`sqrt_factor` of the covariance, computed on first use and kept (the reference serves many schedules)."""
        if self._factor is None:
            self._factor = sqrt_factor(self.sigma, self.features)
        return self._factor

    @property
    def dim(self) -> int:
        """Feature dimension (2048 for Inception pool3)."""
        return int(self.mu.shape[0])

    def describe(self) -> dict[str, Any]:
        """What the report records about the reference set."""
        return {"source": self.source, "num_images": self.num_images, "feature_dim": self.dim}


def _default_extractor(feature: FeatureExtractor | None) -> FeatureExtractor:
    return feature if feature is not None else InceptionFeatures()


def _check_ref(ref: ReferenceStats, extractor: nn.Module) -> None:
    dim = getattr(extractor, "num_features", None)
    if dim is not None and ref.dim != int(dim):
        raise UsageError(
            f"reference statistics have {ref.dim}-d features but the extractor gives {dim}-d: they were computed "
            "with a different network"
        )


class FID(FrechetInceptionDistance):
    """torchmetrics FID with a pluggable `FeatureExtractor` (real Inception by default) and a fixed reference.

    `update(images_uint8, real=False)` accumulates generated images; `set_reference(stats)` fixes the real side.
    States sync across processes before `compute()` like any torchmetrics metric.
    """

    def __init__(
        self,
        feature: FeatureExtractor | None = None,
        reference: ReferenceStats | None = None,
        **kwargs: Any,
    ) -> None:
        extractor = _default_extractor(feature)
        super().__init__(feature=extractor, reset_real_features=True, normalize=False, **kwargs)
        self._reference: ReferenceStats | None = None
        if reference is not None:
            self.set_reference(reference)

    def set_reference(self, reference: ReferenceStats) -> None:
        """Use fixed reference statistics instead of the accumulated real features.

        The real side's states are then unused, and torchmetrics also keeps a zero copy of every state to reset
        from: at 2048 Inception features that is four 32 MiB float64 matrices per FID, one FID per configuration of
        an evaluation (a bench compares dozens). So the real states shrink to scalars and the reset copies to
        stride-0 views of one zero: 32 MiB per FID (the generated side's covariance sum) instead of 128 MiB.
        """
        _check_ref(reference, self.inception)
        self._reference = reference
        for name in ("real_features_sum", "real_features_cov_sum"):
            empty = getattr(self, name).new_zeros(())
            setattr(self, name, empty)
            self._defaults[name] = empty.clone()
        for name, default in self._defaults.items():
            if isinstance(default, torch.Tensor) and default.numel() > 1 and not bool(default.any()):
                self._defaults[name] = default.new_zeros(()).expand(default.shape)  # reset() clones it to full size

    def update(self, imgs: torch.Tensor, real: bool) -> None:  # type: ignore[override]
        """Accumulate generated images (`real=False`), or real ones when there is no fixed reference."""
        if real and self._reference is not None:
            raise UsageError(f"this FID compares against a fixed reference ({self._reference.source}); it takes "
                             "generated images only")
        super().update(imgs, real)

    @property
    def reference(self) -> ReferenceStats | None:
        """The fixed reference, if any."""
        return self._reference

    @staticmethod
    def _stats(total: torch.Tensor, cov_sum: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = total / n
        return mean, (cov_sum - n * torch.outer(mean, mean)) / (n - 1)

    def compute(self) -> torch.Tensor:
        """FID of the accumulated generated images against the fixed reference (or the accumulated real images)."""
        if self.fake_features_num_samples < 2:
            raise RuntimeError("FID needs at least 2 generated images")
        mean, cov = self._stats(self.fake_features_sum, self.fake_features_cov_sum, self.fake_features_num_samples)
        if self._reference is not None:
            ref = self._reference
            d = frechet_distance(ref.mu.to(mean.device), ref.sigma.to(mean.device), mean, cov, ref.factor())
            return torch.tensor(d)
        if self.real_features_num_samples < 2:
            raise RuntimeError("FID needs a reference: set_reference() or at least 2 update(images, real=True)")
        rmean, rcov = self._stats(self.real_features_sum, self.real_features_cov_sum, self.real_features_num_samples)
        return torch.tensor(frechet_distance(rmean, rcov, mean, cov))

    def info(self) -> dict[str, Any]:
        """Backend, weights hash, resize mode and reference for the report."""
        out = {"metric": "FID", "implementation": "torchmetrics.image.fid.FrechetInceptionDistance",
               **self.inception.info()}
        if self._reference is not None:
            out["reference"] = self._reference.describe()
        return out


class KID(KernelInceptionDistance):
    """torchmetrics KID with a pluggable extractor, a fixed reference feature set, and seeded subsets.

    KID needs reference *features* (not just mu/sigma), so a `.npz` of statistics cannot serve as its reference.
    Subsets are drawn with a fixed seed so the value does not depend on global RNG state or process count.
    `subset_size` is capped at the number of available samples (and recorded).
    """

    def __init__(
        self,
        feature: FeatureExtractor | None = None,
        reference: ReferenceStats | None = None,
        subsets: int = 100,
        subset_size: int = 1000,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        extractor = _default_extractor(feature)
        with warnings.catch_warnings():  # torchmetrics warns that KID keeps features in memory; that is the design
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(
                feature=extractor, subsets=subsets, subset_size=subset_size, reset_real_features=True, **kwargs
            )
        self.seed = seed
        self._reference: ReferenceStats | None = None
        self._used_subset_size: int | None = None
        if reference is not None:
            self.set_reference(reference)

    def set_reference(self, reference: ReferenceStats) -> None:
        """Use a fixed set of reference features instead of the accumulated real features."""
        if reference.features is None:
            raise UsageError(
                f"KID needs reference features, but {reference.source} only has mean/covariance statistics; "
                "use an image folder (or the digits held-out set) as the KID reference"
            )
        _check_ref(reference, self.inception)
        self._reference = reference

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(KID mean, KID std) over seeded random subsets of reference and generated features."""
        if not self.fake_features:
            raise RuntimeError("KID needs generated images: call update(images, real=False) first")
        fake = dim_zero_cat(self.fake_features)
        if self._reference is not None:
            real = self._reference.features.to(fake.device)
        elif self.real_features:
            real = dim_zero_cat(self.real_features)
        else:
            raise RuntimeError("KID has no reference: call set_reference() or update(images, real=True)")
        m = min(self.subset_size, real.shape[0], fake.shape[0])
        if m < 2:
            raise RuntimeError("KID needs at least 2 reference and 2 generated images")
        self._used_subset_size = m
        gen = torch.Generator().manual_seed(self.seed)
        scores = []
        for _ in range(self.subsets):
            r = real[torch.randperm(real.shape[0], generator=gen)[:m].to(real.device)]
            f = fake[torch.randperm(fake.shape[0], generator=gen)[:m].to(fake.device)]
            scores.append(poly_mmd(r.double(), f.double(), self.degree, self.gamma, self.coef))
        kid = torch.stack(scores)
        return kid.mean(), kid.std(unbiased=False)

    def info(self) -> dict[str, Any]:
        """Backend, weights hash, subset sizes and reference for the report."""
        out = {
            "metric": "KID",
            "implementation": "torchmetrics.image.kid.KernelInceptionDistance",
            **self.inception.info(),
            "subsets": self.subsets,
            "subset_size": self._used_subset_size or self.subset_size,
            "subset_seed": self.seed,
        }
        if self._reference is not None:
            out["reference"] = self._reference.describe()
        return out
