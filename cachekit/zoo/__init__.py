"""Small, real models the project trains and ships, so every test and default run works offline.

``digits`` is a PixArt-alpha-architecture text-to-image pipeline (AutoencoderKL 16x16x3 <-> 8x8x4, tiny T5 encoder,
word-level tokenizer, 28-block PixArtTransformer2DModel, DPM-Solver++) trained on scikit-learn's bundled handwritten
digits; ``digits_clip`` is a CLIP in open_clip format trained on the same images and captions. Both are plain
``save_pretrained`` / open_clip folders: stock ``PixArtAlphaPipeline.from_pretrained(path)`` and
``open_clip.create_model_and_transforms(...)`` load them. Retrain with ``python -m cachekit.zoo.train_digits`` and
``python -m cachekit.zoo.train_digits_clip``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from ..errors import CachekitError
from ..io import write_text

__all__ = [
    "DIGITS_DEFAULTS",
    "DIGITS_VIDEO_DEFAULTS",
    "call_defaults",
    "bundled_name",
    "DIGITS_CLIP_NAME",
    "ModelNotFoundError",
    "pipeline_path",
    "load_pipeline",
    "clip_path",
    "clip_checkpoint",
    "register_clip",
    "load_clip",
    "shipped_schedules",
    "schedule_path",
]

_HERE = Path(__file__).resolve().parent
_PIPELINES = {"digits": _HERE / "digits", "digits-video": _HERE / "digits_video"}
#: The stock diffusers class each bundled pipeline loads with, and the module that retrains it.
_PIPELINE_CLASSES = {"digits": "PixArtAlphaPipeline", "digits-video": "WanPipeline"}
_TRAINERS = {"digits": "cachekit.zoo.train_digits", "digits-video": "cachekit.zoo.train_digits_video"}
_CLIPS = {"digits": _HERE / "digits_clip"}
_SCHEDULES = _HERE / "schedules"

#: Recommended generation settings for the digits pipeline: pass them as ``pipe(prompt, **DIGITS_DEFAULTS)``.
#: ``use_resolution_binning=False`` is required: PixArt's binning only knows its 256/512/1024 sample sizes and raises
#: "Invalid sample size" for this 16x16 model. ``max_sequence_length=16`` holds every caption (the pipeline's default
#: of 120 also works, with the same images, but makes cross-attention several times slower).
#: ``clean_caption=False`` skips the bs4/ftfy caption cleaner (lower-casing is done either way).
DIGITS_DEFAULTS: Dict[str, Any] = {
    "num_inference_steps": 20,
    "guidance_scale": 4.0,
    "height": 16,
    "width": 16,
    "max_sequence_length": 16,
    "use_resolution_binning": False,
    "clean_caption": False,
}

#: Recommended settings for the digits-video pipeline (a ``WanPipeline``). ``max_sequence_length=16`` is required in
#: practice: Wan pads prompts with zeros to its default of 512 and gives the transformer no mask, and the model was
#: trained on 16 (at 512 it draws the motion far less often right).
DIGITS_VIDEO_DEFAULTS: Dict[str, Any] = {
    "num_inference_steps": 20,
    "guidance_scale": 4.0,
    "height": 32,
    "width": 32,
    "num_frames": 9,
    "max_sequence_length": 16,
}


def call_defaults(model: str) -> Dict[str, Any]:
    """The pipeline call settings a bundled model needs, without the step count (which every command sets itself).

    Any other model gets none: a user's pipeline runs with its own defaults unless the command line says otherwise.
    """
    defaults = {"digits": DIGITS_DEFAULTS, "digits-video": DIGITS_VIDEO_DEFAULTS}.get(model)
    if defaults is None:
        return {}
    return {k: v for k, v in defaults.items() if k != "num_inference_steps"}


def bundled_name(pipe: Any) -> Optional[str]:
    """The bundled model a pipeline was loaded from (``"digits"``, ``"digits-video"``), or None for any other.

    Read off the transformer's ``_name_or_path`` (kept by copies of the pipeline, which peers make) or the
    pipeline's own, compared with the bundled folders.
    """
    candidates = []
    transformer = getattr(pipe, "transformer", None)
    for source in (getattr(getattr(transformer, "config", None), "_name_or_path", None),
                   getattr(pipe, "name_or_path", None)):
        if source:
            candidates.append(Path(str(source)).expanduser())
    for name, folder in _PIPELINES.items():
        for path in candidates:
            try:
                resolved = path.resolve()
            except OSError:
                continue
            if resolved == folder or folder in resolved.parents:
                return name
    return None


#: Name under which :func:`register_clip` registers the digits CLIP config with open_clip.
DIGITS_CLIP_NAME = "cachekit-digits-clip"
_CLIP_WEIGHTS = "open_clip_model.safetensors"


class ModelNotFoundError(CachekitError, FileNotFoundError):
    """A model folder or its weights are missing; the message says how to provide them."""


def pipeline_path(name: str = "digits") -> Path:
    """Folder of a bundled pipeline (``"digits"``), or ``name`` itself as a path."""
    return _PIPELINES.get(name, Path(name))


def _has_pipeline_weights(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() and any(folder.rglob("*.safetensors"))


def load_pipeline(name_or_path: str = "digits", device=None, torch_dtype=None):
    """A stock diffusers pipeline, loaded offline.

    ``"digits"`` is the bundled PixArt-alpha pipeline (a ``PixArtAlphaPipeline``), ``"digits-video"`` the bundled
    text-to-video pipeline (a ``WanPipeline``, 9 frames of 32x32 moving digits); any other string is a local
    diffusers folder or a model id already in the Hugging Face cache, loaded with
    ``DiffusionPipeline.from_pretrained(..., local_files_only=True)``. Nothing is downloaded; a missing model raises
    :class:`ModelNotFoundError` with a one-line message. Weights load as float32 unless ``torch_dtype`` is given.
    """
    from diffusers import DiffusionPipeline

    name_or_path = str(name_or_path)
    kwargs = {"local_files_only": True}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype  # diffusers >= 0.42 name (torch_dtype is deprecated there)
    if name_or_path in _PIPELINES:
        folder = _PIPELINES[name_or_path]
        if not _has_pipeline_weights(folder):
            raise ModelNotFoundError(
                f"bundled model {name_or_path!r} has no weights at {folder}: reinstall cachekit or retrain it with "
                f"`python -m {_TRAINERS[name_or_path]} --out {folder}`")
        import diffusers

        pipeline_class = getattr(diffusers, _PIPELINE_CLASSES[name_or_path])
        pipe = pipeline_class.from_pretrained(str(folder), **kwargs)
    else:
        folder = Path(name_or_path).expanduser()
        if folder.exists() and not _has_pipeline_weights(folder):
            raise ModelNotFoundError(
                f"model {name_or_path!r} not found: {folder} is not a diffusers folder with weights "
                "(model_index.json + *.safetensors); pass a local diffusers folder or a name already in the HF cache "
                "(offline)")
        try:
            pipe = DiffusionPipeline.from_pretrained(str(folder) if folder.exists() else name_or_path, **kwargs)
        except (OSError, ValueError) as e:
            raise ModelNotFoundError(
                f"model {name_or_path!r} not found: pass a local diffusers folder or a name already in the HF cache "
                f"(offline) [{type(e).__name__}]") from None
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def clip_path(name: str = "digits") -> Path:
    """Folder of a bundled open_clip model (``"digits"``), or ``name`` itself as a path."""
    return _CLIPS.get(name, Path(name))


def clip_checkpoint(name: str = "digits") -> Path:
    """The weights file of a bundled CLIP (the ``pretrained=`` argument of ``open_clip.create_model_and_transforms``)."""
    path = clip_path(name) / _CLIP_WEIGHTS
    if not path.is_file():
        raise ModelNotFoundError(
            f"CLIP {name!r} has no weights at {path}: reinstall cachekit or retrain it with "
            f"`python -m cachekit.zoo.train_digits_clip --out {path.parent}`")
    return path


_registered: Optional[str] = None


def register_clip() -> str:
    """Register the digits CLIP config with open_clip (``open_clip.add_model_config``); returns its name.

    Afterwards ``open_clip.create_model_and_transforms(DIGITS_CLIP_NAME, pretrained=str(clip_checkpoint()))`` and
    ``open_clip.get_tokenizer(DIGITS_CLIP_NAME)`` work like they do for ``ViT-B-32``. The registered copy of the config
    points ``hf_tokenizer_name`` at the bundled tokenizer folder (an absolute path, so it is written to a temp dir).
    """
    global _registered
    if _registered:
        return _registered
    import open_clip

    folder = clip_path("digits")
    src = folder / f"{DIGITS_CLIP_NAME}.json"
    if not src.is_file():
        raise ModelNotFoundError(
            f"CLIP 'digits' config missing at {src}: reinstall cachekit or retrain it with "
            f"`python -m cachekit.zoo.train_digits_clip --out {folder}`")
    cfg = json.loads(src.read_text())
    cfg["text_cfg"]["hf_tokenizer_name"] = str(folder)
    reg_dir = Path(tempfile.gettempdir()) / f"cachekit-open-clip-{os.getuid() if hasattr(os, 'getuid') else 0}"
    reg_dir.mkdir(parents=True, exist_ok=True)
    target = reg_dir / f"{DIGITS_CLIP_NAME}.json"
    write_text(target, json.dumps(cfg, indent=2))
    open_clip.add_model_config(target)
    _registered = DIGITS_CLIP_NAME
    return _registered


def load_clip(name: str = "digits", device=None) -> Tuple[Any, Callable, Callable]:
    """``(model, preprocess, tokenizer)`` of a CLIP loaded offline through open_clip; the model is in eval mode.

    ``"digits"``: the bundled digits CLIP. A local folder: an open_clip ``local-dir:`` folder
    (``open_clip_config.json`` + weights). ``"ARCH:PRETRAINED"`` (e.g. ``"ViT-B-32:openai"``): an open_clip
    architecture whose weights are a local file or already in open_clip's cache.
    """
    import open_clip

    if name in _CLIPS:
        model_name = register_clip()
        ckpt = clip_checkpoint(name)
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(ckpt),
                                                                     device=device or "cpu")
        tokenizer = open_clip.get_tokenizer(model_name)
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise ModelNotFoundError(f"CLIP {name!r} not found: {folder} has no open_clip_config.json")
        spec = f"local-dir:{folder}"
        model, _, preprocess = open_clip.create_model_and_transforms(spec, device=device or "cpu")
        tokenizer = open_clip.get_tokenizer(spec)
    else:
        arch, _, pretrained = name.partition(":")
        try:
            if not pretrained:
                raise FileNotFoundError("no pretrained weights named")
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained,
                                                                         device=device or "cpu")
        except Exception as e:  # open_clip raises RuntimeError / FileNotFoundError / HF offline errors
            raise ModelNotFoundError(
                f"CLIP {name!r} not found: pass 'digits', an open_clip local folder, or 'ARCH:PRETRAINED' whose "
                f"weights are a local file or already in the open_clip cache (offline) [{type(e).__name__}]") from None
        tokenizer = open_clip.get_tokenizer(arch)
    model.eval()
    return model, preprocess, tokenizer


def shipped_schedules() -> Dict[str, Path]:
    """Searched schedules shipped with the bundled models, by name (``"digits-lossless"``, ``"digits-fast"``, ...).

    Each was found by ``cachekit search`` and measured on held-out prompts and seeds (its ``measured`` metadata and
    ``docs/benchmarks.md`` say how); a name is accepted wherever a schedule file is, e.g. ``--schedule digits-fast``.
    """
    return {path.stem: path for path in sorted(_SCHEDULES.glob("*.json"))}


def shipped_schedule_rows(model_class: str | None = None) -> list[Dict[str, Any]]:
    """One row per shipped schedule (name, model class, step count and what the held-out bench measured), optionally
    only those made for `model_class`: what `cachekit schedule list` prints and the server offers.

    A joint search's points run their own step count (``digits-fastest`` runs 8 of the model's 20), so a caller
    that shows a schedule also shows the steps it runs."""
    from ..schedule import Schedule

    rows = []
    for name, path in shipped_schedules().items():
        schedule = Schedule.load(path)
        if model_class is not None and schedule.model_class != model_class:
            continue
        heldout = (schedule.measured or {}).get("heldout", {})
        rows.append({"id": name, "model_class": schedule.model_class, "num_inference_steps": schedule.num_steps,
                     "speedup": heldout.get("speedup"), "psnr": heldout.get("psnr"), "kid": heldout.get("kid")})
    return rows


def schedule_path(name: str) -> Path:
    """The file of a shipped schedule; unknown names list the shipped ones."""
    shipped = shipped_schedules()
    if name not in shipped:
        raise ModelNotFoundError(f"no shipped schedule {name!r}; shipped: {', '.join(shipped) or 'none'}")
    return shipped[name]
