"""NSGA-II search over cache schedules with DEAP (ECAD's approach, seeded so it needs far fewer evaluations).

The genome (`genome.py`) is the schedule's recompute mask, one gene per (step, block, component) that exists, step 0
excluded (it always computes), in the template's mode: component (ECAD: attention and feed-forward outputs) or block (whole
block residuals). Optional forecast genes, one per step, choose TaylorSeer extrapolation of that step's reused
outputs. With `SearchConfig.step_counts` the step count is a gene too (a joint search: fewer steps against more
reuse), every candidate still judged against the uncached model at the template's step count. Two objectives: maximise quality (fidelity to the uncached model, or CLIP / ImageReward) and minimise cost
(predicted MAC, latency or wall-clock ratio). Beside DEAP's uniform crossover and bit flips, mutations act on the
structures that matter in a DiT: a whole step, a block over a range of steps, a component type over a range of
steps, forecasting over a range of steps. Schedules the evaluator marks infeasible (a CLIP constraint) rank below
every feasible one and never reach the written front.

The first population is seeded with FORA, Delta-DiT, TGATE and DP-solver schedules at several budgets, so the front
starts where the heuristics are and the search only has to improve on them. Every generation is checkpointed: a run
killed at any point resumes with `resume=True`, losing at most the generation in progress, and the same seed gives
the same front.

The checkpoint (`OUT/checkpoint.json`) is plain JSON, written atomically: the population, the fitness memo, the
history and the state of Python's `random` (the only random source the search draws from: the mutations here and
DEAP's crossover, bit flips and tournament all use it; candidates are judged with explicitly seeded generators).
Nothing in it is code, so a planted file can at worst be refused. It records every setting that changes results
(model, prompts, seeds, steps, mode, objectives, the search config but for the generation count, the seeds'
genomes, ...); a resume with other settings is refused, naming each setting that differs, since it would silently
mix values of different objectives. A resume may ask for more generations: it continues.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from deap import base, creator, tools
from tqdm.auto import tqdm

from cachekit.errors import UsageError
from cachekit.io import atomic_write, save_figure, write_text
from cachekit.schedule import Schedule

from .fitness import Evaluator
from .genome import Genome, JointGenome, make_genome

__all__ = [
    "CHECKPOINT",
    "OLD_CHECKPOINT",
    "CheckpointError",
    "SearchConfig",
    "Genome",
    "JointGenome",
    "make_genome",
    "SearchResult",
    "check_resume",
    "read_checkpoint",
    "run_search",
    "run_settings",
    "hypervolume",
    "write_outputs",
]

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.json"
"""The search's checkpoint in its output folder: JSON, rewritten atomically after every generation."""
OLD_CHECKPOINT = "checkpoint.pkl"
"""Where cachekit before checkpoint format 1 pickled its state; never loaded (unpickling can run any code)."""
CHECKPOINT_FORMAT = "cachekit.search-checkpoint"
CHECKPOINT_VERSION = 1

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
    step_counts: step counts the search may choose among (a step-count gene beside the cache genes, see
        `JointGenome`); empty: only the template's. Candidates are judged against the template's step count.
    """

    population: int = 24
    generations: int = 10
    crossover_prob: float = 0.7
    mutation_prob: float = 0.6
    structured_prob: float = 0.6
    seed: int = 0
    quality_floor: float = 15.0
    forecast_order: int = 0
    step_counts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "step_counts", tuple(sorted(set(int(k) for k in self.step_counts))))
        if any(k < 2 for k in self.step_counts):
            raise ValueError(f"step counts must be at least 2, got {list(self.step_counts)}")
        if self.population < 4 or self.population % 4:
            raise ValueError(f"population must be a positive multiple of 4, got {self.population}")
        if self.generations < 0:
            raise ValueError("generations must be >= 0")
        if self.forecast_order < 0:
            raise ValueError("forecast_order must be >= 0")


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


# ---------------------------------------------------------------- checkpoint: settings, reading, writing
class CheckpointError(UsageError):
    """A search checkpoint that cannot be resumed: not a valid checkpoint file, the old pickle format, or made with
    other settings than the run that asks to resume it. The message is one line and says what to do."""


_MISSING = object()


def _genes_text(genes: Sequence[int]) -> str:
    """Genes as a string of 0s and 1s (every gene is a bit)."""
    return "".join("1" if g else "0" for g in genes)


def _genes_from_text(text: Any, what: str) -> list[int]:
    if not isinstance(text, str) or text.strip("01"):
        raise ValueError(f"{what} is not a string of 0s and 1s")
    return [1 if c == "1" else 0 for c in text]


def _digest(genes: Sequence[int]) -> str:
    return hashlib.sha256(_genes_text(genes).encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    """JSON form of a setting json cannot write itself: tensors by shape, dtype and content digest; paths as text."""
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return {"tensor": list(value.shape), "dtype": str(value.dtype), "sha256": hashlib.sha256(data).hexdigest()[:16]}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    text = repr(value)
    return type(value).__qualname__ if " at 0x" in text else text  # an address would differ in every process


def _plain(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists, ...), so a saved and a new setting compare equal."""
    return json.loads(json.dumps(value, default=_jsonable))


def run_settings(
    template: Schedule,
    config: SearchConfig,
    seeds: Mapping[str, Schedule],
    settings: Mapping[str, Any] | None = None,
    objectives: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The settings a checkpoint records and a resume must match, as JSON values.

    Derived here: the template's model class, mode, step and block counts, components and scheduler; the genome
    size; every `SearchConfig` field except `generations` (a resume may ask for more); a digest of each seed's
    genome (a changed calibration or DP budget changes the first population). `objectives` (the evaluator's
    quality and cost names) and then the caller's `settings` (model, prompts, noise seed, pipeline call, ...) are
    added; a caller's key replaces a derived one of the same name.
    """
    genome = make_genome(template, config.forecast_order, config.step_counts)
    derived: dict[str, Any] = {
        "model_class": template.model_class,
        "mode": template.mode,
        "num_steps": template.num_steps,
        "num_blocks": template.num_blocks,
        "components": list(template.components),
        "scheduler": template.scheduler,
        "genome_size": genome.size,
    }
    for name, value in asdict(config).items():
        if name == "step_counts" and not value:
            continue  # recorded only when searched, so checkpoints from before the joint search still resume
        if name != "generations":
            derived["search_seed" if name == "seed" else name] = value
    derived["seeds"] = {name: _digest(genome.encode(schedule)) for name, schedule in seeds.items()}
    derived.update(objectives or {})
    derived.update(settings or {})
    return _plain(derived)


def _brief(value: Any) -> str:
    if value is _MISSING:
        return "(not recorded)"
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) > 3:
        return f"[{', '.join(json.dumps(v) for v in value[:2])}, ... ({len(value)} items)]"
    text = json.dumps(value)
    return text if len(text) <= 120 else f"{text[:117]}..."


_CONSEQUENCES = ("genome_size", "seeds")
"""Settings that differ whenever another one does (steps, blocks, mode, forecast order): named only when alone."""


def _differing_parts(old: Any, new: Any) -> tuple[Any, Any]:
    """Of two objects (e.g. pipeline call settings), only the entries that differ; other values whole."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [k for k in dict.fromkeys([*old, *new]) if old.get(k, _MISSING) != new.get(k, _MISSING)]
        return ({k: old[k] for k in keys if k in old}, {k: new[k] for k in keys if k in new})
    return old, new


def check_resume(
    out_dir: str | os.PathLike, settings: Mapping[str, Any], generations: int, partial: bool = False
) -> dict[str, Any] | None:
    """The checkpoint in `out_dir` (decoded, see `read_checkpoint`) if it can be resumed with `settings`, else None
    when there is none; raises `CheckpointError` naming each setting that differs (old and new values).

    `settings` come from `run_settings`. With `partial`, only the settings given are compared (a caller checking
    early, before every setting is known). A checkpoint past generation `generations` is refused too: the run would
    end before it.
    """
    state = read_checkpoint(out_dir)
    if state is None:
        return None
    saved = state["settings"]
    current = _plain(dict(settings))
    keys = list(current) if partial else list(dict.fromkeys([*saved, *current]))
    differing = [(k, *_differing_parts(saved.get(k, _MISSING), current.get(k, _MISSING))) for k in keys
                 if saved.get(k, _MISSING) != current.get(k, _MISSING)]
    if any(k not in _CONSEQUENCES for k, _, _ in differing):  # a changed step count changes the genome: say why
        differing = [d for d in differing if d[0] not in _CONSEQUENCES]
    if differing:
        old = ", ".join(f"{k}={_brief(v)}" for k, v, _ in differing)
        new = ", ".join(f"{k}={_brief(v)}" for k, _, v in differing)
        raise CheckpointError(
            f"the checkpoint in {out_dir} was made with {old}; this run asks {new}: resuming would mix results of "
            f"different settings; resume with the checkpoint's settings, or start a new search in another --out"
        )
    if state["generation"] > generations:
        raise CheckpointError(
            f"the checkpoint in {out_dir} already holds generation {state['generation']}; this run asks "
            f"generations={generations}, which ends before it: ask for {state['generation']} generations or more, "
            f"or start a new search in another --out"
        )
    return state


def read_checkpoint(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint in `out_dir`, decoded and checked, or None when there is none; never runs code from the file.

    Raises `CheckpointError` (one line) for a file that is not a valid checkpoint (not JSON, truncated, another
    format or version, missing or malformed fields) and for an old pickled `checkpoint.pkl`, which is never opened.
    Returns `generation` (the last completed), `generations`, `settings`, `random` (Python's `random` state),
    `cache` and `extras` (the fitness memo by genome key), `history` and `population` ((genes, origin, crowding)).
    """
    folder = Path(out_dir)
    old = folder / OLD_CHECKPOINT
    if old.exists():
        raise CheckpointError(
            f"{old} is a checkpoint in the old pickle format, which can run arbitrary code when loaded, so it will "
            f"not be loaded: delete it and start the search again, or use another --out"
        )
    path = folder / CHECKPOINT
    if not path.exists():
        return None
    invalid = f"{path} is not a valid cachekit search checkpoint"
    advice = "delete it to start the search again, or use another --out"
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read the checkpoint {path}: {err.strerror or err}") from None
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{invalid} (binary content, not JSON text): {advice}") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{invalid} (not JSON: {err.msg} at line {err.lineno} column {err.colno}; truncated?): {advice}"
        ) from None
    except RecursionError:
        raise CheckpointError(f"{invalid} (JSON nested too deeply): {advice}") from None
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{invalid} (format {_brief(found)!s}, expected {CHECKPOINT_FORMAT}): {advice}")
    if raw.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} is a search checkpoint of version {_brief(raw.get('version'))}; this cachekit reads version "
            f"{CHECKPOINT_VERSION}: {advice}"
        )
    try:
        return _decode_checkpoint(raw)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        what = f"missing field {err}" if isinstance(err, KeyError) else str(err)
        raise CheckpointError(f"{path} is a damaged search checkpoint ({what}): {advice}") from None


def _decode_checkpoint(raw: dict[str, Any]) -> dict[str, Any]:
    def integer(value: Any, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{what} is not an integer")
        return value

    def number(value: Any, what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{what} is not a number")
        return float(value)

    generation = integer(raw["generation"], "generation")
    if generation < 0:
        raise ValueError("generation is negative")
    settings = raw["settings"]
    if not isinstance(settings, dict):
        raise ValueError("settings is not an object")
    version, internal, gauss = raw["random"]["python"]
    state = (integer(version, "random state version"),
             tuple(integer(v, "random state") for v in internal),
             None if gauss is None else number(gauss, "random state"))
    random.Random().setstate(state)  # raises on a malformed state
    cache: dict[bytes, tuple[float, float]] = {}
    extras: dict[bytes, dict[str, Any]] = {}
    for i, entry in enumerate(raw["memo"]):
        key = _key(_genes_from_text(entry["genes"], f"memo entry {i} genes"))
        quality, cost = entry["fitness"]
        cache[key] = (number(quality, "a fitness"), number(cost, "a fitness"))
        if not isinstance(entry["extras"], dict):
            raise ValueError(f"memo entry {i} extras is not an object")
        extras[key] = entry["extras"]
    population = []
    for i, entry in enumerate(raw["population"]):
        genes = _genes_from_text(entry["genes"], f"population member {i} genes")
        if _key(genes) not in cache:
            raise ValueError(f"population member {i} has no fitness in the memo")
        if not isinstance(entry["origin"], str):
            raise ValueError(f"population member {i} origin is not a string")
        population.append((genes, entry["origin"], number(entry["crowding"], "a crowding distance")))
    history = raw["history"]
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise ValueError("history is not a list of objects")
    return {"generation": generation, "generations": raw.get("generations"), "settings": settings, "random": state,
            "cache": cache, "extras": extras, "history": history, "population": population}


def _encode_checkpoint(
    generation: int,
    config: SearchConfig,
    settings: Mapping[str, Any],
    cache: Mapping[bytes, tuple[float, float]],
    extras: Mapping[bytes, dict[str, Any]],
    history: list[dict[str, Any]],
    population: Sequence[Any],
) -> str:
    version, internal, gauss = random.getstate()
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "generation": generation,
        "generations": config.generations,
        "settings": settings,
        "random": {"python": [version, list(internal), gauss]},
        "memo": [{"genes": _genes_text(key), "fitness": list(fit), "extras": extras.get(key, {})}
                 for key, fit in cache.items()],
        "history": history,
        "population": [{"genes": _genes_text(ind), "origin": ind.origin, "crowding": ind.fitness.crowding_dist}
                       for ind in population],
    }
    # serialised whole before anything is written; crowding distances may be Infinity (read back by Python's json)
    return json.dumps(state, default=_jsonable)


def run_search(
    evaluator: Evaluator,
    template: Schedule,
    seeds: dict[str, Schedule],
    config: SearchConfig = SearchConfig(),
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    is_main: bool = True,
    settings: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Run NSGA-II from seeded schedules; checkpoint to `out_dir` every generation (from the main process only).

    `settings` are the caller's settings that change results and that the search cannot see (model, prompts, noise
    seed, pipeline call, ...; JSON values, see `run_settings`): the checkpoint records them with the derived ones,
    and `resume=True` refuses a checkpoint made with other settings (`CheckpointError`). Without a checkpoint in
    `out_dir`, `resume=True` starts from scratch.
    """
    genome = make_genome(template, config.forecast_order, config.step_counts)
    structured = genome.mutations()
    for name, schedule in seeds.items():
        if not genome.fits(schedule):
            raise ValueError(f"seed {name!r} does not fit the search template (model, steps or mode differ)")
    recorded = run_settings(template, config, seeds, settings,
                            {"quality": evaluator.quality_name, "cost": evaluator.cost_name})

    toolbox = base.Toolbox()
    toolbox.register("mate", tools.cxUniform, indpb=0.5)
    toolbox.register("select", tools.selNSGA2)

    checkpoint_path = os.path.join(out_dir, CHECKPOINT) if out_dir else None
    cache: dict[bytes, tuple[float, float]] = {}
    extras: dict[bytes, dict[str, Any]] = {}  # feasibility and details (e.g. CLIP score) of each evaluated schedule
    history: list[dict[str, Any]] = []
    start_generation = 0
    population: list[Any] = []
    state = check_resume(out_dir, recorded, config.generations) if resume and out_dir else None
    if state is not None:
        wrong = [i for i, (genes, _, _) in enumerate(state["population"]) if len(genes) != genome.size]
        if wrong or len(state["population"]) != config.population:
            raise CheckpointError(f"{checkpoint_path} is a damaged search checkpoint (its population does not fit "
                                  f"the genome): delete it to start the search again, or use another --out")
        random.setstate(state["random"])
        cache, history, extras = state["cache"], state["history"], state["extras"]
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
            genome.flip(ind)
        genome.canonicalize(ind)

    def save(generation: int) -> None:
        if not checkpoint_path or not is_main:
            return
        text = _encode_checkpoint(generation, config, recorded, cache, extras, history, population)
        # an error or interrupt mid-write leaves the previous generation's checkpoint whole and no temporary file
        with atomic_write(checkpoint_path, encoding="utf-8") as f:
            f.write(text)

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
                genome.canonicalize(a)
                genome.canonicalize(b)
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
         "num_steps": genome.decode(ind).num_steps,
         **{k: v for k, v in extras.get(_key(ind), {}).items() if k != "feasible"}}
        for ind in unique_front.values()
    ]
    seed_points = [
        {"name": name, "quality": cache[_key(genome.encode(s))][0], "cost": cache[_key(genome.encode(s))][1],
         "num_steps": s.num_steps, **extras.get(_key(genome.encode(s)), {})}
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
    genome = make_genome(template, result.config.get("forecast_order", 0), result.config.get("step_counts", ()))
    os.makedirs(out_dir, exist_ok=True)
    joint = len(genome.step_counts) > 1
    files = []
    for i, point in enumerate(result.front):
        speedup = 1.0 / point["cost"] if point["cost"] > 0 else math.inf
        schedule = genome.decode(
            point["genes"],
            provenance={"method": "search", "objectives": result.objectives, "origin": point["origin"],
                        "seed": result.config["seed"]},
        )
        # A point's cost is against the uncached call at the reference step count (what the front compares); the
        # file records it against the uncached model at the schedule's own count, as every schedule file does, so a
        # runner that prices `steps x cost` counts the skipped steps once (the per-call overhead is spread evenly).
        reference_steps = result.evaluator.get("num_steps", schedule.num_steps)
        schedule.predicted_cost = {result.objectives["cost"]: round(point["cost"] * reference_steps / schedule.num_steps, 6)}
        schedule.measured = {result.objectives["quality"]: round(point["quality"], 4),
                             **({"clip_score": point["clip_score"]} if "clip_score" in point else {})}
        name = f"front_{i:02d}_{schedule.num_steps}steps_x{speedup:.2f}.json" if joint else f"front_{i:02d}_x{speedup:.2f}.json"
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
    write_text(os.path.join(out_dir, "front.json"), json.dumps(front_json, indent=1))
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
    ax.plot(xs, ys, "-", color="tab:red", label="searched front")
    joint = len({p.get("num_steps") for p in result.front} | {s.get("num_steps") for s in result.seeds}) > 1
    if joint:  # the step count of each front point, and uniform step-skipping (the uncached model at fewer steps)
        points = ax.scatter(xs, ys, c=[p["num_steps"] for p in result.front], cmap="viridis", zorder=3)
        fig.colorbar(points, ax=ax, label="denoising steps")
        uniform = sorted((1 / s["cost"], s["quality"], s["num_steps"]) for s in result.seeds
                         if s["name"].startswith("steps-"))
        if uniform:
            ax.plot([u[0] for u in uniform], [u[1] for u in uniform], "s--", color="tab:blue",
                    label="uniform step-skipping (uncached)")
            for x, y, k in uniform:
                ax.annotate(f"{k}", (x, y), fontsize=7, color="tab:blue")
    else:
        ax.scatter(xs, ys, color="tab:red", zorder=3)
    for seed in result.seeds:
        if (joint and seed["name"].startswith("steps-")) or not seed.get("feasible", True):
            continue  # infeasible seeds (below the CLIP constraint) have no quality to draw
        ax.scatter(1 / seed["cost"], seed["quality"], marker="x", color="tab:gray")
        if not joint:
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
    save_figure(fig, path, dpi=120)
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
        "| file | steps | predicted speedup | cost | quality | origin |",
        "|---|---|---|---|---|---|",
    ]
    for p in result.front:
        lines.append(f"| {p.get('file', '')} | {p.get('num_steps', '')} | {1 / p['cost']:.2f}x | {p['cost']:.3f} | "
                     f"{p['quality']:.2f} | {p['origin']} |")
    uniform = sorted((s for s in result.seeds if s["name"].startswith("steps-")), key=lambda s: s["cost"])
    if uniform:
        lines += ["", "Against uniform step-skipping (the uncached model at fewer steps): the best front point at "
                  "least as fast as each.", "",
                  "| uniform steps | speedup | quality | best front point as fast | its speedup | its quality |",
                  "|---|---|---|---|---|---|"]
        for seed in uniform:
            faster = [p for p in result.front if p["cost"] <= seed["cost"]]
            best = max(faster, key=lambda p: p["quality"]) if faster else None
            shown = (f"{best.get('file', '')} ({best.get('num_steps', '')} steps) | {1 / best['cost']:.2f}x | "
                     f"{best['quality']:.2f}") if best else "none | - | -"
            lines.append(f"| {seed['num_steps']} | {1 / seed['cost']:.2f}x | {seed['quality']:.2f} | {shown} |")
    lines += ["", "| generation | evaluations | front size | hypervolume |", "|---|---|---|---|"]
    for h in result.history:
        lines.append(f"| {h['generation']} | {h['evaluations']} | {h['front_size']} | {h['hypervolume']:.4g} |")
    write_text(path, "\n".join(lines) + "\n")
