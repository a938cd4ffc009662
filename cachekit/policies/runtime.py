"""Shared machinery of runtime policies: decide per request, at run time, whether to run the blocks or reuse them.

TeaCache, MagCache and first-block cache all make one decision per batch row and step: run every block, or serve
blocks from their cached residuals (block mode, so the reused result is `live input + cached residual`, the same as
reusing the residual of the whole block stack). The decision is taken from a signal the model has just produced
(the first block's output, its modulated input) or from a calibrated table, and each request keeps its own state,
so one odd prompt in a batch does not decide for the others.

`SignalRecorder` is the same machinery with every decision forced to compute: it records the signals of an
uncached run, which is what the policies' calibration fits.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ..hooks import PROBE_HOOK, CacheSession
from ..registry import resolve_layout
from ..state import StepRows

__all__ = ["BlockSkipPolicy", "InputProbeHook", "SignalRecorder", "relative_l1"]


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Per-row mean |current - previous| / mean |previous| (TeaCache's and first-block cache's distance)."""
    dims = tuple(range(1, current.ndim))
    diff = (current.float() - previous.float()).abs().mean(dims)
    return diff / previous.float().abs().mean(dims).clamp_min(1e-12)


def _hidden_residual(value: Any) -> torch.Tensor:
    """The image-stream residual out of a block's cached value (a tuple per output stream)."""
    residuals = [r for r in value if r is not None]
    return residuals[-1] if len(residuals) > 1 else residuals[0]


class InputProbeHook(ModelHook):
    """Read-only: hands a module's first input to a callback (TeaCache reads the first block's modulated input)."""

    def __init__(self, callback) -> None:
        super().__init__()
        self.callback = callback

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs.get("hidden_states")
        self.callback(hidden)
        return args, kwargs


class BlockSkipPolicy:
    """Base class: per-row skip decisions in block mode.

    Subclasses set `decides_after_block` (the block whose computed output is the signal; None when the decision
    needs no signal, as MagCache's) and implement `_skip_rows(rows, signal)` returning a bool tensor per row.
    """

    mode = "block"
    num_steps: int | None = None
    decides_after_block: int | None = 0

    def __init__(self) -> None:
        self.states: dict[Hashable, dict[str, Any]] = {}
        self._rows: StepRows | None = None
        self._skip: torch.Tensor | None = None
        self.decisions: list[tuple[Hashable, int, bool]] = []  # (key, step, skipped): what the policy did

    # -------------------------------------------------------------- CachePlan
    def decide(self, rows: StepRows, block: int, component: int) -> bool | torch.Tensor:
        if self._rows is not rows:  # a new forward pass
            self._rows, self._skip = rows, None
            if self.decides_after_block is None:
                self._set_skip(rows, self._skip_rows(rows, None))
        if self.decides_after_block is not None and block <= self.decides_after_block:
            return True
        if self._skip is None:
            return True
        if bool(self._skip.all()):
            return False
        if not bool(self._skip.any()):
            return True
        return ~self._skip

    def observe(self, rows: StepRows, block: int, component: int, row_index: torch.Tensor | None, value: Any) -> None:
        if block == self.decides_after_block and row_index is None:
            self._set_skip(rows, self._skip_rows(rows, value))

    def _set_skip(self, rows: StepRows, skip: torch.Tensor) -> None:
        self._skip = skip.bool().cpu()
        for key, step, skipped in zip(rows.keys, rows.steps.tolist(), self._skip.tolist()):
            self.decisions.append((key, step, skipped))

    def _skip_rows(self, rows: StepRows, signal: Any) -> torch.Tensor:
        raise NotImplementedError

    def state(self, key: Hashable) -> dict[str, Any]:
        return self.states.setdefault(key, {})

    # -------------------------------------------------------------- RuntimePlan
    def attach(self, transformer: nn.Module, session: CacheSession) -> None:
        self.session = session

    def detach(self, transformer: nn.Module) -> None:
        self.session = None

    def drop(self, keys: tuple[Hashable, ...]) -> None:
        for key in keys:
            self.states.pop(key, None)

    def clear(self) -> None:
        self.states.clear()
        self._rows = self._skip = None

    @property
    def skipped_steps(self) -> int:
        return sum(1 for _, _, skipped in self.decisions if skipped)


def attach_input_probe(transformer: nn.Module, callback) -> None:
    """Watch the input of the first block's first component: the modulated input on PixArt, FLUX, Wan, SD3."""
    layout = resolve_layout(transformer)
    first = layout.blocks[0]
    name = next(c for i, c in enumerate(layout.components) if bool(layout.present[0, i]))
    module = getattr(first.module, name)
    HookRegistry.check_if_exists_or_initialize(module).register_hook(InputProbeHook(callback), PROBE_HOOK)


class SignalRecorder(BlockSkipPolicy):
    """Computes everything and records, per row and step, what the policies look at. Used for calibration."""

    decides_after_block = None

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[Hashable, dict[int, dict[str, torch.Tensor]]] = {}
        self._probe: torch.Tensor | None = None
        self._stack: torch.Tensor | None = None

    def attach(self, transformer: nn.Module, session: CacheSession) -> None:
        super().attach(transformer, session)
        attach_input_probe(transformer, self._on_probe)

    def _on_probe(self, hidden: torch.Tensor) -> None:
        self._probe = hidden.detach().float().cpu()

    def _skip_rows(self, rows: StepRows, signal: Any) -> torch.Tensor:
        self._stack = None
        return torch.zeros(rows.batch_size, dtype=torch.bool)

    def observe(self, rows: StepRows, block: int, component: int, row_index: torch.Tensor | None, value: Any) -> None:
        residual = _hidden_residual(value).detach().float().cpu()
        self._stack = residual if self._stack is None else self._stack + residual
        for i, (key, step) in enumerate(zip(rows.keys, rows.steps.tolist())):
            record = self.records.setdefault(key, {}).setdefault(step, {})
            if block == 0:
                record["first_residual"] = residual[i]
                record["modulated_input"] = self._probe[i]
            record["stack_residual"] = self._stack[i]

    def drop(self, keys: tuple[Hashable, ...]) -> None:
        """Recording keeps everything until the caller reads it."""
