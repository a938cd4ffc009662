"""The streaming batch runner: step-level continuous batching with each request's cache plan kept on.

One resident stock pipeline; a loop thread that, every tick, packs the rows of requests at any denoising step into
one transformer forward (per-row timesteps, prompt embeddings and plans, declared with `cachekit.rows`), then steps
each request with its own scheduler. Requests join and leave between ticks, so a request's result is the image a
solo pipeline call with the same prompt, seed, settings and plan gives.

    from cachekit.pipelines import Runner

    with Runner() as runner:                                   # the bundled digits model
        handle = runner.submit("a handwritten 3", seed=0, schedule="digits-fast")
        image = handle.result(timeout=60)                      # a PIL image
        print(handle.info.plan, runner.stats()["latency_s"])

Scheduling: a bounded queue (`QueueFull` when it is full, the server's 429), earliest deadline first, admission by
rows and predicted cache memory, and cache tiering: a request that allows it and would miss its deadline at the
predicted load is served by a faster plan from `tiers`. Shared work: the text encoder runs once per distinct text
(batched over new arrivals, an LRU keeps repeats), finished latents are decoded in batches.
"""

from __future__ import annotations

import collections
import copy
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

import cachekit
from cachekit.compat import execution_device
from cachekit.errors import UsageError
from cachekit.plans import PlanError, plan_label, resolve_plan
from cachekit.schedule import Schedule

from .cohorts import Cohort
from .families import PipelineFamily, TextConditioning, family_of, stock_default
from .metrics import RunnerMetrics
from .requests import ActiveRequest, RequestHandle, ServedRequest, new_request_id

__all__ = ["Runner", "QueueFull", "RunnerClosed", "DEFAULT_TIERS"]

logger = logging.getLogger(__name__)

DEFAULT_TIERS: dict[str, tuple[str, ...]] = {"digits": ("digits-lossless", "digits-fast", "digits-fastest")}
"""The ordered plans (slowest and most faithful first) tiering picks from, per bundled model."""


class QueueFull(UsageError):
    """The runner's queue is at `max_queue`: try again later (HTTP 429)."""


class RunnerClosed(UsageError):
    """The runner was closed; it takes no more requests."""


class _PromptCache:
    """An LRU of text embeddings, keyed by the text and the settings that change its encoding."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: collections.OrderedDict[tuple, TextConditioning] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    def get(self, key: tuple) -> TextConditioning | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return entry

    def put(self, key: tuple, value: TextConditioning) -> None:
        self.misses += 1
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class Runner:
    """Serve many generation requests from one resident pipeline, each under its own cache plan.

    Args:
        pipe: a stock diffusers pipeline of a family the runner knows (`pipelines.families`), or a bundled model
            name or local folder, which the runner loads on its own thread (see `_setup`); None loads
            the bundled digits model. The runner enables cachekit on it (every row brings its own plan) and disables
            it on close.
        max_batch: transformer rows per forward (a request with CFG takes two).
        max_queue: requests waiting for admission before `submit` raises `QueueFull`.
        tiers: plans from slowest to fastest that tiering may pick (default: the bundled model's shipped ones).
        max_cache_bytes: admit a request only while the predicted cache memory of all admitted requests fits.
        prompt_cache_size: text embeddings kept for repeated prompts.
        preview: decode the current x0 prediction into every step event (costs one small VAE call per step).
        cpu_threads: torch intra-op threads of the runner's loop thread when the model runs on CPU. While another
            thread of the process also keeps an OpenMP team (it ran multi-threaded torch work, e.g. loaded the
            pipeline), the loop thread's team runs about half as fast at the same count (measured on 2 cores), so
            "auto" times a full batch at the creating thread's count and at 1 and keeps the faster; an int sets it;
            None leaves torch's default. Ignored on accelerators.
        align_steps: how many forwards' time requests under a schedule may wait, while the batch is busy, to start
            together as a cohort (rows at one step skip a schedule's blocks for the whole batch; rows at mixed steps
            compute most blocks for some rows). At most 2 forwards' time when the runner is idle; 0 admits at once.
            Measured on digits-fast: 1.31x over uncached in the runner with 20, 0.69x with 0.
    """

    def __init__(
        self,
        pipe: Any = None,
        *,
        max_batch: int = 16,
        max_queue: int = 256,
        tiers: Sequence[Any] | None = None,
        max_cache_bytes: int | None = None,
        prompt_cache_size: int = 512,
        preview: bool = False,
        cpu_threads: int | str | None = "auto",
        align_steps: float = 20.0,
    ) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise UsageError(f"max_batch must be a positive integer, got {max_batch!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise UsageError(f"max_queue must be a positive integer, got {max_queue!r}")
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_cache_bytes = max_cache_bytes
        self.preview = preview
        self.metrics = RunnerMetrics(max_batch)
        self._prompts = _PromptCache(prompt_cache_size)
        self._scheduler_prototypes: dict[tuple, Any] = {}
        self._cv = threading.Condition()
        self._pending: list[tuple[tuple[float, float], int, ActiveRequest]] = []
        self._seq = itertools.count()
        self._active: list[ActiveRequest] = []
        self._cancelled: set[str] = set()
        self._streams: list[Any] = []
        self._closed = False
        self._seconds_per_cost: float | None = None  # seconds of a forward per unit of row cost, measured
        self._seconds_per_tick: float | None = None
        self.align_steps = align_steps
        self._bytes_per_row = 0.0
        if isinstance(align_steps, bool) or not isinstance(align_steps, (int, float)) or align_steps < 0:
            raise UsageError(f"align_steps must be a number >= 0, got {align_steps!r}")
        if not (cpu_threads in ("auto", None) or (isinstance(cpu_threads, int) and cpu_threads >= 1)):
            raise UsageError(f"cpu_threads must be 'auto', None or a positive integer, got {cpu_threads!r}")
        self._cpu_threads = cpu_threads
        self._creator_threads = torch.get_num_threads()
        self.loop_threads: int | None = None
        self._tiers_asked = tiers
        self._ready = threading.Event()
        self._setup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, args=(pipe,), name="cachekit-runner", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._setup_error is not None:
            self._thread.join()
            raise self._setup_error

    def _setup(self, pipe: Any) -> None:
        """Load (when given a name) and prepare the pipeline on the loop thread, before any request.

        On CPU this can matter for speed: every thread that runs multi-threaded torch work keeps an OpenMP team,
        and a stock digits pipeline call on a worker thread ran at 10.4 img/s while the main thread also had a team
        against 19.4 img/s when the worker's was the only one (2 cores; likely libgomp's throttled barrier spinning
        once its threads outnumber the cores). Loading and profiling here leaves the caller's thread without a team
        (when it has none already).
        """
        from cachekit import zoo
        from cachekit.cost import MacProfile
        from cachekit.hooks import session_of

        if pipe is None or isinstance(pipe, (str, os.PathLike)):
            pipe = zoo.load_pipeline("digits" if pipe is None else str(pipe))
        self.family: PipelineFamily = family_of(pipe)
        if session_of(pipe.transformer) is not None:
            raise UsageError("cachekit is already enabled on this pipeline; call cachekit.disable(pipe) first: "
                             "the runner gives every request its own plan")
        self.pipe = pipe
        self._default_settings = self.family.settings(pipe, {})
        self._profile = MacProfile.for_pipeline(pipe, **self._profile_settings())
        bundled = zoo.bundled_name(pipe)
        asked = self._tiers_asked
        self.tiers: tuple[Any, ...] = tuple(asked) if asked is not None else DEFAULT_TIERS.get(bundled or "", ())
        self._tier_costs = [self._plan_cost(resolve_plan(t), self._steps_of(t)) for t in self.tiers]
        cachekit.enable(pipe, None)
        self.device = execution_device(pipe)  # resolved once: diffusers walks every module for it

    # ------------------------------------------------------------------ public API
    def submit(
        self,
        prompt: str,
        *,
        seed: int = 0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str = "",
        schedule: Any = None,
        deadline_s: float | None = None,
        allow_degrade: bool = False,
        height: int | None = None,
        width: int | None = None,
        on_step: Callable[[int, torch.Tensor], None] | None = None,
    ) -> RequestHandle:
        """Queue one image; returns at once with a handle (`result`, `cancel`, `await`, `events`).

        `schedule` is anything `cachekit.enable` takes (a shipped name, a policy spec, a file, a Schedule, None).
        Without `num_inference_steps` a schedule runs the step count it records (its search chose it), anything
        else 20.
        `deadline_s` is seconds from now; with `allow_degrade` a request that would miss it is served by a faster
        plan from the runner's tiers. `on_step(step, latents)` runs after each of its steps on the runner's thread;
        if it raises, this request fails alone. Raises `UsageError` on a bad argument, `QueueFull` when the queue is
        full, with nothing queued.
        """
        _check_prompt_and_seed(prompt, negative_prompt, seed)
        if num_inference_steps is None:
            num_inference_steps = self._steps_of(schedule)
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                or not 2 <= num_inference_steps <= 1000:
            raise UsageError(f"num_inference_steps must be an integer from 2 to 1000, got {num_inference_steps!r}")
        defaults = self.family.settings(self.pipe, {})
        guidance_scale = self._guidance(guidance_scale)
        if deadline_s is not None and (isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float))
                                       or deadline_s <= 0):
            raise UsageError(f"deadline_s must be a positive number of seconds, got {deadline_s!r}")
        if on_step is not None and not callable(on_step):
            raise UsageError("on_step must be callable")
        overrides = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
        settings = self.family.settings(self.pipe, overrides) if overrides else defaults
        plan = self._resolve(schedule, num_inference_steps)
        cost = self._request_cost(plan, num_inference_steps, guidance_scale)
        rows = self._rows(guidance_scale)
        if rows > self.max_batch:
            raise UsageError(f"a request with CFG takes 2 rows, more than max_batch={self.max_batch}")

        handle = RequestHandle(new_request_id(), self._cancel)
        now = time.monotonic()
        request = ActiveRequest(
            handle=handle, prompt=prompt, negative_prompt=negative_prompt, seed=seed,
            num_inference_steps=num_inference_steps, guidance_scale=float(guidance_scale), settings=settings,
            group=self.family.group_key(settings), plan=plan, plan_label=plan_label(schedule),
            requested_plan=plan_label(schedule), degraded=False, cost=cost,
            deadline=None if deadline_s is None else now + float(deadline_s),
            deadline_s=None if deadline_s is None else float(deadline_s), on_step=on_step, preview=self.preview,
            cfg_rows=getattr(self.family, "cfg_rows", True), submitted=now)
        with self._cv:
            if self._closed:
                raise RunnerClosed("the runner is closed")
            if len(self._pending) >= self.max_queue:
                self.metrics.outcome("rejected")
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            if allow_degrade and request.deadline is not None:
                self._degrade_if_late(request, now)
            heapq.heappush(self._pending, (request.urgency, next(self._seq), request))
            self.metrics.depth(len(self._pending), len(self._active))
            self._cv.notify_all()
        handle._emit({"type": "queued", "request_id": handle.id, "plan": request.plan_label,
                      "degraded": request.degraded})
        return handle

    def generate(self, prompt: str, timeout: float | None = None, **options: Any) -> Any:
        """`submit(...).result(timeout)` in one call."""
        return self.submit(prompt, **options).result(timeout)

    def stats(self) -> dict[str, Any]:
        """Per-runner figures: throughput, batch occupancy, latency percentiles, deadline misses, queue, caches."""
        snapshot = self.metrics.snapshot()
        with self._cv:
            snapshot.update(queued=len(self._pending), active=len(self._active), streams=len(self._streams))
        sessions = cachekit.sessions(self.pipe)
        snapshot["cached_bytes"] = sum(s.cached_bytes() for s in sessions)
        snapshot["reused_share_measured"] = sessions[0].stats.reuse_fraction if sessions else None
        snapshot["prompt_cache"] = {"hits": self._prompts.hits, "misses": self._prompts.misses}
        snapshot["max_batch"] = self.max_batch
        snapshot["loop_threads"] = self.loop_threads
        return snapshot

    def queue_position(self, handle: RequestHandle) -> int | None:
        """How many waiting requests go before this one (0: next in); None once it is admitted or done."""
        with self._cv:
            ahead = sorted(self._pending)
        for position, (_, _, request) in enumerate(ahead):
            if request.handle is handle:
                return position
        return None

    @property
    def prometheus_registry(self) -> Any:
        """The runner's `prometheus_client.CollectorRegistry` (what a server's /metrics exposes)."""
        return self.metrics.registry

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop taking requests, cancel those waiting or in flight, stop the loop and take cachekit off the pipe."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)
        cachekit.disable(self.pipe)

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ plans and costs
    def _profile_settings(self) -> dict[str, Any]:
        return {**self.family.call_settings(self._default_settings), "prompt": "a", "num_inference_steps": 2}

    @staticmethod
    def _steps_of(plan: Any, default: int = 20) -> int:
        """The steps a plan runs: a schedule's own count, anything else `default`."""
        resolved = resolve_plan(plan)
        return resolved.num_steps if isinstance(resolved, Schedule) else default

    def _resolve(self, schedule: Any, num_steps: int) -> Any:
        try:
            plan = resolve_plan(schedule)
            if plan is not None and hasattr(plan, "validate_for"):
                plan.validate_for(self.pipe.transformer, num_steps)
        except PlanError:
            raise
        except (ValueError, TypeError) as err:
            raise UsageError(f"schedule {plan_label(schedule)!r}: {err}") from None
        return plan

    def _plan_cost(self, plan: Any, num_steps: int) -> float:
        """Predicted share of an uncached forward's time the plan costs (1.0 when it cannot be predicted)."""
        if plan is None:
            return 1.0
        schedule = plan
        if not isinstance(plan, Schedule):
            schedule_for = getattr(plan, "schedule_for", None)
            if schedule_for is None:  # a runtime policy decides as it goes: assume the worst
                return 1.0
            schedule = schedule_for(num_steps, self.pipe.transformer)
        predicted = schedule.predicted_cost or {}
        if "wallclock_ratio" in predicted:
            return float(predicted["wallclock_ratio"])
        try:
            return float(self._profile.predict(schedule))
        except UsageError:
            return 1.0

    def _guidance(self, guidance_scale: float | None) -> float:
        """The guidance scale asked for, or the model's call default (else the stock call's); checked."""
        from .call import model_call_defaults

        if guidance_scale is None:
            guidance_scale = float(model_call_defaults(self.pipe).get(
                "guidance_scale", stock_default(self.pipe, "guidance_scale", 4.5)))
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
                or not 0.0 <= float(guidance_scale) <= 100.0:
            raise UsageError(f"guidance_scale must be a number from 0 to 100, got {guidance_scale!r}")
        return guidance_scale

    def _rows(self, guidance_scale: float) -> int:
        """Transformer rows of a request: two with CFG (unless the family embeds guidance in one row), else one."""
        return 2 if guidance_scale > 1.0 and getattr(self.family, "cfg_rows", True) else 1

    def _request_cost(self, plan: Any, num_steps: int, guidance_scale: float) -> float:
        rows = self._rows(guidance_scale)
        return num_steps * rows * self._plan_cost(plan, num_steps)

    def _predicted_finish(self, request: ActiveRequest, now: float, cost: float) -> float | None:
        """When the request would finish under EDF at the measured rate, if there is a measurement yet."""
        if self._seconds_per_cost is None:
            return None
        ahead = sum(r.remaining_cost for r in self._active)
        ahead += sum(r.cost for urgency, _, r in self._pending if urgency <= request.urgency)
        return now + (ahead + cost) * self._seconds_per_cost

    def _degrade_if_late(self, request: ActiveRequest, now: float) -> None:
        """Cache tiering: the first faster tier that meets the deadline, else the fastest; never a slower one."""
        finish = self._predicted_finish(request, now, request.cost)
        if finish is None or finish <= request.deadline or not self.tiers:
            return
        rows = request.num_rows
        chosen = None
        for tier, tier_cost in zip(self.tiers, self._tier_costs):
            steps = self._steps_of(tier, request.num_inference_steps)  # a tier schedule runs its own step count
            cost = steps * rows * tier_cost
            if cost >= request.cost:
                continue
            chosen = (tier, cost, steps)
            finish = self._predicted_finish(request, now, cost)
            if finish <= request.deadline:
                break
        if chosen is None:
            return
        tier, cost, steps = chosen
        request.plan = resolve_plan(tier)
        request.plan_label = plan_label(tier)
        request.cost = cost
        request.num_inference_steps = steps
        request.degraded = True

    # ------------------------------------------------------------------ cancelling
    def _cancel(self, handle: RequestHandle) -> None:
        with self._cv:
            for index, (_, _, request) in enumerate(self._pending):
                if request.handle is handle:
                    self._pending.pop(index)
                    heapq.heapify(self._pending)
                    self.metrics.outcome("cancelled")
                    handle._cancelled("was cancelled while queued")
                    return
            self._cancelled.add(handle.id)
            self._cv.notify_all()

    def _drop(self, request: ActiveRequest, error: BaseException | None, why: str = "") -> None:
        """Take a request out of the batch now and free its rows' caches; its batch-mates go on."""
        self._active.remove(request)
        request.cohort.leave(request)
        cachekit.release(self.pipe, request.keys)
        self._report_held()
        if error is None:
            self.metrics.outcome("cancelled")
            request.handle._cancelled(why)
        else:
            self.metrics.outcome("failed")
            request.handle._fail(error)

    def _report_held(self) -> None:
        held = sum(s.cached_bytes() for s in cachekit.sessions(self.pipe))
        self.metrics.held(held, len(self._active), len(self._streams))

    # ------------------------------------------------------------------ the loop
    def _configure_threads(self) -> None:
        """Pick the loop thread's torch thread count on CPU (see `cpu_threads`)."""
        if self.device.type != "cpu" or self._cpu_threads is None:
            return
        if isinstance(self._cpu_threads, int):
            torch.set_num_threads(self._cpu_threads)
        else:
            candidates = sorted({self._creator_threads, 1}, reverse=True)
            timings = {n: self._time_full_batch(n) for n in candidates}
            torch.set_num_threads(min(timings, key=timings.get))
        self.loop_threads = torch.get_num_threads()

    def _time_full_batch(self, threads: int) -> float:
        torch.set_num_threads(threads)
        settings = self._default_settings
        with torch.no_grad():
            text = self.family.encode(self.pipe, [""], settings, self.device)[0]
            generators = [torch.Generator("cpu").manual_seed(i) for i in range(self.max_batch)]
            latents = self.family.initial_latents(self.pipe, generators, settings, self.device)
            timesteps = torch.full((self.max_batch,), 500, dtype=torch.long)
            keys = [("cachekit-probe", i) for i in range(self.max_batch)]
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                with cachekit.rows(self.pipe, [0] * self.max_batch, keys, 2, [None] * self.max_batch):
                    self.family.forward(self.pipe, latents, timesteps, [text] * self.max_batch, settings)
                best = min(best, time.perf_counter() - started)
            cachekit.release(self.pipe, keys)
        return best

    def _loop(self, pipe: Any) -> None:
        try:
            self._setup(pipe)
        except BaseException as err:  # noqa: BLE001 - handed to the constructor, which raises it
            self._setup_error = err
            self._ready.set()
            return
        self._ready.set()
        try:
            self._configure_threads()
        except Exception:  # noqa: BLE001 - a probe failure only costs speed
            logger.exception("timing the loop thread's torch threads failed; keeping torch's default")
        while True:
            with self._cv:
                while not self._closed and not self._pending and not self._active and not self._cancelled and \
                        not any(s.closed or s.has_work() for s in self._streams):
                    self._cv.wait()
                if self._closed:
                    break
                cancelled, self._cancelled = self._cancelled, set()
                admitted, hold_until = self._admit()
                if not admitted and not self._active and not cancelled and hold_until is not None and \
                        not any(s.has_work() for s in self._streams):
                    self._cv.wait(max(hold_until - time.monotonic(), 0.0))  # a cohort gathering: nothing to run
                    continue
                self.metrics.depth(len(self._pending), len(self._active) + len(admitted))
            for request in [r for r in self._active if r.handle.id in cancelled]:
                self._drop(request, None, "was cancelled")
            try:
                self._start(admitted)
            except Exception as err:  # noqa: BLE001 - the encoder failed: these requests fail, nobody else
                logger.exception("starting requests failed")
                for request in admitted:
                    self.metrics.outcome("failed")
                    request.handle._fail(err)
                admitted = []
            self._active.extend(admitted)
            if self._active:
                self._tick()
            self._advance_streams()
        self._shutdown()

    def _shutdown(self) -> None:
        with self._cv:
            pending, self._pending = [r for _, _, r in self._pending], []
        for request in pending:
            self.metrics.outcome("cancelled")
            request.handle._cancelled("was cancelled: the runner closed")
        for request in list(self._active):
            self._drop(request, None, "was cancelled: the runner closed")
        for stream in self._streams:
            stream._shutdown()
        self._streams.clear()

    def _admit(self) -> tuple[list[ActiveRequest], float | None]:
        """Move the most urgent waiting requests in, while their rows and predicted cache memory fit.

        Step-aligned admission: requests under a static plan (a schedule) skip work only where every row of a
        forward is at a step that skips it, so they are let in as cohorts that start together. While the waiting
        requests cannot fill the free rows (and fill less than half the queue), they are held for up to
        `align_steps` forwards' time; the second value is when the hold ends (None: no hold).
        """
        rows = sum(r.num_rows for r in self._active)
        admitted: list[ActiveRequest] = []
        for _, _, request in sorted(self._pending):
            if rows + request.num_rows > self.max_batch:
                break
            if self.max_cache_bytes is not None and (self._active or admitted):
                predicted = (rows + request.num_rows) * self._bytes_per_row
                if predicted > self.max_cache_bytes:
                    break
            rows += request.num_rows
            admitted.append(request)
        if not admitted:
            return [], None
        fills = len(admitted) < len(self._pending) or rows + 2 > self.max_batch
        # held requests take queue places: past half the queue a cohort gathering would turn arrivals away (429)
        # while rows are free, so it goes in as it is
        fills = fills or 2 * len(self._pending) >= self.max_queue
        if self.align_steps and not fills and self._seconds_per_tick is not None and \
                any(_is_static(r.plan) for r in admitted):
            # while the batch is busy anyway a cohort may gather for longer; an idle runner waits briefly for a burst
            steps = self.align_steps if self._active else min(self.align_steps, 2)
            hold_until = min(r.submitted for r in admitted) + steps * self._seconds_per_tick
            if time.monotonic() < hold_until:
                return [], hold_until
        chosen = {id(r) for r in admitted}
        self._pending = [entry for entry in self._pending if id(entry[2]) not in chosen]
        heapq.heapify(self._pending)
        return admitted, None

    def _start(self, admitted: list[ActiveRequest]) -> None:
        """Encode the new requests' texts (one batched call per group, repeats from the LRU), draw their noise."""
        if not admitted:
            return
        now = time.monotonic()
        by_group: dict[tuple, list[ActiveRequest]] = collections.defaultdict(list)
        for request in admitted:
            by_group[request.group].append(request)
        for requests in by_group.values():
            settings = requests[0].settings
            if getattr(self.family, "negatives_apart", False):  # negatives encode differently: their own call
                positives = self._encode_texts([r.prompt for r in requests], settings)
                negatives = self._encode_texts([r.negative_prompt for r in requests if r.cfg], settings, negative=True)
            else:
                wanted = [t for r in requests for t in ((r.negative_prompt, r.prompt) if r.cfg else (r.prompt,))]
                positives = negatives = self._encode_texts(wanted, settings)
            for request in requests:
                request.texts = ((negatives[request.negative_prompt], positives[request.prompt]) if request.cfg
                                 else (positives[request.prompt],))
                request.generator = torch.Generator("cpu").manual_seed(request.seed)
            lockstep: dict[tuple, list[ActiveRequest]] = collections.defaultdict(list)
            for request in requests:
                lockstep[(request.num_inference_steps, request.num_rows)].append(request)
            for members in lockstep.values():
                with torch.no_grad():
                    latents = self.family.initial_latents(self.pipe, [r.generator for r in members], settings,
                                                          self.device)
                cohort = Cohort(members, self._fresh_scheduler(members[0]), latents,
                                self.family.extra_step_kwargs(self.pipe, members[0].generator))
                for request in members:
                    request.cohort = cohort
        for request in admitted:
            request.admitted = now
            request.handle._emit({"type": "started", "request_id": request.handle.id,
                                  "queue_wait_s": now - request.submitted})

    def _fresh_scheduler(self, request: ActiveRequest) -> Any:
        """A cohort's own scheduler: a copy of one built per step count and group, 5x cheaper than building it
        (the family builds from the pipeline's config and sets the timesteps, which depend only on the step count
        and the latent shape the group fixes)."""
        key = (request.num_inference_steps, request.group)
        prototype = self._scheduler_prototypes.get(key)
        if prototype is None:
            if len(self._scheduler_prototypes) >= 64:
                self._scheduler_prototypes.clear()
            prototype = self._scheduler_prototypes[key] = self.family.scheduler(
                self.pipe, request.num_inference_steps, request.settings, self.device)
        return copy.deepcopy(prototype)

    def _encode_texts(self, texts: Sequence[str], settings: dict[str, Any],
                      negative: bool = False) -> dict[str, TextConditioning]:
        """Embeddings of these texts: the LRU's, and the missing ones in one text-encoder call.

        `negative`: as negative prompts, for a family whose negatives encode differently (`negatives_apart`).
        """
        if not texts:
            return {}
        text_key = self.family.text_key(settings) + (("negative",) if negative else ())
        missing = sorted({t for t in texts if (*text_key, t) not in self._prompts})
        if missing:
            with torch.no_grad():
                fresh = self.family.encode(self.pipe, missing, settings, self.device, negative=True) if negative \
                    else self.family.encode(self.pipe, missing, settings, self.device)
                for text, encoded in zip(missing, fresh):
                    self._prompts.put((*text_key, text), encoded)
        return {t: self._prompts.get((*text_key, t)) for t in set(texts)}

    def _texts_for(self, negative: str, positive: str, settings: dict[str, Any]) -> tuple:
        encoded = self._encode_texts([negative, positive], settings)
        return encoded[negative], encoded[positive]

    # ------------------------------------------------------------------ streams
    def open_stream(
        self,
        prompt: str,
        *,
        stages: Sequence[int] = (30, 40),
        num_inference_steps: int = 50,
        guidance: str = "self",
        guidance_scale: float = 1.4,
        delta: float = 1.0,
        negative_prompt: str = "",
        seed: int = 0,
        similarity_filter: Any = None,
        stream_batch: bool = True,
    ) -> Any:
        """An image stream (img2img through `stages`, indices into `num_inference_steps` timesteps).

        `guidance`: "none", "full" (CFG), "self" or "onetime" (residual CFG); `similarity_filter`: a
        `SimilarityFilterConfig` (or True for eta 0.98, 10 skips at most); `stream_batch=False` runs frame by frame.
        """
        from .stream_filters import SimilarityFilterConfig
        from .streams import ImageStream

        if not getattr(self.family, "supports_streams", False):
            raise UsageError(f"image streams need a DDPM-style scheduler; the runner serves them for PixArt "
                             f"pipelines, not {type(self.pipe).__name__} (its requests work as usual)")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError("prompt must be a non-empty string")
        if similarity_filter is True:
            similarity_filter = SimilarityFilterConfig()
        elif similarity_filter is not None and not isinstance(similarity_filter, SimilarityFilterConfig):
            raise UsageError("similarity_filter must be None, True or a SimilarityFilterConfig")
        stream = ImageStream(self, f"s{next(self._seq)}", prompt, stages=tuple(int(s) for s in stages),
                             num_inference_steps=int(num_inference_steps), guidance=guidance,
                             guidance_scale=guidance_scale, delta=delta, negative_prompt=negative_prompt, seed=seed,
                             similarity_filter=similarity_filter, stream_batch=bool(stream_batch))
        with self._cv:
            if self._closed:
                raise RunnerClosed("the runner is closed")
            self._streams.append(stream)
        return stream

    def open_video_stream(
        self,
        prompt: str,
        *,
        seed: int = 0,
        schedule: Any = None,
        steps: int = 8,
        window: int = 3,
        num_frames: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str = "",
        max_unread: int | None = None,
    ) -> Any:
        """A video stream (`pipelines.video_streams.VideoStream`): frames, in order, until closed.

        A rolling `window` of latent frames, an anchor and frames `steps // (window - 1)` denoising steps apart, one
        forward per tick (see `video_streams`). `num_frames` makes it a finite clip of that many pixel frames
        (None: until `close()`); `schedule` is any plan a request takes (a policy spec, a Schedule of
        `steps // (window - 1)` steps), applied within each position of the window. Raises `UsageError` on a bad argument or a family without video streams.
        """
        from .video_streams import MAX_UNREAD, VideoStream, check_video_stream_args

        if not getattr(self.family, "supports_video_streams", False):
            raise UsageError(f"video streams need a video pipeline with per-frame noise levels (WanPipeline), not "
                             f"{type(self.pipe).__name__}")
        _check_prompt_and_seed(prompt, negative_prompt, seed)
        check_video_stream_args(steps, window, num_frames, self.pipe.vae_scale_factor_temporal)
        guidance_scale = self._guidance(guidance_scale)
        if max_unread is not None and (isinstance(max_unread, bool) or not isinstance(max_unread, int)
                                       or max_unread < 1):
            raise UsageError(f"max_unread must be a positive integer, got {max_unread!r}")
        lag = steps // (window - 1)  # ticks between two shifts of the window: what a plan reuses within
        plan = self._resolve(schedule, lag)
        if plan is not None and lag == 1:
            logger.warning("a video stream with window == steps + 1 shifts every tick: its plan has nothing to reuse")
            plan = None
        stream = VideoStream(self, f"v{next(self._seq)}", prompt, steps=steps, window=window,
                             guidance_scale=float(guidance_scale), negative_prompt=negative_prompt, seed=seed,
                             plan=plan, plan_label=plan_label(schedule), num_frames=num_frames,
                             max_unread=MAX_UNREAD if max_unread is None else max_unread)
        with self._cv:
            if self._closed:
                raise RunnerClosed("the runner is closed")
            self._streams.append(stream)
            self._cv.notify_all()
        return stream

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _close_stream(self, stream: Any) -> None:
        self._wake()  # the loop thread takes it out and frees its caches

    def _advance_streams(self) -> None:
        for stream in list(self._streams):
            if stream.closed:
                self._streams.remove(stream)
                stream._shutdown()
                self._report_held()
                continue
            if stream.has_work():
                try:
                    stream.advance()
                except Exception:  # noqa: BLE001 - a broken stream closes alone
                    logger.exception("stream %s failed; closing it", stream.id)
                    self._streams.remove(stream)
                    stream._shutdown()
                    self._report_held()
                    continue
                if stream.closed:  # a finite video stream that sent its last frame
                    self._streams.remove(stream)
                    stream._shutdown()
                    self._report_held()

    def _next_group(self) -> list[ActiveRequest]:
        """The requests that share the next forward: the group of the most urgent active request."""
        groups = {r.group for r in self._active}
        if len(groups) == 1:
            return list(self._active)
        urgent = min(self._active, key=lambda r: r.urgency)
        return [r for r in self._active if r.group == urgent.group]

    def _tick(self) -> None:
        batch = self._next_group()
        started = time.perf_counter()
        try:
            predictions = self._forward(batch)
        except Exception:  # noqa: BLE001 - find who broke it: each request alone, so only the broken ones fail
            logger.exception("a transformer forward of %d requests failed; retrying them one by one", len(batch))
            predictions = self._forward_each(batch)
            batch = [r for _, members, _ in predictions for r in members]
            if not batch:
                return
        elapsed = time.perf_counter() - started
        self._seconds_per_tick = elapsed if self._seconds_per_tick is None else \
            0.8 * self._seconds_per_tick + 0.2 * elapsed
        self.metrics.forward(sum(r.num_rows for r in batch))
        self._learn_rates(batch, elapsed)

        now = time.monotonic()
        finished: list[ActiveRequest] = []
        for cohort, members, prediction in predictions:
            try:
                guided = cohort.guide(members, prediction)
                timestep = cohort.timestep
                with torch.no_grad():
                    cohort.advance(members, guided)
            except Exception as err:  # noqa: BLE001 - the cohort's shared step failed: its members fail
                for request in members:
                    self._drop(request, err)
                continue
            for request, row in zip(members, guided.split(1)):
                try:
                    self._stepped(request, row, timestep, now)
                except Exception as err:  # noqa: BLE001 - this request's own callback failed: it alone fails
                    self._drop(request, err)
                    continue
                if request.step == request.num_inference_steps:
                    finished.append(request)
        if finished:
            self._finish(finished)

    def _forward(self, batch: list[ActiveRequest]) -> list[tuple[Cohort, list[ActiveRequest], torch.Tensor]]:
        """One transformer forward over every row of `batch`: per cohort, its members here and their rows."""
        present = set(batch)
        segments = [(cohort, [m for m in cohort.live if m in present])
                    for cohort in dict.fromkeys(r.cohort for r in batch)]
        inputs, timesteps, texts, steps, keys, counts, plans = [], [], [], [], [], [], []
        for cohort, members in segments:
            inputs.append(cohort.model_input(self.family, members))
            rows = len(members) * cohort.num_rows
            timesteps.append(cohort.timestep.reshape(1).expand(rows))
            for request in members:
                texts.extend(request.texts)
                keys.extend(request.keys)
                plans.extend([request.plan] * request.num_rows)
            steps.extend([cohort.step] * rows)
            counts.extend([members[0].num_inference_steps] * rows)
        extra = {}
        if not getattr(self.family, "cfg_rows", True):  # guidance-distilled: each row's scale goes in the forward
            extra["guidance"] = [r.guidance_scale for _, members in segments for r in members]
        with torch.no_grad(), cachekit.rows(self.pipe, steps, keys, counts, plans):
            prediction = self.family.forward(self.pipe, torch.cat(inputs), torch.cat(timesteps), texts,
                                             batch[0].settings, **extra)
        out, offset = [], 0
        for cohort, members in segments:
            rows = len(members) * cohort.num_rows
            out.append((cohort, members, prediction[offset : offset + rows]))
            offset += rows
        return out

    def _forward_each(self, batch: list[ActiveRequest]) -> list[tuple[Cohort, list[ActiveRequest], torch.Tensor]]:
        """After a failed forward: every request alone. One that fails alone is dropped; the rest go on.

        The failed forward may have stored some blocks' outputs for this step; the solo forwards run the same step
        and store them again, so nothing of the failed attempt survives into a result.
        """
        survivors: dict[Cohort, dict[ActiveRequest, torch.Tensor]] = collections.defaultdict(dict)
        for request in batch:
            try:
                [(_, _, rows)] = self._forward([request])
            except Exception as err:  # noqa: BLE001 - this request's forward fails on its own: it alone fails
                logger.exception("request %s failed in its transformer forward", request.handle.id)
                self._drop(request, err)
                continue
            survivors[request.cohort][request] = rows
        out = []
        for cohort, rows_of in survivors.items():
            order = [m for m in cohort.live if m in rows_of]
            out.append((cohort, order, torch.cat([rows_of[m] for m in order])))
        return out

    def _learn_rates(self, batch: list[ActiveRequest], elapsed: float) -> None:
        cost = sum(r.cost / r.num_inference_steps for r in batch)
        rate = elapsed / max(cost, 1e-9)
        self._seconds_per_cost = rate if self._seconds_per_cost is None else 0.8 * self._seconds_per_cost + 0.2 * rate
        if self.max_cache_bytes is not None:
            rows = sum(r.num_rows for r in self._active)
            held = sum(s.cached_bytes() for s in cachekit.sessions(self.pipe))
            if rows:
                self._bytes_per_row = max(self._bytes_per_row, held / rows)

    def _stepped(self, request: ActiveRequest, prediction: torch.Tensor, t: torch.Tensor, now: float) -> None:
        """A request's bookkeeping after its cohort stepped: timing, its step event (and preview), its callback."""
        if request.first_step is None:
            request.first_step = now
        request.step += 1
        event = {"type": "step", "request_id": request.handle.id, "step": request.step,
                 "num_steps": request.num_inference_steps}
        if request.preview:
            event["preview"] = self._preview(request, prediction, t)
        request.handle._emit(event)
        if request.on_step is not None:
            request.on_step(request.step, request.latents)

    def _preview(self, request: ActiveRequest, noise: torch.Tensor, t: torch.Tensor) -> Any:
        """The current x0 prediction, decoded: what the image is becoming."""
        with torch.no_grad():
            x0 = self.family.x0(request.cohort.scheduler, request.latents, noise, t)
            return None if x0 is None else self.family.decode(self.pipe, x0)[0]

    def _finish(self, finished: list[ActiveRequest]) -> None:
        """Decode finished requests in one VAE call per latent shape and hand out their images."""
        by_shape: dict[tuple, list[ActiveRequest]] = collections.defaultdict(list)
        for request in finished:
            by_shape[tuple(request.latents.shape)].append(request)
        for requests in by_shape.values():
            try:
                with torch.no_grad():
                    images = self.family.decode(self.pipe, torch.cat([r.latents for r in requests]))
            except Exception as err:  # noqa: BLE001
                for request in requests:
                    self._drop(request, err)
                continue
            done = time.monotonic()
            for request, image in zip(requests, images):
                self._active.remove(request)
                cachekit.release(self.pipe, request.keys)
                info = ServedRequest(
                    request_id=request.handle.id, plan=request.plan_label, requested_plan=request.requested_plan,
                    degraded=request.degraded, num_inference_steps=request.num_inference_steps,
                    queue_wait_s=request.admitted - request.submitted,
                    time_to_first_step_s=request.first_step - request.submitted,
                    latency_s=done - request.submitted, steps_computed=request.step,
                    reused_share=round(1.0 - self._plan_cost(request.plan, request.num_inference_steps), 6),
                    deadline_s=request.deadline_s,
                    deadline_missed=None if request.deadline is None else done > request.deadline)
                self.metrics.served(info)
                request.handle._finish(image, info)
            self._report_held()


def _check_prompt_and_seed(prompt: Any, negative_prompt: Any, seed: Any) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise UsageError("prompt must be a non-empty string")
    if not isinstance(negative_prompt, str):
        raise UsageError("negative_prompt must be a string")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}")


def _is_static(plan: Any) -> bool:
    """A plan whose decisions depend on the step alone (a schedule, a static policy), not on the features."""
    return isinstance(plan, Schedule) or hasattr(plan, "schedule_for")

