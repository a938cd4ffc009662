"""The joint step-count x schedule search: its genome at every step count, the search on a tiny real PixArt
transformer (judged against the uncached model at the reference step count), resume, and the CLI on the digits model."""

from __future__ import annotations

import json
import random

import pytest
import torch

import cachekit
from cachekit.cli import main
from cachekit.policies import FORAConfig, fora_schedule
from cachekit.search.genetic import SearchConfig, run_search, write_outputs
from cachekit.search.genome import Genome, JointGenome, make_genome
from cachekit.search.run import joint_seeds
from tiny_models import TinyLoopEvaluator, build

NAME = "PixArtTransformer2DModel"
REFERENCE = 6
COUNTS = (3, 4, 6)


@pytest.fixture(scope="module")
def model():
    return build(NAME)


def _template(model, mode="component"):
    return cachekit.Schedule.full(model, REFERENCE, mode=mode)


def test_make_genome_is_joint_only_over_several_step_counts(model):
    template = _template(model)
    assert isinstance(make_genome(template), Genome)
    assert isinstance(make_genome(template, step_counts=(REFERENCE,)), Genome)
    single = make_genome(template, step_counts=(4,))
    assert isinstance(single, Genome) and single.template.num_steps == 4
    joint = make_genome(template, step_counts=COUNTS)
    assert isinstance(joint, JointGenome) and joint.step_counts == COUNTS
    assert joint.size == len(COUNTS) - 1 + sum(Genome(cachekit.Schedule.full(model, k)).size for k in COUNTS)
    with pytest.raises(ValueError, match="at least two step counts"):
        JointGenome(template, (4,))


@pytest.mark.parametrize("mode,forecast_order", [("component", 0), ("block", 2)])
def test_joint_genome_decodes_to_valid_schedules_at_every_step_count(model, mode, forecast_order):
    genome = JointGenome(_template(model, mode), COUNTS, forecast_order)
    rng = random.Random(0)
    seen = set()
    for _ in range(60):
        genes = [rng.randint(0, 1) for _ in range(genome.size)]
        schedule = genome.decode(genes)
        assert schedule.num_steps == COUNTS[genome.choice(genes)]
        schedule.validate_for(model, schedule.num_steps)
        assert schedule.mode == mode and bool(schedule.recompute[0].all())  # step 0 always computes
        seen.add(schedule.num_steps)
        canonical = list(genes)
        genome.canonicalize(canonical)
        assert torch.equal(genome.decode(canonical).recompute, schedule.recompute)
        assert genome.encode(genome.decode(canonical)) == canonical  # one spelling per schedule
    assert seen == set(COUNTS)

    for count in COUNTS:  # every step count round-trips, forecast genes included
        schedule = fora_schedule(model, count, FORAConfig(interval=2, mode=mode))
        if forecast_order:
            schedule = schedule.with_forecast(forecast_order)
        decoded = genome.decode(genome.encode(schedule))
        assert decoded.num_steps == count and torch.equal(decoded.recompute, schedule.recompute)
        if forecast_order:
            assert torch.equal(decoded.forecast, schedule.forecast)


def test_joint_mutations_keep_schedules_valid_and_carry_the_pattern_to_a_new_step_count(model):
    genome = JointGenome(_template(model), COUNTS)
    random.seed(3)
    fora = fora_schedule(model, 6, FORAConfig(interval=2, mode="component"))
    genes = genome.encode(fora)
    moved = list(genes)
    genome.mutate_steps(moved)
    carried = genome.decode(moved)
    assert carried.num_steps != 6
    assert torch.equal(carried.recompute, fora.resample(carried.num_steps).recompute)
    for _ in range(200):
        op = random.choice([*genome.mutations(), genome.flip])
        op(genes)
        genome.canonicalize(genes)
        schedule = genome.decode(genes)
        schedule.validate_for(model, schedule.num_steps)
        assert genome.encode(schedule) == genes


def test_joint_search_judges_against_the_reference_and_resumes_to_the_same_front(model, tmp_path):
    template = _template(model)
    config = SearchConfig(population=12, generations=2, seed=4, quality_floor=5.0, step_counts=COUNTS)
    seeds = joint_seeds(model, template, config)
    assert {"steps-3", "steps-4", "steps-6", "fora-2@3", "fora-2@6"} <= set(seeds)

    evaluator = TinyLoopEvaluator(model, NAME, REFERENCE)
    result = run_search(evaluator, template, seeds, config, tmp_path / "a", progress=False)
    by_name = {s["name"]: s for s in result.seeds}
    assert by_name["steps-6"]["quality"] == 60.0  # the uncached model at the reference: the images themselves
    assert by_name["steps-3"]["cost"] == pytest.approx(0.5)  # half the steps, nothing reused
    assert {p["num_steps"] for p in result.front} <= set(COUNTS)
    assert result.history[-1]["hypervolume"] >= result.history[0]["hypervolume"]

    front_before_writing = json.loads(json.dumps(result.front))
    files = write_outputs(result, template, tmp_path / "a")  # adds each point's file name
    for point, name in zip(result.front, files):
        schedule = cachekit.Schedule.load(tmp_path / "a" / name)
        assert schedule.num_steps == point["num_steps"] and f"_{point['num_steps']}steps_" in name
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert "| uniform steps | speedup |" in summary and "| steps |" in summary
    assert json.loads((tmp_path / "a" / "checkpoint.json").read_text())["settings"]["step_counts"] == list(COUNTS)

    killed = TinyLoopEvaluator(model, NAME, REFERENCE, fail_after=len(seeds) + 5)  # dies inside generation 1
    with pytest.raises(KeyboardInterrupt):
        run_search(killed, template, seeds, config, tmp_path / "b", progress=False)
    resumed = run_search(TinyLoopEvaluator(model, NAME, REFERENCE), template, seeds, config, tmp_path / "b",
                         resume=True, progress=False)
    assert resumed.front == front_before_writing and resumed.history == result.history


def test_search_cli_searches_step_counts_on_the_digits_model(tmp_path, capsys):
    out = tmp_path / "joint"
    code = main(["search", "--steps", "3,4", "--num", "2", "--genome", "block", "--population", "8",
                 "--generations", "1", "--no-dp", "--out", str(out)])
    assert code == 0
    front = json.loads((out / "front.json").read_text())
    assert front["config"]["step_counts"] == [3, 4] and front["evaluator"]["num_steps"] == 4
    seeds = {s["name"]: s for s in front["seeds"]}
    assert {"steps-3", "steps-4", "fora-2@3"} <= set(seeds)
    assert seeds["steps-4"]["quality"] == 60.0  # the reference itself (PSNR capped at 60 dB)
    assert seeds["steps-3"]["quality"] < 60.0  # judged against the 4-step images, not its own
    assert seeds["steps-3"]["cost"] < seeds["steps-4"]["cost"]  # wall-clock model fitted across step counts
    for point in front["front"]:
        schedule = cachekit.Schedule.load(out / point["file"])
        assert schedule.num_steps == point["num_steps"]
        # the file's predicted cost is against the uncached model at its own count, the front's against 4 steps
        (ratio,) = schedule.predicted_cost.values()
        assert ratio == pytest.approx(point["cost"] * 4 / schedule.num_steps, abs=1e-6)
    assert "uniform step-skipping" in (out / "summary.md").read_text()

    assert main(["search", "--steps", "3,x", "--out", str(tmp_path / "bad")]) == 2
    assert "step counts separated by commas" in capsys.readouterr().err
