"""One generation request inside the runner, and the handle its caller holds.

The handle is a `concurrent.futures.Future` underneath, so it works the same from a thread (`result(timeout)`),
from asyncio (`await handle`) and from a server (`events()` streams progress); the runner's loop thread is the only
writer of a request's denoising state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import CancelledError, Future
from typing import Any

import torch

__all__ = ["RequestHandle", "RequestCancelled", "RequestFailed", "ServedRequest"]

_ids = itertools.count(1)
_FINAL = ("done", "cancelled", "failed")


class RequestCancelled(CancelledError):
    """The request was cancelled before it finished (by its caller or by the runner closing)."""


class RequestFailed(RuntimeError):
    """The request failed on its own; the others in its batch went on."""


@dataclasses.dataclass
class ServedRequest:
    """What a finished request reports besides its image: how it was served."""

    request_id: str
    plan: str
    requested_plan: str
    degraded: bool
    num_inference_steps: int
    queue_wait_s: float
    time_to_first_step_s: float
    latency_s: float
    steps_computed: int
    reused_share: float
    deadline_s: float | None
    deadline_missed: bool | None


class RequestHandle:
    """What `Runner.submit` returns: the result, its progress, and a way to cancel it.

        handle = runner.submit("a handwritten 3", seed=0)
        image = handle.result(timeout=30)          # a PIL image
        handle.info.plan                            # the plan that served it (after tiering)
        for event in handle.events(): ...           # {"type": "step", "step": 3, "num_steps": 20, ...}
        image = await handle                        # under asyncio
    """

    def __init__(self, request_id: str, cancel: Callable[["RequestHandle"], None]) -> None:
        self.id = request_id
        self._future: Future = Future()
        self._cancel = cancel
        self._history: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self.info: ServedRequest | None = None

    # ------------------------------------------------------------------ caller side
    def result(self, timeout: float | None = None) -> Any:
        """The PIL image; raises `RequestCancelled`, `RequestFailed` or `TimeoutError`."""
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> bool:
        """Cancel the request; its rows and caches are freed before the next forward. False if already done."""
        if self._future.done():
            return False
        self._cancel(self)
        return True

    def __await__(self):
        return asyncio.wrap_future(self._future).__await__()

    def events(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Progress events from the start, ending with one of "done", "cancelled" or "failed".

        Any number of consumers may iterate at once; each sees every event. `timeout` bounds the wait for the next.
        """
        seen = 0
        while True:
            with self._changed:
                if seen == len(self._history) and not self._changed.wait_for(
                        lambda: seen < len(self._history), timeout=timeout):
                    raise TimeoutError(f"no progress from request {self.id} in {timeout} s")
                pending = self._history[seen:]
            for event in pending:
                seen += 1
                yield event
                if event["type"] in _FINAL:
                    return

    async def aevents(self) -> AsyncIterator[dict[str, Any]]:
        """`events()` for asyncio: the same events, awaited without holding a thread per consumer."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        with self._changed:
            backlog = list(self._history)
            listener = (loop, inbox)
            self._listeners.append(listener)
        try:
            for event in backlog:
                yield event
                if event["type"] in _FINAL:
                    return
            while True:
                event = await inbox.get()
                yield event
                if event["type"] in _FINAL:
                    return
        finally:
            with self._changed:
                self._listeners.remove(listener)

    def add_done_callback(self, fn: Callable[["RequestHandle"], None]) -> None:
        self._future.add_done_callback(lambda _: fn(self))

    # ------------------------------------------------------------------ runner side
    def _emit(self, event: dict[str, Any]) -> None:
        with self._changed:
            self._history.append(event)
            self._changed.notify_all()
            for loop, inbox in self._listeners:
                with contextlib.suppress(RuntimeError):  # that consumer's event loop has closed
                    loop.call_soon_threadsafe(inbox.put_nowait, event)

    def _finish(self, image: Any, info: ServedRequest) -> None:
        if self._future.done():
            return
        self.info = info
        self._emit({"type": "done", "request_id": self.id, "plan": info.plan, "latency_s": info.latency_s})
        self._future.set_result(image)

    def _fail(self, error: BaseException) -> None:
        if self._future.done():
            return
        self._emit({"type": "failed", "request_id": self.id, "error": str(error)})
        failure = RequestFailed(f"request {self.id} failed: {error}")
        failure.__cause__ = error
        self._future.set_exception(failure)

    def _cancelled(self, why: str) -> None:
        if self._future.done():
            return
        self._emit({"type": "cancelled", "request_id": self.id, "reason": why})
        self._future.set_exception(RequestCancelled(f"request {self.id} {why}"))


def new_request_id() -> str:
    return f"r{next(_ids)}"


@dataclasses.dataclass(eq=False)
class ActiveRequest:
    """The denoising state of one admitted request: owned by the runner's loop thread alone."""

    handle: RequestHandle
    prompt: str
    negative_prompt: str
    seed: int
    num_inference_steps: int
    guidance_scale: float
    settings: dict[str, Any]
    group: tuple
    plan: Any
    plan_label: str
    requested_plan: str
    degraded: bool
    cost: float
    deadline: float | None  # absolute, time.monotonic()
    deadline_s: float | None
    on_step: Callable[[int, torch.Tensor], None] | None
    preview: bool
    cfg_rows: bool = True  # False for a guidance-distilled family (FLUX): one row, its scale an input of the forward
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    admitted: float | None = None
    first_step: float | None = None
    cancel_reason: str | None = None
    # filled on admission
    cohort: Any = None  # the `Cohort` that steps this request's latents with its lockstep batch-mates'
    latents: torch.Tensor | None = None  # this request's row of the cohort's latents
    generator: torch.Generator | None = None
    texts: tuple = ()  # (negative, positive) or (positive,)
    step: int = 0

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance as two rows (uncond, cond), as the stock loop batches it."""
        return self.cfg_rows and self.guidance_scale > 1.0

    @property
    def num_rows(self) -> int:
        return 2 if self.cfg else 1

    @property
    def keys(self) -> tuple[tuple[str, str], ...]:
        return ((self.handle.id, "uncond"), (self.handle.id, "cond")) if self.cfg else ((self.handle.id, "cond"),)

    @property
    def remaining_cost(self) -> float:
        return self.cost * (self.num_inference_steps - self.step) / self.num_inference_steps

    @property
    def urgency(self) -> tuple[float, float]:
        """Earliest deadline first; requests without one after every deadline, in arrival order."""
        return (self.deadline if self.deadline is not None else float("inf"), self.submitted)
