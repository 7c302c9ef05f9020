"""The FastAPI application of the ingress: its routers and its error contract.

:func:`build_api` is called once per ingress replica (Serve's
``__serve_build_asgi_app__``) with the :class:`~serve_apps.pipeline.PredictionService`
and the helper actors' handles; each route module is an ``APIRouter`` factory given
exactly what it needs, so no route reaches the ingress through a global. Every error
is ``{"error": "..."}``; nothing a client sends produces a 500.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_apps.inputs import ApiError

__all__ = ["build_api", "error_response", "require_admin", "AdmissionControl"]

logger = logging.getLogger("ray.serve")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.headers)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return error_response(400, f"invalid request: {where}: {first.get('msg', 'bad value')}")


async def _store_error(_: Request, exc: Exception) -> JSONResponse:
    # Any route that reached the registry's store or database while it was down (the
    # prediction path maps its own): the server's state, not the client's input.
    from serve_apps.runner import store_unavailable_message

    return error_response(503, store_unavailable_message(exc), {"Retry-After": "1"})


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error in ingress")
    return error_response(500, f"internal error ({type(exc).__name__})")


class AdmissionControl:
    """Fast 503 when this ingress replica is full, 408 when a request takes too long.

    A pure ASGI middleware (no per-request body buffering). Only inference routes are
    guarded — ``/v1/predict*`` and ``/v2/models/…/infer`` — so health, metadata and admin
    routes always answer. ``service`` is the replica's PredictionService (its config's
    limits and its ``in_flight`` count).
    """

    def __init__(self, app: Any, service: Any) -> None:
        self.app = app
        self.service = service

    @staticmethod
    def _guarded(path: str) -> bool:
        return path.startswith("/v1/predict") or (path.startswith("/v2/models/") and path.endswith("/infer"))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        import asyncio

        if scope["type"] != "http" or not self._guarded(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        ing = self.service
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


def build_api(service: Any, actors: Any, runner_stats: Callable[[], Any]) -> FastAPI:
    """The ingress's FastAPI app, its routes given what they need.

    Args:
        service: the replica's :class:`~serve_apps.pipeline.PredictionService`.
        actors: the helper actors (:class:`serve_apps.ingress.Actors`: the telemetry sink
            and the experiment coordinator), for feedback and admin routes.
        runner_stats: async callable giving the model runner's figures (``/v1/stats``).
    """
    from serve_apps import routes_admin, routes_edge, routes_predict, routes_stream, routes_v2

    api = FastAPI(title="visionfleet", version="0.1.0", docs_url="/docs", redoc_url=None)
    api.add_exception_handler(ApiError, _api_error)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    from visionfleet.store import StoreError

    api.add_exception_handler(StoreError, _store_error)
    api.add_exception_handler(Exception, _unexpected)
    api.add_middleware(AdmissionControl, service=service)
    api.include_router(routes_predict.router(service, runner_stats))
    api.include_router(routes_v2.router(service))
    api.include_router(routes_stream.router(service))
    api.include_router(routes_admin.router(service.cfg, actors))
    api.include_router(routes_edge.router(service.cfg))
    return api


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
