# No `from __future__ import annotations`: FastAPI reads these annotations at runtime.
"""``WS /v1/stream``: send frames (encoded images), receive predictions in order.

Protocol: each binary message is one frame; the server answers each with a JSON text
message ``{"type": "prediction", "frame": i, ...}`` (or ``{"type": "error", "frame": i,
"status", "error"}``) in frame order. A text message ``{"type": "close"}`` (or closing
the socket) ends the stream; the server then sends ``{"type": "summary", ...}`` and
closes. The version is resolved once when the stream opens, so a stream never mixes
versions. ``?size=320x320`` serves every frame at that listed size (an unlisted one
closes the stream with a 400 error first); without it each frame goes to the listed
size nearest its own, and every prediction says which (``size``).

Flow control: the server's first message is ``{"type": "ready", "max_in_flight": N}``;
a client keeps at most N frames unanswered (send a new frame when an answer arrives).
The Ray Serve HTTP proxy reads a WebSocket eagerly and queues its messages without
bound before they reach the replica, so TCP alone cannot push back on a flooding
client; the server therefore reads eagerly too and closes a stream (code 1008) whose
unanswered frames exceed ``2 * max_in_flight``. Per-stream memory is thus bounded by
``2 * max_in_flight`` frames (plus what arrives in the milliseconds before the check),
whatever the client does.
"""

import asyncio
import dataclasses
import json
import time
import uuid
from typing import Any, Optional

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from serve_apps.inputs import ApiError
from serve_apps.pipeline import PredictionService
from visionfleet.imaging import choose_size, format_size

__all__ = ["router"]

_MAX_IN_FLIGHT = 64


async def _close_with_error(ws: WebSocket, status: int, message: str) -> None:
    await ws.send_text(json.dumps({"type": "error", "status": status, "error": message}))
    await ws.close(code=1008 if status < 500 else 1011, reason=message[:120])


def router(svc: PredictionService) -> APIRouter:
    """The stream route, bound to this replica's prediction service."""
    r = APIRouter()

    @r.websocket("/v1/stream")
    async def stream(ws: WebSocket, model: Optional[str] = None, version: Optional[str] = None, top_k: int = 3,
                     max_in_flight: int = 4, size: Optional[str] = None) -> None:
        await ws.accept()
        max_body = svc.cfg.max_body_bytes
        if not 1 <= max_in_flight <= _MAX_IN_FLIGHT or not 1 <= top_k <= 1000:
            await _close_with_error(ws, 400, f"max_in_flight must be 1..{_MAX_IN_FLIGHT} and top_k 1..1000")
            return
        try:
            route = svc.route(ws.headers, model, version)
            resolved, card = svc.target(route.ref)
            route = dataclasses.replace(route, ref=str(resolved))  # pinned: a stream never mixes versions
            if size is not None:
                try:  # refused when the stream opens, not frame by frame
                    choose_size(card.sizes, None, size)
                except ValueError as exc:
                    raise ApiError(400, str(exc)) from None
        except ApiError as exc:
            await _close_with_error(ws, exc.status, exc.message)
            return
        stream_id = uuid.uuid4().hex[:12]
        client_key = ws.headers.get("x-client-id")
        pending: asyncio.Queue = asyncio.Queue()
        hard_limit = 2 * max_in_flight  # unanswered frames before the stream is closed
        stats: dict[str, Any] = {"frames": 0, "ok": 0, "errors": 0, "latencies": [], "labels": {}, "max_in_flight": 0}
        outstanding = 0

        async def process(i: int, data: bytes) -> dict:
            t0 = time.perf_counter()
            rid = f"{stream_id}-{i}"
            try:
                if len(data) > max_body:
                    raise ApiError(413, f"frame of {len(data)} bytes; the limit is {max_body}")
                (o,) = await svc.run(route, [data], request_ids=[rid], t0=t0, top_k=top_k, client_key=client_key,
                                     size=size)
                return {"type": "prediction", "frame": i, "request_id": rid, "model": resolved.name,
                        "version": resolved.version, "variant": route.variant, "latency_ms": round(o.latency_ms, 3),
                        **o.prediction.response()}
            except ApiError as exc:
                return {"type": "error", "frame": i, "status": exc.status, "error": exc.message}

        async def writer() -> None:
            nonlocal outstanding
            while True:
                task = await pending.get()
                if task is None:
                    return
                msg = await task
                if msg["type"] == "prediction":
                    stats["ok"] += 1
                    stats["latencies"].append(msg["latency_ms"])
                    label = msg.get("label")
                    if label is not None:
                        stats["labels"][label] = stats["labels"].get(label, 0) + 1
                else:
                    stats["errors"] += 1
                await ws.send_text(json.dumps(msg))
                outstanding -= 1

        await ws.send_text(json.dumps({"type": "ready", "model": resolved.name, "version": resolved.version,
                                       "variant": route.variant, "max_in_flight": max_in_flight,
                                       "sizes": [format_size(s) for s in card.sizes], "size": size}))
        writer_task = asyncio.create_task(writer())
        t_start = time.perf_counter()
        closed_by_client = False
        violated = False
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    closed_by_client = True
                    break
                outstanding += 1
                stats["max_in_flight"] = max(stats["max_in_flight"], outstanding)
                if outstanding > hard_limit:
                    violated = True
                    break
                data = msg.get("bytes")
                if data is None:
                    text = msg.get("text") or ""
                    try:
                        ctl = json.loads(text)
                    except json.JSONDecodeError:
                        ctl = None
                    if isinstance(ctl, dict) and ctl.get("type") == "close":
                        outstanding -= 1
                        break
                    await pending.put(_done({"type": "error", "frame": stats["frames"], "status": 400,
                                             "error": "send frames as binary messages; text may only be {\"type\": \"close\"}"}))
                    stats["frames"] += 1
                    continue
                i = stats["frames"]
                stats["frames"] += 1
                await pending.put(asyncio.create_task(process(i, data)))
        except WebSocketDisconnect:
            closed_by_client = True
        if violated:
            writer_task.cancel()
            while not pending.empty():
                t = pending.get_nowait()
                if t is not None:
                    t.cancel()
            await _close_with_error(ws, 429, f"flow control: more than {hard_limit} unanswered frames "
                                             f"(keep at most {max_in_flight} in flight)")
            return
        await pending.put(None)
        try:
            await writer_task
        except (WebSocketDisconnect, RuntimeError):
            return  # the client left; nothing more to send
        if closed_by_client:
            return
        lat = np.array(stats["latencies"]) if stats["latencies"] else np.array([np.nan])
        summary = {
            "type": "summary",
            "model": resolved.name,
            "version": resolved.version,
            "frames": stats["frames"],
            "ok": stats["ok"],
            "errors": stats["errors"],
            "seconds": round(time.perf_counter() - t_start, 3),
            "latency_ms": {"mean": float(np.nanmean(lat)), "p50": float(np.nanpercentile(lat, 50)), "p95": float(np.nanpercentile(lat, 95))},
            "labels": stats["labels"],
            "max_in_flight": max_in_flight,
            "max_in_flight_observed": stats["max_in_flight"],
        }
        await ws.send_text(json.dumps(summary))
        await ws.close()

    return r


def _done(value: dict) -> "asyncio.Future":
    fut = asyncio.get_running_loop().create_future()
    fut.set_result(value)
    return fut
