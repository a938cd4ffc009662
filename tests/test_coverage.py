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
from stock_pipelines import CASES as STOCK_CASES
from test_stock_pipelines import STOCK_CASES as ALL_STOCK_CASES
from tiny_models import CORE_MODELS, TINY_MODELS

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
    import diffusers

    for row in rows:
        assert (row.tests != "") == row.supported and (row.reason != "") != row.supported
    for name, pipeline in cov.PIPELINE_TESTS.items():
        assert name in supported_models() and hasattr(diffusers, pipeline.split()[0])
    # every other class in the table has a case in tests/test_stock_pipelines.py (which checks the pairing)
    tested_elsewhere = {"PixArtTransformer2DModel", "WanTransformer3DModel",  # the bundled models' tests
                        "SD3Transformer2DModel", "SanaTransformer2DModel", "FluxTransformer2DModel"}  # runner families
    assert len(set(cov.PIPELINE_TESTS) - tested_elsewhere) == len(ALL_STOCK_CASES)


def test_docs_models_md_is_generated_from_the_registry(rows):
    spec = importlib.util.spec_from_file_location("write_models_doc", ROOT / "scripts" / "write_models_doc.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert (ROOT / "docs" / "models.md").read_text() == script.render(), \
        "docs/models.md is out of date: run python scripts/write_models_doc.py"


def test_the_readme_models_table_is_generated_from_the_registry(rows):
    readme = (ROOT / "README.md").read_text()
    assert cov.compact_markdown(rows) in readme, \
        "README's supported-models table is out of date: paste python scripts/write_models_doc.py --readme"
    assert all(r.stock_pipeline for r in rows if r.supported)  # each supported class has a stock-pipeline test


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


# the prompted transformer pipelines (a peer call passes prompts; over the Kandinsky prior every peer says it has no
# `transformer`)
PEER_CASES = [case for case in STOCK_CASES if case.denoiser == "transformer" and "prompt" in case.inputs]


@pytest.mark.parametrize("case", PEER_CASES, ids=[case.family for case in PEER_CASES])
def test_the_bench_peers_act_on_coverage_families_or_say_why(case):
    """Every peer of `cachekit bench` (diffusers' caches, cache-dit) over a coverage family's stock pipeline, at its
    first sweep value: it measurably skips work, or its row says why not (a block diffusers' registry lacks, CFG as
    two calls for FasterCache, too few blocks for DBCache, ...). Nothing raises."""
    from cachekit.eval.peers import PEERS, PipelineCall, run_peers

    pipe = case.build()
    cfg = {key: value for key, value in case.cfg.items() if key != "negative_prompt"}
    call = PipelineCall(["a seven", "a two"], num_inference_steps=6, kwargs={**cfg, **case.kwargs})
    rows = run_peers(pipe, call, knobs={peer.name: peer.sweep[:1] for peer in PEERS}, progress=False)
    assert [row.peer for row in rows] == [peer.name for peer in PEERS]
    for row in rows:
        if row.status == "acted":
            assert row.work.skipped_linear_calls > 0, row.peer
        else:
            assert row.status in {"cannot-act", "no-skip", "unavailable"} and row.reason, (row.peer, row.status)
    assert sum(row.status == "acted" for row in rows) >= 2
