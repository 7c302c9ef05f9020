"""The FastAPI application of the ingress and its error contract.

Route modules (``ingress``, ``routes_admin``, …) register on :data:`api`; handlers
that are not methods of the ``Ingress`` deployment reach it with :func:`ingress`.
Every error is ``{"error": "..."}``; nothing a client sends produces a 500.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_apps.inputs import ApiError

__all__ = ["api", "error_response", "ingress", "require_admin"]

logger = logging.getLogger("ray.serve")

api = FastAPI(title="visionfleet", version="0.1.0", docs_url="/docs", redoc_url=None)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return error_response(400, f"invalid request: {where}: {first.get('msg', 'bad value')}")


@api.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error in ingress")
    return error_response(500, f"internal error ({type(exc).__name__})")


class AdmissionControl:
    """Fast 503 when this ingress replica is full, 408 when a request takes too long.

    A pure ASGI middleware (no per-request body buffering). Only inference routes are
    guarded — ``/v1/predict*`` and ``/v2/models/…/infer`` — so health, metadata and admin
    routes always answer. Limits come from the serving Ingress's config; outside a
    replica (unit tests) nothing is limited.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    @staticmethod
    def _guarded(path: str) -> bool:
        return path.startswith("/v1/predict") or (path.startswith("/v2/models/") and path.endswith("/infer"))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        import asyncio

        if scope["type"] != "http" or not self._guarded(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        try:
            ing = ingress()
        except Exception:  # noqa: BLE001 - not inside a replica
            await self.app(scope, receive, send)
            return
        cfg = ing.cfg.ingress
        if ing.in_flight >= cfg.max_in_flight:
            ing.count_rejected("ingress_full")
            resp = error_response(503, "server at capacity; retry later", {"Retry-After": str(cfg.retry_after_s)})
            await resp(scope, receive, send)
            return
        started = False

        async def tracked_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        ing.in_flight += 1
        try:
            await asyncio.wait_for(self.app(scope, receive, tracked_send), timeout=cfg.request_timeout_s)
        except asyncio.TimeoutError:
            ing.count_rejected("timeout")
            if not started:
                await error_response(408, f"request took longer than {cfg.request_timeout_s:g}s")(scope, receive, send)
        finally:
            ing.in_flight -= 1


api.add_middleware(AdmissionControl)


def ingress() -> Any:
    """The ``Ingress`` instance serving this request (for module-level routes)."""
    from ray import serve

    return serve.get_replica_context().servable_object


def require_admin(request: Request, token: str | None) -> None:
    """Bearer-token check of the admin routes: 401 without a token, 403 with a wrong one.

    The comparison is constant-time. With no token configured, admin routes refuse
    every request (403) rather than running open.
    """
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(401, "admin route: send 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"})
    if not token or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(403, "admin route: wrong token")
