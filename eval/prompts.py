"""Prompt sets: the built-in digits set and the public benchmarks, read from files the user already has.

Nothing is downloaded. Each loader takes a local path (or finds the file under `$CACHEKIT_DATA`, default
`~/.cache/cachekit/data`); a missing file raises `PromptFileNotFoundError` naming where to put it and where the public
copy lives. Samples are seeded, so a prompt set is a pure function of (file, num, seed) and the same on every process.
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachekit.errors import UsageError

__all__ = [
    "PromptSet",
    "PromptFileNotFoundError",
    "data_dir",
    "SOURCES",
    "digits_prompts",
    "digits_video_prompts",
    "prompts_for_model",
    "load_coco_captions",
    "load_mjhq",
    "load_parti_prompts",
    "load_drawbench",
    "load_text_prompts",
    "load_jsonl_prompts",
    "load_prompts",
]


class PromptFileNotFoundError(FileNotFoundError):
    """A benchmark prompt file is not on this machine; the message says where to put it and where to get it."""


@dataclass
class PromptSet:
    """Prompts in a fixed order, with per-prompt metadata (category, label, image id...) and where they came from."""

    name: str
    prompts: list[str]
    source: str
    meta: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def describe(self) -> dict[str, Any]:
        """What the report records: name, source file, count."""
        return {"name": self.name, "source": self.source, "num_prompts": len(self.prompts)}

    def head(self, num: int | None) -> "PromptSet":
        """The first `num` prompts (all if None)."""
        if num is None or num >= len(self.prompts):
            return self
        return PromptSet(self.name, self.prompts[:num], self.source, self.meta[:num] if self.meta else [])


# name -> (default file name under data_dir()/<name>/, public location, one-line how-to)
SOURCES: dict[str, tuple[str, str, str]] = {
    "coco": (
        "captions_val2014.json",
        "https://cocodataset.org/#download (annotations_trainval2014.zip -> annotations/captions_val2014.json; "
        "or annotations_trainval2017.zip -> captions_val2017.json)",
        "COCO caption annotations",
    ),
    "mjhq": (
        "meta_data.json",
        "https://huggingface.co/datasets/playgroundai/MJHQ-30K (file meta_data.json)",
        "MJHQ-30K metadata",
    ),
    "parti": (
        "PartiPrompts.tsv",
        "https://github.com/google-research/parti (file PartiPrompts.tsv)",
        "PartiPrompts",
    ),
    "drawbench": (
        "drawbench.csv",
        "https://imagen.research.google/ (DrawBench spreadsheet, exported as CSV with a 'Prompts' column, or a text "
        "file with one prompt per line); a copy is the Hugging Face dataset shunk031/DrawBench",
        "DrawBench",
    ),
}


def data_dir() -> Path:
    """Where benchmark files are looked up when no path is given: `$CACHEKIT_DATA` or `~/.cache/cachekit/data`."""
    return Path(os.environ.get("CACHEKIT_DATA", Path.home() / ".cache" / "cachekit" / "data")).expanduser()


def _resolve(kind: str, path: str | os.PathLike | None) -> Path:
    filename, url, what = SOURCES[kind]
    p = Path(path).expanduser() if path is not None else data_dir() / kind / filename
    if not p.is_file():
        raise PromptFileNotFoundError(
            f"{what} file not found at {p}. cachekit works offline: download it from {url} and pass its path, or put "
            f"it at {data_dir() / kind / filename} (the default location; set $CACHEKIT_DATA to move it)."
        )
    return p


def _sample(n_total: int, num: int | None, seed: int) -> list[int]:
    """A seeded sample of indices (sorted), or all of them."""
    if num is None or num >= n_total:
        return list(range(n_total))
    return sorted(random.Random(seed).sample(range(n_total), num))


def digits_prompts(num: int = 40, seed: int = 0) -> PromptSet:
    """The built-in prompt set of the embedded digits model: digits 0..9 cycled, seeded phrasings, labels in meta."""
    from cachekit.zoo.digits_data import digit_prompts

    pairs = digit_prompts(num, seed)
    return PromptSet(
        "digits", [p for p, _ in pairs], f"cachekit.zoo.digits_data.digit_prompts(num={num}, seed={seed})",
        [{"label": int(label)} for _, label in pairs],
    )


def digits_video_prompts(num: int = 40, seed: int = 0) -> PromptSet:
    """The built-in prompt set of the bundled digits-video model ("a handwritten 3 moving left", ...): digits and
    directions cycled, seeded phrasings; each prompt's digit and direction in meta (what the motion check scores)."""
    from cachekit.zoo.digits_video_data import video_prompts

    rows = video_prompts(num, seed)
    return PromptSet(
        "digits-video", [p for p, _, _ in rows],
        f"cachekit.zoo.digits_video_data.video_prompts(num={num}, seed={seed})",
        [{"label": int(label), "direction": direction} for _, label, direction in rows],
    )


_MODEL_PROMPTS = {"digits-video": "digits-video"}


def prompts_for_model(spec: str, model: str | None) -> str:
    """The prompt spec a command runs: the default `digits` becomes a bundled model's own set (`digits-video` for
    the video model, whose prompts ask for a motion too); anything else is kept as given."""
    return _MODEL_PROMPTS.get(model or "", spec) if spec == "digits" else spec


def load_coco_captions(path: str | os.PathLike | None = None, num: int | None = 1000, seed: int = 0) -> PromptSet:
    """A seeded sample of `num` COCO images, one caption each (the seeded choice among the image's ~5 captions).

    One caption per image keeps the prompt set aligned with the image set a COCO FID reference is built from.
    """
    p = _resolve("coco", path)
    with open(p, encoding="utf-8") as f:
        data = json.load(f)
    if "annotations" not in data:
        raise UsageError(f"{p} is not a COCO captions file (no 'annotations' key)")
    by_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        by_image.setdefault(int(a["image_id"]), []).append(a)
    files = {int(im["id"]): im.get("file_name") for im in data.get("images", [])}
    image_ids = sorted(by_image)
    rng = random.Random(seed)
    prompts, meta = [], []
    for i in _sample(len(image_ids), num, seed):
        iid = image_ids[i]
        caps = sorted(by_image[iid], key=lambda a: int(a["id"]))
        a = caps[rng.randrange(len(caps))]
        prompts.append(" ".join(str(a["caption"]).split()))
        meta.append({"image_id": iid, "caption_id": int(a["id"]), "file_name": files.get(iid)})
    return PromptSet("coco", prompts, str(p), meta)


def load_mjhq(
    path: str | os.PathLike | None = None,
    num: int | None = None,
    categories: list[str] | None = None,
    per_category: int | None = None,
    seed: int = 0,
) -> PromptSet:
    """MJHQ-30K prompts from `meta_data.json` (`{id: {"category", "prompt"}}`).

    `categories` keeps only those categories; `per_category` takes a seeded sample of that many per category (the
    benchmark is balanced by category, so per-category sampling keeps it balanced); `num` then caps the total.
    """
    p = _resolve("mjhq", path)
    with open(p, encoding="utf-8") as f:
        data = json.load(f)
    items = sorted((k, v) for k, v in data.items() if isinstance(v, dict) and "prompt" in v)
    known = sorted({v.get("category", "") for _, v in items})
    if categories:
        unknown = sorted(set(categories) - set(known))
        if unknown:
            raise UsageError(f"unknown MJHQ categories {unknown}; the file has {known}")
        items = [(k, v) for k, v in items if v.get("category") in set(categories)]
    if per_category is not None:
        chosen = []
        for c in sorted({v.get("category", "") for _, v in items}):
            group = [(k, v) for k, v in items if v.get("category", "") == c]
            chosen += [group[i] for i in _sample(len(group), per_category, seed)]
        items = chosen
    items = [items[i] for i in _sample(len(items), num, seed)]
    return PromptSet(
        "mjhq", [v["prompt"] for _, v in items], str(p), [{"id": k, "category": v.get("category")} for k, v in items]
    )


def load_parti_prompts(
    path: str | os.PathLike | None = None,
    num: int | None = None,
    categories: list[str] | None = None,
    challenges: list[str] | None = None,
    seed: int = 0,
) -> PromptSet:
    """PartiPrompts from `PartiPrompts.tsv` (columns Prompt, Category, Challenge, Note), filtered, then sampled."""
    p = _resolve("parti", path)
    with open(p, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or "Prompt" not in rows[0]:
        raise UsageError(f"{p} is not PartiPrompts.tsv (needs a 'Prompt' column)")
    for key, wanted in (("Category", categories), ("Challenge", challenges)):
        if wanted:
            present = {r.get(key, "") for r in rows}
            unknown = sorted(set(wanted) - present)
            if unknown:
                raise UsageError(f"unknown PartiPrompts {key.lower()} {unknown}; the file has {sorted(present)}")
            rows = [r for r in rows if r.get(key) in set(wanted)]
    rows = [rows[i] for i in _sample(len(rows), num, seed)]
    return PromptSet(
        "parti", [r["Prompt"] for r in rows], str(p),
        [{"category": r.get("Category"), "challenge": r.get("Challenge")} for r in rows],
    )


def load_drawbench(path: str | os.PathLike | None = None, num: int | None = None, seed: int = 0) -> PromptSet:
    """DrawBench: a CSV with a `Prompts` column (and `Category`), or a text file with one prompt per line."""
    p = _resolve("drawbench", path)
    text = p.read_text(encoding="utf-8")
    first = text.splitlines()[0] if text.strip() else ""
    if "Prompts" in first.split(","):
        rows = list(csv.DictReader(text.splitlines()))
        prompts = [r["Prompts"].strip() for r in rows if r.get("Prompts", "").strip()]
        meta = [{"category": r.get("Category")} for r in rows if r.get("Prompts", "").strip()]
    else:
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
        meta = []
    idx = _sample(len(prompts), num, seed)
    return PromptSet("drawbench", [prompts[i] for i in idx], str(p), [meta[i] for i in idx] if meta else [])


def _user_file(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise PromptFileNotFoundError(f"prompt file {p} does not exist")
    return p


def load_text_prompts(path: str | os.PathLike, num: int | None = None, seed: int = 0) -> PromptSet:
    """One prompt per line; blank lines and lines starting with `#` are skipped. `num` takes a seeded sample."""
    p = _user_file(path)
    prompts = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    prompts = [s for s in prompts if s and not s.startswith("#")]
    return PromptSet(p.stem, [prompts[i] for i in _sample(len(prompts), num, seed)], str(p))


def load_jsonl_prompts(path: str | os.PathLike, num: int | None = None, seed: int = 0) -> PromptSet:
    """One JSON object per line with a `prompt` (or `caption`/`text`) field; other fields become metadata."""
    p = _user_file(path)
    prompts, meta = [], []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        key = next((k for k in ("prompt", "caption", "text") if k in obj), None)
        if key is None:
            raise UsageError(f"{p}:{n}: no 'prompt', 'caption' or 'text' field")
        prompts.append(str(obj[key]))
        meta.append({k: v for k, v in obj.items() if k != key})
    idx = _sample(len(prompts), num, seed)
    return PromptSet(p.stem, [prompts[i] for i in idx], str(p), [meta[i] for i in idx])


def load_prompts(spec: str, num: int | None = None, seed: int = 0) -> PromptSet:
    """Resolve a CLI prompt spec: `digits`, `digits-video`, `coco[:PATH]`, `mjhq[:PATH]`, `parti[:PATH]`,
    `drawbench[:PATH]`, or a `.txt` / `.jsonl` / `.tsv` / `.json` file (format detected from the name and content).
    """
    name, _, path = spec.partition(":")
    if name == "digits":
        return digits_prompts(num if num is not None else 40, seed)
    if name == "digits-video":
        return digits_video_prompts(num if num is not None else 40, seed)
    loaders = {"coco": load_coco_captions, "mjhq": load_mjhq, "parti": load_parti_prompts,
               "drawbench": load_drawbench}
    if name in loaders and (path or not Path(spec).exists()):
        return loaders[name](path or None, num=num, seed=seed)
    p = Path(spec).expanduser()
    if not p.is_file():
        raise PromptFileNotFoundError(
            f"prompt set {spec!r} is neither a built-in name (digits, digits-video, coco, mjhq, parti, drawbench) "
            "nor a file"
        )
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return load_jsonl_prompts(p, num, seed)
    if suffix == ".tsv":
        return load_parti_prompts(p, num=num, seed=seed)
    if suffix == ".csv":
        return load_drawbench(p, num=num, seed=seed)
    if suffix == ".json":
        with open(p, encoding="utf-8") as f:
            head = json.load(f)
        if isinstance(head, dict) and "annotations" in head:
            return load_coco_captions(p, num=num, seed=seed)
        return load_mjhq(p, num=num, seed=seed)
    return load_text_prompts(p, num, seed)
