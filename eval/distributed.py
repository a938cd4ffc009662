"""Splitting an evaluation over processes so that the numbers do not depend on how many there are.

Work is cut into fixed global batches (batch k always holds items `k*B .. k*B+B-1`, whatever the process count), and
each process takes a contiguous run of batches. Every image is therefore generated in the same batch with the same
per-prompt seed whether one process or eight run, and gathering results in rank order restores the global order.
Runs under `accelerate launch` (any backend, including `--cpu`) and as a plain single process.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Dist", "get_dist", "global_batches"]


def global_batches(num_items: int, batch_size: int) -> list[list[int]]:
    """Item indices cut into fixed batches of `batch_size` (the last may be shorter), independent of process count."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [list(range(s, min(s + batch_size, num_items))) for s in range(0, num_items, batch_size)]


@dataclass
class Dist:
    """This process's place in the run: rank, world size, device, and the collective operations eval needs."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    _state: Any = None

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and measures latency."""
        return self.rank == 0

    def my_batches(self, batches: list[list[int]]) -> list[list[int]]:
        """This rank's contiguous share of the global batches (first ranks get one more when uneven)."""
        n, w = len(batches), self.world_size
        per, extra = divmod(n, w)
        start = self.rank * per + min(self.rank, extra)
        return batches[start : start + per + (1 if self.rank < extra else 0)]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (picklable objects, e.g. CPU tensors or dicts)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate a per-rank tensor along dim 0 in rank order (CPU result), on every rank."""
        parts = self.gather(t.detach().cpu())
        return torch.cat(parts, dim=0)

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.world_size > 1:
            torch.distributed.barrier()

    def broadcast(self, obj: Any) -> Any:
        """The main process's `obj`, on every rank (e.g. latency figures measured on rank 0 only)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def get_dist(cpu: bool = False) -> Dist:
    """The process layout from accelerate (`accelerate launch ...`), or a single process if not launched.

    `cpu=True` keeps models on CPU even where a GPU exists (accelerate's `--cpu`).
    """
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    if state.num_processes == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") \
            and "WORLD_SIZE" not in os.environ:
        warnings.warn(
            "running as a single process: `accelerate launch --cpu` starts only one process unless it is given "
            "--mpirun_hostfile. For several CPU processes use `accelerate launch --multi_gpu --num_processes N` "
            "(torchrun; accelerate falls back to gloo on CPU) or `torchrun --nproc_per_node N -m cachekit.eval`.",
            stacklevel=2,
        )
    return Dist(rank=state.process_index, world_size=state.num_processes, device=state.device, _state=state)
