"""A load test of the HTTP server (`create_app` over a `Runner`), on loopback only, bounded in count and time.

Prints figures measured in one run, never asserts them. The server runs in this process on a 127.0.0.1 port (the
same uvicorn as `cachekit serve`), over the bundled digits model; clients are httpx.AsyncClient tasks. Every
request is `POST /v1/images/generations` with a prompt "a handwritten D", a random seed, a random cache plan among
"none" (20 steps) and the shipped digits schedules (each at its own step count), b64_json. Clients and server share this process and its
cores, so the figures include the clients' HTTP, JSON and PNG work.

- one client at a time: the distinct requests served sequentially; their images are the solo references and
  their images per second the baseline;
- (a) 32 concurrent clients on a bursty trace (Gamma inter-arrival gaps, shape 0.25: coefficient of variation 2)
  of the same requests: errors, cross-talk (an image that is not its request's solo image within 1/255 per uint8
  pixel, the criterion tests/test_server.py uses), digits recognised, client-side p50/p99 latency, throughput
  against one client at a time;
- (b) twice the sustainable load (2x the images per second measured in (a)), open loop (every request sent at its
  arrival time, however many are in flight), on a fresh runner whose queue holds max_batch / 2 requests: 200s,
  429s and whether each carries Retry-After, timeouts, whether every request the runner took in came back with
  its own image, and what one retry after Retry-After brings.

    python benchmarks/serve_load.py                 # about 70 s on 2 idle CPU cores
    python benchmarks/serve_load.py --quick         # about 25 s
    python benchmarks/serve_load.py --requests 200 --json runs/serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cachekit.pipelines import Runner
from cachekit.zoo import load_pipeline
from cachekit.zoo.digits_classifier import recognise

API = "/v1/images/generations"
STEPS = 20
PLANS = ("none", "digits-lossless", "digits-fast", "digits-fastest")
PIXEL_TOLERANCE = 1  # of 255, as tests/test_server.py


# ---------------------------------------------------------------------------------------------------- the trace
def gamma_arrivals(num: int, rate: float, shape: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times (s) of `num` requests at `rate` per second with Gamma(shape) inter-arrival gaps."""
    gaps = rng.gamma(shape, 1.0 / (shape * rate), size=num)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def request_list(num: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    digits = rng.integers(0, 10, size=num)
    seeds = rng.choice(2**31, size=num, replace=False)
    plans = rng.integers(0, len(PLANS), size=num)
    # a shipped schedule runs the step count it records (digits-fastest: 8), so only the uncached requests name one
    return [{"prompt": f"a handwritten {int(d)}", "seed": int(s), "cache": PLANS[int(p)], "response_format": "b64_json",
             **({"num_inference_steps": STEPS} if PLANS[int(p)] == "none" else {})}
            for d, s, p in zip(digits, seeds, plans)]


def key(body: dict[str, Any]) -> tuple:
    return body["prompt"], body["seed"], body["cache"], body.get("num_inference_steps")


# ---------------------------------------------------------------------------------------------------- clients
class Outcome:
    """One HTTP exchange as the client saw it."""

    def __init__(self, index: int, sent: float) -> None:
        self.index = index
        self.sent = sent
        self.latency_s: float | None = None
        self.status: int | None = None
        self.error: str | None = None  # a transport error or timeout, by class name
        self.retry_after: str | None = None
        self.image: Image.Image | None = None
        self.served_seed: int | None = None


async def post(http: httpx.AsyncClient, index: int, body: dict[str, Any], started: float) -> Outcome:
    outcome = Outcome(index, time.perf_counter() - started)
    t0 = time.perf_counter()
    try:
        response = await http.post(API, json=body)
    except httpx.HTTPError as err:
        outcome.error = type(err).__name__
        outcome.latency_s = time.perf_counter() - t0
        return outcome
    outcome.latency_s = time.perf_counter() - t0
    outcome.status = response.status_code
    outcome.retry_after = response.headers.get("Retry-After")
    if response.status_code == 200:
        data = response.json().get("data") or []
        if len(data) == 1 and data[0].get("b64_json"):
            outcome.image = Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"]))).convert("RGB")
            outcome.served_seed = data[0].get("cachekit", {}).get("seed")
    return outcome


def client(url: str, connections: int, timeout: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=timeout, trust_env=False,
                             limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))


async def one_at_a_time(url: str, bodies: list[dict], timeout: float) -> tuple[list[Outcome], float]:
    async with client(url, 1, timeout) as http:
        started = time.perf_counter()
        outcomes = [await post(http, i, body, started) for i, body in enumerate(tqdm(bodies, desc="one client at a "
                                                                                      "time", leave=False))]
        return outcomes, time.perf_counter() - started


async def concurrent_clients(url: str, bodies: list[dict], arrivals: np.ndarray, clients: int,
                             timeout: float) -> tuple[list[Outcome], float]:
    """`clients` tasks take the requests in arrival order; each sends its next one at its arrival time or, when
    every client is busy, as soon as one is free."""
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(bodies)):
        queue.put_nowait(i)
    outcomes: list[Outcome] = []
    progress = tqdm(total=len(bodies), desc=f"{clients} concurrent clients", leave=False)
    async with client(url, clients, timeout) as http:
        started = time.perf_counter()

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                delay = arrivals[i] - (time.perf_counter() - started)
                if delay > 0:
                    await asyncio.sleep(delay)
                outcomes.append(await post(http, i, bodies[i], started))
                progress.update()

        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    progress.close()
    return sorted(outcomes, key=lambda o: o.index), elapsed


async def open_loop(url: str, bodies: list[dict], arrivals: np.ndarray, timeout: float,
                    retry: bool) -> tuple[list[Outcome], list[Outcome], float]:
    """Every request sent at its arrival time, however many are in flight; a 429 retried once after Retry-After."""
    progress = tqdm(total=len(bodies), desc="overload, open loop", leave=False)
    retries: list[Outcome] = []
    async with client(url, len(bodies) * 2, timeout) as http:
        started = time.perf_counter()

        async def one(i: int) -> Outcome:
            delay = arrivals[i] - (time.perf_counter() - started)
            if delay > 0:
                await asyncio.sleep(delay)
            outcome = await post(http, i, bodies[i], started)
            if retry and outcome.status == 429 and (outcome.retry_after or "").isdigit():
                await asyncio.sleep(int(outcome.retry_after))
                retries.append(await post(http, i, bodies[i], started))
            progress.update()
            return outcome

        outcomes = await asyncio.gather(*(one(i) for i in range(len(bodies))))
        elapsed = time.perf_counter() - started
    progress.close()
    return list(outcomes), sorted(retries, key=lambda o: o.index), elapsed


# ---------------------------------------------------------------------------------------------------- checks
def pixel_difference(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def as_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(i).copy()).permute(2, 0, 1) for i in images])


def judge(outcomes: list[Outcome], bodies: list[dict], solo: dict[tuple, Image.Image]) -> dict[str, Any]:
    """Cross-talk against the solo references, digits recognised, latency percentiles of the 200s."""
    ok = [o for o in outcomes if o.status == 200 and o.image is not None]
    differences = [pixel_difference(o.image, solo[key(bodies[o.index])]) for o in ok]
    crossed = [o for o, d in zip(ok, differences) if d > PIXEL_TOLERANCE]
    # an image off its own reference: whose is it? (the signature of cross-talk proper)
    others = {}
    for o in crossed:
        for k, reference in solo.items():
            if k != key(bodies[o.index]) and pixel_difference(o.image, reference) <= PIXEL_TOLERANCE:
                others[o.index] = k
                break
    recognised = recognise(as_tensor([o.image for o in ok])) if ok else np.zeros(0, dtype=np.int64)
    wanted = np.array([int(bodies[o.index]["prompt"].rsplit(" ", 1)[1]) for o in ok])
    latencies = [o.latency_s for o in ok]
    return {
        "ok": len(ok),
        "cross_talk": len(crossed),
        "images_of_another_request": len(others),
        "exactly_equal": sum(d == 0 for d in differences),
        "max_pixel_difference": max(differences) if differences else None,
        "seed_mismatches": sum(o.served_seed != bodies[o.index]["seed"] for o in ok),
        "recognised_share": float((recognised == wanted).mean()) if ok else None,
        "latency_p50_s": float(np.percentile(latencies, 50)) if latencies else None,
        "latency_p99_s": float(np.percentile(latencies, 99)) if latencies else None,
    }


def statuses(outcomes: list[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        name = str(o.status) if o.status is not None else o.error or "?"
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def is_timeout(o: Outcome) -> bool:
    return o.error is not None and "Timeout" in o.error


def run_with_deadline(coroutine: Any, deadline: float, what: str) -> Any:
    left = deadline - time.monotonic()
    if left <= 0:
        coroutine.close()
        raise SystemExit(f"the --timeout ran out before {what}")
    try:
        return asyncio.run(asyncio.wait_for(coroutine, timeout=left))
    except asyncio.TimeoutError:
        raise SystemExit(f"the --timeout ran out during {what}") from None


def machine_busy_s() -> float | None:
    """CPU seconds every process on this machine has used since boot (Linux /proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def done_count(runner: Runner) -> int:
    return int(runner.stats()["requests"].get("done", 0))


def forward_rows(runner: Runner) -> tuple[int, float]:
    """Forwards so far and the rows they carried."""
    stats = runner.stats()
    return stats["forwards"], (stats["batch_occupancy"] or 0.0) * stats["forwards"] * runner.max_batch


def occupancy_since(runner: Runner, before: tuple[int, float]) -> float | None:
    forwards, rows = forward_rows(runner)
    return (rows - before[1]) / (forwards - before[0]) / runner.max_batch if forwards > before[0] else None


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=96,
                        help="requests in the one-at-a-time and concurrent phases (default 96; --quick 32)")
    parser.add_argument("--distinct", type=int, default=None,
                        help="distinct requests among them, each served once alone as the reference; the rest repeat "
                             "them in random order (default: all distinct; --quick 16)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients in phase (a) (default 32)")
    parser.add_argument("--load", type=float, default=4.0,
                        help="phase (a)'s mean arrival rate as a multiple of one-at-a-time throughput (default 4: "
                             "bursts outrun the server, so the clients, not the trace, bound it)")
    parser.add_argument("--shape", type=float, default=0.25, help="Gamma shape of inter-arrival gaps (default 0.25)")
    parser.add_argument("--overload-requests", type=int, default=160,
                        help="requests in phase (b): enough that the backlog outgrows the queue (default 160; "
                             "--quick 64)")
    parser.add_argument("--overload", type=float, default=2.0,
                        help="phase (b)'s arrival rate as a multiple of (a)'s throughput (default 2)")
    parser.add_argument("--max-batch", type=int, default=32,
                        help="the runner's transformer rows per forward; a request with CFG takes 2 (default 32)")
    parser.add_argument("--max-queue", type=int, default=None,
                        help="the runner's queue in phase (b): beyond it the server answers 429 (default max_batch / 2 "
                             "requests, one batch of CFG requests; --quick max_batch / 4)")
    parser.add_argument("--align-steps", type=float, default=20.0,
                        help="the runner's step-aligned admission (Runner(align_steps=...); default 20, 0: off)")
    parser.add_argument("--no-retry", action="store_true", help="in phase (b), do not retry a 429 once")
    parser.add_argument("--request-timeout", type=float, default=120.0,
                        help="client timeout per request, s; one that runs out counts as a timeout (default 120)")
    parser.add_argument("--timeout", type=float, default=900.0, help="the whole run's bound, s (default 900)")
    parser.add_argument("--quick", action="store_true",
                        help="32 requests of 16 distinct, 64 in phase (b) on a queue of max_batch / 4: about 25 s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.requests = min(args.requests, 32)
        args.distinct = min(args.distinct or 16, args.requests)
        args.overload_requests = min(args.overload_requests, 64)
        args.max_queue = args.max_queue or max(args.max_batch // 4, 1)
    args.max_queue = args.max_queue or max(args.max_batch // 2, 1)
    distinct = min(args.distinct or args.requests, args.requests)
    deadline = time.monotonic() + args.timeout
    load_before = os.getloadavg()[0]
    busy_before, own_before, wall_before = machine_busy_s(), own_cpu_s(), time.monotonic()
    torch.set_num_threads(2)
    from cachekit.pipelines.server import ServerLimits, ServerThread, create_app

    rng = np.random.default_rng(args.seed)
    references = request_list(distinct, rng)
    order = np.concatenate([np.arange(distinct), rng.integers(0, distinct, size=args.requests - distinct)])
    bodies = [references[int(i)] for i in rng.permutation(order)]
    limits = ServerLimits()
    results: dict[str, Any] = {"requests": args.requests, "distinct": distinct, "clients": args.clients, "steps": STEPS,
                               "gamma_shape": args.shape, "max_batch_rows": args.max_batch,
                               "align_steps": args.align_steps,
                               "plans": list(PLANS),
                               "torch_threads": torch.get_num_threads()}

    pipe = load_pipeline("digits")
    pipe.set_progress_bar_config(disable=True)
    # ---------------------------------------------------------------- one at a time, then (a)
    with Runner(pipe, max_batch=args.max_batch, max_queue=max(256, args.requests),
                align_steps=args.align_steps) as runner, \
            ServerThread(create_app(runner=runner, limits=limits)) as server:
        results["runner_loop_threads"] = runner.loop_threads
        run_with_deadline(one_at_a_time(server.url, references[:4], args.request_timeout), deadline, "the warm-up")
        sequential, sequential_s = run_with_deadline(
            one_at_a_time(server.url, references, args.request_timeout), deadline, "the one-at-a-time phase")
        solo = {key(references[o.index]): o.image for o in sequential if o.status == 200 and o.image is not None}
        sequential_rate = len(solo) / sequential_s
        rate = args.load * sequential_rate
        arrivals = gamma_arrivals(args.requests, rate, args.shape, rng)
        before, rows_before = done_count(runner), forward_rows(runner)
        concurrent, concurrent_s = run_with_deadline(
            concurrent_clients(server.url, bodies, arrivals, args.clients, args.request_timeout), deadline,
            "phase (a)")
        accepted_a = done_count(runner) - before
        occupancy_a = occupancy_since(runner, rows_before)
    seq = judge(sequential, references, solo)
    conc = judge(concurrent, bodies, solo)
    concurrent_rate = conc["ok"] / concurrent_s
    results["one_at_a_time"] = {"statuses": statuses(sequential), "seconds": sequential_s,
                                "images_per_s": sequential_rate, **seq}
    results["concurrent"] = {"offered_rate_per_s": rate, "trace_span_s": float(arrivals[-1]),
                             "statuses": statuses(concurrent), "errors": sum(o.status != 200 for o in concurrent),
                             "seconds": concurrent_s, "images_per_s": concurrent_rate,
                             "over_one_at_a_time": concurrent_rate / sequential_rate,
                             "runner_done": accepted_a, "batch_occupancy": occupancy_a, **conc}

    # ---------------------------------------------------------------- (b) twice the sustainable load
    over_bodies = [bodies[i % len(bodies)] for i in range(args.overload_requests)]
    over_rate = args.overload * concurrent_rate
    over_arrivals = gamma_arrivals(args.overload_requests, over_rate, args.shape, rng)
    with Runner(pipe, max_batch=args.max_batch, max_queue=args.max_queue,
                align_steps=args.align_steps) as runner, \
            ServerThread(create_app(runner=runner, limits=limits)) as server:
        before, rows_before = done_count(runner), forward_rows(runner)
        outcomes_before = dict(runner.stats()["requests"])
        first, retries, over_s = run_with_deadline(
            open_loop(server.url, over_bodies, over_arrivals, args.request_timeout, not args.no_retry), deadline,
            "phase (b)")
        idle_by = time.monotonic() + 30
        while (runner.stats()["active"] or runner.stats()["queued"]) and time.monotonic() < idle_by:
            time.sleep(0.05)
        runner_done = done_count(runner) - before
        runner_outcomes = {name: count - outcomes_before.get(name, 0)
                           for name, count in runner.stats()["requests"].items()
                           if count - outcomes_before.get(name, 0)}
        occupancy_b = occupancy_since(runner, rows_before)
        results["overload_runner_loop_threads"] = runner.loop_threads
        healthy = httpx.get(server.url + "/healthz", timeout=5, trust_env=False).status_code == 200
    every = first + retries
    accepted = [o for o in every if o.status == 200]
    rejected = [o for o in every if o.status == 429]
    over_first = judge(first, over_bodies, solo)
    # goodput: accepted images per second from the first send to the last image (retries included)
    last_image = max((x.sent + x.latency_s for x in accepted), default=None)
    goodput = len(accepted) / last_image if last_image else None
    over_all = judge(every, over_bodies, solo)
    results["overload"] = {
        "offered_rate_per_s": over_rate, "max_queue": args.max_queue, "requests": args.overload_requests,
        "seconds": over_s, "first_attempts": statuses(first), "retries": statuses(retries),
        "accepted": len(accepted), "rejected_429": len(rejected),
        "429_with_retry_after": sum((o.retry_after or "").isdigit() for o in rejected),
        "timeouts": sum(is_timeout(o) for o in every),
        "other_errors": sum(o.status not in (200, 429) for o in every) - sum(is_timeout(o) for o in every),
        "accepted_without_image": sum(o.image is None for o in accepted),
        "runner_done": runner_done, "runner_outcomes": runner_outcomes,
        # what the runner took in (everything but its rejections) and the client did not get back as an image
        "lost": sum(n for name, n in runner_outcomes.items() if name != "rejected")
        - sum(x.image is not None for x in accepted),
        "goodput_images_per_s": goodput,
        "goodput_over_sustainable": goodput / concurrent_rate if goodput else None,
        "first_attempt_latency_p50_s": over_first["latency_p50_s"],
        "first_attempt_latency_p99_s": over_first["latency_p99_s"],
        "cross_talk": over_all["cross_talk"], "max_pixel_difference": over_all["max_pixel_difference"],
        "recognised_share": over_all["recognised_share"],
        "healthz_after": healthy, "batch_occupancy": occupancy_b,
        "served_after_one_retry": sum(o.status == 200 for o in retries),
    }

    results["load_average_1min"] = {"start": load_before, "end": os.getloadavg()[0]}
    busy_after = machine_busy_s()
    others = None if busy_before is None or busy_after is None else \
        max(0.0, (busy_after - busy_before) - (own_cpu_s() - own_before)) / \
        ((time.monotonic() - wall_before) * (os.cpu_count() or 1))
    results["other_processes_cpu_share"] = others
    # ---------------------------------------------------------------- the table
    s, c, o = results["one_at_a_time"], results["concurrent"], results["overload"]

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1000:.0f} ms"

    print(f"\nserver on 127.0.0.1, digits model, {STEPS} steps, plans {', '.join(PLANS)} at random, "
          f"max_batch {args.max_batch} rows, "
          f"align_steps {args.align_steps:g}, torch threads {results['torch_threads']} "
          f"(runner loop {results['runner_loop_threads']}, in (b) {results['overload_runner_loop_threads']}); "
          f"{os.cpu_count()} CPUs; other processes used "
          f"{'?' if others is None else f'{others:.0%}'} of the machine's CPU time during the run")
    print()
    print("| phase | requests | statuses | cross-talk | max px diff | digits right | p50 | p99 | images/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| one client at a time (the references) | {distinct} | {s['statuses']} | - (reference) | - | "
          f"{s['recognised_share']:.0%} | {ms(s['latency_p50_s'])} | {ms(s['latency_p99_s'])} | "
          f"{s['images_per_s']:.2f} |")
    print(f"| (a) {args.clients} clients, Gamma({args.shape}) trace at {c['offered_rate_per_s']:.1f}/s | "
          f"{args.requests} | {c['statuses']} | {c['cross_talk']} | {c['max_pixel_difference']} | "
          f"{c['recognised_share']:.0%} | {ms(c['latency_p50_s'])} | {ms(c['latency_p99_s'])} | "
          f"{c['images_per_s']:.2f} |")
    print(f"| (b) open loop at {o['offered_rate_per_s']:.1f}/s, max_queue {args.max_queue}, first tries | "
          f"{args.overload_requests} | {o['first_attempts']} | {over_first['cross_talk']} | "
          f"{over_first['max_pixel_difference']} | {over_first['recognised_share'] or 0:.0%} | "
          f"{ms(o['first_attempt_latency_p50_s'])} | {ms(o['first_attempt_latency_p99_s'])} | "
          f"{o['goodput_images_per_s'] or 0:.2f} (accepted, retries too) |")
    if not args.no_retry:
        print(f"| (b) one retry after Retry-After | {len(retries)} | {o['retries']} | - | - | - | - | - | - |")
    print()
    print(f"(a): {c['errors']} errors, {c['cross_talk']} cross-talk ({c['exactly_equal']}/{c['ok']} images bit-equal "
          f"to their solo call, {c['images_of_another_request']} equal to another request's, "
          f"{c['seed_mismatches']} seed mismatches); runner finished {c['runner_done']} requests; "
          f"batch occupancy {c['batch_occupancy'] or 0:.2f}")
    print(f"(b): {o['accepted']} accepted, {o['rejected_429']} answered 429 ({o['429_with_retry_after']} with "
          f"Retry-After), {o['timeouts']} timeouts, {o['other_errors']} other errors; accepted without an image "
          f"{o['accepted_without_image']}; runner outcomes in (b) {o['runner_outcomes']}; "
          f"{o['cross_talk']} cross-talk; /healthz after: {'200' if healthy else 'not 200'}; "
          f"batch occupancy {o['batch_occupancy'] or 0:.2f}")
    lost = o["lost"]
    print(f"summary: concurrent/one-at-a-time throughput {c['over_one_at_a_time']:.2f}x "
          f"({c['images_per_s']:.2f} vs {s['images_per_s']:.2f} img/s), "
          f"p99/p50 {c['latency_p99_s'] / c['latency_p50_s']:.2f}, "
          f"cross-talk {c['cross_talk'] + o['cross_talk']}, errors {c['errors']}; at {args.overload:.0f}x sustainable: "
          f"accepted {o['accepted'] / max(len(every), 1):.0%} of tries, 429 with Retry-After "
          f"{o['429_with_retry_after']}/{o['rejected_429']}, timeouts {o['timeouts']}, lost {lost}, goodput "
          f"{o['goodput_over_sustainable'] or 0:.2f} of sustainable")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
