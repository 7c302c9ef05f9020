# No `from __future__ import annotations`: FastAPI reads these annotations at runtime.
"""The REST prediction routes: ``POST /v1/predict``, ``POST /v1/predict/batch``, health,
model metadata and ``/v1/stats``.

Each prediction route parses its body (``serve_apps.inputs``), picks the route
(experiment arm, explicit version or ``@production``) and calls the one prediction
step, :meth:`serve_apps.pipeline.PredictionService.run`.
"""

import time
import uuid
from typing import Any, Awaitable, Callable, Dict, Optional

from fastapi import APIRouter, Request

from serve_apps.inputs import model_ref_from, parse_batch, parse_predict, read_body, request_id_from
from serve_apps.pipeline import PredictionService, store_unavailable
from visionfleet.store import StoreError

__all__ = ["router"]


def router(svc: PredictionService, runner_stats: Callable[[], Awaitable[Dict[str, Any]]]) -> APIRouter:
    """The routes, bound to this replica's prediction service and its model runner's figures."""
    r = APIRouter()
    cfg = svc.cfg

    async def body(request: Request) -> bytes:
        return await read_body(request.stream(), request.headers.get("content-length"), cfg.max_body_bytes)

    @r.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "default_model": cfg.default_model, "experiments": sorted(svc.experiments)}

    @r.get("/v1/stats")
    async def stats() -> dict:
        """Batching and telemetry figures of this ingress replica and of its model runner."""
        b = svc.batcher
        return {
            "ingress": {
                "inference_in": cfg.ingress.inference_in,
                "replica_calls": b.calls,
                "requests": b.items,
                "images": b.units,
                "avg_requests_per_call": b.avg_batch_size,
                "max_batch_size": b.max_batch_size,
                "batch_wait_timeout_s": b.batch_wait_timeout_s,
                "max_concurrent_batches": b.max_concurrent,
                "queued": b.queued,
            },
            "replica": await runner_stats(),
            "telemetry": None if svc.telemetry is None else {"sent": svc.telemetry.sent, "dropped": svc.telemetry.dropped},
            "experiments": sorted(svc.experiments),
        }

    @r.get("/v1/models")
    async def list_models() -> dict:
        reg = svc.registry
        try:
            return {"models": [{"name": n, "versions": reg.versions(n), "aliases": reg.aliases(n)}
                               for n in reg.list_models()]}
        except StoreError as exc:  # the database or store is down: 503, retry later
            raise store_unavailable(exc, cfg.ingress.retry_after_s) from None

    @r.get("/v1/models/{name}")
    async def get_model(name: str, version: Optional[str] = None) -> dict:
        resolved, card = svc.target(model_ref_from(name, version, cfg.default_model))
        return {"model": resolved.name, "version": resolved.version, "card": card.model_dump(mode="json")}

    @r.post("/v1/predict")
    async def predict(request: Request, model: Optional[str] = None, version: Optional[str] = None,
                      top_k: Optional[int] = None, size: Optional[str] = None):
        t0 = time.perf_counter()
        request_id = request_id_from(request.headers.get("x-request-id"), uuid.uuid4().hex)
        inp = await parse_predict(request.headers.get("content-type"), await body(request))
        route = svc.route(request.headers, inp.model or model, inp.version or version)
        (o,) = await svc.run(route, inp.images, request_ids=[request_id], t0=t0, top_k=inp.top_k or top_k,
                             client_key=request.headers.get("x-client-id"), size=inp.size or size)
        return {"request_id": request_id, "model": o.resolved.name, "version": o.resolved.version,
                "variant": route.variant, "latency_ms": round(o.latency_ms, 3), **o.prediction.response()}

    @r.post("/v1/predict/batch")
    async def predict_batch(request: Request, model: Optional[str] = None, version: Optional[str] = None,
                            top_k: Optional[int] = None, size: Optional[str] = None):
        t0 = time.perf_counter()
        request_id = request_id_from(request.headers.get("x-request-id"), uuid.uuid4().hex)
        inp = await parse_batch(request.headers.get("content-type"), await body(request), cfg.ingress.max_batch_items)
        route = svc.route(request.headers, inp.model or model, inp.version or version)
        outs = await svc.run(route, inp.images, request_ids=[f"{request_id}#{i}" for i in range(len(inp.images))],
                             t0=t0, top_k=inp.top_k or top_k, client_key=request.headers.get("x-client-id"),
                             per_item=True, size=inp.size or size)
        first = outs[0]
        return {
            "request_id": request_id,
            "model": first.resolved.name,
            "version": first.resolved.version,
            "variant": route.variant,
            "latency_ms": round(first.latency_ms, 3),
            "results": [{"index": i, **o.prediction.response()} if o.ok
                        else {"index": i, "error": o.error, "status": o.status} for i, o in enumerate(outs)],
        }

    return r
