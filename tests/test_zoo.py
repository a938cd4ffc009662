"""The embedded digits models: data split, offline loading through the stock loaders, real outputs, clear errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from cachekit.zoo import (
    DIGITS_CLIP_NAME,
    DIGITS_DEFAULTS,
    ModelNotFoundError,
    clip_checkpoint,
    clip_path,
    load_clip,
    load_pipeline,
    pipeline_path,
    register_clip,
)
from cachekit.zoo import digits_data
from cachekit.zoo.digits_data import TEMPLATES, caption_for, digit_prompts, load_split


# ---------------------------------------------------------------------------------------------------------- data
def test_split_is_deterministic_disjoint_and_holds_out_20_percent():
    images, labels = digits_data._raw_digits()
    train_idx, held_idx = digits_data._split_indices(labels)
    train_idx2, held_idx2 = digits_data._split_indices(labels)
    assert torch.equal(train_idx, train_idx2) and torch.equal(held_idx, held_idx2)
    assert not set(train_idx.tolist()) & set(held_idx.tolist())
    assert len(train_idx) + len(held_idx) == len(labels) == 1797
    assert len(held_idx) >= 0.2 * len(labels)
    assert torch.bincount(labels[held_idx], minlength=10).min() >= 35  # stratified

    x1, y1 = load_split("heldout")
    x2, y2 = load_split("heldout")
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.dtype == torch.uint8 and x1.shape == (len(held_idx), 3, 16, 16)
    assert int(x1.max()) == 255 and int(x1.min()) == 0
    with pytest.raises(ValueError):
        load_split("test")


def test_captions_name_the_digit_in_several_phrasings():
    for d in range(10):
        caps = {caption_for(d, t) for t in range(len(TEMPLATES))}
        assert len(caps) == len(TEMPLATES) >= 5
        assert all(str(d) in c or digits_data.NUMBER_WORDS[d] in c for c in caps)
    prompts = digit_prompts(40, seed=3)
    assert prompts == digit_prompts(40, seed=3)
    assert [l for _, l in prompts] == [i % 10 for i in range(40)]
    assert len({p for p, _ in prompts}) > 20
    assert prompts != digit_prompts(40, seed=4)


# ---------------------------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def stock_pipe():
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(str(pipeline_path("digits")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_stock_pixart_pipeline_loads_offline_and_generates(stock_pipe):
    pipe = stock_pipe
    assert type(pipe.transformer).__name__ == "PixArtTransformer2DModel"
    assert len(pipe.transformer.transformer_blocks) >= 12
    assert pipe.transformer.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    assert pipe.scheduler.config.beta_schedule == "linear"
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    settings = {**DIGITS_DEFAULTS, "num_inference_steps": 4}
    gen = [torch.Generator().manual_seed(i) for i in range(2)]
    out = pipe(["a handwritten 3", "the digit seven"], generator=gen, output_type="pt", **settings).images
    assert out.shape == (2, 3, 16, 16)
    assert torch.isfinite(out).all()
    assert out.std() > 0.05  # not a constant image


def test_pipeline_default_sequence_length_gives_the_same_images(stock_pipe):
    # The pipeline pads prompts to 120 tokens by default; masking makes that equal to the recommended 16.
    settings = {**DIGITS_DEFAULTS, "num_inference_steps": 2}
    a = stock_pipe("number 5", generator=torch.Generator().manual_seed(0), output_type="pt", **settings).images
    settings["max_sequence_length"] = 120
    b = stock_pipe("number 5", generator=torch.Generator().manual_seed(0), output_type="pt", **settings).images
    assert torch.allclose(a, b, atol=1e-4)


def test_load_pipeline_returns_stock_pipeline():
    from diffusers import PixArtAlphaPipeline

    pipe = load_pipeline("digits")
    assert type(pipe) is PixArtAlphaPipeline
    pipe16 = load_pipeline(str(pipeline_path("digits")), torch_dtype=torch.bfloat16)
    assert pipe16.transformer.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["/nonexistent/cachekit-model", "nobody/not-a-cached-model"])
def test_missing_model_is_a_one_line_error(name):
    with pytest.raises(ModelNotFoundError) as exc:
        load_pipeline(name)
    msg = str(exc.value)
    assert "\n" not in msg and "not found" in msg and "local diffusers folder" in msg and name in msg


def test_folder_without_weights_is_a_clear_error(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_pipeline(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------- CLIP
def _rank_first_share(model, preprocess, tokenizer, n=20):
    from PIL import Image

    images, labels = load_split("heldout")
    idx = torch.linspace(0, len(labels) - 1, n).long()
    x = torch.stack([preprocess(Image.fromarray(images[i].permute(1, 2, 0).numpy())) for i in idx])
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer([caption_for(d, 0) for d in range(10)])),
                                            dim=-1)
    return float(((img @ txt.T).argmax(1) == labels[idx]).float().mean())


def test_digits_clip_loads_through_open_clip_and_ranks_right_caption_first():
    import open_clip

    name = register_clip()
    assert name == DIGITS_CLIP_NAME and name in open_clip.list_models()
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(clip_checkpoint()))
    tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    assert _rank_first_share(model, preprocess, tokenizer) >= 0.8


def test_digits_clip_as_local_dir_and_via_load_clip_agree():
    import open_clip

    spec = f"local-dir:{clip_path('digits')}"
    m1, _, pre1 = open_clip.create_model_and_transforms(spec)
    tok1 = open_clip.get_tokenizer(spec)
    m2, pre2, tok2 = load_clip("digits")
    ids = tok1(["a handwritten 7", "digit 0"])
    assert torch.equal(ids, tok2(["a handwritten 7", "digit 0"]))
    with torch.no_grad():
        assert torch.allclose(m1.eval().encode_text(ids), m2.encode_text(ids), atol=1e-5)
    with pytest.raises(ModelNotFoundError):
        load_clip("/nonexistent/clip")
