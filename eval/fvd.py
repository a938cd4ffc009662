"""FVD: the Fréchet distance between clip features of generated and real clips, from a local network only.

FVD is FID's formula (`cachekit.eval.fid.frechet_distance`) over one feature vector per clip instead of per image,
so it sees motion that per-frame metrics cannot. The feature network is whatever the user has on disk, never
downloaded: an I3D saved as TorchScript (StyleGAN-V's `i3d_torchscript.pt`, the network most FVD figures use) or a
VideoMAE folder in `transformers`' format (`load_video_features`). Clips are resampled to the network's length and
input size first (`VideoFeatures.frames_for`), because the bundled model's clips are 9 frames of 32x32.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cachekit.errors import UsageError

from .fid import ReferenceStats, frechet_distance
from .weights import MissingWeightsError, sha256_of

__all__ = ["VideoFeatures", "I3DFeatures", "VideoMAEFeatures", "load_video_features", "FVD"]


class VideoFeatures(nn.Module):
    """A clip feature network for FVD: `forward(uint8 [N, F, 3, H, W]) -> float [N, D]`, eval mode, plus `info()`."""

    def __init__(self, path: Path, kind: str, num_frames: int, size: int) -> None:
        super().__init__()
        self.path, self.kind, self.num_frames, self.size = path, kind, num_frames, size

    def train(self, mode: bool = True) -> "VideoFeatures":
        """Always in eval mode: a metric network must not update its statistics."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")

    def frames_for(self, videos: torch.Tensor) -> torch.Tensor:
        """float `[N, T, 3, size, size]` in 0..1: frames resampled to the network's clip length (nearest index:
        short clips repeat frames, as FVD's I3D needs about 16), bilinear resized to its input size."""
        if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[2] != 3:
            raise ValueError(f"video features take uint8 clips [N, F, 3, H, W], got {videos.dtype} "
                             f"{tuple(videos.shape)}")
        n, f = videos.shape[:2]
        index = torch.linspace(0, f - 1, self.num_frames).round().long()
        x = videos[:, index].flatten(0, 1).float().div(255.0)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x.view(n, self.num_frames, 3, self.size, self.size)

    def extract(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.extract(self.frames_for(videos).to(self.device))
        return feats.flatten(1).float().cpu()

    def info(self) -> dict[str, Any]:
        """Network, file and hash, and how clips are fed to it, for the report."""
        weights = self.path if self.path.is_file() else next(iter(sorted(self.path.glob("*.safetensors"))), None)
        return {"metric": "FVD", "network": self.kind, "checkpoint": str(self.path),
                "sha256": sha256_of(weights) if weights is not None else None, "frames": self.num_frames,
                "input_size": self.size, "formula": "Fréchet distance of clip features (cachekit.eval.fid)",
                "reference": "held-out real clips (digits-video-heldout)"}


class I3DFeatures(VideoFeatures):
    """An I3D saved as TorchScript (StyleGAN-V's `i3d_torchscript.pt`, the common FVD network).

    Input `[N, 3, T, 224, 224]` in -1..1; when its `forward` takes them, it is called with `rescale=False,
    resize=False, return_features=True` (the pre-softmax features FVD uses, the resize already done here).
    """

    def __init__(self, path: Path, num_frames: int = 16, size: int = 224) -> None:
        super().__init__(path, "I3D (TorchScript)", num_frames, size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        try:
            names = {a.name for a in self.net.forward.schema.arguments}
        except (AttributeError, RuntimeError):
            names = set()
        self._kwargs = ({"rescale": False, "resize": False, "return_features": True}
                        if {"rescale", "resize", "return_features"} <= names else {})

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 2, 1, 3, 4).mul(2).sub(1).contiguous(), **self._kwargs)


class VideoMAEFeatures(VideoFeatures):
    """A VideoMAE folder (`config.json` + weights, `transformers`' format): mean of its last hidden states.

    Frames are normalised with the folder's `preprocessor_config.json` mean and std (ImageNet's by default), resized
    to the config's `image_size`, and resampled to its `num_frames`.
    """

    def __init__(self, path: Path) -> None:
        from transformers import VideoMAEModel

        model = VideoMAEModel.from_pretrained(str(path), local_files_only=True)
        cfg = model.config
        super().__init__(path, f"VideoMAE ({cfg.hidden_size}-d mean-pooled)", int(cfg.num_frames),
                         int(cfg.image_size))
        self.model = model.eval()
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            conf = json.loads(pre.read_text())
            mean, std = conf.get("image_mean", mean), conf.get("image_std", std)
        self.register_buffer("mean", torch.tensor(mean).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 1, 3, 1, 1), persistent=False)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=(x - self.mean) / self.std)
        return out.last_hidden_state.mean(1)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.endswith("constants.pkl") for n in z.namelist())


def load_video_features(path: str | os.PathLike) -> VideoFeatures:
    """The FVD network at a local `path`: an I3D TorchScript file or a VideoMAE folder. Never downloads.

    A missing path is a `MissingWeightsError` (one line in the CLI); a file or folder of another kind a `UsageError`.
    """
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise MissingWeightsError(
            f"FVD checkpoint {p} does not exist: give a local I3D TorchScript file (e.g. StyleGAN-V's "
            "i3d_torchscript.pt) or a VideoMAE folder (config.json + weights); cachekit never downloads it")
    if p.is_dir():
        config = p / "config.json"
        model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
        if model_type != "videomae":
            raise UsageError(f"FVD checkpoint folder {p} is not a VideoMAE folder (its config.json has model_type "
                             f"{model_type!r}, want 'videomae')")
        return VideoMAEFeatures(p)
    if not _is_torchscript(p):
        raise UsageError(f"FVD checkpoint {p} is not a TorchScript file (an I3D saved with torch.jit.save) nor a "
                         "VideoMAE folder")
    return I3DFeatures(p)


class FVD:
    """Fréchet video distance of accumulated clips against fixed reference clip statistics (torchmetrics-style
    `update` / `compute` / `reset`); the formula is `cachekit.eval.fid.frechet_distance`, as FID's."""

    def __init__(self, network: VideoFeatures, reference: ReferenceStats) -> None:
        self.network, self.reference = network, reference
        self._features: list[torch.Tensor] = []

    def update(self, videos: torch.Tensor) -> None:
        """Add uint8 clips `[N, F, 3, H, W]`."""
        self._features.append(self.network(videos))

    def compute(self) -> float:
        """FVD of every clip added so far (needs at least 2)."""
        feats = torch.cat(self._features) if self._features else torch.zeros(0, self.reference.dim)
        if feats.shape[0] < 2:
            raise RuntimeError("FVD needs at least 2 generated clips")
        gen = ReferenceStats.from_features(feats, "generated")
        ref = self.reference
        return frechet_distance(ref.mu, ref.sigma, gen.mu, gen.sigma, ref.factor())

    def reset(self) -> None:
        self._features = []

    def info(self) -> dict[str, Any]:
        return {**self.network.info(), "reference_clips": self.reference.num_images}
