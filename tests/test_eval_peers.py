"""Peers (diffusers' caches and cache-dit) on a tiny stock PixArtAlphaPipeline and, if present, the digits model.

Each peer must really skip work on the model (fewer MACs and fewer block linear calls than the uncached call, measured),
keep the images finite, give the same images on every call while applied (the pipeline never resets cache state, the
peer adapter does), and leave the model computing exactly the uncached images once removed. Peers that cannot act
say why in their rows.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from cachekit.eval.peers import (
    PEERS,
    STEP_HOOK,
    PeerCannotAct,
    PeerCopy,
    PipelineCall,
    fresh_pipeline,
    get_peer,
    measure_work,
    run_peer,
    run_peers,
)

SETTINGS = {"height": 16, "width": 16, "max_sequence_length": 8, "use_resolution_binning": False,
            "clean_caption": False, "guidance_scale": 4.0}
WORDS = ["a", "the", "digit", "handwritten", "number", "three", "seven", "3", "7"]
DIGITS = Path(__file__).resolve().parents[1] / "cachekit" / "zoo" / "digits" / "model_index.json"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=16)


def tiny_pipeline(num_layers: int = 4, transformer_cls: type = PixArtTransformer2DModel) -> PixArtAlphaPipeline:
    """A stock PixArtAlphaPipeline (PixArt-alpha's learned-sigma transformer, T5, KL-VAE, DPM-Solver), built offline."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16).eval()
    transformer = transformer_cls(
        sample_size=8, num_layers=num_layers, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, cross_attention_dim=16, caption_channels=16, patch_size=2, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, use_additional_conditions=False).eval()
    with torch.no_grad():  # as tests/tiny_models.py: move every weight off its init so caching changes the output
        gen = torch.Generator().manual_seed(1)
        for param in transformer.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe() -> PixArtAlphaPipeline:
    return tiny_pipeline()


@pytest.fixture(scope="module")
def call() -> PipelineCall:
    return PipelineCall(["a handwritten 3", "the digit 7"], num_inference_steps=6, kwargs=SETTINGS)


@pytest.fixture(scope="module")
def baseline(pipe, call):
    return measure_work(pipe, call)


def _hooks_left(transformer: torch.nn.Module) -> list[str]:
    return [name for m in transformer.modules() for name in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})]


def test_baseline_counts_every_block(baseline, call):
    layers = 4
    assert baseline.transformer_calls == call.num_inference_steps  # PixArt batches CFG: one call per step
    assert baseline.block_calls == [call.num_inference_steps] * layers
    # per call and block: attn1 q,k,v,out + attn2 q,k,v,out + ff proj in, out
    assert baseline.block_linear_calls == [10 * call.num_inference_steps] * layers
    assert baseline.component_linear_calls == {"attn1": 24 * layers, "attn2": 24 * layers, "ff": 12 * layers}
    assert 0 < baseline.transformer_macs < baseline.total_macs
    assert baseline.images.shape == (2, 3, 16, 16) and baseline.mac_ratio is None


@pytest.mark.parametrize("peer", PEERS, ids=lambda p: p.name)
def test_peer_skips_work_and_removal_restores_uncached_output(peer, pipe, call, baseline):
    ok, why = peer.available()
    if not ok:
        pytest.skip(why)
    copy = fresh_pipeline(pipe)
    handle = peer.apply(copy, peer.sweep[-1], call)
    assert copy.transformer._diffusers_hook.get_hook(STEP_HOOK) is handle.step_hook

    work = measure_work(copy, call, baseline)
    assert work.mac_ratio < 1.0 and work.skipped_linear_calls > 0 and work.skipped_work
    assert torch.isfinite(work.images).all()
    assert not torch.equal(work.images, baseline.images)  # the skipped work was served from the cache
    # the stock pipeline never resets cache state between calls; the peer adapter does at step 0 of every call,
    # so neither a previous call nor a shorter one in between changes the images
    assert torch.equal(call(copy), work.images)
    call.replace(num_inference_steps=4)(copy)
    assert torch.equal(call(copy), work.images)
    with pytest.raises(RuntimeError, match="already applied"):
        peer.apply(copy, peer.sweep[0], call)
    with pytest.raises(ValueError, match="uncached pipeline"):
        fresh_pipeline(copy)

    handle.remove()
    assert not handle.active and _hooks_left(copy.transformer) == []
    assert copy.transformer.forward.__func__ is PixArtTransformer2DModel.forward
    assert torch.equal(call(copy), baseline.images)
    assert torch.equal(call(pipe), baseline.images)  # the original was never touched
    handle.remove()  # idempotent


def _transformers_alive() -> int:
    import gc

    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, PixArtTransformer2DModel))


def test_peers_take_turns_on_one_copy(pipe, call, baseline):
    """What the bench does: every peer applied around its own calls on one transformer copy, removed after each;
    each application gives the same images, and between applications the copy is exactly the uncached model."""
    alive = _transformers_alive()
    on = PeerCopy(pipe, call)
    assert _transformers_alive() == alive  # the copy is made when first used
    for peer in [peer for peer in PEERS if peer.available()[0]]:
        images = []
        for _ in range(2):
            with on.applied(peer, peer.sweep[-1]) as handle:
                assert on.pipe.transformer._diffusers_hook.get_hook(STEP_HOOK) is handle.step_hook
                images.append(call(on.pipe))
            assert _hooks_left(on.pipe.transformer) == []
            assert torch.equal(call(on.pipe), baseline.images)  # removed: the uncached model again
        assert torch.equal(images[0], images[1]) and not torch.equal(images[0], baseline.images), peer.name
    assert _transformers_alive() == alive + 1  # one copy for all peers, never one per peer
    del on, handle
    assert _transformers_alive() == alive


def test_what_a_peer_prepares_is_measured_once_per_copy(pipe, call):
    """MagCache's calibration (a whole pipeline call) runs once, not once per knob value or application."""
    magcache = get_peer("diffusers.magcache")
    on = PeerCopy(pipe, call)
    forwards = []
    on.pipe.transformer.register_forward_pre_hook(lambda module, args: forwards.append(1))
    ratios = []
    for knob in magcache.sweep[:2]:
        before = len(forwards)
        with on.applied(magcache, knob) as handle:
            call(on.pipe)
            ratios.append(handle.details["mag_ratios"])
        assert len(forwards) - before == (2 if knob == magcache.sweep[0] else 1) * call.num_inference_steps
    assert ratios[0] == ratios[1] and len(ratios[0]) == call.num_inference_steps


def test_a_peer_that_leaves_something_behind_gets_the_copy_renewed(pipe, call, baseline):
    pab = get_peer("diffusers.pab")
    on = PeerCopy(pipe, call)
    first = on.pipe.transformer
    with pytest.raises(RuntimeError, match="left hooks"):
        with on.applied(pab, 2) as handle:
            handle._undo.clear()  # a broken removal: the hooks stay
    assert on.pipe.transformer is not first and _hooks_left(on.pipe.transformer) == []
    assert torch.equal(call(on.pipe), baseline.images)


def test_run_peers_rows_are_measured_and_json(pipe, call, baseline):
    knobs = {peer.name: [peer.sweep[-1]] for peer in PEERS}
    rows = run_peers(pipe, call, knobs=knobs, baseline=baseline, progress=False)
    assert [row.peer for row in rows] == [peer.name for peer in PEERS]
    for row in rows:
        if row.status == "unavailable":
            continue
        assert row.status == "acted" and row.counts, (row.peer, row.reason)
        assert row.work.mac_ratio < 1 and "MAC ratio" in row.reason
        assert row.config["class"].endswith("Config")
    data = json.loads(json.dumps([row.as_dict() for row in rows]))
    magcache = next(r for r in data if r["peer"] == "diffusers.magcache")
    assert len(magcache["details"]["mag_ratios"]) == call.num_inference_steps  # calibrated on this very call
    assert data[0]["work"]["skipped_linear_calls"] > 0


def test_peers_that_cannot_act_say_why(call):
    one_block = tiny_pipeline(num_layers=1)
    rows = {row.peer: row for row in run_peers(one_block, call, progress=False)}
    for name in ("diffusers.fbcache", "diffusers.magcache"):
        assert rows[name].status == "cannot-act" and "at least two transformer blocks" in rows[name].reason
        assert rows[name].value is None and not rows[name].counts
    dbcache = rows["cache-dit.dbcache"]
    assert dbcache.status == "cannot-act" and "DBCache needs more than 1 blocks" in dbcache.reason
    assert rows["diffusers.pab"].status == "acted"  # attention-level peers still act on one block

    too_short = call.replace(num_inference_steps=3)
    row = run_peer(tiny_pipeline(), get_peer("diffusers.taylorseer"), 2, too_short)
    assert row.status == "cannot-act" and "TaylorSeer needs more than" in row.reason


def test_a_peer_whose_package_is_missing_reports_it(pipe, call, baseline):
    missing = dataclasses.replace(get_peer("cache-dit.dbcache"), requires=("cachekit_no_such_package:enable_cache",))
    ok, why = missing.available()
    assert not ok and "cachekit_no_such_package is not installed" in why and "pip install cache-dit" in why
    row = run_peer(pipe, missing, 0.12, call, baseline)
    assert row.status == "unavailable" and row.reason == why and row.work is None and not row.counts
    with pytest.raises(PeerCannotAct, match="not installed"):
        missing.apply(pipe, 0.12, call)

    too_old = dataclasses.replace(get_peer("diffusers.magcache"), requires=("diffusers.hooks:apply_no_such_cache",))
    rows = run_peers(pipe, call, peers=[too_old], baseline=baseline, progress=False)
    assert len(rows) == 1 and rows[0].status == "unavailable" and rows[0].value is None
    assert "has no apply_no_such_cache" in rows[0].reason


class FinetunedDiT(PixArtTransformer2DModel):
    """A user's subclass: cache-dit has no adapter registered for the name, cachekit's registry resolves the MRO."""


def test_cache_dit_uses_an_explicit_block_adapter_for_classes_it_does_not_know(pipe, call, baseline):
    custom = tiny_pipeline(transformer_cls=FinetunedDiT)
    custom.transformer.load_state_dict(pipe.transformer.state_dict())
    row = run_peer(custom, get_peer("cache-dit.dbcache"), 0.24, call, baseline)
    assert row.status == "acted", row.reason
    assert row.config["adapter"] == "explicit BlockAdapter from cachekit's registry"
    assert row.config["Fn_compute_blocks"] == 1 and row.config["Bn_compute_blocks"] == 0


def test_diffusers_peer_on_a_cache_mixin_model_keeps_the_pipeline_contexts():
    """Wan has CacheMixin and its pipeline calls the transformer once per CFG branch inside `cache_context(name)`:
    the peer goes through `enable_cache`, keeps one state per branch, and resets once per denoising run."""
    import types

    from tiny_models import TINY_MODELS, build, denoise

    from cachekit.cost import count_macs

    tiny = TINY_MODELS["WanTransformer3DModel"]
    model, scheduler = build("WanTransformer3DModel"), tiny.scheduler()
    loop = types.SimpleNamespace(transformer=model, scheduler=scheduler)  # the pipeline is tiny_models' own loop

    def run() -> torch.Tensor:
        return denoise(model, tiny, num_steps=6, branches=("cond", "uncond"), scheduler=scheduler)

    with count_macs() as uncached:
        reference = run()
    handle = get_peer("diffusers.fbcache").apply(loop, 0.2, PipelineCall(["unused"], 6))
    assert model.is_cache_enabled  # applied through CacheMixin.enable_cache
    with count_macs() as cached:
        first = run()
    assert cached.macs < uncached.macs and not torch.equal(first, reference)
    assert torch.equal(run(), first)
    handle.remove()
    assert not model.is_cache_enabled and _hooks_left(model) == []
    assert torch.equal(run(), reference)


def test_pipeline_call_validates():
    with pytest.raises(ValueError, match="set by the call itself"):
        PipelineCall(["a 3"], 4, kwargs={"output_type": "pil"})
    with pytest.raises(ValueError, match="num_inference_steps is 4, but kwargs say 20"):
        PipelineCall(["a 3"], 4, kwargs={"num_inference_steps": 20})
    with pytest.raises(ValueError, match="needs num_inference_steps >= 1"):
        PipelineCall(["a 3"], kwargs={"height": 16})
    from_kwargs = PipelineCall("a 3", kwargs={"num_inference_steps": 20, "height": 16})
    assert from_kwargs.num_inference_steps == 20 and from_kwargs.kwargs == {"height": 16}
    assert from_kwargs.prompts == ("a 3",) and from_kwargs.replace(num_inference_steps=6).num_inference_steps == 6
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        PipelineCall(["a 3"], 4, seeds=(0, 1))
    with pytest.raises(KeyError, match="no peer 'teacache'"):
        get_peer("teacache")


@pytest.mark.skipif(not DIGITS.is_file(), reason="the digits model is not trained yet")
def test_every_peer_acts_on_the_digits_model():
    from cachekit.zoo import DIGITS_DEFAULTS, load_pipeline

    digits = load_pipeline("digits")
    digits.set_progress_bar_config(disable=True)
    call = PipelineCall(["the digit 7"], kwargs=DIGITS_DEFAULTS).replace(num_inference_steps=8)
    base = measure_work(digits, call)
    assert base.block_linear_calls == [10 * 8] * 28
    rows = run_peers(digits, call, knobs={peer.name: [peer.sweep[-1]] for peer in PEERS}, baseline=base,
                     progress=False)
    for row in rows:
        if row.status == "unavailable":
            continue
        assert row.status == "acted", (row.peer, row.reason)
        assert row.work.mac_ratio < 1 and torch.isfinite(row.images).all()
