"""CLIP score with the bundled digits CLIP on real held-out digits, and the errors for CLIPs that are not here."""

from __future__ import annotations

import pytest
import torch

from cachekit.eval.clip_models import load_clip_model
from cachekit.eval.clip_score import CLIPScore
from cachekit.eval.weights import MissingWeightsError
from cachekit.zoo.digits_data import caption_for, load_split


@pytest.fixture(scope="module")
def digits_clip():
    return load_clip_model("digits")


@pytest.fixture(scope="module")
def heldout():
    images, labels = load_split("heldout")
    return images[:60], labels[:60]


def test_matching_captions_score_higher_than_mismatched(digits_clip, heldout):
    images, labels = heldout
    matching, mismatched = CLIPScore(digits_clip), CLIPScore(digits_clip)
    matching.update(images, [caption_for(int(y), i) for i, y in enumerate(labels)])
    mismatched.update(images, [caption_for((int(y) + 1 + i % 9) % 10, i) for i, y in enumerate(labels)])
    good, bad = float(matching.compute()), float(mismatched.compute())
    print(f"digits CLIP score: matching {good:.2f}, mismatched {bad:.2f}")
    assert good > bad + 20
    assert 0 <= bad and good <= 100


def test_score_is_mean_of_clamped_per_image_scores(digits_clip, heldout):
    images, labels = heldout
    prompts = [caption_for(int(y)) for y in labels[:10]]
    per_image = CLIPScore(digits_clip).per_image(images[:10], prompts)
    assert (per_image >= 0).all()
    metric = CLIPScore(digits_clip)
    metric.update(images[:4], prompts[:4])  # accumulation over batches = mean over all images
    metric.update(images[4:10], prompts[4:10])
    assert float(metric.compute()) == pytest.approx(float(per_image.mean()), rel=1e-5)
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"), pytest.raises(RuntimeError, match="no images"):
        metric.compute()


def test_report_info_names_weights_and_hash(digits_clip):
    info = CLIPScore(digits_clip).info()
    assert info["weights"].endswith(".safetensors") and len(info["sha256"]) == 64
    assert "max(100*cos, 0)" in info["convention"]


def test_prompt_count_must_match(digits_clip, heldout):
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        CLIPScore(digits_clip).update(heldout[0][:3], ["a", "b"])


def test_missing_clip_weights_are_clear_errors(tmp_path, monkeypatch):
    import cachekit.eval.clip_models as cm

    monkeypatch.setattr(cm, "CLIP_CACHE_DIR", tmp_path)  # an empty cache folder
    with pytest.raises(MissingWeightsError) as e:
        load_clip_model("ViT-B-32")
    assert str(tmp_path / "ViT-B-32.pt") in str(e.value) and "openaipublic" in str(e.value)
    with pytest.raises(MissingWeightsError, match="does not exist"):
        load_clip_model("ViT-L-14", weights=tmp_path / "ViT-L-14.pt")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        load_clip_model("ViT-Q-99")


def test_local_open_clip_checkpoint_loads(tmp_path, digits_clip):
    """A CLIP given as architecture + local state-dict file goes through open_clip's file loading (no network)."""
    from cachekit.zoo import register_clip

    arch = register_clip()
    torch.save(digits_clip.model.state_dict(), tmp_path / "digits.pt")
    bundle = load_clip_model(arch, weights=tmp_path / "digits.pt")
    assert bundle.weights == str(tmp_path / "digits.pt") and len(bundle.sha256) == 64
    x = load_split("heldout")[0][:2]
    a = CLIPScore(bundle).per_image(x, ["digit 0", "digit 0"])
    b = CLIPScore(digits_clip).per_image(x, ["digit 0", "digit 0"])
    assert torch.allclose(a, b, atol=1e-4)
