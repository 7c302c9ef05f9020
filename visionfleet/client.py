"""A small concurrent HTTP client for the prediction routes (demo, tests, load checks).

It sends prepared requests with a fixed concurrency (closed loop), records status,
latency and body of each, and summarizes accuracy and latency percentiles.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["PreparedRequest", "Outcome", "prepare", "run_closed_loop", "summarize"]


@dataclass
class PreparedRequest:
    """One HTTP request body with its expected label (for scoring) and tags."""

    path: str
    body: bytes
    headers: dict[str, str]
    label: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    request: PreparedRequest
    status: int
    latency_ms: float
    body: dict[str, Any] | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.body is not None


def prepare(
    data: bytes, content_type: str, style: str, *, label: str | None = None, tags: dict[str, str] | None = None
) -> PreparedRequest:
    """Build a ``/v1/predict`` request in one of the input styles: raw, multipart, json."""
    tags = {**(tags or {}), "style": style}
    if style == "raw":
        return PreparedRequest("/v1/predict", data, {"Content-Type": content_type}, label, tags)
    if style == "json":
        body = json.dumps({"image": base64.b64encode(data).decode()}).encode()
        return PreparedRequest("/v1/predict", body, {"Content-Type": "application/json"}, label, tags)
    if style == "multipart":
        boundary = "vfboundary7MA4YWxkTrZu0gW"
        ext = content_type.split("/")[-1]
        body = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"image.{ext}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
        return PreparedRequest(
            "/v1/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}, label, tags
        )
    raise ValueError(f"Got {style!r} for style; expected raw, multipart or json")


async def _run(
    base_url: str,
    requests: Sequence[PreparedRequest],
    concurrency: int,
    timeout: float,
    on_done: Callable[[Outcome], None] | None,
) -> tuple[list[Outcome], float]:
    import httpx

    outcomes: list[Outcome | None] = [None] * len(requests)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(requests)):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                req = requests[i]
                t0 = time.perf_counter()
                try:
                    r = await client.post(req.path, content=req.body, headers=req.headers)
                    ms = (time.perf_counter() - t0) * 1000
                    try:
                        body = r.json()
                    except ValueError:
                        body = None
                    err = body.get("error") if isinstance(body, dict) and r.status_code != 200 else None
                    outcomes[i] = Outcome(req, r.status_code, ms, body, err)
                except httpx.HTTPError as exc:
                    outcomes[i] = Outcome(req, 0, (time.perf_counter() - t0) * 1000, None, repr(exc))
                if on_done:
                    on_done(outcomes[i])  # type: ignore[arg-type]

        t_start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
        wall = time.perf_counter() - t_start
    return [o for o in outcomes if o is not None], wall


def run_closed_loop(
    base_url: str,
    requests: Sequence[PreparedRequest],
    *,
    concurrency: int = 8,
    timeout: float = 60.0,
    on_done: Callable[[Outcome], None] | None = None,
) -> tuple[list[Outcome], float]:
    """Send every request with ``concurrency`` in flight; returns outcomes and wall seconds."""
    return asyncio.run(_run(base_url, requests, concurrency, timeout, on_done))


def summarize(outcomes: Sequence[Outcome], wall_s: float, group_by: str | None = None) -> dict[str, Any]:
    """Accuracy (where labels exist), latency percentiles, throughput and errors."""

    def _one(items: Sequence[Outcome]) -> dict[str, Any]:
        ok = [o for o in items if o.ok]
        lat = np.array([o.latency_ms for o in ok]) if ok else np.array([np.nan])
        scored = [o for o in ok if o.request.label is not None]
        correct = sum(1 for o in scored if o.body and o.body.get("label") == o.request.label)
        return {
            "requests": len(items),
            "ok": len(ok),
            "errors": len(items) - len(ok),
            "accuracy": correct / len(scored) if scored else None,
            "p50_ms": float(np.nanpercentile(lat, 50)),
            "p95_ms": float(np.nanpercentile(lat, 95)),
            "p99_ms": float(np.nanpercentile(lat, 99)),
        }

    doc = _one(outcomes)
    doc["rps"] = len(outcomes) / wall_s if wall_s > 0 else None
    doc["wall_s"] = wall_s
    if group_by:
        groups: dict[str, list[Outcome]] = {}
        for o in outcomes:
            groups.setdefault(o.request.tags.get(group_by, "?"), []).append(o)
        doc["by_" + group_by] = {k: _one(v) for k, v in sorted(groups.items())}
    versions = sorted({str(o.body.get("version")) for o in outcomes if o.ok and o.body})
    doc["versions"] = versions
    return doc
