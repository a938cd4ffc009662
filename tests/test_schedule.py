"""Schedule files: round trip, readable format, validation errors, step-count transfer."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import cachekit
from cachekit.schedule import SCHEDULE_VERSION
from tiny_models import build


@pytest.fixture(scope="module")
def flux():
    return build("FluxTransformer2DModel")


def _fora(model, steps=8, every=3):
    full = cachekit.Schedule.full(model, steps)
    mask = torch.zeros_like(full.recompute)
    mask[::every] = True
    return cachekit.Schedule.from_mask(model, mask, provenance={"method": "policy", "policy": "fora", "every": every})


def test_round_trip_and_readable_rows(tmp_path, flux):
    schedule = _fora(flux)
    path = tmp_path / "s.json"
    schedule.save(path)
    loaded = cachekit.Schedule.load(path)
    assert loaded == schedule
    assert torch.equal(loaded.recompute, schedule.recompute)
    data = json.loads(path.read_text())
    assert data["version"] == SCHEDULE_VERSION and data["model_class"] == "FluxTransformer2DModel"
    assert data["components"] == ["attn", "ff", "ff_context", "proj_mlp"]
    # one line per step; double blocks have no proj_mlp, single blocks no ff / ff_context
    assert data["recompute"][0] == "111- 111- 1--1 1--1"
    assert data["recompute"][1] == "000- 000- 0--0 0--0"
    assert path.read_text().count("\n") > schedule.num_steps  # indented: a row per line, diffable


def test_from_mask_checks_shape_and_step_zero(flux):
    with pytest.raises(cachekit.ScheduleError, match=r"mask must have shape \[steps, 4 blocks, 4 components"):
        cachekit.Schedule.from_mask(flux, torch.ones(5, 3, 4, dtype=torch.bool))
    mask = torch.ones(5, 4, 4, dtype=torch.bool)
    mask[0, 2, 0] = False
    with pytest.raises(cachekit.ScheduleError, match="step 0 must compute everything.*block 2 component 'attn'"):
        cachekit.Schedule.from_mask(flux, mask)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(version=99), "unknown schedule version 99"),
        (lambda d: d.pop("format"), "not a cachekit schedule"),
        (lambda d: d.pop("components"), "corrupt schedule"),
        (lambda d: d["recompute"].pop(), "recompute has 7 rows but num_steps is 8"),
        (lambda d: d["recompute"].__setitem__(2, "1x1- 111- 1--1 1--1"), "only 0, 1, f and -"),
        (lambda d: d["recompute"].__setitem__(2, "111- 111-"), "must have 4 groups of 4 characters"),
    ],
)
def test_corrupt_files_raise_clear_errors(tmp_path, flux, edit, message):
    data = _fora(flux).to_dict()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(cachekit.ScheduleError, match=message):
        cachekit.Schedule.load(path)


def test_not_json_and_missing_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{not json")
    with pytest.raises(cachekit.ScheduleError, match="not JSON"):
        cachekit.Schedule.load(path)
    with pytest.raises(cachekit.ScheduleError, match="not found"):
        cachekit.Schedule.load(tmp_path / "missing.json")


def test_validation_names_what_does_not_fit(flux):
    schedule = _fora(flux)
    other_depth = build("FluxTransformer2DModel")
    other_depth.single_transformer_blocks = other_depth.single_transformer_blocks[:1]
    with pytest.raises(cachekit.ScheduleError, match="schedule has 4 blocks, but this FluxTransformer2DModel has 3"):
        schedule.validate_for(other_depth)
    with pytest.raises(cachekit.ScheduleError, match="made for FluxTransformer2DModel, but the model is PixArt"):
        schedule.validate_for(build("PixArtTransformer2DModel"))
    with pytest.raises(cachekit.ScheduleError, match="schedule has 8 steps but the pipeline runs 20.*resample"):
        schedule.validate_for(flux, num_steps=20)
    block_mode = cachekit.Schedule.full(flux, 8, mode="block")
    assert block_mode.components == ("block",)
    block_mode.validate_for(flux)


def test_resample_maps_nearest_steps_and_logs(flux, caplog):
    schedule = _fora(flux, steps=9, every=2)  # computes at 0, 2, 4, 6, 8
    with caplog.at_level(logging.INFO, logger="cachekit.schedule"):
        longer = schedule.resample(17)
    assert "transferred schedule from 9 to 17 steps" in caplog.text
    assert longer.num_steps == 17 and longer.provenance["method"] == "transfer"
    computed = longer.recompute[:, 0, 0].nonzero().flatten().tolist()
    assert computed == [0, 3, 4, 7, 8, 11, 12, 15, 16]  # new step k maps to old round(k / 2)
    shorter = schedule.resample(3)
    assert shorter.recompute[:, 0, 0].tolist() == [True, True, True]  # old steps 0, 4, 8
    assert schedule.resample(9) == schedule


def test_summary_reports_fractions(flux):
    text = _fora(flux).summary()
    assert "computed: 37.5% of component evaluations" in text
    assert "per component: attn:38% ff:38% ff_context:38% proj_mlp:38%" in text
    assert "  1 ...." in text and "  0 ####" in text
