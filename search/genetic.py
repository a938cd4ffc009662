"""NSGA-II search over cache schedules with DEAP (ECAD's approach, seeded so it needs far fewer evaluations).

The genome is the schedule's recompute mask, one gene per (step, block, component) that exists, step 0 excluded
(it always computes), in the template's mode: component (ECAD: attention and feed-forward outputs) or block (whole
block residuals). Optional forecast genes, one per step, choose TaylorSeer extrapolation of that step's reused
outputs. Two objectives: maximise quality (fidelity to the uncached model, or CLIP / ImageReward) and minimise cost
(predicted MAC, latency or wall-clock ratio). Beside DEAP's uniform crossover and bit flips, mutations act on the
structures that matter in a DiT: a whole step, a block over a range of steps, a component type over a range of
steps, forecasting over a range of steps. Schedules the evaluator marks infeasible (a CLIP constraint) rank below
every feasible one and never reach the written front.

The first population is seeded with FORA, Delta-DiT, TGATE and DP-solver schedules at several budgets, so the front
starts where the heuristics are and the search only has to improve on them. Every generation is checkpointed: a run
killed at any point resumes with `resume=True`, losing at most the generation in progress, and the same seed gives
the same front.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from deap import base, creator, tools
from tqdm.auto import tqdm

from cachekit.schedule import Schedule

from .fitness import Evaluator

__all__ = ["SearchConfig", "Genome", "SearchResult", "run_search", "hypervolume", "write_outputs"]

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pkl"

if not hasattr(creator, "CachekitFitness"):
    creator.create("CachekitFitness", base.Fitness, weights=(1.0, -1.0))  # quality up, cost down
    creator.create("CachekitIndividual", list, fitness=creator.CachekitFitness, origin=str)


@dataclass(frozen=True)
class SearchConfig:
    """Args:
    population: individuals per generation (a multiple of 4, as NSGA-II's tournament needs).
    generations: generations after the seeded first one.
    crossover_prob: chance a pair of parents is recombined (uniform crossover).
    mutation_prob: chance an offspring is mutated.
    structured_prob: chance a mutation is structured (step / block / component) rather than bit flips.
    seed: the one seed of the run; the same seed gives the same front.
    quality_floor: hypervolume reference quality (cost reference is 1.0, the uncached model).
    forecast_order: 0 for plain reuse; k > 0 adds one gene per step choosing order-k extrapolation (TaylorSeer) of
        that step's reused outputs.
    """

    population: int = 24
    generations: int = 10
    crossover_prob: float = 0.7
    mutation_prob: float = 0.6
    structured_prob: float = 0.6
    seed: int = 0
    quality_floor: float = 15.0
    forecast_order: int = 0

    def __post_init__(self) -> None:
        if self.population < 4 or self.population % 4:
            raise ValueError(f"population must be a positive multiple of 4, got {self.population}")
        if self.generations < 0:
            raise ValueError("generations must be >= 0")
        if self.forecast_order < 0:
            raise ValueError("forecast_order must be >= 0")


class Genome:
    """Maps schedules to flat gene lists and back, for one template (model layout, step count, mode).

    Genes are one per (step, block, component) that exists, step 0 excluded, then, with `forecast_order > 0`, one
    per step from 1 on: whether that step's reused entries are extrapolated (TaylorSeer, `forecast_order`) from the
    last computed ones instead of reused as they are. The template's mode (component or block) is the genome's.
    """

    def __init__(self, template: Schedule, forecast_order: int = 0) -> None:
        if forecast_order < 0:
            raise ValueError(f"forecast_order must be >= 0, got {forecast_order}")
        self.template = template
        self.forecast_order = forecast_order
        steps = torch.arange(template.num_steps)[:, None, None].expand_as(template.recompute)
        self.slots = (template.present.unsqueeze(0).expand_as(template.recompute) & (steps > 0)).nonzero()
        self.num_mask_genes = len(self.slots)
        self.num_forecast_genes = template.num_steps - 1 if forecast_order else 0
        self.size = self.num_mask_genes + self.num_forecast_genes
        self.step_of = self.slots[:, 0].tolist() + list(range(1, 1 + self.num_forecast_genes))
        self.block_of = self.slots[:, 1].tolist() + [-1] * self.num_forecast_genes
        self.component_of = self.slots[:, 2].tolist() + [-1] * self.num_forecast_genes

    def encode(self, schedule: Schedule) -> list[int]:
        mask = schedule.recompute
        genes = [int(v) for v in mask[self.slots[:, 0], self.slots[:, 1], self.slots[:, 2]].tolist()]
        if self.num_forecast_genes:
            forecast = schedule.forecast
            per_step = forecast.flatten(1).any(1) if forecast is not None else torch.zeros(schedule.num_steps, dtype=torch.bool)
            genes += [int(v) for v in per_step[1:].tolist()]
        return genes

    def decode(self, genes: Sequence[int], provenance: dict[str, Any] | None = None) -> Schedule:
        genes = list(genes)
        mask = torch.ones_like(self.template.recompute)
        mask[self.slots[:, 0], self.slots[:, 1], self.slots[:, 2]] = torch.tensor(
            genes[: self.num_mask_genes], dtype=torch.bool
        )
        recompute = mask | ~self.template.present.unsqueeze(0)
        schedule = replace(
            self.template,
            recompute=recompute,
            provenance=provenance or {"method": "search"},
            predicted_cost=None,
            measured=None,
        )
        if self.num_forecast_genes:
            forecast_steps = torch.tensor([False] + [bool(g) for g in genes[self.num_mask_genes :]])
            forecast = ~recompute & self.template.present.unsqueeze(0) & forecast_steps[:, None, None]
            if bool(forecast.any()):
                schedule = replace(schedule, forecast=forecast, forecast_order=self.forecast_order)
        return schedule

    # ---------------------------------------------------------------- structured mutations
    def mutations(self) -> list[Callable[[list[int]], None]]:
        """The structured mutations that make sense for this layout (component types only when there are several)."""
        ops = [self.mutate_step, self.mutate_block]
        if len(self.template.components) > 1:
            ops.append(self.mutate_component)
        if self.num_forecast_genes:
            ops.append(self.mutate_forecast)
        return ops

    def _set(self, genes: list[int], where: Callable[[int], bool], value: int) -> None:
        for i in range(self.num_mask_genes):
            if where(i):
                genes[i] = value

    def _step_range(self) -> tuple[int, int]:
        if self.template.num_steps <= 2:
            return 1, 2
        lo, hi = sorted(random.sample(range(1, self.template.num_steps + 1), 2))
        return lo, hi

    def mutate_step(self, genes: list[int]) -> None:
        step = random.randrange(1, self.template.num_steps)
        self._set(genes, lambda i: self.step_of[i] == step, random.randint(0, 1))

    def mutate_block(self, genes: list[int]) -> None:
        block = random.randrange(self.template.num_blocks)
        lo, hi = self._step_range()
        self._set(genes, lambda i: self.block_of[i] == block and lo <= self.step_of[i] < hi, random.randint(0, 1))

    def mutate_component(self, genes: list[int]) -> None:
        component = random.randrange(len(self.template.components))
        lo, hi = self._step_range()
        self._set(genes, lambda i: self.component_of[i] == component and lo <= self.step_of[i] < hi,
                  random.randint(0, 1))

    def mutate_forecast(self, genes: list[int]) -> None:
        """Switch extrapolation on or off for a range of steps."""
        lo, hi = self._step_range()
        value = random.randint(0, 1)
        for i in range(self.num_mask_genes, self.size):
            if lo <= self.step_of[i] < hi:
                genes[i] = value


def hypervolume(points: Sequence[tuple[float, float]], quality_floor: float) -> float:
    """Area dominated by (quality, cost) points above `quality_floor` and below cost 1 (the uncached model)."""
    kept = sorted((c, q) for q, c in points if q > quality_floor and c < 1.0)
    area, best_quality = 0.0, quality_floor
    # sweep by increasing cost: each point adds the strip between its cost and 1.0 above the best so far
    for cost, quality in kept:
        if quality > best_quality:
            area += (1.0 - cost) * (quality - best_quality)
            best_quality = quality
    return area


@dataclass
class SearchResult:
    front: list[dict[str, Any]]
    history: list[dict[str, Any]]
    evaluations: int
    config: dict[str, Any]
    objectives: dict[str, str]
    seeds: list[dict[str, Any]] = field(default_factory=list)
    evaluator: dict[str, Any] = field(default_factory=dict)


def _key(genes: Sequence[int]) -> bytes:
    return bytes(genes)


def run_search(
    evaluator: Evaluator,
    template: Schedule,
    seeds: dict[str, Schedule],
    config: SearchConfig = SearchConfig(),
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    is_main: bool = True,
) -> SearchResult:
    """Run NSGA-II from seeded schedules; checkpoint to `out_dir` every generation (from the main process only)."""
    genome = Genome(template, forecast_order=config.forecast_order)
    structured = genome.mutations()
    for name, schedule in seeds.items():
        if schedule.recompute.shape != template.recompute.shape or schedule.components != template.components:
            raise ValueError(f"seed {name!r} does not fit the search template (model, steps or mode differ)")

    toolbox = base.Toolbox()
    toolbox.register("mate", tools.cxUniform, indpb=0.5)
    toolbox.register("flip", tools.mutFlipBit, indpb=max(1.0 / genome.size, 0.02))
    toolbox.register("select", tools.selNSGA2)

    checkpoint_path = os.path.join(out_dir, CHECKPOINT) if out_dir else None
    cache: dict[bytes, tuple[float, float]] = {}
    extras: dict[bytes, dict[str, Any]] = {}  # feasibility and details (e.g. CLIP score) of each evaluated schedule
    history: list[dict[str, Any]] = []
    start_generation = 0
    population: list[Any] = []
    if resume and checkpoint_path and os.path.exists(checkpoint_path):
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        if state["config"] != asdict(config) or state["genome_size"] != genome.size:
            raise ValueError("the checkpoint was made with another config or model; start without --resume")
        random.setstate(state["random"])
        cache, history, extras = state["cache"], state["history"], state.get("extras", {})
        population = []
        for genes, origin, crowding in state["population"]:
            ind = _individual(genes, origin, cache)
            ind.fitness.crowding_dist = crowding  # NSGA-II's tournament reads it; keep the saved value exactly
            population.append(ind)
        start_generation = state["generation"] + 1
        logger.info("cachekit search: resumed after generation %d", state["generation"])
    else:
        random.seed(config.seed)

    def evaluate(individuals: list[Any]) -> None:
        todo = [ind for ind in individuals if _key(ind) not in cache]
        unique: dict[bytes, Any] = {}
        for ind in todo:
            unique.setdefault(_key(ind), ind)
        if unique:
            fitnesses = evaluator.evaluate([genome.decode(ind) for ind in unique.values()])
            for key, fit in zip(unique, fitnesses):
                cache[key] = (fit.quality, fit.cost)
                extras[key] = {"feasible": fit.feasible, **fit.details}
        for ind in individuals:
            ind.fitness.values = cache[_key(ind)]

    def mutate(ind: Any) -> None:
        if random.random() < config.structured_prob:
            random.choice(structured)(ind)
        else:
            toolbox.flip(ind)

    def save(generation: int) -> None:
        if not checkpoint_path or not is_main:
            return
        os.makedirs(out_dir, exist_ok=True)
        state = {
            "generation": generation,
            "config": asdict(config),
            "genome_size": genome.size,
            "random": random.getstate(),
            "cache": cache,
            "extras": extras,
            "history": history,
            "population": [(list(ind), ind.origin, ind.fitness.crowding_dist) for ind in population],
        }
        tmp = f"{checkpoint_path}.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(state, f)
        os.replace(tmp, checkpoint_path)

    def record(generation: int) -> None:
        front = tools.sortNondominated(population, len(population), first_front_only=True)[0]
        points = [tuple(ind.fitness.values) for ind in front]
        entry = {
            "generation": generation,
            "evaluations": len(cache),
            "front_size": len({_key(ind) for ind in front}),
            "hypervolume": hypervolume(points, config.quality_floor),
        }
        history.append(entry)
        logger.info("generation %d: %s", generation, entry)

    total = config.generations + 1
    bar = tqdm(total=total, initial=start_generation, desc="search", disable=not progress or not is_main)
    if start_generation == 0:
        population = [_individual(genome.encode(s), name, None) for name, s in seeds.items()]
        while len(population) < config.population:
            parent = random.choice(population) if population else _individual([1] * genome.size, "full", None)
            child = _individual(parent, f"mutant of {parent.origin}", None)
            mutate(child)
            population.append(child)
        evaluate(population)
        population = toolbox.select(population, config.population)
        record(0)
        save(0)
        bar.update()
        bar.set_postfix(hv=f"{history[-1]['hypervolume']:.3g}", evals=len(cache))
        start_generation = 1

    for generation in range(start_generation, total):
        offspring = [_individual(ind, "offspring", None) for ind in tools.selTournamentDCD(population, len(population))]
        for a, b in zip(offspring[::2], offspring[1::2]):
            if random.random() < config.crossover_prob:
                toolbox.mate(a, b)
        for ind in offspring:
            if random.random() < config.mutation_prob:
                mutate(ind)
        evaluate(offspring)
        population = toolbox.select(population + offspring, config.population)
        record(generation)
        save(generation)
        bar.update()
        bar.set_postfix(hv=f"{history[-1]['hypervolume']:.3g}", evals=len(cache))
    bar.close()

    front_inds = tools.sortNondominated(population, len(population), first_front_only=True)[0]
    unique_front: dict[bytes, Any] = {}
    for ind in sorted(front_inds, key=lambda i: i.fitness.values[1]):
        if extras.get(_key(ind), {}).get("feasible", True):  # infeasible schedules never reach the written front
            unique_front.setdefault(_key(ind), ind)
    front = [
        {"quality": ind.fitness.values[0], "cost": ind.fitness.values[1], "origin": ind.origin, "genes": list(ind),
         **{k: v for k, v in extras.get(_key(ind), {}).items() if k != "feasible"}}
        for ind in unique_front.values()
    ]
    seed_points = [
        {"name": name, "quality": cache[_key(genome.encode(s))][0], "cost": cache[_key(genome.encode(s))][1],
         **extras.get(_key(genome.encode(s)), {})}
        for name, s in seeds.items()
        if _key(genome.encode(s)) in cache
    ]
    return SearchResult(
        front=front,
        history=history,
        evaluations=len(cache),
        config=asdict(config),
        objectives={"quality": evaluator.quality_name, "cost": evaluator.cost_name},
        evaluator=evaluator.describe() if hasattr(evaluator, "describe") else {},
        seeds=seed_points,
    )


def _individual(genes: Sequence[int], origin: str, cache: dict[bytes, tuple[float, float]] | None) -> Any:
    ind = creator.CachekitIndividual(list(genes))
    ind.origin = origin
    if cache is not None and _key(genes) in cache:
        ind.fitness.values = cache[_key(genes)]
    return ind


def write_outputs(result: SearchResult, template: Schedule, out_dir: str | os.PathLike) -> list[str]:
    """front.json, one schedule file per front point (named by predicted speedup), front.png and summary.md."""
    genome = Genome(template, forecast_order=result.config.get("forecast_order", 0))
    os.makedirs(out_dir, exist_ok=True)
    files = []
    for i, point in enumerate(result.front):
        speedup = 1.0 / point["cost"] if point["cost"] > 0 else math.inf
        schedule = genome.decode(
            point["genes"],
            provenance={"method": "search", "objectives": result.objectives, "origin": point["origin"],
                        "seed": result.config["seed"]},
        )
        schedule.predicted_cost = {result.objectives["cost"]: round(point["cost"], 6)}
        schedule.measured = {result.objectives["quality"]: round(point["quality"], 4),
                             **({"clip_score": point["clip_score"]} if "clip_score" in point else {})}
        name = f"front_{i:02d}_x{speedup:.2f}.json"
        schedule.save(os.path.join(out_dir, name))
        point["file"] = name
        point["predicted_speedup"] = speedup
        files.append(name)
    front_json = {
        "objectives": result.objectives,
        "evaluator": result.evaluator,
        "evaluations": result.evaluations,
        "config": result.config,
        "history": result.history,
        "seeds": result.seeds,
        "front": [{k: v for k, v in p.items() if k != "genes"} for p in result.front],
    }
    with open(os.path.join(out_dir, "front.json"), "w") as f:
        json.dump(front_json, f, indent=1)
    _plot_front(result, os.path.join(out_dir, "front.png"))
    _write_summary(result, os.path.join(out_dir, "summary.md"))
    return files


def _plot_front(result: SearchResult, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_hv) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [1 / p["cost"] for p in result.front]
    ys = [p["quality"] for p in result.front]
    ax.plot(xs, ys, "o-", color="tab:red", label="searched front")
    for seed in result.seeds:
        ax.scatter(1 / seed["cost"], seed["quality"], marker="x", color="tab:gray")
        ax.annotate(seed["name"], (1 / seed["cost"], seed["quality"]), fontsize=7, color="tab:gray")
    ax.set_xlabel(f"predicted speedup (1 / {result.objectives['cost']})")
    ax.set_ylabel(result.objectives["quality"])
    ax.set_title("front against its seeds (x)")
    ax.legend()
    ax_hv.plot([h["evaluations"] for h in result.history], [h["hypervolume"] for h in result.history], "o-")
    ax_hv.set_xlabel("evaluations")
    ax_hv.set_ylabel("hypervolume")
    ax_hv.set_title("hypervolume per generation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_summary(result: SearchResult, path: str) -> None:
    lines = [
        "# cachekit search",
        "",
        f"Objectives: maximise `{result.objectives['quality']}`, minimise `{result.objectives['cost']}`"
        + (f", subject to `{result.evaluator['constraint']}`" if result.evaluator.get("constraint") else "") + ".",
        f"Judged on: `{json.dumps(result.evaluator)}`." if result.evaluator else "",
        f"Evaluations: {result.evaluations}. Config: `{json.dumps(result.config)}`.",
        "",
        "| file | predicted speedup | cost | quality | origin |",
        "|---|---|---|---|---|",
    ]
    for p in result.front:
        lines.append(f"| {p.get('file', '')} | {1 / p['cost']:.2f}x | {p['cost']:.3f} | {p['quality']:.2f} | {p['origin']} |")
    lines += ["", "| generation | evaluations | front size | hypervolume |", "|---|---|---|---|"]
    for h in result.history:
        lines.append(f"| {h['generation']} | {h['evaluations']} | {h['front_size']} | {h['hypervolume']:.4g} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
