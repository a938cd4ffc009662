"""Latency bookkeeping (median/IQR, per image/step, warm-up and round-robin order) and counted MACs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cachekit.eval.latency import (
    LatencyStats,
    count_call_macs,
    macs_available,
    measure_interleaved,
    measure_latency,
    paired_speedup,
)


def test_statistics_per_image_and_per_step():
    s = LatencyStats([4.0, 1.0, 3.0, 2.0, 10.0], batch_size=2, num_steps=5, warmup=1, timer="perf_counter")
    assert s.median_s == 3.0
    assert s.iqr_s == pytest.approx(2.0)  # inclusive quartiles of 1,2,3,4,10: 2 and 4
    assert s.per_image_s == 1.5 and s.per_step_s == pytest.approx(0.3)
    d = s.to_dict()
    assert d["samples_s"] == [4.0, 1.0, 3.0, 2.0, 10.0] and d["per_image_iqr_s"] == pytest.approx(1.0)
    assert LatencyStats([2.0], 1, 1, 0, "perf_counter").iqr_s == 0.0


def test_warmup_then_round_robin_repeats():
    calls: list[str] = []
    fns = {"uncached": lambda: calls.append("u"), "cached": lambda: calls.append("c")}
    stats = measure_interleaved(fns, batch_size=1, num_steps=1, warmup=2, repeats=3, progress=False)
    assert calls == ["u", "u", "c", "c"] + ["u", "c"] * 3
    assert all(len(s.samples_s) == 3 and s.warmup == 2 and s.timer == "perf_counter" for s in stats.values())
    assert all(x >= 0 for s in stats.values() for x in s.samples_s)
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(lambda: None, batch_size=1, num_steps=1, repeats=0)


def test_setups_wrap_every_call_of_their_configuration_outside_the_timer():
    import contextlib

    events: list[str] = []

    @contextlib.contextmanager
    def applied():
        events.append("enable")
        yield
        events.append("disable")

    fns = {"uncached": lambda: events.append("u"), "cached": lambda: events.append("c")}
    measure_interleaved(fns, batch_size=1, num_steps=1, warmup=1, repeats=2, progress=False,
                        setups={"cached": applied})
    assert events == ["u", "enable", "c", "disable"] + ["u", "enable", "c", "disable"] * 2


def test_paired_speedup_cancels_a_machine_that_changes_speed_between_rounds():
    # the machine runs at 1x, then 2x slower, then 1x: the cached call is always half the uncached one
    uncached = {"samples_s": [1.0, 2.0, 1.0]}
    cached = {"samples_s": [0.5, 1.0, 0.5]}
    assert paired_speedup(uncached, cached) == 2.0
    assert paired_speedup(uncached, uncached) == 1.0
    assert paired_speedup({"samples_s": [1.0, 3.0]}, {"samples_s": [1.0]}) == 2.0  # unpaired: ratio of medians


def test_macs_are_counted_by_the_core_counter():
    assert macs_available()
    layer = nn.Linear(8, 4, bias=False)
    x = torch.randn(3, 8)
    assert count_call_macs(lambda: layer(x)) == 3 * 8 * 4
