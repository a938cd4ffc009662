"""Measuring a text-to-video model's clips: the image metrics applied to frames, plus what only a clip has.

`cachekit eval --model digits-video` (`evaluate_video`) generates every prompt's clip uncached and under each plan,
with the same prompts and seeds, and measures (each number made by this package's image metrics where a frame
serves as an image, and by `cachekit.zoo.digits_video_check` for what the digits show):

- **fid, kid** (`FID`, `KID`): every frame of every clip against the frames of held-out real clips
  (`digits-video-heldout`: their digit samples were never trained on). The same numbers for real clips of the
  train split, as many as there are prompts, are the *real-data floor* (`report["real"]`): what a perfect model
  would score with this many clips, FID's small-sample bias included, so a reader knows what "good" is.
- **clip** (`CLIPScore`, the digits CLIP): each frame's box-centred 16x16 digit crop against the clip's prompt.
  Why the crop: the digits CLIP was trained on 16x16 framed digits, and a 32x32 frame shrunk to its input shows an
  8x8 digit somewhere in it. Its tokenizer knows the image captions' words only, so motion words are unknown tokens:
  the score says whether frames show the prompted digit; the motion check scores the motion.
- **temporal** (temporal consistency, `SSIM`): the mean SSIM between the box-centred crops of consecutive frames.
  Why crops and not whole frames: a digit that moves as asked changes most pixels of its frame, so any plain
  frame-to-frame difference would score a frozen clip best and punish the motion the prompt asks for. The crop takes
  the motion out; what is left is whether the digit keeps its shape from frame to frame (no flicker, morphing or
  smearing). Real clips move one rigid digit, so theirs is near 1 (not quite: the crop snaps to whole pixels; the
  real-clips row gives the ceiling), about 0.2 above whole-frame SSIM, and clips whose frames show different
  digit samples score far lower.
- **psnr, ssim** (`PSNR`, `SSIM`): each frame against the same frame of the uncached clip (same prompt, same seed),
  also per frame index (`report["per_frame"]`), since a cache's error can grow along the clip.
- **motion**: the digit of every frame read by the held-out classifier and the direction of every clip from its
  tracked ink centre, against the prompt's digit and direction: `digit_frames` (share of frames), `digit_clips`
  (share of clips whose most frequent digit is right) and `direction` (share of clips moving the right way).
- **fvd** (only with `fvd_checkpoint`): the Fréchet distance between clip features of the generated and the
  held-out real clips, from a local I3D TorchScript file or VideoMAE folder (`cachekit.eval.fvd`); nothing is
  ever downloaded.

Latency is the wall-clock of a call generating `timing_clips` clips (8 by default: "the time for 8 clips"),
timed round-robin with the uncached model in the same run (`measure_interleaved`), so speedups are paired ratios.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cachekit.errors import UsageError
from cachekit.pipelines.call import PipelineCall
from cachekit.plans import resolve_plan

from .distributed import Dist, global_batches
from .fid import ReferenceStats
from .fidelity import PSNR, SSIM
from .fvd import FVD, load_video_features
from .images import to_uint8
from .latency import count_call_macs, measure_interleaved, paired_speedup
from .reference import VIDEO_REFERENCE_CLIPS, VIDEO_REFERENCES, reference_clips
from .runner import UNCACHED, describe_plan
from .suite import MetricConfig, MetricFactory

__all__ = [
    "VIDEO_METRICS", "DEFAULT_VIDEO_METRICS", "LOWER_IS_BETTER", "VideoPromptSet", "video_prompt_set",
    "parse_video_metric_names", "clips_uint8", "frame_crops", "generate_clips", "TemporalConsistency", "MotionCheck",
    "VideoMetricSuite", "VideoMetricFactory", "real_floor", "evaluate_video",
]

# name -> what it needs besides the clips
VIDEO_METRICS = {
    "fid": "distribution",
    "kid": "distribution",
    "clip": "text",
    "temporal": "clip",
    "psnr": "fidelity",
    "ssim": "fidelity",
    "motion": "caption",
    "fvd": "distribution",
}
DEFAULT_VIDEO_METRICS = "fid,kid,clip,temporal,psnr,ssim,motion"
LOWER_IS_BETTER = frozenset({"fid", "kid", "kid_std", "fvd"})
_IMAGE_PARTS = ("fid", "kid", "clip", "psnr", "ssim")  # the image metrics the frames go through


def parse_video_metric_names(spec: str | Sequence[str]) -> list[str]:
    """`"fid,temporal,motion"` -> `["fid", "temporal", "motion"]`, refusing unknown names with the known ones."""
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [n for n in names if n not in VIDEO_METRICS]
    if bad:
        raise UsageError(f"unknown video metric(s) {bad}; known: {', '.join(VIDEO_METRICS)}")
    if not names:
        raise UsageError(f"no video metrics named; known: {', '.join(VIDEO_METRICS)}")
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class VideoPromptSet:
    """Prompts with the digit and the direction each one asks for (what the motion check scores against)."""

    prompts: list[str]
    labels: list[int]
    directions: list[str]
    source: str = "cachekit.zoo.digits_video_data.video_prompts"
    seed: int = 0

    def __post_init__(self) -> None:
        if not (len(self.prompts) == len(self.labels) == len(self.directions)):
            raise UsageError(f"{len(self.prompts)} prompts, {len(self.labels)} digits and {len(self.directions)} "
                             "directions: need one of each per prompt")

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def from_prompt_set(cls, prompt_set: Any, seed: int = 0) -> "VideoPromptSet":
        """The typed view of a `PromptSet` whose meta gives each prompt's `label` and `direction` (`digits-video`)."""
        meta = list(prompt_set.meta or [])
        if len(meta) != len(prompt_set.prompts) or not all({"label", "direction"} <= set(m) for m in meta):
            raise UsageError(f"prompt set {prompt_set.name!r} does not say each prompt's digit and direction; the "
                             "video evaluation needs them (use the digits-video prompts)")
        return cls(list(prompt_set.prompts), [int(m["label"]) for m in meta], [str(m["direction"]) for m in meta],
                   prompt_set.source, seed)

    def describe(self) -> dict[str, Any]:
        """What the report records about the prompts."""
        return {"name": "digits-video", "source": self.source, "seed": self.seed, "num_prompts": len(self.prompts)}


def video_prompt_set(num: int = 40, seed: int = 0) -> VideoPromptSet:
    """`num` digits-video prompts ("a handwritten 3 moving left", ...): digits and directions cycled, seeded phrasing
    (`cachekit.eval.prompts.digits_video_prompts`, the set every command uses for the video model)."""
    from .prompts import digits_video_prompts

    if num < 1:
        raise UsageError(f"need at least one prompt, got {num}")
    return VideoPromptSet.from_prompt_set(digits_video_prompts(num, seed), seed)


# -------------------------------------------------------------------------------------------------------- frames
def clips_uint8(videos: Any) -> torch.Tensor:
    """A pipeline's clips (`[N, F, 3, H, W]` floats in 0..1 or uint8) -> uint8 `[N, F, 3, H, W]` on CPU.

    Quantised once, frame by frame with `to_uint8`, so every metric sees the pixels a saved clip holds.
    """
    if not torch.is_tensor(videos) or videos.ndim != 5:
        got = tuple(videos.shape) if torch.is_tensor(videos) else type(videos).__name__
        raise UsageError(f"expected clips [N, F, 3, H, W] (a video pipeline's output_type='pt'), got {got}")
    n, f = videos.shape[:2]
    frames = to_uint8(videos.flatten(0, 1))
    return frames.view(n, f, *frames.shape[1:])


def frame_crops(videos: torch.Tensor) -> torch.Tensor:
    """Box-centred digit crops of every frame, `[N, F, 3, 16, 16]` (`digits_video_check.digit_crops`)."""
    from cachekit.zoo.digits_video_check import digit_crops

    return torch.stack([digit_crops(clip) for clip in videos])


def generate_clips(pipe: Any, plan: Any, prompts: Sequence[str], seeds: Sequence[int], num_steps: int,
                   pipe_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    """Clips (uint8 `[N, F, 3, H, W]`, CPU) for `prompts` seeded `seeds`, through `PipelineCall` (one generator per
    prompt, the model's call defaults under `pipe_kwargs`), with `plan` applied if not None."""
    call = PipelineCall(tuple(prompts), num_steps, dict(pipe_kwargs or {}), tuple(int(s) for s in seeds))
    return clips_uint8(call(pipe, plan))


# ------------------------------------------------------------------------------------------- clip-level metrics
class TemporalConsistency(SSIM):
    """Mean SSIM between the digit crops of consecutive frames (see the module docstring for why crops)."""

    def update(self, crops: torch.Tensor) -> None:  # type: ignore[override]
        """Add the crops `[N, F, 3, h, w]` (uint8) of N clips."""
        super().update(crops[:, 1:].flatten(0, 1), crops[:, :-1].flatten(0, 1))

    def info(self) -> dict[str, Any]:
        return {"metric": "temporal consistency", "backend": "torchmetrics StructuralSimilarityIndexMeasure",
                "definition": "mean SSIM between the box-centred 16x16 digit crops of consecutive frames "
                              "(the motion taken out by the crop; 1 for a frozen digit, near 1 for a rigid moving "
                              "one)"}


class MotionCheck:
    """The digit of every frame and the direction of every clip, against the prompts (`digits_video_check`)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.videos: list[torch.Tensor] = []
        self.labels: list[int] = []
        self.directions: list[str] = []

    def update(self, videos: torch.Tensor, labels: Sequence[int], directions: Sequence[str]) -> None:
        self.videos.extend(videos)
        self.labels.extend(int(l) for l in labels)
        self.directions.extend(directions)

    def compute(self) -> dict[str, float]:
        from cachekit.zoo.digits_video_check import check_clips

        c = check_clips(self.videos, self.labels, self.directions)
        return {"digit_frames": c.digit_frames, "digit_clips": c.digit_clips, "direction": c.direction}

    def per_frame(self) -> list[float]:
        """Share of clips whose frame t shows the prompted digit, for every frame index t."""
        from cachekit.zoo.digits_video_check import frame_digits

        hits = np.stack([frame_digits(v) == l for v, l in zip(self.videos, self.labels)])
        return hits.mean(0).tolist()

    def info(self) -> dict[str, Any]:
        from cachekit.zoo.digits_classifier import classifier_accuracy

        return {"metric": "motion check", "backend": "cachekit.zoo.digits_video_check",
                "digit": "held-out SVM on box-centred 16x16 crops (trained on held-out digit samples only)",
                "classifier_heldout_accuracy": round(classifier_accuracy(), 4),
                "direction": "net motion of the tracked ink centre, first to last frame"}


# -------------------------------------------------------------------------------------------------------- suites
class VideoMetricSuite:
    """The video metrics of one configuration, fed `update(videos, prompts, labels, directions, baseline)`."""

    def __init__(self, image_metrics: dict[str, Any], names: Sequence[str], fvd: FVD | None, baseline: bool) -> None:
        self.names = list(names)
        self.image = image_metrics  # fid, kid, clip, psnr, ssim: the image metrics themselves
        self.temporal = TemporalConsistency() if "temporal" in names else None
        self.motion = MotionCheck() if "motion" in names else None
        self.fvd = fvd
        self.baseline = baseline
        self._psnr_by_frame: list[PSNR] = []

    def update(self, videos: torch.Tensor, prompts: Sequence[str], labels: Sequence[int],
               directions: Sequence[str], baseline: torch.Tensor | None = None) -> None:
        """Feed uint8 clips `[N, F, 3, H, W]` with their prompts, digits and directions (and the uncached clips)."""
        n, f = videos.shape[:2]
        if not (len(prompts) == len(labels) == len(directions) == n):
            raise ValueError(f"{n} clips but {len(prompts)} prompts, {len(labels)} digits, {len(directions)} "
                             "directions")
        frames = videos.flatten(0, 1)
        crops = frame_crops(videos) if {"clip", "temporal"} & set(self.names) else None
        for name in ("fid", "kid"):
            if name in self.image:
                self.image[name].update(frames, real=False)  # one extractor forward for both (memoised)
        if "clip" in self.image:
            self.image["clip"].update(crops.flatten(0, 1), [p for p in prompts for _ in range(f)])
        if self.temporal is not None:
            self.temporal.update(crops)
        if self.baseline:
            if baseline is None or baseline.shape != videos.shape:
                raise ValueError("psnr/ssim compare with the uncached clips; pass baseline of the same shape")
            for name in ("psnr", "ssim"):
                if name in self.image:
                    self.image[name].update(frames, baseline.flatten(0, 1))
            if "psnr" in self.image:
                if not self._psnr_by_frame:
                    self._psnr_by_frame = [PSNR() for _ in range(f)]
                for t, metric in enumerate(self._psnr_by_frame):
                    metric.update(videos[:, t], baseline[:, t])
        if self.motion is not None:
            self.motion.update(videos, labels, directions)
        if self.fvd is not None:
            self.fvd.update(videos)

    def compute(self) -> dict[str, float]:
        """name -> value (KID adds `kid_std`; the motion check gives `digit_frames`, `digit_clips`, `direction`)."""
        out: dict[str, float] = {}
        for name in ("fid", "kid", "clip"):
            if name in self.image:
                v = self.image[name].compute()
                if name == "kid":
                    out["kid"], out["kid_std"] = float(v[0]), float(v[1])
                else:
                    out[name] = float(v)
        if self.temporal is not None:
            out["temporal"] = float(self.temporal.compute())
        for name in ("psnr", "ssim"):
            if self.baseline and name in self.image:
                out[name] = float(self.image[name].compute())
        if self.motion is not None:
            out.update(self.motion.compute())
        if self.fvd is not None:
            out["fvd"] = self.fvd.compute()
        return out

    def per_frame(self) -> dict[str, list[float]]:
        """Per frame index: PSNR against the uncached clip (cached configurations) and the share of clips whose
        frame shows the prompted digit."""
        out: dict[str, list[float]] = {}
        if self._psnr_by_frame:
            out["psnr"] = [float(m.compute()) for m in self._psnr_by_frame]
        if self.motion is not None:
            out["digit"] = self.motion.per_frame()
        return out

    def to(self, device: torch.device | str) -> "VideoMetricSuite":
        """Move the metrics (and their networks) to `device`."""
        for m in self.image.values():
            m.to(device)
        if self.temporal is not None:
            self.temporal.to(device)
        return self

    def info(self) -> dict[str, dict[str, Any]]:
        """How each number was made (backends, weights, references), for the report."""
        info = {name: m.info() for name, m in self.image.items()}
        if "clip" in info:
            info["clip"]["applied_to"] = "box-centred 16x16 digit crop of every frame, against the clip's prompt"
        for name in ("fid", "kid", "psnr", "ssim"):
            if name in info:
                info[name]["applied_to"] = "every frame"
        if self.temporal is not None:
            info["temporal"] = self.temporal.info()
        if self.motion is not None:
            info["motion"] = self.motion.info()
        if self.fvd is not None:
            info["fvd"] = self.fvd.info()
        return info


class VideoMetricFactory:
    """Builds the networks and the real references once, then hands out fresh `VideoMetricSuite`s that share them.

    The image metrics come from `MetricFactory` (FID/KID extractor, CLIP, the frame reference from
    `digits-video-heldout`), so a frame's FID is computed exactly as an image's. Everything that needs weights is
    loaded here, before any clip is generated.
    """

    def __init__(self, config: MetricConfig, names: Sequence[str] | str = DEFAULT_VIDEO_METRICS, *,
                 reference_clips_num: int = VIDEO_REFERENCE_CLIPS, fvd_checkpoint: str | os.PathLike | None = None,
                 dist: Dist | None = None) -> None:
        self.names = parse_video_metric_names(names)
        if fvd_checkpoint is not None and "fvd" not in self.names:
            self.names.append("fvd")
        if "fvd" in self.names and fvd_checkpoint is None:
            raise UsageError("fvd needs a local I3D TorchScript file or VideoMAE folder: pass --fvd-checkpoint PATH "
                             "(cachekit never downloads one)")
        self.dist = dist or Dist()
        if self.dist.world_size > 1:
            raise UsageError("the video evaluation runs in one process; run it without accelerate launch")
        self.reference_spec = config.fid_reference or "digits-video-heldout"
        if self.reference_spec not in VIDEO_REFERENCES:
            raise UsageError(f"the video model's FID/KID reference is one of {', '.join(VIDEO_REFERENCES)}, got "
                             f"{self.reference_spec!r}")
        if reference_clips_num < 2:
            raise UsageError(f"the reference needs at least 2 real clips, got {reference_clips_num}")
        self.reference_clips_num = int(reference_clips_num)
        # the network first: a missing or wrong checkpoint fails before any reference feature is computed
        self.fvd_network = load_video_features(fvd_checkpoint).to(self.dist.device) if fvd_checkpoint else None
        image_names = [n for n in _IMAGE_PARTS if n in self.names]
        from cachekit.zoo.digits_video_data import NUM_FRAMES

        self.image_config = dataclasses.replace(config, names=image_names, fid_reference=self.reference_spec,
                                                reference_limit=self.reference_clips_num * NUM_FRAMES)
        self.image = MetricFactory(self.image_config, self.dist)
        self.fvd_reference = None
        if self.fvd_network is not None:
            real = reference_clips(self.reference_spec, self.reference_clips_num)
            self.fvd_reference = self.clip_features_stats(real.frames, self.reference_spec)

    @property
    def reference(self) -> ReferenceStats | None:
        """The frame reference statistics (FID/KID), if those metrics are on."""
        return self.image.reference

    def clip_features_stats(self, videos: torch.Tensor, source: str, batch_size: int = 8) -> ReferenceStats:
        """FVD-network statistics of uint8 clips `[N, F, 3, H, W]` (the FVD reference)."""
        feats = [self.fvd_network(videos[i:i + batch_size])
                 for i in tqdm(range(0, len(videos), batch_size), desc="FVD reference", leave=False)]
        return ReferenceStats.from_features(torch.cat(feats), source, {"network": self.fvd_network.kind})

    def suite(self, include_fidelity: bool = True) -> VideoMetricSuite:
        """Fresh states for one configuration; the uncached model and real clips get no fidelity metrics."""
        image = self.image.suite(include_fidelity=include_fidelity).metrics
        fvd = FVD(self.fvd_network, self.fvd_reference) if self.fvd_network is not None else None
        names = [n for n in self.names if include_fidelity or VIDEO_METRICS[n] != "fidelity"]
        return VideoMetricSuite(image, names, fvd, baseline=include_fidelity).to(self.dist.device)

    def describe_reference(self) -> dict[str, Any] | None:
        ref = self.image.reference
        if ref is None and self.fvd_reference is None:
            return None
        return {"source": self.reference_spec, "clips": self.reference_clips_num,
                "frames": ref.num_images if ref is not None else None,
                "feature_dim": ref.dim if ref is not None else None,
                "fvd_feature_dim": self.fvd_reference.dim if self.fvd_reference is not None else None}


# -------------------------------------------------------------------------------------------------- evaluation
def evaluate_video(
    pipe: Any,
    plans: dict[str, Any],
    prompts: VideoPromptSet,
    num_steps: int,
    factory: VideoMetricFactory,
    out_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 8,
    base_seed: int = 0,
    pipe_kwargs: dict[str, Any] | None = None,
    model_name: str | None = None,
    latency: bool = True,
    warmup: int = 1,
    repeats: int = 3,
    timing_clips: int = 8,
    macs: bool = True,
    strip_samples: int = 4,
    fps: float = 4,
) -> dict[str, Any]:
    """Generate every prompt's clip uncached and under each plan (same prompts, same seeds), measure, report.

    Args:
        pipe: a text-to-video diffusers pipeline returning `[N, F, 3, H, W]` frames (the bundled `digits-video`).
        plans: name -> plan (anything `cachekit.resolve_plan` takes: a Schedule, a policy, a shipped name or a
            spec such as "fora:interval=2"); the uncached model is always evaluated first, as "uncached".
        prompts: a `VideoPromptSet`; prompt i always uses seed `base_seed + i`.
        factory: the metrics (`VideoMetricFactory`, built before the pipeline loads so missing weights fail early).
        out_dir: where report.json, report.md, strips.png, preview.gif, per_frame.png (and with several plans
            tradeoff.png) go; None writes nothing.
        timing_clips: clips per timed call (the time for 8 clips by default), timed round-robin over configurations
            after `warmup` untimed calls each, `repeats` rounds.
        strip_samples: prompts shown in the frame strips and the animated preview.

    Returns the report dict (`format: cachekit.eval.video_report`).
    """
    n = len(prompts)
    if n == 0:
        raise UsageError("no prompts to evaluate")
    if "fvd" in factory.names and n < 2:
        raise UsageError(f"FVD compares sets of clips and needs at least 2, got {n}; evaluate more prompts")
    configs: dict[str, Any] = {UNCACHED: None}
    for name, plan in plans.items():
        if plan is None:
            continue
        if name == UNCACHED:
            raise UsageError(f"'{UNCACHED}' is reserved for the uncached model; rename that plan")
        configs[name] = resolve_plan(plan, pipe.transformer, num_steps)  # names and specs too; objects as they are
    pipe_kwargs = dict(pipe_kwargs or {})
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    suites = {name: factory.suite(include_fidelity=name != UNCACHED) for name in configs}
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in configs}
    batches = global_batches(n, batch_size)
    bar = tqdm(total=len(batches) * len(configs), desc=f"generating clips ({len(configs)} configs)")
    for idx in batches:
        batch_prompts = [prompts.prompts[i] for i in idx]
        labels = [prompts.labels[i] for i in idx]
        directions = [prompts.directions[i] for i in idx]
        seeds = [base_seed + i for i in idx]
        baseline = None
        for name, plan in configs.items():
            videos = generate_clips(pipe, plan, batch_prompts, seeds, num_steps, pipe_kwargs)
            if baseline is None:
                baseline = videos
            suites[name].update(videos, batch_prompts, labels, directions, None if name == UNCACHED else baseline)
            keep = [j for j, i in enumerate(idx) if i < strip_samples]
            if keep:
                samples[name].append(videos[keep])
            bar.update()
    bar.close()
    values = {name: suite.compute() for name, suite in suites.items()}
    per_frame = {name: suite.per_frame() for name, suite in suites.items()}
    metrics_info = suites[UNCACHED].info()
    for suite in suites.values():
        for k, v in suite.info().items():
            metrics_info.setdefault(k, v)

    real = real_floor(factory, n)
    timing = _timing(pipe, configs, prompts, num_steps, pipe_kwargs, base_seed, latency=latency, warmup=warmup,
                     repeats=repeats, clips=min(timing_clips, n), macs=macs, device=factory.dist.device)
    report = _assemble(prompts, configs, values, per_frame, real, metrics_info, timing, num_steps, base_seed,
                       batch_size, pipe_kwargs, model_name or type(pipe).__name__, factory)
    if out_dir is not None:
        from .report import write_video_report

        columns = {name: torch.cat(v)[:strip_samples] for name, v in samples.items() if v}
        write_video_report(report, out_dir, columns, prompts.prompts[:strip_samples], fps=fps)
    return report


def real_floor(factory: VideoMetricFactory, num_clips: int) -> dict[str, Any]:
    """The real-data floor: as many real train-split clips as generated ones, through the same metrics."""
    spec = "digits-video-train" if factory.reference_spec == "digits-video-heldout" else "digits-video-heldout"
    real = reference_clips(spec, num_clips)
    suite = factory.suite(include_fidelity=False)
    for i in range(0, num_clips, 32):
        part = slice(i, i + 32)
        suite.update(real.frames[part], real.captions[part], real.labels[part].tolist(), real.direction_names[part])
    return {"source": spec, "clips": num_clips, "metrics": suite.compute(), "per_frame": suite.per_frame(),
            "why": "real clips of the other split, as many as the generated ones, against the same reference: the "
                   "figure a perfect model would reach with this many clips"}


def _timing(pipe: Any, configs: dict[str, Any], prompts: VideoPromptSet, num_steps: int,
            pipe_kwargs: dict[str, Any], base_seed: int, *, latency: bool, warmup: int, repeats: int, clips: int,
            macs: bool, device: torch.device) -> dict[str, Any]:
    if not (latency or macs):
        return {}
    import cachekit

    call = PipelineCall(tuple(prompts.prompts[:clips]), num_steps, pipe_kwargs,
                        tuple(base_seed + i for i in range(clips)))
    calls = {name: functools.partial(call, pipe) for name in configs}
    applied = {name: functools.partial(cachekit.cached, pipe, plan) for name, plan in configs.items()
               if plan is not None}
    timing: dict[str, Any] = {}
    if latency:
        stats = measure_interleaved(calls, batch_size=clips, num_steps=num_steps, warmup=warmup, repeats=repeats,
                                    device=device, setups=applied)
        timing["latency"] = {k: v.to_dict() for k, v in stats.items()}
    if macs:
        timing["macs"] = {}
        for name, fn in calls.items():
            with applied[name]() if name in applied else contextlib.nullcontext():
                timing["macs"][name] = count_call_macs(fn)
    timing["protocol"] = {"clips_per_call": clips, "warmup": warmup, "repeats": repeats,
                          "timer": "cuda-events" if device.type == "cuda" else "perf_counter",
                          "order": "round-robin over configurations after per-configuration warm-up",
                          "cache_applied": "once per timed call, outside the timed region"}
    return timing


def _assemble(prompts, configs, values, per_frame, real, metrics_info, timing, num_steps, base_seed, batch_size,
              pipe_kwargs, model_name, factory) -> dict[str, Any]:
    lat, macs = timing.get("latency", {}), timing.get("macs", {})
    schedules: dict[str, Any] = {}
    for name, plan in configs.items():
        entry: dict[str, Any] = {"plan": describe_plan(plan)}
        if name in lat:
            entry["latency_s"] = lat[name]["per_image_s"]  # per clip
            entry["seconds_per_call"] = lat[name]["median_s"]
            entry["speedup"] = paired_speedup(lat[UNCACHED], lat[name])
            entry["latency"] = lat[name]
        else:
            entry["latency_s"] = entry["seconds_per_call"] = entry["speedup"] = None
        m, base = macs.get(name), macs.get(UNCACHED)
        entry["macs"] = m
        entry["macs_ratio"] = (m / base) if (m is not None and base) else None
        entry["metrics"] = values[name]
        entry["per_frame"] = per_frame[name]
        schedules[name] = entry
    return {
        "format": "cachekit.eval.video_report",
        "version": 1,
        "model": model_name,
        "num_steps": num_steps,
        "prompts": {**prompts.describe(), "num_clips": len(prompts)},
        "seeds": {"base_seed": base_seed, "rule": "seed = base_seed + prompt_index (one CPU generator per prompt)"},
        "batch_size": batch_size,
        "pipeline_kwargs": pipe_kwargs,
        "device": str(factory.dist.device),
        "reference": factory.describe_reference(),
        "real": real,
        "metrics_info": metrics_info,
        "latency_protocol": timing.get("protocol"),
        "schedules": schedules,
    }
