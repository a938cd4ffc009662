"""Shared machinery of runtime policies: decide per request, at run time, whether to run the blocks or reuse them.

TeaCache, MagCache and first-block cache all make one decision per batch row and step: run every block, or serve
blocks from their cached residuals (block mode, so the reused result is `live input + cached residual`, the same as
reusing the residual of the whole block stack). The decision is taken from a signal the model has just produced
(the first block's output, its modulated input) or from a calibrated table.

A policy object holds no request state: what it accumulates per request lives in `rows.state(key)`, which the cache
session owns and frees with the request's cache, and what it learns within one forward (the skip decision made at
block 0) lives in that forward's `rows.scratch`. So one policy object can serve many requests, sessions and threads
at once, and its memory is bounded by the live requests. `decisions` is a bounded log of the latest decisions,
for people and tests.

`SignalRecorder` is the same machinery with every decision forced to compute: it records the signals of an
uncached run, which is what the policies' calibration fits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Any

import torch

from ..hooks import FIRST_INPUT
from ..state import StepRows

__all__ = ["BlockSkipPolicy", "SignalRecorder", "relative_l1", "DECISION_LOG"]

DECISION_LOG = 4096
"""How many of the latest (key, step, skipped) decisions a policy keeps for inspection."""


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Per-row mean |current - previous| / mean |previous| (TeaCache's and first-block cache's distance)."""
    dims = tuple(range(1, current.ndim))
    diff = (current.float() - previous.float()).abs().mean(dims)
    return diff / previous.float().abs().mean(dims).clamp_min(1e-12)


def _hidden_residual(value: Any) -> torch.Tensor:
    """The image-stream residual out of a block's cached value (a tuple per output stream, the image stream last:
    `BlockResidualHook` stores it so)."""
    residuals = [r for r in value if r is not None]
    return residuals[-1] if len(residuals) > 1 else residuals[0]


class BlockSkipPolicy:
    """Base class: per-row skip decisions in block mode.

    Subclasses set `decides_after_block` (the block whose computed output is the signal; None when the decision
    needs no signal, as MagCache's) and implement `_skip_rows(rows, signal)` returning a bool tensor per row.
    """

    mode = "block"
    num_steps: int | None = None
    decides_after_block: int | None = 0
    needs_input_probe = False

    def __init__(self) -> None:
        self.decisions: deque[tuple[Hashable, int, bool]] = deque(maxlen=DECISION_LOG)
        self.skipped_steps = 0  # rows x steps served from cache, over the policy's lifetime

    # -------------------------------------------------------------- CachePlan
    def decide(self, rows: StepRows, block: int, component: int) -> bool | torch.Tensor:
        if self.decides_after_block is not None and block <= self.decides_after_block:
            return True
        skips: dict[Hashable, bool] = rows.scratch.setdefault(("skip", id(self)), {})
        missing = [i for i, key in enumerate(rows.keys) if key not in skips]
        if missing:
            if self.decides_after_block is not None:
                return True  # no signal for these rows this forward (they joined after the probe block): compute
            self._set_skip(rows, self._skip_rows(rows, None), skips)
        skip = [skips[key] for key in rows.keys]
        if all(skip):
            return False
        if not any(skip):
            return True
        return ~torch.tensor(skip)

    def observe(self, rows: StepRows, block: int, component: int, value: Any) -> None:
        if block == self.decides_after_block:
            self._set_skip(rows, self._skip_rows(rows, value), rows.scratch.setdefault(("skip", id(self)), {}))

    def _set_skip(self, rows: StepRows, skip: torch.Tensor, into: dict[Hashable, bool]) -> None:
        decided = skip.bool().tolist()
        for key, step, skipped in zip(rows.keys, rows.step_list, decided):
            into[key] = skipped
            self.decisions.append((key, step, skipped))
        self.skipped_steps += sum(decided)

    def _skip_rows(self, rows: StepRows, signal: Any) -> torch.Tensor:
        raise NotImplementedError


class SignalRecorder(BlockSkipPolicy):
    """Computes everything and records, per row and step, what the policies look at. Used for calibration.

    Unlike the policies it keeps what it saw (`records`) until its caller reads it: that is its job.
    """

    decides_after_block = None
    needs_input_probe = True

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[Hashable, dict[int, dict[str, torch.Tensor]]] = {}

    def _skip_rows(self, rows: StepRows, signal: Any) -> torch.Tensor:
        return torch.zeros(rows.batch_size, dtype=torch.bool)

    def observe(self, rows: StepRows, block: int, component: int, value: Any) -> None:
        residual = _hidden_residual(value).detach().float().cpu()
        stack = rows.scratch.get(("stack", id(self)))
        if stack is not None and residual.ndim == stack.ndim == 3 and residual.shape[1] > stack.shape[1]:
            residual = residual[:, -stack.shape[1]:]  # a single-stream block over [text, image]: the image tokens
        stack = residual if stack is None else stack + residual
        rows.scratch[("stack", id(self))] = stack
        first_inputs = rows.scratch.get(FIRST_INPUT, {})
        for i, (key, step) in enumerate(zip(rows.keys, rows.step_list)):
            record = self.records.setdefault(key, {}).setdefault(step, {})
            if block == 0:
                record["first_residual"] = residual[i]
                record["modulated_input"] = first_inputs[key].float().cpu()
            record["stack_residual"] = stack[i]
