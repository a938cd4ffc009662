"""PSNR/SSIM against a baseline, and the clear errors for LPIPS / ImageReward weights that are not on the machine."""

from __future__ import annotations

import math

import pytest
import torch

from cachekit.eval.fidelity import LPIPS, PSNR, SSIM, lpips_backbone_file
from cachekit.eval.image_reward import ImageRewardScore
from cachekit.eval.weights import MissingWeightsError
from cachekit.zoo.digits_data import load_split


@pytest.fixture(scope="module")
def digits():
    return load_split("heldout")[0][:8]


def _perturbed(x: torch.Tensor, amount: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(-amount, amount + 1, x.shape, generator=g)
    return (x.int() + noise).clamp(0, 255).to(torch.uint8)


def test_psnr_orders_perturbations_and_matches_per_image_formula(digits):
    small, large = PSNR(), PSNR()
    small.update(_perturbed(digits, 4), digits)
    large.update(_perturbed(digits, 40), digits)
    assert float(small.compute()) > float(large.compute()) > 0
    y = _perturbed(digits, 4)
    mse = ((y.double() - digits.double()) ** 2).flatten(1).mean(1)
    expected = (10 * torch.log10(255.0**2 / mse)).mean()
    check = PSNR()
    check.update(y[:3], digits[:3])  # two batches: still the mean of per-image PSNRs
    check.update(y[3:], digits[3:])
    assert float(check.compute()) == pytest.approx(float(expected), rel=1e-5)


def test_identical_images_have_infinite_psnr_and_unit_ssim(digits):
    p, s = PSNR(), SSIM()
    p.update(digits, digits)
    s.update(digits, digits)
    assert math.isinf(float(p.compute()))
    assert float(s.compute()) == pytest.approx(1.0, abs=1e-6)
    worse = SSIM()
    worse.update(_perturbed(digits, 40), digits)
    assert float(worse.compute()) < 0.9


def test_shape_and_size_errors(digits):
    with pytest.raises(ValueError, match="differ in shape"):
        PSNR().update(digits[:2], digits[:3])
    tiny = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="at least 11x11"):
        SSIM().update(tiny, tiny)


def test_lpips_without_local_backbone_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url, path = lpips_backbone_file("alex")
    assert str(path).startswith(str(tmp_path)) and path.name == "alexnet-owt-7be5be79.pth"
    with pytest.raises(MissingWeightsError) as e:
        LPIPS("alex")
    assert str(path) in str(e.value) and url in str(e.value) and "never" in str(e.value)
    with pytest.raises(ValueError, match="net_type"):
        LPIPS("resnet")


def test_image_reward_is_optional_with_a_clear_error(tmp_path):
    # ImageReward is never required: without the package, or without its weights, the error says what to do
    try:
        import ImageReward  # noqa: F401
    except ImportError:
        with pytest.raises(MissingWeightsError, match="pip install image-reward"):
            ImageRewardScore()
    else:  # package present: weights must be local
        with pytest.raises(MissingWeightsError, match="ImageReward.pt"):
            ImageRewardScore(weights_dir=tmp_path)
