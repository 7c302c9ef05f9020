"""The HTTP ingress: parses requests, resolves model references, decodes and resizes
images once (shared imaging code), calls the ModelReplica and shapes responses.

Routes (this module): ``POST /v1/predict``, ``POST /v1/predict/batch``, ``GET /healthz``,
``GET /v1/models``, ``GET /v1/models/{name}``. Every error is ``{"error": "..."}`` with
the contract's status; nothing a client sends produces a 500.
"""

# No `from __future__ import annotations` here: FastAPI must see real annotation
# objects on the route methods that @serve.ingress rewrites.
import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_apps.config import AppConfig
from serve_apps.inputs import (
    ApiError,
    model_ref_from,
    parse_batch,
    parse_predict,
    read_body,
    request_id_from,
    status_for_image_error,
)
from visionfleet.imaging import ImageError, ResizeInfo, load_for_model
from visionfleet.inference import classification_result
from visionfleet.registry import NotFound, Registry, ResolvedModel
from visionfleet.spec import ModelCard, Task, parse_ref

__all__ = ["Ingress", "api"]

logger = logging.getLogger("ray.serve")

api = FastAPI(title="visionfleet", version="0.1.0", docs_url="/docs", redoc_url=None)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return _error(400, f"invalid request: {where}: {first.get('msg', 'bad value')}")


@api.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error in ingress")
    return _error(500, f"internal error ({type(exc).__name__})")


class _CardCache:
    """Alias lookups cached for ``ttl`` seconds; cards (immutable) cached LRU."""

    def __init__(self, registry: Registry, ttl: float, size: int = 64) -> None:
        self._registry = registry
        self._ttl = ttl
        self._aliases: dict[tuple[str, str], tuple[int, float]] = {}
        self._cards: OrderedDict[tuple[str, int], ModelCard] = OrderedDict()
        self._size = size

    def resolve(self, ref: str) -> ResolvedModel:
        try:
            r = parse_ref(ref)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        if r.version is not None:
            self.card(r.name, r.version)  # 404 when missing
            return ResolvedModel(r.name, r.version)
        key = (r.name, r.alias or "production")
        hit = self._aliases.get(key)
        now = time.monotonic()
        if hit and hit[1] > now:
            return ResolvedModel(r.name, hit[0])
        try:
            resolved = self._registry.resolve(r)
        except NotFound as exc:
            raise ApiError(404, str(exc)) from None
        self._aliases[key] = (resolved.version, now + self._ttl)
        return resolved

    def card(self, name: str, version: int) -> ModelCard:
        key = (name, version)
        card = self._cards.get(key)
        if card is None:
            try:
                card = self._registry.card(name, version)
            except NotFound as exc:
                raise ApiError(404, str(exc)) from None
            self._cards[key] = card
            if len(self._cards) > self._size:
                self._cards.popitem(last=False)
        else:
            self._cards.move_to_end(key)
        return card


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, config: dict[str, Any], replica: DeploymentHandle) -> None:
        self._cfg = AppConfig.model_validate(config)
        self._registry = Registry(f"{self._cfg.home}/registry", cache_dir=f"{self._cfg.home}/cache/registry")
        self._cards = _CardCache(self._registry, self._cfg.ingress.alias_ttl_s)
        self._replica = replica
        self._decode_pool = ThreadPoolExecutor(self._cfg.ingress.decode_threads, thread_name_prefix="decode")

    # ------------------------------------------------------------------ helpers
    async def _body(self, request: Request) -> bytes:
        return await read_body(request.stream(), request.headers.get("content-length"), self._cfg.max_body_bytes)

    def _target(self, model: "str | None", version: "str | None") -> "tuple[ResolvedModel, ModelCard]":
        ref = model_ref_from(model, version, self._cfg.default_model)
        resolved = self._cards.resolve(ref)
        return resolved, self._cards.card(resolved.name, resolved.version)

    def _decode(self, data: bytes, card: ModelCard) -> tuple[np.ndarray, ResizeInfo]:
        try:
            return load_for_model(data, card.input_size, card.resize, max_pixels=self._cfg.max_pixels)
        except ImageError as exc:
            raise ApiError(status_for_image_error(exc), str(exc)) from None

    async def _decode_many(self, images: list[bytes], card: ModelCard, per_item: bool) -> list[Any]:
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._decode_pool, self._decode, b, card) for b in images]
        return list(await asyncio.gather(*futures, return_exceptions=per_item))

    async def _infer(self, resolved: ResolvedModel, batch: np.ndarray):
        handle = self._replica.options(multiplexed_model_id=f"{resolved.name}:{resolved.version}")
        try:
            out = await handle.predict.remote(batch)
        except Exception as exc:  # noqa: BLE001 - replica died, overloaded, timed out
            logger.warning("replica call failed: %r", exc)
            raise ApiError(503, "model replica unavailable; retry later", {"Retry-After": "1"}) from None
        if out.error is not None:
            raise ApiError(out.status, out.error)
        return out

    def _result(self, card: ModelCard, outputs: list[np.ndarray], i: int, top_k: int) -> dict[str, Any]:
        if card.task is Task.CLASSIFICATION:
            return classification_result(outputs[0][i], card.labels, top_k)
        raise ApiError(501, f"task {card.task.value} is not served by this route yet")

    # ------------------------------------------------------------------ routes
    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "default_model": self._cfg.default_model}

    @api.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        out = []
        for name in self._registry.list_models():
            out.append({"name": name, "versions": self._registry.versions(name), "aliases": self._registry.aliases(name)})
        return {"models": out}

    @api.get("/v1/models/{name}")
    async def get_model(self, name: str, version: str | None = None) -> dict[str, Any]:
        resolved, card = self._target(name, version)
        return {"model": resolved.name, "version": resolved.version, "card": card.model_dump(mode="json")}

    @api.post("/v1/predict")
    async def predict(self, request: Request, model: str | None = None, version: str | None = None, top_k: int | None = None):
        t0 = time.perf_counter()
        request_id = request_id_from(request.headers.get("x-request-id"), uuid.uuid4().hex)
        body = await self._body(request)
        inp = await parse_predict(request.headers.get("content-type"), body)
        resolved, card = self._target(inp.model or model, inp.version or version)
        (img, _info), = await self._decode_many(inp.images, card, per_item=False)
        out = await self._infer(resolved, img[None])
        k = inp.top_k or top_k or self._cfg.top_k
        result = self._result(card, out.outputs, 0, k)
        return {
            "request_id": request_id,
            "model": resolved.name,
            "version": resolved.version,
            "variant": "default",
            "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
            **result,
        }

    @api.post("/v1/predict/batch")
    async def predict_batch(
        self, request: Request, model: str | None = None, version: str | None = None, top_k: int | None = None
    ):
        t0 = time.perf_counter()
        request_id = request_id_from(request.headers.get("x-request-id"), uuid.uuid4().hex)
        body = await self._body(request)
        inp = await parse_batch(request.headers.get("content-type"), body, self._cfg.ingress.max_batch_items)
        resolved, card = self._target(inp.model or model, inp.version or version)
        decoded = await self._decode_many(inp.images, card, per_item=True)
        ok = [i for i, d in enumerate(decoded) if not isinstance(d, BaseException)]
        results: list[dict[str, Any]] = []
        outputs = None
        if ok:
            out = await self._infer(resolved, np.stack([decoded[i][0] for i in ok]))
            outputs = out.outputs
        k = inp.top_k or top_k or self._cfg.top_k
        pos = {i: j for j, i in enumerate(ok)}
        for i, d in enumerate(decoded):
            if isinstance(d, ApiError):
                results.append({"index": i, "error": d.message, "status": d.status})
            elif isinstance(d, BaseException):
                results.append({"index": i, "error": f"could not process image ({type(d).__name__})", "status": 400})
            else:
                results.append({"index": i, **self._result(card, outputs, pos[i], k)})  # type: ignore[arg-type]
        return {
            "request_id": request_id,
            "model": resolved.name,
            "version": resolved.version,
            "variant": "default",
            "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
            "results": results,
        }
