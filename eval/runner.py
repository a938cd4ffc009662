"""Evaluate caching schedules on a pipeline: same prompts, same seeds, against the uncached model of the same run.

For every fixed batch of prompts the uncached images are generated first, then each schedule's images with the same
per-prompt seeds (`seed = base_seed + prompt_index`); every metric sees its batch at once, so memory stays at one
batch however many images are evaluated, and fidelity metrics (PSNR/SSIM/LPIPS) compare like with like. Batches are
split over processes (`accelerate launch`), metric states are gathered before `compute()`, and latency is measured on
the main process only, interleaving all configurations, so speedups are relative to the uncached model timed alongside.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ContextManager

import torch
from tqdm.auto import tqdm

from cachekit.pipelines.call import PipelineCall

from .distributed import Dist, get_dist, global_batches
from .images import save_png, to_uint8
from .latency import count_call_macs, measure_interleaved, paired_speedup
from .prompts import PromptSet
from .report import write_report
from .suite import MetricConfig, MetricFactory, MetricSuite, parse_metric_names

__all__ = ["UNCACHED", "Variant", "evaluate", "generate", "describe_plan"]

UNCACHED = "uncached"


@dataclasses.dataclass(frozen=True)
class Variant:
    """A configuration that runs on its own pipeline instead of `evaluate`'s `pipe` (optionally with a plan on it).

    Why: a peer cache (diffusers' hooks, cache-dit) lives on a fresh copy of the transformer, never stacked with
    another, yet its images must come from the same prompts and seeds and its latency must be timed interleaved with
    the uncached model. So it is one more configuration of the same run that carries its pipeline. `info` is what the
    report says about it (JSON-ready: which peer, which knob, its configuration).
    """

    pipe: Any
    plan: Any = None
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    num_steps: int | None = None
    """Denoising steps of this configuration instead of the evaluation's (uniform step-skipping: the reference any
    cache must beat is simply running fewer steps)."""
    setup: Callable[[], ContextManager[Any]] | None = None
    """A context entered around each of this configuration's calls (generation, timed calls, MAC count), outside the
    timed region. Why: the bench's peers take turns on one transformer copy, each applied only while it runs, so at
    most one extra copy of the model is alive however many peers are compared."""


def generate(
    pipe: Any,
    plan: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_steps: int,
    pipe_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Images (uint8 [N,3,H,W], CPU) for `prompts` seeded `seeds`, with `plan` applied if not None (a video
    pipeline's N clips of F frames come as their N*F frames, clip after clip).

    The call is `cachekit.pipelines.PipelineCall`'s: one CPU generator per prompt, the model's call defaults under
    `pipe_kwargs`, so search, calibration and `cachekit generate` see the same images for the same prompt and seed.
    """
    call = PipelineCall(tuple(prompts), num_steps, dict(pipe_kwargs or {}), tuple(int(s) for s in seeds))
    return to_uint8(call(pipe, plan))


def describe_plan(plan: Any) -> dict[str, Any]:
    """What the report says about a schedule or policy (kind, provenance, compute fraction, config)."""
    from cachekit import Schedule

    if plan is None:
        return {"kind": "uncached"}
    if isinstance(plan, Variant):
        described = {"kind": "variant", "pipeline": type(plan.pipe).__name__, **plan.info}
        if plan.num_steps is not None:
            described["num_steps"] = plan.num_steps
        if plan.plan is not None:
            described["plan"] = describe_plan(plan.plan)
        return described
    if isinstance(plan, Schedule):
        return {
            "kind": "schedule",
            "model_class": plan.model_class,
            "mode": plan.mode,
            "num_steps": plan.num_steps,
            "compute_fraction": plan.compute_fraction(),
            "provenance": plan.provenance,
            "predicted_cost": plan.predicted_cost,
        }
    config = getattr(plan, "config", None)
    return {
        "kind": "policy",
        "class": type(plan).__name__,
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config),
    }


def _factory(metrics: MetricFactory | MetricConfig | str | Sequence[str], dist: Dist,
             default_reference: str | None) -> MetricFactory:
    if isinstance(metrics, MetricFactory):
        return metrics
    config = metrics if isinstance(metrics, MetricConfig) else MetricConfig(names=parse_metric_names(metrics))
    return MetricFactory(config, dist, default_reference=default_reference)


def evaluate(
    pipe: Any,
    schedules: dict[str, Any],
    prompts: PromptSet | Sequence[str],
    num_steps: int = 20,
    metrics: MetricFactory | MetricConfig | str | Sequence[str] = "clip,psnr,ssim",
    out_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 8,
    base_seed: int = 0,
    pipe_kwargs: dict[str, Any] | None = None,
    model_name: str | None = None,
    default_reference: str | None = None,
    latency: bool = True,
    warmup: int = 1,
    repeats: int = 3,
    latency_batch_size: int | None = None,
    macs: bool = True,
    grid_samples: int = 6,
    save_images: bool = False,
    dist: Dist | None = None,
) -> dict[str, Any]:
    """Generate the uncached reference once and each schedule's images with the same prompts/seeds; measure.

    Args:
        pipe: a diffusers pipeline (already on its device).
        schedules: name -> `cachekit.Schedule`, runtime policy, `Variant` (its own pipeline, e.g. a peer cache on a
            transformer copy), or None (None is the uncached model, always evaluated, under the name "uncached").
        prompts: a `PromptSet` or plain prompts; prompt i always uses seed `base_seed + i`.
        num_steps: denoising steps of the uncached reference and of every configuration but schedules (which run
            their own step count) and `Variant`s with their own.
        metrics: metric names ("fid,kid,clip,psnr,ssim,lpips,imagereward"), a `MetricConfig`, or a `MetricFactory`
            built beforehand (so missing weights fail before a large model is loaded, and the reference features
            are computed once for several evaluations).
        out_dir: where report.json / report.md / grid.png / tradeoff.png go (main process); None writes nothing.
        batch_size: prompts per pipeline call; fixed global batches make results independent of process count.
        pipe_kwargs: extra pipeline arguments (guidance_scale, height, width, ...).
        default_reference: FID/KID reference used when the metric config names none (e.g. "digits-heldout").
        latency / warmup / repeats / latency_batch_size: the timing protocol (main process, after generation).
        macs: count MACs of one call per configuration with `cachekit.cost.count_macs`.
        grid_samples: how many prompts the image grid shows.
        save_images: also write every image as PNG under out_dir/images/<schedule>/.

    Returns the report dict (identical on every process).
    """
    dist = dist or get_dist()
    prompt_set = prompts if isinstance(prompts, PromptSet) else PromptSet("custom", list(prompts), "argument")
    n = len(prompt_set)
    if n == 0:
        raise ValueError("no prompts to evaluate")
    plans: dict[str, Any] = {UNCACHED: None}
    for name, plan in schedules.items():
        if plan is None:
            continue  # the uncached model is always there
        if name == UNCACHED:
            raise ValueError(f"'{UNCACHED}' is reserved for the uncached model; rename that schedule")
        plans[name] = plan
    batches = global_batches(n, batch_size)
    if len(batches) < dist.world_size:
        raise ValueError(
            f"{n} prompts in batches of {batch_size} give {len(batches)} batch(es) for {dist.world_size} processes; "
            "use more prompts, a smaller --batch-size, or fewer processes"
        )
    pipe_kwargs = dict(pipe_kwargs or {})
    targets = {name: _target(pipe, plan, num_steps) for name, plan in plans.items()}  # -> (pipeline, plan, steps)
    setups = {name: _setup(plan) for name, plan in plans.items()}  # -> context around each call, or None
    for target_pipe, _, _ in targets.values():
        if hasattr(target_pipe, "set_progress_bar_config"):
            target_pipe.set_progress_bar_config(disable=True)  # one progress bar for the whole evaluation instead

    factory = _factory(metrics, dist, default_reference)
    suites: dict[str, MetricSuite] = {name: factory.suite(include_fidelity=name != UNCACHED) for name in plans}

    out = Path(out_dir) if out_dir is not None else None
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in plans}
    mine = dist.my_batches(batches)
    bar = tqdm(total=len(mine) * len(plans), desc=f"generating ({len(plans)} configs)", disable=not dist.is_main)
    for idx in mine:
        batch_prompts = [prompt_set.prompts[i] for i in idx]
        seeds = [base_seed + i for i in idx]
        baseline = None
        for name, (target_pipe, plan, steps) in targets.items():
            with setups[name]() if setups[name] is not None else contextlib.nullcontext():
                images = generate(target_pipe, plan, batch_prompts, seeds, steps, pipe_kwargs)
            if baseline is None:
                baseline = images
            frames = _frames_per_prompt(images, batch_prompts)  # a video pipeline's clips come as their frames
            suites[name].update(images, [p for p in batch_prompts for _ in range(frames)],
                                None if name == UNCACHED else baseline)
            keep = [j * frames for j, i in enumerate(idx) if i < grid_samples]  # a clip shows its first frame
            if keep:
                samples[name].append(images[keep])
            if save_images and out is not None:
                folder = out / "images" / name
                folder.mkdir(parents=True, exist_ok=True)
                for j, i in enumerate(idx):
                    for f in range(frames):
                        save_png(images[j * frames + f], folder / (f"{i:05d}.png" if frames == 1
                                                                   else f"{i:05d}_{f:03d}.png"))
            bar.update()
    bar.close()

    values = {name: suite.compute() for name, suite in suites.items()}  # collective: every rank, same order
    metrics_info = next(iter(suites.values())).info()
    for suite in suites.values():  # fidelity metrics are absent from the uncached suite
        for k, v in suite.info().items():
            metrics_info.setdefault(k, v)
    for info in metrics_info.values():
        info["num_images"] = n

    timing: dict[str, Any] = {}
    if dist.is_main and (latency or macs):
        lat_n = min(latency_batch_size or batch_size, n)
        lat_prompts, lat_seeds = prompt_set.prompts[:lat_n], [base_seed + i for i in range(lat_n)]
        # one call per configuration, its cache (and a variant's setup, a peer applied) entered around it by
        # `applied` outside the timer, as a deployment applies a cache once: all configurations are timed alike
        calls = {
            name: (lambda t=target, k=steps: generate(t, None, lat_prompts, lat_seeds, k, pipe_kwargs))
            for name, (target, plan, steps) in targets.items()
        }
        applied = {name: functools.partial(_applied, target, plan, setups[name])
                   for name, (target, plan, steps) in targets.items() if plan is not None or setups[name] is not None}
        if latency:
            stats = measure_interleaved(calls, batch_size=lat_n, num_steps=num_steps, warmup=warmup,
                                        repeats=repeats, device=dist.device, setups=applied)
            timing["latency"] = {k: v.to_dict() for k, v in stats.items()}
        if macs:
            timing["macs"] = {}
            for name, fn in calls.items():
                with applied[name]() if name in applied else contextlib.nullcontext():
                    timing["macs"][name] = count_call_macs(fn)
        timing["protocol"] = {"warmup": warmup, "repeats": repeats, "batch_size": lat_n,
                              "timer": "cuda-events" if dist.device.type == "cuda" else "perf_counter",
                              "order": "round-robin over configurations after per-configuration warm-up",
                              "cache_applied": "once per timed call, outside the timed region",
                              "measured_on": "main process only, after generation"}
    timing = dist.broadcast(timing)

    report = _assemble(prompt_set, plans, values, metrics_info, timing, num_steps, base_seed, batch_size,
                       pipe_kwargs, model_name or type(pipe).__name__, dist, factory)
    grid_columns = None
    if grid_samples > 0:
        gathered = dist.gather({k: torch.cat(v) if v else None for k, v in samples.items()})
        grid_columns = {}
        for name in plans:
            parts = [g[name] for g in gathered if g[name] is not None]
            grid_columns[name] = torch.cat(parts)[:grid_samples]
    if out is not None and dist.is_main:
        write_report(report, out, grid_columns, prompt_set.prompts[:grid_samples])
    dist.barrier()
    return report


def _frames_per_prompt(images: torch.Tensor, prompts: Sequence[str]) -> int:
    """How many images each prompt gave: 1 for an image pipeline, the clip length for a video pipeline, whose clips
    `to_uint8` turns into their frames (clip after clip)."""
    frames, left = divmod(images.shape[0], len(prompts))
    if left or frames < 1:
        raise ValueError(f"{images.shape[0]} images for {len(prompts)} prompts")
    return frames


def _setup(plan: Any) -> Callable[[], ContextManager[Any]] | None:
    return plan.setup if isinstance(plan, Variant) else None


@contextlib.contextmanager
def _applied(target: Any, plan: Any, setup: Callable[[], ContextManager[Any]] | None) -> Iterator[None]:
    """A configuration made ready for a call: its variant's setup entered, then its plan enabled on `target`."""
    import cachekit

    with setup() if setup is not None else contextlib.nullcontext():
        with cachekit.cached(target, plan) if plan is not None else contextlib.nullcontext():
            yield


def _target(pipe: Any, plan: Any, num_steps: int) -> tuple[Any, Any, int]:
    """(pipeline, plan applied on it, steps) of one configuration: a `Variant` brings its own pipeline and steps, a
    schedule its own step count (judged, like every configuration, against the uncached model at `num_steps`)."""
    from cachekit import Schedule

    if isinstance(plan, Variant):
        return plan.pipe, plan.plan, plan.num_steps or num_steps
    if isinstance(plan, Schedule):
        return pipe, plan, plan.num_steps
    return pipe, plan, num_steps


def _assemble(prompt_set, plans, values, metrics_info, timing, num_steps, base_seed, batch_size, pipe_kwargs,
              model_name, dist, factory) -> dict[str, Any]:
    lat = timing.get("latency", {})
    macs = timing.get("macs", {})
    base_lat = lat.get(UNCACHED, {}).get("median_s")
    base_macs = macs.get(UNCACHED)
    schedules: dict[str, Any] = {}
    for name, plan in plans.items():
        entry: dict[str, Any] = {"plan": describe_plan(plan)}
        if name in lat:
            entry["latency_s"] = lat[name]["per_image_s"]
            entry["speedup"] = paired_speedup(lat[UNCACHED], lat[name]) if base_lat else None
            entry["latency"] = lat[name]
        else:
            entry["latency_s"] = entry["speedup"] = None
        m = macs.get(name)
        entry["macs"] = m
        entry["macs_ratio"] = (m / base_macs) if (m is not None and base_macs) else None
        entry["metrics"] = values[name]
        schedules[name] = entry
    ref = factory.reference.describe() if factory.reference is not None else None
    return {
        "format": "cachekit.eval.report",
        "version": 1,
        "model": model_name,
        "num_steps": num_steps,
        "prompts": {**prompt_set.describe(), "num_images": len(prompt_set)},
        "seeds": {"base_seed": base_seed, "rule": "seed = base_seed + prompt_index (one CPU generator per prompt)"},
        "batch_size": batch_size,
        "pipeline_kwargs": pipe_kwargs,
        "world_size": dist.world_size,
        "device": str(dist.device),
        "reference": ref,
        "metrics_info": metrics_info,
        "latency_protocol": timing.get("protocol"),
        "schedules": schedules,
    }
