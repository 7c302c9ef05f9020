"""HTTP load generator: closed-loop concurrency and open-loop Poisson arrivals.

    python bench/loadgen.py --url http://127.0.0.1:8000/v1/predict --image x.png --concurrency 1,4,16
    python bench/loadgen.py --url ... --image x.png --rate 50 --duration 20

Closed loop: ``concurrency`` clients each send the next request when the previous one
answered (throughput at a fixed load). Open loop: requests start at Poisson arrival
times whatever the server does (what real traffic does; latency includes queueing).
Prints a table, writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["LoadResult", "closed_loop", "open_loop", "multipart_body"]


@dataclass
class LoadResult:
    mode: str
    level: float  # concurrency or offered rate
    requests: int
    ok: int
    errors: int
    seconds: float
    throughput: float  # successful requests per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    status_counts: dict

    def row(self) -> str:
        return (f"{self.mode:>6} {self.level:>7.1f} {self.requests:>7} {self.errors:>6} {self.throughput:>9.1f} "
                f"{self.p50_ms:>8.1f} {self.p95_ms:>8.1f} {self.p99_ms:>8.1f}")


def multipart_body(data: bytes, field: str = "file", filename: str = "image.png", ctype: str = "image/png") -> tuple[bytes, str]:
    boundary = "vfbench0123456789"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {ctype}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _summary(mode: str, level: float, lat: list[float], statuses: list[int], seconds: float) -> LoadResult:
    if CLIENT_ERRORS:
        statuses_errors = dict(CLIENT_ERRORS)
        CLIENT_ERRORS.clear()
    else:
        statuses_errors = {}
    ok_lat = np.array([l for l, s in zip(lat, statuses) if s == 200]) if lat else np.array([])
    counts: dict[str, int] = {}
    for s in statuses:
        counts[str(s)] = counts.get(str(s), 0) + 1
    for name, k in statuses_errors.items():
        counts[f"client:{name}"] = k
    q = (lambda p: float(np.percentile(ok_lat, p))) if ok_lat.size else (lambda p: float("nan"))
    ok = int(ok_lat.size)
    return LoadResult(mode=mode, level=level, requests=len(statuses), ok=ok, errors=len(statuses) - ok, seconds=seconds,
                      throughput=ok / seconds if seconds else 0.0, p50_ms=q(50), p95_ms=q(95), p99_ms=q(99),
                      status_counts=counts)


CLIENT_ERRORS: dict[str, int] = {}  # exception class -> count (status 0 in the results)


async def _one(client, url: str, body: bytes, headers: dict) -> tuple[float, int]:
    import httpx

    t0 = time.perf_counter()
    try:
        r = await client.post(url, content=body, headers=headers)
        status = r.status_code
        await r.aread()
    except httpx.HTTPError as exc:
        status = 0
        CLIENT_ERRORS[type(exc).__name__] = CLIENT_ERRORS.get(type(exc).__name__, 0) + 1
    return (time.perf_counter() - t0) * 1000, status


async def _closed(url: str, make: Callable[[int], tuple[bytes, dict]], concurrency: int, duration: float, warmup: float) -> LoadResult:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    lat: list[float] = []
    statuses: list[int] = []
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        stop_at = time.perf_counter() + warmup + duration
        measure_from = time.perf_counter() + warmup
        counter = [0]

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                i = counter[0]
                counter[0] += 1
                body, headers = make(i)
                t_start = time.perf_counter()
                ms, st = await _one(client, url, body, headers)
                if t_start >= measure_from:
                    lat.append(ms)
                    statuses.append(st)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return _summary("closed", concurrency, lat, statuses, duration)


async def _open(url: str, make: Callable[[int], tuple[bytes, dict]], rate: float, duration: float, seed: int,
                max_connections: int = 512) -> LoadResult:
    import httpx

    rng = np.random.default_rng(seed)
    lat: list[float] = []
    statuses: list[int] = []
    # Requests beyond max_connections wait for a free connection in the client (the wait
    # counts in their latency): a real client's connection pool, and no connection churn.
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        t0 = time.perf_counter()
        tasks = []
        t = 0.0
        i = 0
        while t < duration:
            t += float(rng.exponential(1.0 / rate))
            delay = t0 + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body, headers = make(i)
            i += 1
            tasks.append(asyncio.create_task(_one(client, url, body, headers)))
        for ms, st in await asyncio.gather(*tasks):
            lat.append(ms)
            statuses.append(st)
        seconds = time.perf_counter() - t0
    return _summary("open", rate, lat, statuses, seconds)


def closed_loop(url: str, make: Callable[[int], tuple[bytes, dict]], concurrency: int, duration: float = 10.0,
                warmup: float = 2.0) -> LoadResult:
    return asyncio.run(_closed(url, make, concurrency, duration, warmup))


def open_loop(url: str, make: Callable[[int], tuple[bytes, dict]], rate: float, duration: float = 10.0, seed: int = 0,
              max_connections: int = 512) -> LoadResult:
    return asyncio.run(_open(url, make, rate, duration, seed, max_connections))


HEADER = f"{'mode':>6} {'level':>7} {'reqs':>7} {'errors':>6} {'req/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--image", required=True, type=Path)
    ap.add_argument("--multipart", action="store_true", help="send as multipart/form-data (field 'file')")
    ap.add_argument("--concurrency", default="", help="closed loop: comma-separated levels")
    ap.add_argument("--rate", default="", help="open loop: comma-separated request rates")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    data = args.image.read_bytes()
    if args.multipart:
        body, ctype = multipart_body(data)
    else:
        body, ctype = data, "application/octet-stream"
    make = lambda i: (body, {"Content-Type": ctype})  # noqa: E731
    results = []
    print(HEADER)
    for c in [int(x) for x in args.concurrency.split(",") if x]:
        r = closed_loop(args.url, make, c, args.duration)
        results.append(r)
        print(r.row())
    for rate in [float(x) for x in args.rate.split(",") if x]:
        r = open_loop(args.url, make, rate, args.duration)
        results.append(r)
        print(r.row())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
