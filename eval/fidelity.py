"""Fidelity to the uncached model: PSNR, SSIM, LPIPS between cached and uncached images of the same prompt and seed.

Caching is an approximation of the uncached model, so the most direct quality measure is how far each image moved.
All metrics take `update(images_uint8, baseline_uint8)` and are torchmetrics objects underneath (states sync across
processes). PSNR is the mean of per-image PSNRs; identical images give `inf`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from .weights import MissingWeightsError, sha256_of, torch_hub_checkpoint

__all__ = ["PSNR", "SSIM", "LPIPS", "lpips_backbone_file"]


def _pair(images: torch.Tensor, baseline: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if images.shape != baseline.shape:
        raise ValueError(f"cached images {tuple(images.shape)} and baseline {tuple(baseline.shape)} differ in shape")
    return images.float(), baseline.float()


class PSNR(PeakSignalNoiseRatio):
    """Mean per-image PSNR (dB) on 0..255 pixels against the uncached images."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(data_range=255.0, dim=(1, 2, 3), **kwargs)

    def update(self, images: torch.Tensor, baseline: torch.Tensor) -> None:  # type: ignore[override]
        """Add cached `images` and the uncached `baseline` (uint8 [N,3,H,W], same prompts and seeds)."""
        a, b = _pair(images, baseline)
        super().update(a.to(self.device), b.to(self.device))

    def info(self) -> dict[str, Any]:
        """Backend for the report (no weights)."""
        return {"metric": "PSNR", "backend": "torchmetrics PeakSignalNoiseRatio", "data_range": 255,
                "reduction": "mean of per-image PSNR", "compared_with": "uncached model, same prompts and seeds"}


class SSIM(StructuralSimilarityIndexMeasure):
    """Mean SSIM (Gaussian 11x11, sigma 1.5) on 0..255 pixels against the uncached images."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(data_range=255.0, **kwargs)

    def update(self, images: torch.Tensor, baseline: torch.Tensor) -> None:  # type: ignore[override]
        """Add cached `images` and the uncached `baseline` (uint8 [N,3,H,W])."""
        a, b = _pair(images, baseline)
        if min(a.shape[-2:]) < 11:
            raise ValueError(f"SSIM's 11x11 window needs images of at least 11x11, got {tuple(a.shape[-2:])}")
        super().update(a.to(self.device), b.to(self.device))

    def info(self) -> dict[str, Any]:
        """Backend for the report (no weights)."""
        return {"metric": "SSIM", "backend": "torchmetrics StructuralSimilarityIndexMeasure", "data_range": 255,
                "kernel": "gaussian 11, sigma 1.5", "compared_with": "uncached model, same prompts and seeds"}


_BACKBONES = {"alex": ("alexnet", "AlexNet_Weights"), "vgg": ("vgg16", "VGG16_Weights"),
              "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights")}


def lpips_backbone_file(net_type: str = "alex") -> tuple[str, os.PathLike]:
    """(URL, local path) of the torchvision ImageNet backbone LPIPS needs; torchvision reads it from the hub cache."""
    import torchvision

    if net_type not in _BACKBONES:
        raise ValueError(f"LPIPS net_type must be one of {sorted(_BACKBONES)}, got {net_type!r}")
    url = getattr(torchvision.models, _BACKBONES[net_type][1]).DEFAULT.url
    return url, torch_hub_checkpoint(os.path.basename(url))


def _linear_layers_file(net_type: str) -> str:
    import torchmetrics.functional.image.lpips as tm_lpips

    return os.path.join(os.path.dirname(tm_lpips.__file__), "lpips_models", f"{net_type}.pth")


class LPIPS(torch.nn.Module):
    """LPIPS (torchmetrics) against the uncached images, only from local weights.

    LPIPS = torchvision ImageNet backbone + linear layers (bundled with torchmetrics). torchvision would download the
    backbone; we check the torch hub cache first and raise `MissingWeightsError` naming the file instead.
    """

    def __init__(self, net_type: str = "alex") -> None:
        super().__init__()
        url, path = lpips_backbone_file(net_type)
        if not os.path.isfile(path):
            raise MissingWeightsError(
                f"LPIPS ({net_type}) needs the torchvision backbone {os.path.basename(url)} at {path}; cachekit never "
                f"downloads it. Copy it there from a machine that has it (source: {url}), or drop lpips from --metrics."
            )
        linear = _linear_layers_file(net_type)
        if not os.path.isfile(linear):
            raise MissingWeightsError(f"LPIPS linear layers {linear} are missing from the torchmetrics install")
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        self.metric = LearnedPerceptualImagePatchSimilarity(net_type=net_type, normalize=True)
        self.net_type, self.backbone, self.linear = net_type, str(path), linear

    def update(self, images: torch.Tensor, baseline: torch.Tensor) -> None:
        """Add cached `images` and the uncached `baseline` (uint8 [N,3,H,W])."""
        a, b = _pair(images, baseline)
        dev = next(self.metric.parameters(), torch.empty(0)).device
        self.metric.update((a / 255.0).to(dev), (b / 255.0).to(dev))

    def compute(self) -> torch.Tensor:
        """Mean LPIPS distance (lower is closer to the uncached image)."""
        return self.metric.compute()

    def reset(self) -> None:
        """Clear accumulated scores."""
        self.metric.reset()

    def info(self) -> dict[str, Any]:
        """Backbone and linear-layer weights with their sha256, for the report."""
        return {"metric": "LPIPS", "backend": f"torchmetrics LearnedPerceptualImagePatchSimilarity ({self.net_type})",
                "weights": self.backbone, "sha256": sha256_of(self.backbone),
                "linear_weights": self.linear, "linear_sha256": sha256_of(self.linear),
                "compared_with": "uncached model, same prompts and seeds"}
