"""Cost model: multiply-accumulates per component, counted with `torch.utils.flop_counter`.

A schedule's predicted cost is the fraction of the transformer's MACs it still computes. The prediction is checked
against a counted run of the hooked model (see the tests), which is what lets a search trust it as an objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .errors import UsageError
from .registry import resolve_layout
from .schedule import Schedule

__all__ = ["count_macs", "MacCounter", "MacProfile", "capture_transformer_inputs"]


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_formulas() -> dict[Any, Any]:
    """Attention on CPU dispatches to a fused kernel torch's counter does not know; count it like the GPU ones."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _cpu_sdpa_flops} if op is not None else {}


class MacCounter:
    """`with MacCounter() as counter: ...` then `counter.macs`: MACs of everything run inside, per module too."""

    def __init__(self) -> None:
        self._mode = FlopCounterMode(display=False, depth=None, custom_mapping=_extra_formulas())
        self.macs = 0
        self.by_module: dict[str, int] = {}

    def __enter__(self) -> "MacCounter":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        self.macs = self._mode.get_total_flops() // 2
        self.by_module = {name: sum(ops.values()) // 2 for name, ops in self._mode.get_flop_counts().items()}


def count_macs() -> MacCounter:
    """Count the MACs of the code run inside: `with count_macs() as c: pipe(...)`, then `c.macs`."""
    return MacCounter()


@dataclass
class MacProfile:
    """MACs of one transformer forward, split by block and component, for the input size it was measured at."""

    model_class: str
    components: tuple[str, ...]
    total: int
    per_component: torch.Tensor  # [blocks, components] MACs
    per_block: torch.Tensor  # [blocks] MACs of the whole block

    @classmethod
    def measure(cls, transformer: nn.Module, *args: Any, **kwargs: Any) -> "MacProfile":
        """Run one uncached forward with the given inputs and attribute its MACs to blocks and components."""
        from .hooks import session_of

        if session_of(transformer) is not None:
            raise RuntimeError("measure MACs on the uncached model: call cachekit.disable first")
        with torch.no_grad(), count_macs() as counter:
            transformer(*args, **kwargs)
        root = type(transformer).__name__
        layout = resolve_layout(transformer, "component")
        per_component = torch.zeros(layout.num_blocks, len(layout.components), dtype=torch.float64)
        per_block = torch.zeros(layout.num_blocks, dtype=torch.float64)
        for ref in layout.blocks:
            per_block[ref.index] = counter.by_module.get(f"{root}.{ref.path}", 0)
            for c, name in enumerate(layout.components):
                if bool(layout.present[ref.index, c]):
                    per_component[ref.index, c] = counter.by_module.get(f"{root}.{ref.path}.{name}", 0)
        return cls(layout.model_class, layout.components, counter.macs, per_component, per_block)

    @classmethod
    def for_pipeline(cls, pipe: Any, **call_kwargs: Any) -> "MacProfile":
        """Profile the pipeline's transformer at the shapes the given call settings produce."""
        args, kwargs = capture_transformer_inputs(pipe, **call_kwargs)
        return cls.measure(pipe.transformer, *args, **kwargs)

    def step_savings(self, schedule: Schedule) -> torch.Tensor:
        """MACs skipped at each step (per transformer call) under the schedule."""
        if schedule.model_class != self.model_class:
            raise UsageError(f"profile is for {self.model_class}, schedule for {schedule.model_class}")
        skipped = (~schedule.effective).double()
        if schedule.mode == "block":
            return (skipped[:, :, 0] * self.per_block).sum(1)
        if schedule.components != self.components:
            raise UsageError("profile and schedule list different components")
        return (skipped * self.per_component).sum((1, 2))

    def predict(self, schedule: Schedule) -> float:
        """Fraction of the uncached transformer MACs the schedule still computes."""
        saved = float(self.step_savings(schedule).sum())
        return 1.0 - saved / (self.total * schedule.num_steps)

    def annotate(self, schedule: Schedule) -> Schedule:
        """Record the predicted MAC ratio in the schedule's metadata (and return it)."""
        schedule.predicted_cost = {**(schedule.predicted_cost or {}), "mac_ratio": round(self.predict(schedule), 6)}
        return schedule

    @property
    def component_weights(self) -> torch.Tensor:
        return self.per_component.clone()


class _InputsCaptured(Exception):
    """Raised by the capture hook to stop the pipeline once the transformer's first inputs are known."""


def capture_transformer_inputs(pipe: Any, **call_kwargs: Any) -> tuple[tuple, dict]:
    """Start the pipeline and return the arguments its transformer is first called with, without denoising.

    This gives `MacProfile.measure` the exact shapes the user's settings produce (resolution, CFG batch, prompt length).
    The call is stopped at the first transformer forward rather than run for one step: some pipelines special-case
    `num_inference_steps=1` (PixArt indexes a second scheduler output that DPM-Solver does not return).
    """
    captured: dict[str, Any] = {}

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["args"], captured["kwargs"] = args, dict(kwargs)
        raise _InputsCaptured

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        call_kwargs = {**call_kwargs, "output_type": "latent"}
        call_kwargs.setdefault("num_inference_steps", 2)
        with torch.no_grad():
            pipe(**call_kwargs)
    except _InputsCaptured:
        pass
    finally:
        handle.remove()
    if "args" not in captured:
        raise RuntimeError(f"{type(pipe).__name__} finished without calling its transformer")
    return captured["args"], captured["kwargs"]
