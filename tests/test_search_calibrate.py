"""Calibration on a tiny real PixArt: recorded errors equal a direct computation, files round-trip, hooks come off."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import cachekit
from cachekit.cost import MacProfile
from cachekit.hooks import session_of
from cachekit.search.calibrate import CALIBRATE_HOOK, Calibration, CalibrationError, calibrate, calibrate_transformer
from tiny_models import TINY_MODELS, build, denoise, tiny_pixart_pipeline

NAME = "PixArtTransformer2DModel"
STEPS = 6
SEEDS = (0, 1)
BATCH = 2


def _run(model, scheduler, finals=None):
    """Two generations (seeds 0 and 1) of BATCH rows each, as a calibration over two prompt batches would run."""

    def run():
        for seed in SEEDS:
            out = denoise(model, TINY_MODELS[NAME], num_steps=STEPS, batch=BATCH, seed=seed, scheduler=scheduler)
            if finals is not None:
                finals.append(out)

    return run


@pytest.fixture(scope="module")
def model():
    return build(NAME)


@pytest.fixture(scope="module")
def calibration(model):
    scheduler = TINY_MODELS[NAME].scheduler()
    return calibrate_transformer(model, _run(model, scheduler), STEPS, scheduler=scheduler, progress=False,
                                 max_features=None, meta={"prompts": ["a", "b"]})


def _direct_outputs(model, module):
    """Every output of `module` over the same two generations, recorded with a plain torch forward hook."""
    outputs = []
    handle = module.register_forward_hook(lambda mod, args, out: outputs.append(out.detach().flatten(1).clone()))
    try:
        _run(model, TINY_MODELS[NAME].scheduler())()
    finally:
        handle.remove()
    return torch.stack(outputs).reshape(len(SEEDS), STEPS, BATCH, -1)  # [generation, step, row, features]


def test_errors_equal_a_direct_computation(model, calibration):
    outputs = _direct_outputs(model, model.transformer_blocks[1].attn2)
    comp = calibration.components.index("attn2")
    for i, t in [(0, 1), (0, 5), (2, 4), (3, 5)]:
        o_i, o_t = outputs[:, i], outputs[:, t]
        rel = ((o_t - o_i).abs().sum(-1) / o_t.abs().sum(-1)).mean()
        cos = (1 - F.cosine_similarity(o_t, o_i, dim=-1)).mean()
        assert calibration.rel_l1[1, comp, i, t].item() == pytest.approx(rel.item(), rel=1e-5)
        assert calibration.cosine[1, comp, i, t].item() == pytest.approx(cos.item(), rel=1e-4, abs=1e-7)


def test_error_matrices_shape_diagonal_and_growth(calibration):
    assert calibration.components == ("attn1", "attn2", "ff") and calibration.mode == "component"
    assert calibration.rel_l1.shape == calibration.cosine.shape == (3, 3, STEPS, STEPS)
    steps = torch.arange(STEPS)
    assert torch.all(calibration.rel_l1[..., steps, steps] == 0)
    assert torch.all(calibration.rel_l1.tril(-1) == 0)
    upper = calibration.rel_l1[..., *torch.triu_indices(STEPS, STEPS, 1)]
    assert torch.all(upper > 0) and torch.all(calibration.cosine[..., *torch.triu_indices(STEPS, STEPS, 1)] >= 0)
    # serving a step from further back is worse on average
    by_gap = [calibration.rel_l1[..., steps[:-d], steps[d:]].mean().item() for d in range(1, STEPS)]
    assert by_gap[0] < by_gap[len(by_gap) // 2] < by_gap[-1]


def test_sample_count_latency_and_macs_recorded(model, calibration):
    assert calibration.num_samples == len(SEEDS) * BATCH
    upper = torch.triu(torch.ones(STEPS, STEPS, dtype=torch.bool))
    assert torch.all(calibration.pair_counts[upper] == len(SEEDS) * BATCH)
    assert calibration.latency.shape == (3, 3) and torch.all(calibration.latency > 0)
    assert calibration.latency_remainder >= 0
    assert calibration.meta["timer"] == "perf_counter" and calibration.meta["device"] == "cpu"
    gen = torch.Generator().manual_seed(0)
    tiny = TINY_MODELS[NAME]
    profile = MacProfile.measure(model, tiny.latents(BATCH, gen), timestep=torch.tensor([999, 999]),
                                 **tiny.conditioning(BATCH, gen))
    assert calibration.macs["total"] == profile.total and calibration.meta["mac_rows"] == BATCH
    assert torch.equal(calibration.macs["per_component"], profile.per_component)
    per_unit, total = calibration.unit_costs("macs")
    assert total == profile.total and torch.equal(per_unit, profile.per_component)
    per_unit_s, total_s = calibration.unit_costs("latency")
    assert total_s == pytest.approx(float(calibration.latency.sum()) + calibration.latency_remainder)


def test_calibration_is_exact_and_leaves_no_hooks(model, calibration):
    scheduler = TINY_MODELS[NAME].scheduler()
    plain: list = []
    _run(model, scheduler, plain)()
    recorded: list = []
    calibrate_transformer(model, _run(model, scheduler, recorded), STEPS, scheduler=scheduler, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(plain, recorded))
    assert session_of(model) is None
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        assert registry is None or CALIBRATE_HOOK not in registry.hooks


def test_save_load_round_trip(calibration, tmp_path):
    path = tmp_path / "calib.pt"
    calibration.save(path)
    loaded = Calibration.load(path)
    for name in ("rel_l1", "cosine", "pair_counts", "latency", "present"):
        assert torch.equal(getattr(loaded, name), getattr(calibration, name)), name
    assert loaded.macs["total"] == calibration.macs["total"]
    assert torch.equal(loaded.macs["per_block"], calibration.macs["per_block"])
    assert (loaded.model_class, loaded.components, loaded.num_steps, loaded.num_samples) == (
        NAME, ("attn1", "attn2", "ff"), STEPS, len(SEEDS) * BATCH)
    assert loaded.meta["prompts"] == ["a", "b"] and loaded.latency_remainder == calibration.latency_remainder
    readable = json.loads((tmp_path / "calib.pt.json").read_text())
    assert readable["format"] == "cachekit.calibration" and readable["num_steps"] == STEPS
    assert readable["components"] == ["attn1", "attn2", "ff"] and readable["num_samples"] == 4


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="calibration file not found"):
        Calibration.load(tmp_path / "missing.pt")
    bogus = tmp_path / "bogus.pt"
    bogus.write_text("not a torch file")
    with pytest.raises(CalibrationError, match="not a cachekit calibration") as err:
        Calibration.load(bogus)
    assert "\n" not in str(err.value)
    other = tmp_path / "other.pt"
    torch.save({"meta": json.dumps({"format": "something else"})}, other)
    with pytest.raises(CalibrationError, match="format 'something else'"):
        Calibration.load(other)


def test_block_mode_records_block_residuals(model):
    scheduler = TINY_MODELS[NAME].scheduler()
    calib = calibrate_transformer(model, _run(model, scheduler), STEPS, scheduler=scheduler, mode="block",
                                  progress=False)
    assert calib.components == ("block",) and calib.rel_l1.shape == (3, 1, STEPS, STEPS)
    inputs, outputs = [], []
    block = model.transformer_blocks[2]

    def record(module, args, kwargs, output):
        inputs.append(args[0].flatten(1).clone())
        outputs.append(output.flatten(1).clone())

    handle = block.register_forward_hook(record, with_kwargs=True)
    try:
        _run(model, scheduler)()
    finally:
        handle.remove()
    residual = (torch.stack(outputs) - torch.stack(inputs)).reshape(len(SEEDS), STEPS, BATCH, -1)
    rel = ((residual[:, 4] - residual[:, 1]).abs().sum(-1) / residual[:, 4].abs().sum(-1)).mean()
    assert calib.rel_l1[2, 0, 1, 4].item() == pytest.approx(rel.item(), rel=1e-5)
    assert calib.unit_costs("macs")[0][:, 0].tolist() == calib.macs["per_block"].tolist()


def test_max_features_subsamples_outputs(model, calibration):
    scheduler = TINY_MODELS[NAME].scheduler()
    everything = calibrate_transformer(model, _run(model, scheduler), STEPS, scheduler=scheduler, progress=False)
    assert everything.meta["max_features"] == 65536  # the default, above this tiny model's output size
    assert torch.allclose(everything.rel_l1, calibration.rel_l1)
    sampled = calibrate_transformer(model, _run(model, scheduler), STEPS, scheduler=scheduler, progress=False,
                                    max_features=64)
    assert sampled.meta["max_features"] == 64
    assert not torch.equal(sampled.rel_l1, calibration.rel_l1)
    upper = torch.triu(torch.ones(STEPS, STEPS, dtype=torch.bool), 1)
    ratio = sampled.rel_l1[..., upper].mean() / calibration.rel_l1[..., upper].mean()
    assert 0.7 < ratio.item() < 1.3  # an estimate of the same quantity


def test_bad_input_is_refused(model):
    scheduler = TINY_MODELS[NAME].scheduler()
    with pytest.raises(RuntimeError, match="saw no complete 6-step generation"):
        calibrate_transformer(model, lambda: None, STEPS, scheduler=scheduler, progress=False)
    with pytest.raises(ValueError, match="num_steps must be positive"):
        calibrate_transformer(model, lambda: None, 0, scheduler=scheduler, progress=False)
    with cachekit.cached(model, cachekit.Schedule.full(model, STEPS), scheduler=scheduler):
        with pytest.raises(RuntimeError, match="call cachekit.disable before calibrating"):
            calibrate_transformer(model, lambda: None, STEPS, scheduler=scheduler, progress=False)
    with pytest.raises(ValueError, match="at least one prompt"):
        calibrate(object(), [], STEPS)


# ---------------------------------------------------------------------------------------------------------- pipeline
PIPE_SETTINGS = {"height": 16, "width": 16, "max_sequence_length": 16, "use_resolution_binning": False,
                 "clean_caption": False, "guidance_scale": 4.0}


def test_calibrate_a_stock_pipeline():
    pipe = tiny_pixart_pipeline()
    calib = calibrate(pipe, ["a handwritten 3", "the digit seven", "number 5"], 4, batch_size=2, progress=False,
                      **PIPE_SETTINGS)
    assert calib.num_samples == 3 * 2  # three prompts, each a conditional and an unconditional CFG row
    assert calib.meta["prompts"] == ["a handwritten 3", "the digit seven", "number 5"]
    assert calib.meta["batch_size"] == 2 and calib.meta["call_kwargs"]["height"] == 16
    assert calib.meta["scheduler"] == "DPMSolverMultistepScheduler"
    assert calib.meta["mac_rows"] == 4  # MACs counted on the first forward: two prompts, two CFG rows each
    per_unit, total = calib.unit_costs("macs")
    assert torch.all(per_unit > 0) and per_unit.sum() < total
    assert torch.all(calib.rel_l1[..., 0, 3] > 0) and session_of(pipe.transformer) is None
    with pytest.raises(ValueError, match="'output_type'\] are set by the call itself"):
        calibrate(pipe, ["a 3"], 4, output_type="pil")


# ---------------------------------------------------------------------------------------------------------- CLI
def _parser():
    import argparse

    from cachekit.search.cli import add_parser

    root = argparse.ArgumentParser(prog="cachekit")
    add_parser(root.add_subparsers(dest="command", required=True))
    return root


def test_cli_calibrate_on_a_pipeline_folder(tmp_path, capsys):
    from cachekit.zoo import train_digits as td

    pipe = tiny_pixart_pipeline()
    folder = tmp_path / "tiny-pixart"
    td.save_pipeline(folder, pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.transformer)
    out = tmp_path / "calib.pt"
    settings = [f"--pipeline-arg={k}={json.dumps(v)}" for k, v in PIPE_SETTINGS.items() if k != "guidance_scale"]
    args = _parser().parse_args(["calibrate", "--model", str(folder), "--steps", "3", "--num", "2",
                                 "--guidance-scale", "2.5", *settings, "--out", str(out)])
    assert args.handler(args) == 0
    calib = Calibration.load(out)
    assert calib.num_steps == 3 and calib.num_samples == 4 and len(calib.meta["prompts"]) == 2
    assert calib.meta["call_kwargs"]["guidance_scale"] == 2.5 and calib.meta["model"] == str(folder)
    assert f"wrote {out} (+ {out}.json)" in capsys.readouterr().out


def test_cli_calibrate_errors(tmp_path, capsys):
    args = _parser().parse_args(["calibrate", "--model", str(tmp_path / "missing"), "--pipeline-arg", "height",
                                 "--out", str(tmp_path / "c.pt")])
    with pytest.raises(ValueError, match="--pipeline-arg expects KEY=VALUE, got 'height'"):
        args.handler(args)
    for bad in (["--num", "0"], ["--steps", "-3"], ["--mode", "layer"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(["calibrate", "--out", "c.pt", *bad])
    assert "must be a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse_args(["calibrate", "--help"])
    assert "1 - cosine" in capsys.readouterr().out
