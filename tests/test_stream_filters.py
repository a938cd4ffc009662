"""StreamDiffusion's similarity filter and residual CFG against the paper's formulas, on constructed frames."""

from __future__ import annotations

import math

import pytest
import torch

from cachekit.errors import UsageError
from cachekit.pipelines.stream_filters import SimilarityFilter, SimilarityFilterConfig, residual_cfg


def frame_at_cosine(base: torch.Tensor, cosine: float, seed: int = 1) -> torch.Tensor:
    """A frame whose cosine similarity to `base` is exactly `cosine` (same norm)."""
    u = base.flatten() / base.norm()
    v = torch.randn(u.shape, generator=torch.Generator().manual_seed(seed))
    v = v - (v @ u) * u
    v = v / v.norm()
    return ((cosine * u + math.sqrt(max(0.0, 1 - cosine**2)) * v) * base.norm()).reshape(base.shape)


BASE = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cosine", [0.5, 0.97, 0.985, 0.99, 0.995, 1.0])
def test_skip_probability_is_the_papers_formula(cosine):
    eta = 0.98
    expected = max(0.0, 1 - (1 - cosine) / (1 - eta))
    trials, skipped = 1500, 0
    for seed in range(trials):
        f = SimilarityFilter(SimilarityFilterConfig(eta=eta), seed=seed)
        assert f.should_skip(BASE) is False  # the first frame always goes through
        frame = frame_at_cosine(BASE, cosine)
        assert f.skip_probability(frame) == pytest.approx(expected, abs=1e-5)
        skipped += f.should_skip(frame)
    rate = skipped / trials
    sigma = math.sqrt(max(expected * (1 - expected), 1e-12) / trials)
    assert abs(rate - expected) <= 4 * sigma + 1e-9


def test_a_static_input_refreshes_after_max_skips():
    f = SimilarityFilter(SimilarityFilterConfig(eta=0.98, max_skips=10), seed=0)
    decisions = [f.should_skip(BASE) for _ in range(23)]
    assert decisions == [False] + [True] * 10 + [False] + [True] * 10 + [False]


def test_filter_settings_are_checked():
    with pytest.raises(UsageError, match="eta"):
        SimilarityFilterConfig(eta=1.0)
    with pytest.raises(UsageError, match="max_skips"):
        SimilarityFilterConfig(max_skips=-1)


def test_residual_cfg_against_a_hand_computation():
    cond = torch.tensor([2.0, -1.0, 0.5])
    stock = torch.tensor([1.0, 1.0, -2.0])
    # eps = delta * stock + g * (cond - delta * stock), with g = 3 and delta = 0.5, worked out by hand:
    # [0.5 + 3 * 1.5, 0.5 + 3 * -1.5, -1 + 3 * 1.5] = [5.0, -4.0, 3.5]
    assert torch.equal(residual_cfg(cond, stock, 3.0, delta=0.5), torch.tensor([5.0, -4.0, 3.5]))
    # with delta 1 and g 1 guidance is the conditional prediction itself
    assert torch.equal(residual_cfg(cond, stock, 1.0), cond)
