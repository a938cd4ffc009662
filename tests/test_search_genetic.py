"""The NSGA-II schedule search on a tiny real PixArt transformer: it improves on its seeds, and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

import cachekit
from cachekit.policies import FORAConfig, TGATEConfig, fora_schedule, tgate_schedule
from cachekit.search.fitness import Fitness
from cachekit.search.genetic import CHECKPOINT, Genome, SearchConfig, hypervolume, run_search, write_outputs
from tiny_models import TinyLoopEvaluator, build

NAME = "PixArtTransformer2DModel"
STEPS = 6


class LoopEvaluator(TinyLoopEvaluator):
    """The shared tiny-model evaluator on PixArt at this module's step count."""

    def __init__(self, model, fail_after: int | None = None):
        super().__init__(model, NAME, STEPS, fail_after)


@pytest.fixture(scope="module")
def model():
    return build(NAME)


def _seeds(model):
    return {
        "fora-2": fora_schedule(model, STEPS, FORAConfig(interval=2, mode="component")),
        "fora-3": fora_schedule(model, STEPS, FORAConfig(interval=3, mode="component")),
        "tgate-2": tgate_schedule(model, STEPS, TGATEConfig(gate_step=2)),
    }


def test_genome_round_trip(model):
    schedule = _seeds(model)["tgate-2"]
    genome = Genome(cachekit.Schedule.full(model, STEPS))
    assert genome.size == (STEPS - 1) * 3 * 3
    assert torch.equal(genome.decode(genome.encode(schedule)).recompute, schedule.recompute)


def test_hypervolume_of_simple_fronts():
    assert hypervolume([(20.0, 0.5)], quality_floor=10.0) == pytest.approx(5.0)
    assert hypervolume([(20.0, 0.5), (15.0, 0.25)], 10.0) == pytest.approx(5.0 + 0.25 * 5.0)
    assert hypervolume([(5.0, 0.2), (30.0, 1.2)], 10.0) == 0.0  # below the floor / costlier than uncached


def test_search_improves_on_its_seeds_and_writes_outputs(model, tmp_path):
    config = SearchConfig(population=8, generations=3, seed=1, quality_floor=5.0)
    evaluator = LoopEvaluator(model)
    seeds = _seeds(model)
    result = run_search(evaluator, cachekit.Schedule.full(model, STEPS), seeds, config, tmp_path, progress=False)
    seed_hv = hypervolume([(s["quality"], s["cost"]) for s in result.seeds], config.quality_floor)
    assert result.history[-1]["hypervolume"] > seed_hv
    assert [h["generation"] for h in result.history] == [0, 1, 2, 3]
    assert result.evaluations == evaluator.calls <= 8 * 4  # duplicates are never evaluated twice
    files = write_outputs(result, cachekit.Schedule.full(model, STEPS), tmp_path)
    front = json.loads((tmp_path / "front.json").read_text())
    assert front["objectives"] == {"quality": "psnr_vs_uncached", "cost": "mac_ratio"}
    assert len(front["front"]) == len(files) and (tmp_path / "front.png").stat().st_size > 0
    best = cachekit.Schedule.load(tmp_path / files[0])
    assert best.provenance["method"] == "search" and best.validate_for(model) is None
    assert "| generation | evaluations |" in (tmp_path / "summary.md").read_text()


def test_resume_after_kill_gives_the_same_front(model, tmp_path):
    config = SearchConfig(population=8, generations=3, seed=2, quality_floor=5.0)
    template = cachekit.Schedule.full(model, STEPS)
    uninterrupted = run_search(LoopEvaluator(model), template, _seeds(model), config, tmp_path / "a", progress=False)

    killed = LoopEvaluator(model, fail_after=14)  # dies inside generation 1 or 2
    with pytest.raises(KeyboardInterrupt):
        run_search(killed, template, _seeds(model), config, tmp_path / "b", progress=False)
    resumed = run_search(LoopEvaluator(model), template, _seeds(model), config, tmp_path / "b", resume=True,
                         progress=False)
    assert [(p["genes"], p["quality"], p["cost"]) for p in resumed.front] == [
        (p["genes"], p["quality"], p["cost"]) for p in uninterrupted.front
    ]
    assert resumed.history == uninterrupted.history
    saved = json.loads((tmp_path / "b" / CHECKPOINT).read_text())  # plain JSON, nothing pickled
    assert saved["generation"] == config.generations and not (tmp_path / "b" / "checkpoint.pkl").exists()


def test_block_genome_with_forecast_genes_round_trips(model):
    template = cachekit.Schedule.full(model, STEPS, mode="block")
    genome = Genome(template, forecast_order=1)
    assert genome.num_mask_genes == (STEPS - 1) * 3 and genome.size == genome.num_mask_genes + STEPS - 1
    assert genome.mutate_component not in genome.mutations() and genome.mutate_forecast in genome.mutations()
    fora = fora_schedule(model, STEPS, FORAConfig(interval=3, mode="block")).with_forecast(1)
    decoded = genome.decode(genome.encode(fora))
    assert torch.equal(decoded.recompute, fora.recompute) and torch.equal(decoded.forecast, fora.forecast)
    assert decoded.forecast_order == 1 and decoded.mode == "block"
    plain = genome.decode(genome.encode(fora_schedule(model, STEPS, FORAConfig(interval=3, mode="block"))))
    assert plain.forecast is None  # forecast genes off: plain reuse


def test_block_search_with_forecast_genes_improves_on_its_seeds(model, tmp_path):
    config = SearchConfig(population=8, generations=3, seed=3, quality_floor=5.0, forecast_order=1)
    template = cachekit.Schedule.full(model, STEPS, mode="block")
    seeds = {f"fora-{k}": fora_schedule(model, STEPS, FORAConfig(interval=k, mode="block")) for k in (2, 3)}
    result = run_search(LoopEvaluator(model), template, seeds, config, tmp_path, progress=False)
    seed_hv = hypervolume([(s["quality"], s["cost"]) for s in result.seeds], config.quality_floor)
    assert result.history[-1]["hypervolume"] > seed_hv
    files = write_outputs(result, template, tmp_path)
    for name in files:
        schedule = cachekit.Schedule.load(tmp_path / name)
        assert schedule.mode == "block" and schedule.validate_for(model, STEPS) is None


class ConstrainedEvaluator(LoopEvaluator):
    """Marks every schedule that reuses anything at step 1 infeasible, as a CLIP constraint would a bad one."""

    def evaluate(self, schedules):
        out = []
        for fit, schedule in zip(super().evaluate(schedules), schedules):
            feasible = bool(schedule.recompute[1].all())
            out.append(Fitness(fit.quality if feasible else -1.0, fit.cost, feasible, {"clip_score": 50.0}))
        return out


def test_infeasible_schedules_never_reach_the_front(model, tmp_path):
    config = SearchConfig(population=8, generations=2, seed=4, quality_floor=5.0)
    result = run_search(ConstrainedEvaluator(model), cachekit.Schedule.full(model, STEPS), _seeds(model), config,
                        tmp_path, progress=False)
    genome = Genome(cachekit.Schedule.full(model, STEPS))
    assert result.front
    for point in result.front:
        assert bool(genome.decode(point["genes"]).recompute[1].all()) and point["clip_score"] == 50.0
    assert any(not s["feasible"] for s in result.seeds)  # fora-2 reuses at step 1: judged, but kept off the front
