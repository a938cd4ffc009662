"""Optional ImageReward (human-preference) score, only when the package and its weights are already on the machine.

It is never required: the metric exists because the caching papers report it for large models. Loading it never
downloads; a missing package or file is a `MissingWeightsError` saying what to install or where to put the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torchmetrics import Metric

from .weights import MissingWeightsError, sha256_of

__all__ = ["ImageRewardScore", "IMAGE_REWARD_DIR"]

IMAGE_REWARD_DIR = Path(os.environ.get("CACHEKIT_IMAGEREWARD_DIR", Path.home() / ".cache" / "ImageReward"))
_HF = "https://huggingface.co/THUDM/ImageReward/tree/main"


class ImageRewardScore(Metric):
    """Mean ImageReward score of `update(images_uint8, prompts)` pairs (higher is preferred by people)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, weights_dir: str | os.PathLike | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        try:
            import ImageReward as RM  # noqa: N813 - the package's own name
        except ImportError as e:
            raise MissingWeightsError(
                "ImageReward is optional and not installed (`pip install image-reward`, then put ImageReward.pt and "
                f"med_config.json from {_HF} into {IMAGE_REWARD_DIR}); drop imagereward from --metrics otherwise."
            ) from e
        folder = Path(weights_dir).expanduser() if weights_dir else IMAGE_REWARD_DIR
        ckpt, med = folder / "ImageReward.pt", folder / "med_config.json"
        missing = [str(p) for p in (ckpt, med) if not p.is_file()]
        if missing:
            raise MissingWeightsError(f"ImageReward weights missing: {missing}; get them from {_HF}. Never downloaded.")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # its BLIP text encoder must come from the local HF cache
        self.model = RM.load(str(ckpt), med_config=str(med), device="cpu", download_root=str(folder))
        self.weights = str(ckpt)
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, prompts: list[str]) -> None:
        """Score each uint8 image against its prompt."""
        from PIL import Image

        for img, prompt in zip(images, prompts):
            pil = Image.fromarray(img.permute(1, 2, 0).cpu().numpy())
            with torch.no_grad():
                self.score_sum += float(self.model.score(prompt, [pil]))
            self.count += 1

    def compute(self) -> torch.Tensor:
        """Mean ImageReward over all images seen."""
        if self.count == 0:
            raise RuntimeError("ImageRewardScore has no images")
        return self.score_sum / self.count

    def info(self) -> dict[str, Any]:
        """Weights and their hash for the report."""
        return {"metric": "ImageReward", "backend": "ImageReward (THUDM)", "weights": self.weights,
                "sha256": sha256_of(self.weights)}
