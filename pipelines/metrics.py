"""The runner's numbers: per-request records, `Runner.stats()`, and the same as Prometheus metrics.

Each runner has its own `prometheus_client.CollectorRegistry` (two runners in one process do not collide); the
server exposes it. Percentiles in `stats()` are over the last `window` finished requests.
"""

from __future__ import annotations

import collections
import statistics
import threading
import time
from typing import Any

from .requests import ServedRequest

__all__ = ["RunnerMetrics"]

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class RunnerMetrics:
    def __init__(self, max_batch: int, window: int = 1000) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.max_batch = max_batch
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._served: collections.deque[ServedRequest] = collections.deque(maxlen=window)
        self._frame_gaps: collections.deque[float] = collections.deque(maxlen=window)
        self._first_frames: collections.deque[float] = collections.deque(maxlen=window)
        self.counts = collections.Counter()
        self.forwards = 0
        self.rows_forwarded = 0
        self.frames = 0

        self.registry = CollectorRegistry()
        r = self.registry
        self.m_requests = Counter("cachekit_requests", "Requests by outcome", ["outcome"], registry=r)
        self.m_latency = Histogram("cachekit_request_latency_seconds", "Submit to image", buckets=_LATENCY_BUCKETS,
                                   registry=r)
        self.m_queue_wait = Histogram("cachekit_queue_wait_seconds", "Submit to admission", buckets=_LATENCY_BUCKETS,
                                      registry=r)
        self.m_first_step = Histogram("cachekit_time_to_first_step_seconds", "Submit to first denoising step",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.m_reused = Histogram("cachekit_reused_share", "Share of a request's hooked work served from cache",
                                  buckets=(0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1), registry=r)
        self.m_rows = Histogram("cachekit_batch_rows", "Rows per transformer forward",
                                buckets=tuple(sorted({1, 2, 4, 8, 16, 32, 64, 128, max_batch})), registry=r)
        self.m_degraded = Counter("cachekit_degraded_requests", "Requests served with a faster plan than asked",
                                  registry=r)
        self.m_deadline_missed = Counter("cachekit_deadline_missed", "Requests that finished after their deadline",
                                         registry=r)
        self.m_queue = Gauge("cachekit_queue_depth", "Requests waiting for admission", registry=r)
        self.m_active = Gauge("cachekit_active_requests", "Requests being denoised", registry=r)
        self.m_cached = Gauge("cachekit_cached_bytes", "Bytes held in request caches, as of the last request to leave",
                              registry=r)
        self.m_streams = Gauge("cachekit_open_streams", "Image and video streams open on the runner", registry=r)
        self.m_frames = Counter("cachekit_stream_frames", "Stream frames produced", registry=r)
        self.m_first_frame = Histogram("cachekit_stream_time_to_first_frame_seconds",
                                       "Video stream opened to its first frame sent", buckets=_LATENCY_BUCKETS,
                                       registry=r)
        self.m_frame_gap = Histogram("cachekit_stream_frame_gap_seconds", "Time between a stream's output frames",
                                     buckets=_LATENCY_BUCKETS, registry=r)

    # ------------------------------------------------------------------ recording
    def forward(self, rows: int) -> None:
        with self._lock:
            self.forwards += 1
            self.rows_forwarded += rows
        self.m_rows.observe(rows)

    def outcome(self, outcome: str) -> None:
        with self._lock:
            self.counts[outcome] += 1
        self.m_requests.labels(outcome).inc()

    def served(self, info: ServedRequest) -> None:
        with self._lock:
            self._served.append(info)
            self.counts["done"] += 1
        self.m_requests.labels("done").inc()
        self.m_latency.observe(info.latency_s)
        self.m_queue_wait.observe(info.queue_wait_s)
        self.m_first_step.observe(info.time_to_first_step_s)
        self.m_reused.observe(info.reused_share)
        if info.degraded:
            self.m_degraded.inc()
        if info.deadline_missed:
            self.m_deadline_missed.inc()

    def frame(self, gap_s: float | None) -> None:
        with self._lock:
            self.frames += 1
            if gap_s is not None:
                self._frame_gaps.append(gap_s)
        self.m_frames.inc()
        if gap_s is not None:
            self.m_frame_gap.observe(gap_s)

    def first_frame(self, seconds: float) -> None:
        """A video stream sent its first frame, `seconds` after it was opened."""
        with self._lock:
            self._first_frames.append(seconds)
        self.m_first_frame.observe(seconds)

    def depth(self, queued: int, active: int) -> None:
        self.m_queue.set(queued)
        self.m_active.set(active)

    def held(self, cached_bytes: int, active: int, streams: int) -> None:
        """What requests still hold, set by the loop thread whenever one leaves (so a freed cache shows at once)."""
        self.m_cached.set(cached_bytes)
        self.m_active.set(active)
        self.m_streams.set(streams)

    # ------------------------------------------------------------------ reading
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            served = list(self._served)
            gaps = list(self._frame_gaps)
            first_frames = list(self._first_frames)
            counts = dict(self.counts)
            forwards, rows, frames = self.forwards, self.rows_forwarded, self.frames
        elapsed = max(time.monotonic() - self.started, 1e-9)
        latencies = [s.latency_s for s in served]
        with_deadline = [s for s in served if s.deadline_missed is not None]
        return {
            "requests": counts,
            "images_per_s": counts.get("done", 0) / elapsed,
            "frames_per_s": frames / elapsed,
            "forwards": forwards,
            "batch_occupancy": (rows / forwards / self.max_batch) if forwards else None,
            "latency_s": {"p50": _percentile(latencies, 0.5), "p95": _percentile(latencies, 0.95),
                          "p99": _percentile(latencies, 0.99)},
            "queue_wait_s_p50": _percentile([s.queue_wait_s for s in served], 0.5),
            "time_to_first_step_s_p50": _percentile([s.time_to_first_step_s for s in served], 0.5),
            "reused_share_mean": statistics.fmean([s.reused_share for s in served]) if served else None,
            "degraded": sum(s.degraded for s in served),
            "deadline_miss_rate": (sum(bool(s.deadline_missed) for s in with_deadline) / len(with_deadline)
                                   if with_deadline else None),
            "frame_gap_s": {"stdev": statistics.pstdev(gaps) if len(gaps) > 1 else None,
                            "p99": _percentile(gaps, 0.99)},
            "stream_time_to_first_frame_s_p50": _percentile(first_frames, 0.5),
            "uptime_s": elapsed,
        }
