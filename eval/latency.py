"""Latency and compute cost of a pipeline call, measured, never assumed.

A caching schedule is only worth its quality loss if it is faster, and "faster" only means something against the
uncached model timed in the same process, on the same batch, at the same time. So timing always comes in groups
(`measure_interleaved`): warm-up calls first, then repeats that alternate between the configurations so that drift
(thermal, other load) hits all of them alike. GPU time uses CUDA events; CPU time uses `perf_counter`.
MACs come from the core's `cachekit.cost.count_macs()` when it is available.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, ContextManager

import torch
from tqdm.auto import tqdm

__all__ = [
    "LatencyStats",
    "time_call",
    "measure_latency",
    "measure_interleaved",
    "count_call_macs",
    "macs_available",
]


@dataclass
class LatencyStats:
    """Seconds per call over repeats: median and interquartile range, also per image and per denoising step."""

    samples_s: list[float]
    batch_size: int
    num_steps: int
    warmup: int
    timer: str

    @property
    def median_s(self) -> float:
        """Median seconds per call (robust to the odd slow repeat)."""
        return float(statistics.median(self.samples_s))

    @property
    def iqr_s(self) -> float:
        """Interquartile range of seconds per call (0 with fewer than 2 samples)."""
        if len(self.samples_s) < 2:
            return 0.0
        q = statistics.quantiles(self.samples_s, n=4, method="inclusive")
        return float(q[2] - q[0])

    @property
    def per_image_s(self) -> float:
        """Median seconds per image."""
        return self.median_s / self.batch_size

    @property
    def per_step_s(self) -> float:
        """Median seconds per image per denoising step."""
        return self.per_image_s / self.num_steps

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (raw samples included so anyone can recompute other statistics)."""
        d = asdict(self)
        d.update(median_s=self.median_s, iqr_s=self.iqr_s, per_image_s=self.per_image_s,
                 per_image_iqr_s=self.iqr_s / self.batch_size, per_step_s=self.per_step_s)
        return d


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Wall time of one call in seconds: CUDA events (after a synchronise) on GPU, `perf_counter` elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        _sync(device)
        return start.elapsed_time(end) / 1000.0
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _timer_name(device: torch.device) -> str:
    return "cuda-events" if device.type == "cuda" else "perf_counter"


def measure_latency(
    fn: Callable[[], Any],
    *,
    batch_size: int,
    num_steps: int,
    warmup: int = 1,
    repeats: int = 3,
    device: torch.device | str = "cpu",
) -> LatencyStats:
    """Time `fn` `repeats` times after `warmup` untimed calls (first calls pay for allocation, compilation, caches)."""
    return measure_interleaved({"_": fn}, batch_size=batch_size, num_steps=num_steps, warmup=warmup,
                               repeats=repeats, device=device, progress=False)["_"]


def measure_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    batch_size: int,
    num_steps: int,
    warmup: int = 1,
    repeats: int = 3,
    device: torch.device | str = "cpu",
    progress: bool = True,
    setups: dict[str, Callable[[], ContextManager[Any]]] | None = None,
) -> dict[str, LatencyStats]:
    """Time several configurations fairly: each warmed up, then repeats in round-robin order (A B C A B C ...).

    `setups[name]()` is a context entered around each of that configuration's calls but outside the timed region:
    applying a cache to a shared pipeline (`cachekit.cached`), which a deployment does once, not per call.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    device = torch.device(device)
    setups = setups or {}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    total = len(fns) * (warmup + repeats)
    with tqdm(total=total, desc="latency", disable=not progress, leave=False) as bar:
        for name, fn in fns.items():
            for _ in range(warmup):
                with setups.get(name, contextlib.nullcontext)():
                    fn()
                bar.update()
        for _ in range(repeats):
            for name, fn in fns.items():
                with setups.get(name, contextlib.nullcontext)():
                    samples[name].append(time_call(fn, device))
                bar.update()
    return {k: LatencyStats(v, batch_size, num_steps, warmup, _timer_name(device)) for k, v in samples.items()}


def paired_speedup(baseline: dict[str, Any], other: dict[str, Any]) -> float:
    """Speedup of `other` over `baseline` (`LatencyStats.to_dict()`s from one `measure_interleaved` run).

    The median over rounds of the per-round ratio: each round times every configuration back to back, so a machine
    that slows down for a while (shared and virtual CPUs do, by tens of percent) slows both sides of a ratio alike,
    where a ratio of medians would mix rounds taken at different speeds.
    """
    base, mine = baseline["samples_s"], other["samples_s"]
    if len(base) != len(mine) or not base:
        return float(statistics.median(base) / statistics.median(mine))
    return float(statistics.median(b / m for b, m in zip(base, mine)))


def macs_available() -> bool:
    """Whether the core exposes `cachekit.cost.count_macs` (it is written separately from eval)."""
    try:
        from cachekit.cost import count_macs  # noqa: F401
    except ImportError:
        return False
    return True


def count_call_macs(fn: Callable[[], Any]) -> int | None:
    """MACs executed by one call of `fn`, counted by `cachekit.cost.count_macs()`; None if the core lacks it."""
    try:
        from cachekit.cost import count_macs
    except ImportError:
        return None
    with count_macs() as counter:
        fn()
    return int(counter.macs)
