"""Throughput of the server on Ray Serve, 1 replica against 2, on a local Ray on this machine, loopback only.

Prints figures measured in one run, never asserts them. A local Ray gets all of this machine's CPU cores; each
deployment splits them evenly over its replicas (`num_cpus = cores / replicas`, so Ray sets each replica's
OpenMP threads to its share) and each runner keeps its default `cpu_threads="auto"`. For each deployment: one
warm-up request, then N requests at once (`POST /v1/images/generations`, "a handwritten D", seeds 0..N-1, 20 steps,
no cache plan), a 429 retried after its Retry-After; images per second is N over the wall time of the N.

    python benchmarks/serve_ray.py                  # N=24, about 50 s on 2 CPU cores
    python benchmarks/serve_ray.py --requests 48 --steps 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time

import httpx

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

API = "/v1/images/generations"


def deploy(replicas: int, cores: int, timeout_s: float) -> None:
    from cachekit.pipelines.server.ray_app import deployment, run_within

    run_within(deployment(model="digits", replicas=replicas, num_cpus=cores / replicas), timeout_s)


async def burst(url: str, count: int, steps: int, timeout_s: float) -> tuple[float, dict[int, int], set[str]]:
    """Wall time of `count` requests at once, their final status codes, and the replicas that answered."""
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as client:
        async def call(seed: int) -> httpx.Response:
            for _ in range(50):
                response = await client.post(API, json={"prompt": "a handwritten D", "seed": seed,
                                                        "num_inference_steps": steps})
                if response.status_code != 429:
                    return response
                await asyncio.sleep(float(response.headers.get("retry-after", 1)))
            return response

        await call(10_000)  # warm-up: the first forward through the proxy and the runner
        start = time.perf_counter()
        responses = await asyncio.wait_for(asyncio.gather(*(call(i) for i in range(count))), timeout_s)
        wall = time.perf_counter() - start
    codes: dict[int, int] = {}
    for response in responses:
        codes[response.status_code] = codes.get(response.status_code, 0) + 1
    return wall, codes, {r.headers.get("x-cachekit-replica", "?") for r in responses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds for each deployment and each burst")
    args = parser.parse_args()

    import ray
    from ray import serve

    cores = os.cpu_count() or 1
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rates = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for replicas in (1, 2):
            deploy(replicas, cores, args.timeout)
            wall, codes, served_by = asyncio.run(burst(f"http://127.0.0.1:{port}", args.requests, args.steps,
                                                       args.timeout))
            rates[replicas] = args.requests / wall
            print(f"{replicas} replica(s), {cores / replicas:g} CPU each: {args.requests} requests in {wall:.2f} s, "
                  f"{rates[replicas]:.2f} images/s, status {codes}, answered by {len(served_by)} replica(s)",
                  flush=True)
            serve.delete("cachekit")
        print(f"2 replicas / 1 replica: {rates[2] / rates[1]:.2f}x ({cores} CPU cores, {args.steps} steps)")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
