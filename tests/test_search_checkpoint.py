"""The search checkpoint is plain JSON: a planted file cannot run code, a damaged one is a one-line error, a resume
with other settings is refused naming each one, and a resume with more generations reaches the uninterrupted front."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest

import cachekit
from cachekit.cli import main
from cachekit.errors import UsageError
from cachekit.search.genetic import (
    CHECKPOINT,
    OLD_CHECKPOINT,
    CheckpointError,
    SearchConfig,
    read_checkpoint,
    run_search,
)
from cachekit.search.run import search_pipeline
from cachekit.zoo import call_defaults, load_pipeline
from test_search_genetic import NAME, STEPS, LoopEvaluator, _seeds
from tiny_models import build

PROMPTS = ["number 0", "digit 1"]
SEARCH = dict(num_steps=3, config=SearchConfig(population=4, generations=1, seed=0, quality_floor=5.0),
              cost="macs", quality="psnr", noise_seed=0, model="digits")


class NeverEvaluated:
    """An evaluator for runs that must stop before judging anything."""

    quality_name = "psnr_vs_uncached"
    cost_name = "mac_ratio"

    def evaluate(self, schedules):
        raise AssertionError("a refused resume evaluated a schedule")


class Planted:
    """Unpickling this creates `path`: what a hostile checkpoint would do (with any command instead)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


@pytest.fixture(scope="module")
def model():
    return build(NAME)


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline("digits")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def searched(pipe, tmp_path_factory):
    """One finished search_pipeline run on the bundled digits model: 3 steps, 2 prompts, generations 0 and 1."""
    out = tmp_path_factory.mktemp("searched") / "out"
    result = search_pipeline(pipe, PROMPTS, out_dir=out, progress=False, **SEARCH, **call_defaults("digits"))
    return out, result


def _resume(model, out, config=SearchConfig(population=8, generations=2, seed=2, quality_floor=5.0)):
    template = cachekit.Schedule.full(model, STEPS)
    return run_search(NeverEvaluated(), template, _seeds(model), config, out, resume=True, progress=False)


# ---------------------------------------------------------------- planted and damaged files
def test_a_planted_pickle_never_runs(model, tmp_path):
    marker = tmp_path / "marker"
    for protocol in (0, pickle.HIGHEST_PROTOCOL):  # protocol 0 is ASCII text, the others binary
        payload = pickle.dumps(Planted(marker), protocol=protocol)
        pickle.loads(payload)  # the payload is real: unpickled, it runs its command
        assert marker.exists()
        marker.unlink()

        out = tmp_path / f"both-{protocol}"
        out.mkdir()
        (out / OLD_CHECKPOINT).write_bytes(payload)
        (out / CHECKPOINT).write_bytes(payload)
        with pytest.raises(CheckpointError, match="old pickle format.*will not be loaded"):
            _resume(model, out)
        (out / OLD_CHECKPOINT).unlink()  # the new name holding a pickle is refused too, unopened
        with pytest.raises(CheckpointError, match="is not a valid cachekit search checkpoint"):
            _resume(model, out)
        assert not marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not JSON"),
        (b"garbage", "not JSON"),
        (b"\xff\xfe\x00binary", "binary content"),
        (b"[1, 2]", "format list"),
        (b'{"format": "cachekit.schedule", "version": 1}', "format cachekit.schedule"),
        (b'{"format": "cachekit.search-checkpoint", "version": 99}', "version 99"),
        (b'{"format": "cachekit.search-checkpoint", "version": 1}', "damaged search checkpoint \\(missing field"),
        (b"[" * 100000, "not a valid"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_is_a_one_line_error(model, tmp_path, content, message):
    (tmp_path / CHECKPOINT).write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as err:
        _resume(model, tmp_path)
    assert isinstance(err.value, UsageError) and isinstance(err.value, ValueError)
    assert "\n" not in str(err.value) and err.value.__cause__ is None


def test_a_truncated_or_edited_checkpoint_is_a_clear_error(searched, model, tmp_path):
    out, _ = searched
    text = (out / CHECKPOINT).read_text()
    (tmp_path / CHECKPOINT).write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="not JSON.*truncated"):
        read_checkpoint(tmp_path)
    state = json.loads(text)
    state["population"][0]["genes"] = "01x"
    (tmp_path / CHECKPOINT).write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="damaged.*population member 0 genes"):
        read_checkpoint(tmp_path)
    state = json.loads(text)
    state["random"]["python"] = [3, [1, 2], None]
    (tmp_path / CHECKPOINT).write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="damaged"):
        read_checkpoint(tmp_path)


def test_the_cli_prints_a_damaged_checkpoint_as_one_line(tmp_path, capsys):
    (tmp_path / CHECKPOINT).write_text('{"format": "cachekit.search-checkpoint", "version": 1, "gen')
    args = ["search", "--steps", "3", "--num", "2", "--no-dp", "--population", "4", "--generations", "1"]
    assert main([*args, "--out", str(tmp_path), "--resume"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("cachekit search: error:")]
    assert len(errors) == 1 and "is not a valid cachekit search checkpoint" in errors[0] and "Traceback" not in err


# ---------------------------------------------------------------- what the checkpoint holds
def test_the_checkpoint_is_json_with_the_settings_that_change_results(searched):
    out, result = searched
    state = json.loads((out / CHECKPOINT).read_text())
    assert (state["format"], state["version"], state["generation"], state["generations"]) == (
        "cachekit.search-checkpoint", 1, 1, 1)
    settings = state["settings"]
    assert settings["model"] == "digits" and settings["prompts"] == PROMPTS and settings["noise_seed"] == 0
    assert (settings["cost"], settings["quality"], settings["clip_tolerance"]) == ("macs", "psnr", None)
    assert (settings["num_steps"], settings["mode"], settings["search_seed"], settings["population"]) == (
        3, "component", 0, 4)
    assert settings["pipeline_call"] == call_defaults("digits") and "generations" not in settings
    assert set(settings["seeds"]) >= {"fora-2", "tgate"}
    assert len(state["memo"]) == result.evaluations and len(state["population"]) == 4
    assert state["random"]["python"][0] == 3 and len(state["random"]["python"][1]) == 625
    assert not [p for p in os.listdir(out) if p.endswith(".tmp") or ".tmp." in p]  # written atomically


def test_a_checkpoint_that_cannot_be_written_is_an_error_and_leaves_no_temporary_file(model, tmp_path):
    (tmp_path / CHECKPOINT).mkdir()  # a folder where the checkpoint goes
    config = SearchConfig(population=8, generations=1, seed=2, quality_floor=5.0)
    with pytest.raises(OSError, match="checkpoint.json"):
        run_search(LoopEvaluator(model), cachekit.Schedule.full(model, STEPS), _seeds(model), config, tmp_path,
                   progress=False)
    assert sorted(os.listdir(tmp_path)) == [CHECKPOINT]


# ---------------------------------------------------------------- resuming with other settings
@pytest.mark.parametrize(
    "change, old, new",
    [
        (dict(cost="latency"), "cost=macs", "cost=latency"),
        (dict(quality="clip"), "quality=psnr", "quality=clip"),
        (dict(prompts=["number 0", "digit 2"]), 'prompts=["number 0", "digit 1"]', 'prompts=["number 0", "digit 2"]'),
        (dict(prompts=["number 0"]), 'prompts=["number 0", "digit 1"]', 'prompts=["number 0"]'),
        (dict(num_steps=4), "num_steps=3", "num_steps=4"),
        (dict(noise_seed=1), "noise_seed=0", "noise_seed=1"),
        (dict(config=SearchConfig(population=4, generations=1, seed=5, quality_floor=5.0)),
         "search_seed=0", "search_seed=5"),
        (dict(config=SearchConfig(population=8, generations=1, seed=0, quality_floor=5.0)),
         "population=4", "population=8"),
        (dict(model="other-model"), "model=digits", "model=other-model"),
        (dict(mode="block"), "mode=component", "mode=block"),
        (dict(clip_tolerance=2.0), "clip_tolerance=null", "clip_tolerance=2.0"),
        (dict(guidance_scale=2.0), '"guidance_scale": 4.0', '"guidance_scale": 2.0'),
    ],
)
def test_a_resume_with_other_settings_is_refused_naming_them(searched, pipe, change, old, new):
    out, _ = searched
    before = (out / CHECKPOINT).read_bytes()
    kwargs = {**SEARCH, "prompts": PROMPTS, **call_defaults("digits")}
    kwargs.update(change)
    with pytest.raises(CheckpointError) as err:
        search_pipeline(pipe, out_dir=out, resume=True, progress=False, **kwargs)
    message = str(err.value)
    assert f"the checkpoint in {out} was made with " in message and "this run asks " in message
    made_with, asks = message.split("this run asks ")
    assert old in made_with and new in asks and "another --out" in asks
    assert (out / CHECKPOINT).read_bytes() == before


def test_a_resume_that_would_end_before_the_checkpoint_is_refused(searched, pipe):
    out, _ = searched
    fewer = SearchConfig(population=4, generations=0, seed=0, quality_floor=5.0)
    with pytest.raises(CheckpointError, match="already holds generation 1; this run asks generations=0"):
        search_pipeline(pipe, PROMPTS, out_dir=out, resume=True, progress=False,
                        **{**SEARCH, "config": fewer}, **call_defaults("digits"))


# ---------------------------------------------------------------- resuming with the same settings
def test_a_resume_with_more_generations_continues_to_the_uninterrupted_front(searched, pipe, tmp_path):
    out, first = searched
    more = SearchConfig(population=4, generations=2, seed=0, quality_floor=5.0)
    uninterrupted = search_pipeline(pipe, PROMPTS, out_dir=tmp_path / "a", progress=False,
                                    **{**SEARCH, "config": more}, **call_defaults("digits"))
    shutil.copytree(out, tmp_path / "b")
    resumed = search_pipeline(pipe, PROMPTS, out_dir=tmp_path / "b", resume=True, progress=False,
                              **{**SEARCH, "config": more}, **call_defaults("digits"))
    assert resumed.history[:2] == first.history and [h["generation"] for h in resumed.history] == [0, 1, 2]
    assert resumed.history == uninterrupted.history
    assert [(p["genes"], p["quality"], p["cost"]) for p in resumed.front] == [
        (p["genes"], p["quality"], p["cost"]) for p in uninterrupted.front
    ]
    assert json.loads((tmp_path / "b" / CHECKPOINT).read_text())["generation"] == 2


def test_a_tiny_model_search_resumed_with_more_generations_matches_an_uninterrupted_one(model, tmp_path):
    template = cachekit.Schedule.full(model, STEPS)
    settings = {"model": "tiny-pixart", "prompts": ["a", "b"], "noise_seed": 0}

    def search(generations, out, resume=False):
        config = SearchConfig(population=8, generations=generations, seed=2, quality_floor=5.0)
        return run_search(LoopEvaluator(model), template, _seeds(model), config, out, resume=resume,
                          progress=False, settings=settings)

    uninterrupted = search(3, tmp_path / "a")
    search(1, tmp_path / "b")
    resumed = search(3, tmp_path / "b", resume=True)
    assert resumed.history == uninterrupted.history and resumed.evaluations == uninterrupted.evaluations
    assert [(p["genes"], p["quality"], p["cost"]) for p in resumed.front] == [
        (p["genes"], p["quality"], p["cost"]) for p in uninterrupted.front
    ]
    settings["prompts"] = ["a", "c"]
    with pytest.raises(CheckpointError, match=r'prompts=\["a", "b"\]; this run asks prompts=\["a", "c"\]'):
        search(3, tmp_path / "b", resume=True)
    settings["prompts"] = ["a", "b"]
    other_seeds = {**_seeds(model), "fora-3": _seeds(model)["fora-2"]}  # e.g. DP seeds of another calibration
    config = SearchConfig(population=8, generations=3, seed=2, quality_floor=5.0)
    with pytest.raises(CheckpointError, match=r'made with seeds=\{"fora-3": "\w+"\}; this run asks seeds='):
        run_search(LoopEvaluator(model), template, other_seeds, config, tmp_path / "b", resume=True, progress=False,
                   settings=settings)
