"""The whole `cachekit search` job on a pipeline: seeds from the heuristics and the DP solver, then NSGA-II.

ECAD needed about 72 x 550 candidate evaluations from random starts. Here the first population already holds the
well-known heuristics (FORA at several intervals, Delta-DiT, TGATE) and DP solutions at several budgets, solved in
seconds from one calibration run, so the search starts on a good front and spends its evaluations improving it.

A joint search (`SearchConfig.step_counts`) seeds every step count it may choose: the uncached model at that count
(uniform step-skipping, the baseline a cache must beat) and the heuristics at that count; the DP seeds stay at the
reference count, the one calibrated.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from cachekit.policies import DeltaDiTConfig, FORAConfig, TGATEConfig, delta_dit_schedule, fora_schedule, tgate_schedule
from cachekit.schedule import Schedule

from .fitness import PipelineEvaluator
from .genome import template_at
from .genetic import SearchConfig, SearchResult, check_resume, run_search, run_settings, write_outputs
from .wallclock import WallClockModel, fit_wallclock, probe_schedules

__all__ = ["heuristic_seeds", "dp_seeds", "joint_seeds", "search_pipeline"]

logger = logging.getLogger(__name__)


def _as_component_mode(schedule: Schedule, transformer: torch.nn.Module) -> Schedule:
    """A block-mode schedule expressed per component: a reused block reuses all its components."""
    template = Schedule.full(transformer, schedule.num_steps)
    mask = schedule.recompute[:, :, :1].expand_as(template.recompute).clone()
    return Schedule.from_mask(transformer, mask, provenance=schedule.provenance)


def heuristic_seeds(
    transformer: torch.nn.Module, num_steps: int, mode: str = "component", forecast_order: int = 0
) -> dict[str, Schedule]:
    """FORA, Delta-DiT and TGATE at settings spanning cheap to faithful, in the search's mode.

    TGATE caches cross-attention alone, so it seeds component-mode searches only. With `forecast_order`, FORA is
    also seeded with its reused outputs extrapolated (TaylorSeer-style), the way cache-dit pairs DBCache with it.
    """
    seeds: dict[str, Schedule] = {}
    intervals = (2, 3, 4) if mode == "component" else (2, 3, 4, 5, 6)
    for interval in intervals:
        seeds[f"fora-{interval}"] = fora_schedule(transformer, num_steps, FORAConfig(interval, mode=mode))
        if forecast_order:
            seeds[f"fora-{interval}+forecast"] = seeds[f"fora-{interval}"].with_forecast(forecast_order)
    num_blocks = Schedule.full(transformer, 1).num_blocks
    for fraction in (0.25, 0.5):
        config = DeltaDiTConfig(boundary_step=num_steps // 2, num_cached_blocks=max(1, int(num_blocks * fraction)),
                                interval=2)
        delta = delta_dit_schedule(transformer, num_steps, config)
        seeds[f"delta-dit-{fraction:g}"] = delta if mode == "block" else _as_component_mode(delta, transformer)
    if mode == "component":
        try:
            seeds["tgate"] = tgate_schedule(transformer, num_steps, TGATEConfig(gate_step=max(1, num_steps // 2)))
        except ValueError as err:  # joint-attention models have no separate cross-attention
            logger.info("no TGATE seed: %s", err)
    return seeds


def dp_seeds(calibration: Any, budgets: Sequence[float]) -> dict[str, Schedule]:
    """DP-solver schedules at several cost budgets, from a calibration (`cachekit calibrate`)."""
    from .dp import InfeasibleError, solve

    seeds = {}
    for budget in budgets:
        try:
            seeds[f"dp-{budget:g}"] = solve(calibration, budget=budget).schedule
        except InfeasibleError as err:  # e.g. a low budget at few steps, where the forced steps alone cost more
            logger.warning("no DP seed at budget %g: %s", budget, err)
    return seeds


def joint_seeds(transformer: torch.nn.Module, template: Schedule, config: SearchConfig) -> dict[str, Schedule]:
    """Seeds of a joint search: at each step count, the uncached model (`steps-K`) and the heuristics (`NAME@K`)."""
    seeds: dict[str, Schedule] = {}
    for count in config.step_counts:
        seeds[f"steps-{count}"] = replace(template_at(template, count),
                                          provenance={"method": "uniform-steps", "num_steps": count})
        for name, schedule in heuristic_seeds(transformer, count, template.mode, config.forecast_order).items():
            seeds[f"{name}@{count}"] = schedule
    return seeds


WALLCLOCK_FILE = "wallclock.json"


def search_pipeline(
    pipe: Any,
    prompts: Sequence[str],
    num_steps: int,
    out_dir: str | os.PathLike,
    config: SearchConfig = SearchConfig(),
    calibration: Any | None = None,
    dp_budgets: Sequence[float] = (0.25, 0.35, 0.5, 0.7),
    cost: str = "macs",
    quality: str = "psnr",
    mode: str = "component",
    clip_tolerance: float | None = None,
    wallclock: WallClockModel | None = None,
    resume: bool = False,
    progress: bool = True,
    noise_seed: int = 0,
    dist: Any | None = None,
    model: str | None = None,
    **call_kwargs: Any,
) -> SearchResult:
    """Search a pipeline's schedule front and write front.json, the front's schedules, front.png, summary.md.

    Candidates are judged on `prompts` with noise seeds `noise_seed + i`; `config.seed` drives only the search's own
    randomness, so the same seeds give the same front. Keep evaluation prompts and seeds apart from these.
    `mode` is the genome's: `component` (ECAD: attention / feed-forward outputs) or `block` (whole-block residuals,
    which turn skipped MACs into wall-clock best on launch-bound models). With `cost="wallclock"` a wall-clock model
    is fitted to timed probe calls (or `wallclock` is used) and saved as `OUT/wallclock.json`.
    Under `accelerate launch`, candidates are spread over the processes of `dist` (default:
    `cachekit.eval.distributed.get_dist()`); only the main one writes files.
    `model` names the model in the checkpoint (a bundled name such as "digits", a folder, a hub id; default: the
    pipeline's `name_or_path`). With `resume`, a checkpoint in `out_dir` made with another model, prompts, seeds,
    steps, mode, objectives, pipeline call or search config is refused before anything runs (`CheckpointError`).
    """
    transformer = pipe.transformer
    if calibration is not None and calibration.mode != mode:
        raise ValueError(f"the calibration is in {calibration.mode} mode but the search is in {mode} mode; "
                         f"calibrate with --mode {mode}")
    template = Schedule.full(transformer, num_steps, mode=mode, scheduler=type(pipe.scheduler).__name__)
    seeds = joint_seeds(transformer, template, config) if config.step_counts else \
        heuristic_seeds(transformer, num_steps, mode, config.forecast_order)
    if calibration is not None and (not config.step_counts or num_steps in config.step_counts):
        seeds.update(dp_seeds(calibration, dp_budgets))
    latency = calibration.unit_costs("latency") if cost == "latency" and calibration is not None else None
    settings: dict[str, Any] = {
        "model": _model_id(model, pipe),
        "prompts": list(prompts),
        "noise_seed": noise_seed,
        "quality": quality,
        "cost": cost,
        "clip_tolerance": clip_tolerance,
        "pipeline_call": dict(call_kwargs),
    }
    if latency is not None:
        settings["latency_table"] = list(latency)  # recorded by digest: another calibration, other costs
    if resume:  # refuse other settings now, before the reference calls and any wall-clock timing
        check_resume(out_dir, run_settings(template, config, seeds, settings), config.generations, partial=True)
    evaluator = PipelineEvaluator(pipe, prompts, num_steps, seed=noise_seed, quality=quality, cost=cost,
                                  latency_table=latency, clip_tolerance=clip_tolerance, dist=dist, **call_kwargs)
    dist = evaluator.dist
    if cost == "wallclock":
        evaluator.set_wallclock(_wallclock_model(evaluator, template, config, out_dir, wallclock, resume, progress))
        settings["wallclock"] = evaluator.wallclock.coefficients
    result = run_search(evaluator, template, seeds, config, out_dir, resume=resume, progress=progress,
                        is_main=dist.is_main, settings=settings)
    if dist.is_main:
        write_outputs(result, template, out_dir)
    dist.barrier()
    return result


def _model_id(model: str | None, pipe: Any) -> str | None:
    """How the checkpoint names the model: as given, else the pipeline's `name_or_path`; a folder path absolute."""
    name = model if model is not None else getattr(pipe, "name_or_path", None)
    if name is None:
        return None
    name = os.fspath(name)
    folder = Path(name).expanduser()
    if (os.sep in name or name.startswith(("~", "."))) and folder.is_dir():
        return str(folder.resolve())
    return name


def _wallclock_model(
    evaluator: PipelineEvaluator,
    template: Schedule,
    config: SearchConfig,
    out_dir: str | os.PathLike,
    given: WallClockModel | None,
    resume: bool,
    progress: bool,
) -> WallClockModel:
    """The given model, the run's saved one on resume, or a new fit timed on the main process and shared."""
    path = os.path.join(out_dir, WALLCLOCK_FILE)
    dist = evaluator.dist
    model = given
    if model is None and resume and os.path.exists(path):
        model = WallClockModel.load(path)
    if model is None:
        if dist.is_main:
            probes = probe_schedules(template, config.forecast_order, seed=config.seed, step_counts=config.step_counts)
            model = fit_wallclock(evaluator.call, evaluator.apply, probes, evaluator.profile,
                                  batch_size=len(evaluator.prompts), device=evaluator.device, progress=progress)
            logger.info("wall-clock model: %s, leave-one-out error %.1f%%", model.coefficients,
                        100 * model.loo_relative_error)
        model = dist.broadcast(model)
    if dist.is_main:
        os.makedirs(out_dir, exist_ok=True)
        model.save(path)
    return model
