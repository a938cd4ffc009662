"""The whole `cachekit search` job on a pipeline: seeds from the heuristics and the DP solver, then NSGA-II.

ECAD needed about 72 x 550 candidate evaluations from random starts. Here the first population already holds the
well-known heuristics (FORA at several intervals, Delta-DiT, TGATE) and DP solutions at several budgets, solved in
seconds from one calibration run, so the search starts on a good front and spends its evaluations improving it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from cachekit.policies import DeltaDiTConfig, FORAConfig, TGATEConfig, delta_dit_schedule, fora_schedule, tgate_schedule
from cachekit.schedule import Schedule

from .fitness import PipelineEvaluator
from .genetic import SearchConfig, SearchResult, run_search, write_outputs

__all__ = ["heuristic_seeds", "dp_seeds", "search_pipeline"]

logger = logging.getLogger(__name__)


def _as_component_mode(schedule: Schedule, transformer: torch.nn.Module) -> Schedule:
    """A block-mode schedule expressed per component: a reused block reuses all its components."""
    template = Schedule.full(transformer, schedule.num_steps)
    mask = schedule.recompute[:, :, :1].expand_as(template.recompute).clone()
    return Schedule.from_mask(transformer, mask, provenance=schedule.provenance)


def heuristic_seeds(transformer: torch.nn.Module, num_steps: int) -> dict[str, Schedule]:
    """FORA, Delta-DiT and TGATE at settings spanning cheap to faithful, all in component mode."""
    seeds: dict[str, Schedule] = {}
    for interval in (2, 3, 4):
        seeds[f"fora-{interval}"] = fora_schedule(transformer, num_steps, FORAConfig(interval, mode="component"))
    num_blocks = Schedule.full(transformer, 1).num_blocks
    for fraction in (0.25, 0.5):
        config = DeltaDiTConfig(boundary_step=num_steps // 2, num_cached_blocks=max(1, int(num_blocks * fraction)),
                                interval=2)
        seeds[f"delta-dit-{fraction:g}"] = _as_component_mode(delta_dit_schedule(transformer, num_steps, config),
                                                              transformer)
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


def search_pipeline(
    pipe: Any,
    prompts: Sequence[str],
    num_steps: int,
    out_dir: str | os.PathLike,
    config: SearchConfig = SearchConfig(),
    calibration: Any | None = None,
    dp_budgets: Sequence[float] = (0.25, 0.35, 0.5, 0.7),
    cost: str = "macs",
    resume: bool = False,
    progress: bool = True,
    noise_seed: int = 0,
    **call_kwargs: Any,
) -> SearchResult:
    """Search a pipeline's schedule front and write front.json, the front's schedules, front.png, summary.md.

    Candidates are judged on `prompts` with noise seeds `noise_seed + i`; `config.seed` drives only the search's own
    randomness, so the same seeds give the same front. Keep evaluation prompts and seeds apart from these.
    """
    transformer = pipe.transformer
    template = Schedule.full(transformer, num_steps, scheduler=type(pipe.scheduler).__name__)
    seeds = heuristic_seeds(transformer, num_steps)
    if calibration is not None:
        seeds.update(dp_seeds(calibration, dp_budgets))
    latency = calibration.unit_costs("latency") if cost == "latency" and calibration is not None else None
    evaluator = PipelineEvaluator(pipe, prompts, num_steps, seed=noise_seed, cost=cost, latency_table=latency,
                                  **call_kwargs)
    result = run_search(evaluator, template, seeds, config, out_dir, resume=resume, progress=progress)
    write_outputs(result, template, out_dir)
    return result
