"""CLIP score: how well images match their prompts, with a CLIP loaded from local files.

Convention (DeepCache, torchmetrics): per image `max(100 * cos(image, text), 0)`, then the mean over images. The
state is a sum and a count, so it syncs across processes like any torchmetrics metric.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from .clip_models import ClipBundle
from .features import ClipImageFeatures

__all__ = ["CLIPScore"]


class CLIPScore(Metric):
    """Mean per-image CLIP score of `update(images_uint8, prompts)` pairs."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, clip: ClipBundle, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clip = clip
        self.image_features = ClipImageFeatures(
            clip.model, clip.preprocess, name=clip.name, weights=clip.weights, weights_sha256=clip.sha256,
            normalize=True,
        )
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def per_image(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per-image `max(100 * cos, 0)` scores (float64 [N]); used by `update` and by callers that want them all."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        img = self.image_features(images)
        dev = self.image_features.device
        with torch.no_grad():
            txt = F.normalize(self.clip.model.encode_text(self.clip.tokenizer(list(prompts)).to(dev)).float(), dim=-1)
        cos = (img.to(dev) * txt).sum(-1)
        return (100.0 * cos).clamp(min=0).double()

    def update(self, images: torch.Tensor, prompts: list[str]) -> None:
        """Add a batch of uint8 images with their prompts."""
        s = self.per_image(images, prompts)
        self.score_sum += s.sum().to(self.score_sum.device)
        self.count += s.numel()

    def compute(self) -> torch.Tensor:
        """Mean CLIP score over all images seen (on all processes)."""
        if self.count == 0:
            raise RuntimeError("CLIPScore has no images: call update(images, prompts) first")
        return self.score_sum / self.count

    def info(self) -> dict[str, Any]:
        """Backend and weights for the report."""
        return {
            "metric": "CLIP score",
            "convention": "mean over images of max(100*cos, 0)",
            **self.image_features.info(),
        }
