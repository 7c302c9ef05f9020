# No `from __future__ import annotations`: FastAPI reads these annotations at runtime.
"""Feedback and experiment routes.

``POST /v1/feedback`` joins ground truth to a past prediction (late labels are normal).
The experiment routes are admin routes (bearer token): list, start, inspect,
re-weight and stop experiments. They delegate to the ExperimentCoordinator actor
(``serve_apps.experiments``), which pushes the change to every ingress replica
through ``reconfigure``; feedback, the labeling queue and the monitor go to the
TelemetrySink actor (``serve_apps.telemetry``).
"""

import asyncio
from typing import Any, Dict, Union

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from serve_apps.api import require_admin
from serve_apps.config import AppConfig, ExperimentConfig
from serve_apps.inputs import ApiError, read_body

__all__ = ["router"]


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:#-]+$")
    # a JSON number is a class index (the datasets store integer labels), a string a label name
    label: Union[StrictInt, str] = Field(description="label name, or class index 0..C-1")


class StopBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: str = Field(default="none", pattern=r"^(promote|rollback|none)$")
    reason: str = Field(default="stopped by an operator", max_length=500)


class WeightsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: Dict[str, float]


async def _json(request: Request, model: type) -> Any:
    body = await read_body(request.stream(), request.headers.get("content-length"), 1024 * 1024)
    ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "send application/json")
    try:
        return model.model_validate_json(body or b"{}")
    except ValueError as exc:
        first = exc.errors()[0] if hasattr(exc, "errors") and exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise ApiError(400, f"invalid body: {where}: {first.get('msg', str(exc)[:200])}") from None


async def _call(method: Any, *args: Any) -> Any:
    """Await an actor call and map the coordinator's errors onto HTTP statuses."""
    from serve_apps.experiments import Conflict
    from serve_apps.runner import store_unavailable_message
    from visionfleet.registry import NotFound
    from visionfleet.store import StoreError

    try:
        return await method.remote(*args)
    except NotFound as exc:
        raise ApiError(404, _msg(exc)) from None
    except StoreError as exc:  # a promote or rollback needs the registry: its store or database is down
        raise ApiError(503, store_unavailable_message(_msg(exc)), {"Retry-After": "1"}) from None
    except Conflict as exc:
        raise ApiError(409, _msg(exc)) from None
    except ValueError as exc:
        raise ApiError(400, _msg(exc)) from None
    except asyncio.TimeoutError:
        raise ApiError(504, "the coordinator did not answer in time") from None


def _msg(exc: BaseException) -> str:
    # Ray wraps actor exceptions; keep only the original message for the client.
    cause = getattr(exc, "cause", None)
    text = str(cause if cause is not None else exc)
    return text.strip().splitlines()[-1][:500] if text.strip() else type(exc).__name__


def router(cfg: AppConfig, actors: Any) -> APIRouter:
    """The routes, given the app's config (the admin token) and the helper actors
    (``actors.sink()`` and ``actors.coordinator()``: handles, or an ApiError 503)."""
    r = APIRouter()

    def admin(request: Request) -> None:
        require_admin(request, cfg.admin_token)

    @r.post("/v1/feedback", status_code=202)
    async def feedback(request: Request) -> Dict[str, Any]:
        """Ground truth for a past prediction: ``{"request_id": ..., "label": ...}``."""
        body = await _json(request, FeedbackBody)
        if isinstance(body.label, str) and not 1 <= len(body.label) <= 256:
            raise ApiError(400, f"Got a label of {len(body.label)} characters; expected 1..256")
        res = await _call(actors.sink().feedback, body.request_id, body.label)
        return {"request_id": body.request_id, "accepted": True, **res}

    @r.get("/v1/experiments")
    async def list_experiments(request: Request) -> Dict[str, Any]:
        admin(request)
        return {"experiments": await _call(actors.coordinator().list)}

    @r.post("/v1/experiments", status_code=201)
    async def start_experiment(request: Request) -> Dict[str, Any]:
        admin(request)
        spec = await _json(request, ExperimentConfig)
        return await _call(actors.coordinator().start, spec.model_dump(mode="json"))

    @r.get("/v1/experiments/{name}")
    async def get_experiment(request: Request, name: str) -> Dict[str, Any]:
        admin(request)
        return await _call(actors.coordinator().status, name)

    @r.post("/v1/experiments/{name}/stop")
    async def stop_experiment(request: Request, name: str) -> Dict[str, Any]:
        admin(request)
        body = await _json(request, StopBody)
        return await _call(actors.coordinator().stop, name, body.action, body.reason)

    @r.post("/v1/experiments/{name}/weights")
    async def reweight_experiment(request: Request, name: str) -> Dict[str, Any]:
        admin(request)
        body = await _json(request, WeightsBody)
        return await _call(actors.coordinator().reweight, name, body.weights)

    @r.get("/v1/labeling/pending")
    async def labeling_pending(request: Request, limit: int = 1000) -> Dict[str, Any]:
        """Samples waiting for a label (ids and predictions; label them with /v1/feedback)."""
        admin(request)
        if not 1 <= limit <= 100_000:
            raise ApiError(400, "limit must be 1..100000")
        sink = actors.sink()
        return {"pending": await _call(sink.labeling_pending, limit), "counts": await _call(sink.labeling_counts)}

    @r.get("/v1/monitor")
    async def monitor(request: Request, model: str = "") -> Dict[str, Any]:
        """Per-version windows (confidence, low-confidence rate, accuracy where labeled) and drift."""
        admin(request)
        sink = actors.sink()
        return {"versions": await _call(sink.monitor_snapshot, model or None), "telemetry": await _call(sink.stats)}

    return r
