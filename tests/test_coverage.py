"""The coverage table: every transformer class of the installed diffusers is supported or has a reason.

A diffusers upgrade that adds a transformer class fails `test_every_installed_class_is_classified` until someone
decides: a registry entry plus a tiny config, or a line in `registry.NOT_SUPPORTED` saying why not.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import cachekit.coverage as cov
from cachekit.cli import main
from cachekit.registry import COVERAGE_SPECS, NOT_SUPPORTED, supported_models
from tiny_models import CORE_MODELS, TINY_MODELS, tiny_auraflow_pipeline, tiny_chroma_pipeline, tiny_ltx_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows() -> list[cov.CoverageRow]:
    return cov.coverage()


def test_every_installed_class_is_classified(rows):
    assert cov.unclassified(rows) == [], "new diffusers transformer classes: register them or say why not " \
                                         "in cachekit.registry.NOT_SUPPORTED"


def test_reasons_and_entries_do_not_contradict_or_go_stale(rows):
    installed = {r.class_name for r in rows}
    assert not set(NOT_SUPPORTED) & set(supported_models())
    assert set(NOT_SUPPORTED) <= installed, "reasons for classes this diffusers no longer has"
    assert set(TINY_MODELS) <= installed  # (other tests register look-alike classes for a while)
    assert all(reason.strip() for reason in NOT_SUPPORTED.values())


def test_at_least_forty_supported_classes_each_with_a_tiny_model(rows):
    supported = [r.class_name for r in rows if r.supported]
    assert len(supported) >= 40
    assert set(supported) <= set(TINY_MODELS)  # so every technique runs over each (test_techniques, test_core_hooks)
    assert {s.class_name for s in COVERAGE_SPECS} == set(TINY_MODELS) - set(CORE_MODELS)


def test_the_table_names_what_tests_each_class_and_the_pipeline_tests_exist(rows):
    for row in rows:
        assert (row.tests != "") == row.supported and (row.reason != "") != row.supported
    for name, pipeline in cov.PIPELINE_TESTS.items():
        assert name in supported_models()
        assert pipeline.split()[0] in {r.__name__ for r in _stock_pipelines()}


def _stock_pipelines():
    import diffusers

    return [getattr(diffusers, name) for name in ("PixArtAlphaPipeline", "WanPipeline", "StableDiffusion3Pipeline",
                                                  "SanaPipeline", "FluxPipeline", "AuraFlowPipeline", "ChromaPipeline",
                                                  "LTXPipeline")]


def test_docs_models_md_is_generated_from_the_registry(rows):
    spec = importlib.util.spec_from_file_location("write_models_doc", ROOT / "scripts" / "write_models_doc.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert (ROOT / "docs" / "models.md").read_text() == script.render(), \
        "docs/models.md is out of date: run python scripts/write_models_doc.py"


def test_cachekit_models_lists_every_class(capsys, rows):
    assert main(["models", "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["class_name"] for r in listed] == [r.class_name for r in rows]
    assert main(["models", "--unsupported"]) == 0
    out = capsys.readouterr().out
    assert "not supported: audio-only" in out and "PixArtTransformer2DModel" not in out


def test_cachekit_models_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as done:
        main(["models", "--help"])
    assert done.value.code == 0 and "ModelMixin" in capsys.readouterr().out
    assert main(["models", "--supported", "--unsupported"]) == 2


def test_every_entry_maps_to_a_cache_dit_forward_pattern():
    """cache-dit's DBCache falls back to a BlockAdapter built from the registry entry (eval/peers/cachedit.py); its
    forward patterns cover blocks returning hidden_states, (encoder, hidden) or (hidden, encoder)."""
    from cachekit.registry import spec_for

    patterns = {("hidden_states",), ("encoder_hidden_states", "hidden_states"),
                ("hidden_states", "encoder_hidden_states")}
    for name in supported_models():
        assert {g.residual_outputs for g in spec_for(name).groups} <= patterns, name


@pytest.mark.parametrize("build, cfg_forwards, size", [
    (tiny_auraflow_pipeline, "batched", {"height": 16, "width": 16}),
    (tiny_chroma_pipeline, "two unnamed calls", {"height": 16, "width": 16}),
    (tiny_ltx_pipeline, "batched", {"height": 32, "width": 32, "num_frames": 5}),
], ids=["AuraFlow", "Chroma", "LTX-Video"])
def test_a_coverage_family_through_its_stock_pipeline_call(build, cfg_forwards, size):
    """A coverage family through its stock pipeline's `__call__` with CFG: steps are tracked from the stock call's
    timesteps (nothing reused is bit-exact, FORA reuses), the two CFG branches hold caches of their own whether they
    ride in one batch (AuraFlow, LTX-Video) or come as two unnamed transformer calls per step (Chroma), and the
    caches are freed."""
    import torch

    import cachekit

    pipe = build()
    steps = 6
    forwards = []
    pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(
        (args[0] if args else kwargs["hidden_states"]).shape[0]), with_kwargs=True)
    live_keys = []

    def count_keys(pipe, step, timestep, callback_kwargs):
        live_keys.append(len(cachekit.sessions(pipe.transformer)[0].cached_keys()))
        return callback_kwargs

    def call(guidance_scale=3.0, **extra):
        out = pipe(prompt="a seven", negative_prompt="blurry", num_inference_steps=steps,
                   guidance_scale=guidance_scale, max_sequence_length=16, output_type="pt",
                   generator=torch.Generator().manual_seed(0), **size, **extra)
        return out.frames if "num_frames" in size else out.images

    reference = call()
    assert forwards == ([2] * steps if cfg_forwards == "batched" else [1] * (2 * steps))
    with cachekit.cached(pipe.transformer, "fora:interval=1", scheduler=pipe.scheduler):
        exact = call()
    assert torch.equal(exact, reference)
    with cachekit.cached(pipe.transformer, "fora:interval=2", scheduler=pipe.scheduler):
        reused = call(callback_on_step_end=count_keys)
        call(guidance_scale=1.0, callback_on_step_end=count_keys)  # no CFG: one branch
        session = cachekit.sessions(pipe.transformer)[0]
        assert session.stats.reused > 0 and session.cached_entries == 0  # freed after the last step
    assert cachekit.sessions(pipe.transformer) == []
    # after each step but the last (whose end frees them): one cache key per branch, two with CFG, one without
    assert live_keys[: steps - 1] == [2] * (steps - 1) and live_keys[steps: 2 * steps - 1] == [1] * (steps - 1)
    assert torch.isfinite(reused).all() and not torch.equal(reused, reference)


@pytest.mark.parametrize("build, size", [
    (tiny_auraflow_pipeline, {"height": 16, "width": 16}),
    (tiny_chroma_pipeline, {"height": 16, "width": 16}),
    (tiny_ltx_pipeline, {"height": 32, "width": 32, "num_frames": 5}),
], ids=["AuraFlow", "Chroma", "LTX-Video"])
def test_the_bench_peers_act_on_coverage_families_or_say_why(build, size):
    """Every peer of `cachekit bench` (diffusers' caches, cache-dit) over a coverage family's stock pipeline, at its
    first sweep value: it measurably skips work, or its row says why not (a block diffusers' registry lacks, CFG as
    two calls for FasterCache, too few blocks for DBCache, ...). Nothing raises."""
    from cachekit.eval.peers import PEERS, PipelineCall, run_peers

    pipe = build()
    call = PipelineCall(["a seven", "a two"], num_inference_steps=6,
                        kwargs={"guidance_scale": 3.0, "max_sequence_length": 16, **size})
    rows = run_peers(pipe, call, knobs={peer.name: peer.sweep[:1] for peer in PEERS}, progress=False)
    assert [row.peer for row in rows] == [peer.name for peer in PEERS]
    for row in rows:
        if row.status == "acted":
            assert row.work.skipped_linear_calls > 0, row.peer
        else:
            assert row.status in {"cannot-act", "no-skip", "unavailable"} and row.reason, (row.peer, row.status)
    assert sum(row.status == "acted" for row in rows) >= 2
