"""Measuring the work one pipeline call really did: transformer MACs, block calls and block linear-layer calls.

A peer row counts only if its measured work went down against the uncached call (`WorkReport.skipped_work`); the
report says what was skipped (per block, per component), which shows *what* a peer skipped (PAB: attention only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from cachekit.pipelines.call import PipelineCall

__all__ = ["WorkReport", "measure_work", "transformer_blocks"]


@dataclasses.dataclass
class WorkReport:
    """The work one pipeline call really did, measured, and (given the uncached call's report) what it skipped.

    `block_linear_calls[b]` counts the linear-layer calls inside transformer block `b`; they happen only when the
    block's work really runs, whereas `block_calls[b]` (calls into the block module) also counts calls that a cache
    hook answered from its cache. `component_linear_calls` splits the linear calls by the block's child module
    (``attn1``, ``attn2``, ``ff``, ...), which shows *what* a peer skipped (PAB: attention only).
    """

    transformer_macs: int
    total_macs: int
    transformer_calls: int
    block_calls: list[int]
    block_linear_calls: list[int]
    component_linear_calls: dict[str, int]
    images: Any = None
    baseline_transformer_macs: int | None = None
    baseline_block_linear_calls: int | None = None

    @property
    def mac_ratio(self) -> float | None:
        """Transformer MACs of this call over those of the uncached call (None without a baseline)."""
        if not self.baseline_transformer_macs:
            return None
        return self.transformer_macs / self.baseline_transformer_macs

    @property
    def skipped_linear_calls(self) -> int | None:
        """Linear-layer calls inside the blocks that the uncached call made and this one did not."""
        if self.baseline_block_linear_calls is None:
            return None
        return self.baseline_block_linear_calls - sum(self.block_linear_calls)

    @property
    def skipped_work(self) -> bool:
        """True only if the work measurably went down: fewer transformer MACs or fewer block linear calls."""
        ratio, skipped = self.mac_ratio, self.skipped_linear_calls
        return (ratio is not None and ratio < 1.0) or (skipped is not None and skipped > 0)

    def against(self, baseline: "WorkReport") -> "WorkReport":
        """This report with the uncached call's numbers filled in (ratios become available)."""
        return dataclasses.replace(self, baseline_transformer_macs=baseline.transformer_macs,
                                   baseline_block_linear_calls=sum(baseline.block_linear_calls))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready numbers (the images are left out)."""
        ratio = self.mac_ratio
        return {
            "transformer_macs": self.transformer_macs,
            "total_macs": self.total_macs,
            "baseline_transformer_macs": self.baseline_transformer_macs,
            "mac_ratio": None if ratio is None else round(ratio, 6),
            "transformer_calls": self.transformer_calls,
            "block_calls": sum(self.block_calls),
            "block_linear_calls": sum(self.block_linear_calls),
            "baseline_block_linear_calls": self.baseline_block_linear_calls,
            "skipped_linear_calls": self.skipped_linear_calls,
            "block_linear_calls_per_block": list(self.block_linear_calls),
            "component_linear_calls": dict(self.component_linear_calls),
        }


def transformer_blocks(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, block) of every transformer block: cachekit's registry entry, else diffusers' block-list names."""
    from cachekit.compat import transformer_block_identifiers
    from cachekit.registry import UnsupportedModelError, resolve_layout

    try:
        return [(ref.path, ref.module) for ref in resolve_layout(transformer, "block").blocks]
    except UnsupportedModelError:
        names = transformer_block_identifiers()
        return [(f"{name}.{i}", block) for name, child in transformer.named_children()
                if name in names and isinstance(child, nn.ModuleList)
                for i, block in enumerate(child)]


def _macs_so_far(counter: Any) -> int:
    """The running MAC total of an open `count_macs()` counter (the same arithmetic its `macs` uses on exit)."""
    return int(counter._mode.get_total_flops()) // 2


def measure_work(pipe: Any, call: PipelineCall, baseline: WorkReport | None = None) -> WorkReport:
    """Run `call` once on `pipe` and measure the work its transformer did.

    MACs come from one `cachekit.cost.count_macs()` counter around the whole call (`total_macs`); the transformer's
    share (`transformer_macs`) is the counter's running total sampled by forward hooks on the transformer as each
    transformer call starts and ends. The counter's per-module attribution is not used: caches that swap the
    transformer's block list during its forward (cache-dit) make torch's module tracker rename the transformer
    mid-call, after which it charges everything, VAE included, to the transformer. Block and linear-layer calls are
    counted with plain `register_forward_pre_hook` handles. All hooks are removed before returning. Pass the uncached
    call's report as `baseline` to get the MAC ratio and the skipped linear calls.
    """
    from cachekit.cost import count_macs

    transformer = pipe.transformer
    blocks = transformer_blocks(transformer)
    block_calls = [0] * len(blocks)
    linear_calls = [0] * len(blocks)
    components: dict[str, int] = {}
    total = count_macs()
    started: list[int] = []
    transformer_macs = [0, 0]  # MACs, calls

    def enter(module: nn.Module, args: tuple) -> None:
        transformer_macs[1] += 1
        started.append(_macs_so_far(total))

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        transformer_macs[0] += _macs_so_far(total) - started.pop()

    def bump_block(b: int) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            block_calls[b] += 1
        return hook

    def bump_linear(b: int, component: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            linear_calls[b] += 1
            components[component] += 1
        return hook

    handles = [transformer.register_forward_pre_hook(enter),
               transformer.register_forward_hook(leave, always_call=True)]
    try:
        for b, (_, block) in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(bump_block(b)))
            for name, module in block.named_modules():
                if isinstance(module, nn.Linear):
                    component = name.split(".")[0]
                    components.setdefault(component, 0)
                    handles.append(module.register_forward_pre_hook(bump_linear(b, component)))
        with total:
            images = call(pipe)
    finally:
        for handle in handles:
            handle.remove()
    report = WorkReport(
        transformer_macs=transformer_macs[0],
        total_macs=int(total.macs),
        transformer_calls=transformer_macs[1],
        block_calls=block_calls,
        block_linear_calls=linear_calls,
        component_linear_calls=components,
        images=images,
    )
    return report.against(baseline) if baseline is not None else report
