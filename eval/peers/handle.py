"""What applying a peer gives back: a removable `PeerHandle`, or `PeerCannotAct` with the reason.

Kept apart from the registry (`registry.py`) because every peer family builds handles and the registry lists the
families: the families import this module, the registry imports the families.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .registry import Peer
    from .step_hook import PeerStepHook

__all__ = ["PeerCannotAct", "PeerHandle", "describe_config"]


class PeerCannotAct(RuntimeError):
    """The peer cannot act on this model or call; the message is the reason shown in the peer's row."""


class PeerHandle:
    """A peer applied to one pipeline's transformer. `remove()` (or leaving the `with` block) takes it off again.

    `config` describes, JSON-ready, the configuration the peer was given; `details` holds what the peer measured on
    the model before it was applied (MagCache's calibrated ratios).
    """

    def __init__(self, peer: "Peer", pipe: Any, knob: float | int, config: dict[str, Any]) -> None:
        self.peer = peer
        self.pipe = pipe
        self.knob = knob
        self.config = config
        self.details: dict[str, Any] = {}
        self._undo: list[Callable[[], None]] = []
        self.step_hook: PeerStepHook | None = None

    @property
    def active(self) -> bool:
        return bool(self._undo)

    def on_remove(self, undo: Callable[[], None]) -> None:
        """Register one step of taking the peer off; `remove()` runs them last first."""
        self._undo.append(undo)

    def remove(self) -> None:
        """Undo everything `apply` did, last first. Idempotent."""
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> "PeerHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def describe_config(config: Any) -> dict[str, Any]:
    """A JSON-ready view of a config dataclass: callables and tensors are named, not serialised."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if callable(value):
            value = f"<{getattr(value, '__name__', type(value).__name__)}>"
        elif isinstance(value, torch.Tensor):
            value = [round(float(v), 5) for v in value.flatten().tolist()]
        elif isinstance(value, torch.dtype):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif hasattr(value, "value") and hasattr(value, "name"):  # enums
            value = value.name
        out[field.name] = value
    return out
