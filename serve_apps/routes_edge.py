# No `from __future__ import annotations`: FastAPI reads these annotations at runtime.
"""Edge routes: device sync, the TUF repository (read-only) and the fleet view.

* ``POST /v1/edge/sync`` — a device uploads a batch of prediction records, sampled
  low-confidence images and install reports, with ids it made itself, plus its status
  (version, health, backlog). The fleet database (``visionfleet.fleet``) stores each id
  once, durably, writes new records into the event lake (``source = edge:<device>``)
  and images into the labeling queue, and halts a rollout whose health checks fail on
  too many devices. Every id in the batch is acknowledged, duplicates included.
* ``GET /tuf/{path}`` — the repository's metadata and bundles, read-only; any path
  outside ``metadata/`` and ``targets/`` is refused. Fetching ``timestamp.json``
  re-signs the timestamp when half its lifetime is gone, so a running server keeps its
  repository fresh without a cron job. The repository is ``<home>/tuf`` on one machine,
  or the store area ``tuf`` (``$VISIONFLEET_STORE``): metadata is read from the store on
  each request, bundles through a local cache (``edge_export.tuf_repo.read_public``).
* ``GET /v1/edge/fleet``, ``GET /v1/edge/channels`` and ``POST /v1/edge/rollouts`` —
  admin routes (bearer token): devices and rollouts, published channels, and changing
  a channel's rollout percentage or halting/resuming it.
"""

import base64
import binascii
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from serve_apps.api import require_admin
from serve_apps.config import AppConfig
from serve_apps.inputs import ApiError, read_body

__all__ = ["router"]

logger = logging.getLogger("ray.serve")

_DEVICE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_TUF_PATH = re.compile(r"^(metadata|targets)/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
_MAX_RECORDS = 5000
_MAX_SAMPLES = 64


class EdgeBacklog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    records: int = Field(default=0, ge=0)
    samples: int = Field(default=0, ge=0)
    reports: int = Field(default=0, ge=0)
    dropped_samples: int = Field(default=0, ge=0)
    dropped_records: int = Field(default=0, ge=0, description="unsent records dropped because the outbox was full")


class EdgeOutbox(BaseModel):
    """The device outbox's size on disk and the acknowledged rows it removed."""

    model_config = ConfigDict(extra="forbid")

    bytes: int = Field(default=0, ge=0)
    max_bytes: int = Field(default=0, ge=0)
    pruned: int = Field(default=0, ge=0)


class EdgeStatus(BaseModel):
    """What a device says about itself on every sync."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = Field(default=None, max_length=64)
    version: Optional[int] = None
    bundle_id: Optional[str] = Field(default=None, max_length=200)
    target: Optional[str] = Field(default=None, max_length=32)
    health: str = Field(default="ok", pattern=r"^(ok|degraded|no_model)$")
    backlog: EdgeBacklog = Field(default_factory=EdgeBacklog)
    outbox: Optional[EdgeOutbox] = None
    agent: Optional[str] = Field(default=None, max_length=64)
    uptime_s: Optional[float] = None
    frames: Optional[int] = None
    ota: Optional[Dict[str, Any]] = None


class EdgeRecord(BaseModel):
    """One prediction made on the device (fields as in the server's event schema)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(max_length=80, description="made on the device; the server keeps (device, id) once")
    ts: float
    model: Optional[str] = Field(default=None, max_length=64)
    version: Optional[int] = None
    task: Optional[str] = Field(default=None, max_length=32)
    label: Optional[str] = Field(default=None, max_length=256)
    class_id: Optional[int] = None
    confidence: Optional[float] = None
    margin: Optional[float] = None
    entropy: Optional[float] = None
    detections: Optional[int] = None
    latency_ms: Optional[float] = None
    width: Optional[int] = None
    height: Optional[int] = None
    input_size: Optional[str] = Field(default=None, max_length=16, description="model-input size used, HxW")
    brightness: Optional[float] = None
    contrast: Optional[float] = None
    blur: Optional[float] = None
    status: int = 200
    error: Optional[str] = Field(default=None, max_length=2000)


class EdgeSample(BaseModel):
    """A sampled (low-confidence) image for the labeling queue."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(max_length=80)
    record_id: Optional[str] = Field(default=None, max_length=80)
    ts: float
    model: Optional[str] = Field(default=None, max_length=64)
    version: Optional[int] = None
    predicted: Optional[str] = Field(default=None, max_length=256)
    confidence: Optional[float] = None
    margin: Optional[float] = None
    reason: str = Field(default="low_confidence", max_length=64)
    width: Optional[int] = None
    height: Optional[int] = None
    image: str = Field(description="base64 of the encoded image")


class EdgeReport(BaseModel):
    """The outcome of an install on the device."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: str = Field(max_length=80)
    ts: float
    kind: str = Field(default="install", pattern=r"^(install|rollback|ota)$")
    outcome: str = Field(pattern=r"^(installed|already_current|invalid|health_failed|rolled_back|refused)$")
    bundle_id: Optional[str] = Field(default=None, max_length=200)
    model: Optional[str] = Field(default=None, max_length=64)
    version: Optional[int] = None
    target: Optional[str] = Field(default=None, max_length=32)
    from_bundle: Optional[str] = Field(default=None, max_length=200)
    error: Optional[str] = Field(default=None, max_length=2000)


class SyncBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: str = Field(pattern=_DEVICE)
    sent_at: Optional[float] = None
    status: Optional[EdgeStatus] = None
    records: List[EdgeRecord] = Field(default_factory=list, max_length=_MAX_RECORDS)
    samples: List[EdgeSample] = Field(default_factory=list, max_length=_MAX_SAMPLES)
    reports: List[EdgeReport] = Field(default_factory=list, max_length=64)


class RolloutBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=64)
    target: str = Field(max_length=32)
    rollout: Optional[int] = Field(default=None, ge=0, le=100, description="percentage of devices (by cohort)")
    halted: Optional[bool] = Field(default=None, description="true halts the rollout, false resumes it")
    reason: Optional[str] = Field(default=None, max_length=500)


@lru_cache(maxsize=8)
def _fleet(home: str) -> Any:
    from visionfleet.fleet import FleetDB
    from visionfleet.settings import Settings

    db = FleetDB.from_settings(Settings.from_env(home))  # the database and store of the settings
    db.flush_pending()  # parts a crash left committed but unwritten
    return db


async def _parse(request: Request, model: type, limit: int) -> Any:
    body = await read_body(request.stream(), request.headers.get("content-length"), limit)
    ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "send application/json")
    try:
        return model.model_validate_json(body or b"{}")
    except ValueError as exc:
        errs = exc.errors() if hasattr(exc, "errors") else []
        first = errs[0] if errs else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise ApiError(400, f"invalid body: {where}: {first.get('msg', str(exc)[:200])}") from None


@lru_cache(maxsize=8)
def _tuf(home: str) -> Any:
    """The TUF repository of this server: ``<home>/tuf``, or the store area ``tuf`` when the
    store is shared (``$VISIONFLEET_STORE``, the database lock, ``$VISIONFLEET_TUF_KEYS``)."""
    from edge_export.tuf_repo import TufRepository
    from visionfleet.settings import Settings

    return TufRepository.from_settings(Settings.from_env(home).with_home(home))


def _apply_halts(home: str, halts: List[Dict[str, Any]]) -> None:
    """Re-sign halted channels in TUF, if the channel still serves the failing bundle."""
    from edge_export.tuf_repo import set_rollout
    from edge_agent.ota import channel_path

    repo = _tuf(home)
    if not repo.exists():
        return
    targets = repo.targets()
    for h in halts:
        info = targets.get(channel_path(h["model"], h["target"]))
        if info is not None and (info.custom or {}).get("bundle_id") == h["bundle_id"]:
            set_rollout(repo, h["model"], h["target"], halted=True, reason=h["reason"])
            logger.warning("edge rollout of %s halted: %s", h["bundle_id"], h["reason"])


def _tuf_file(home: str, path: str) -> "bytes | Path":
    from visionfleet.store import StoreUnavailable

    if not _TUF_PATH.match(path) or any(p.startswith(".") for p in path.split("/")):
        raise ApiError(404, "no such repository file")
    try:
        return _tuf(home).read_public(path)
    except FileNotFoundError:
        raise ApiError(404, "no such repository file") from None
    except StoreUnavailable as exc:
        raise ApiError(503, f"the TUF repository's store did not answer; retry later ({exc})") from None


def _maybe_refresh(home: str) -> None:
    repo = _tuf(home)
    try:
        if repo.exists():
            repo.refresh(0.5)
    except Exception:  # noqa: BLE001 - serving the current (still valid) timestamp is better than a 500
        logger.exception("TUF timestamp refresh failed")


def router(cfg: AppConfig) -> APIRouter:
    """The edge routes, given the app's config (state dir, body limit, admin token)."""
    r = APIRouter()
    home = cfg.home

    @r.post("/v1/edge/sync")
    async def edge_sync(request: Request) -> Dict[str, Any]:
        """A device's batch of records, samples and reports, and its status."""
        body = await _parse(request, SyncBody, cfg.max_body_bytes)
        samples = []
        rejected = []
        for s in body.samples:
            try:
                image = base64.b64decode(s.image, validate=True)
            except (binascii.Error, ValueError):
                rejected.append({"kind": "sample", "id": s.id, "error": "image is not valid base64"})
                continue
            if not image:
                rejected.append({"kind": "sample", "id": s.id, "error": "empty image"})
                continue
            samples.append({**s.model_dump(exclude={"image"}), "image": image})
        fleet = _fleet(home)
        try:
            res = await run_in_threadpool(
                fleet.ingest,
                body.device_id,
                status=body.status.model_dump() if body.status else None,
                records=[r.model_dump() for r in body.records],
                samples=samples,
                reports=[r.model_dump() for r in body.reports],
            )
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        if res.halts:
            await run_in_threadpool(_apply_halts, home, res.halts)
        doc = res.to_dict()
        doc["acked"]["samples"] = doc["acked"]["samples"] + [r["id"] for r in rejected]
        doc["rejected"] = doc["rejected"] + rejected
        return doc


    @r.get("/tuf/{path:path}")
    async def tuf_file(path: str) -> Response:
        """A file of the TUF repository (metadata or a bundle), read-only."""
        if path == "metadata/timestamp.json":
            await run_in_threadpool(_maybe_refresh, home)
        target = await run_in_threadpool(_tuf_file, home, path)
        mutable = path in ("metadata/timestamp.json", "metadata/root.json")
        media_type = "application/json" if path.endswith(".json") else "application/octet-stream"
        # Versioned and hash-named files never change; timestamp.json does.
        headers = {"Cache-Control": "no-cache" if mutable else "public, max-age=31536000, immutable"}
        if isinstance(target, bytes):
            return Response(target, media_type=media_type, headers=headers)
        return FileResponse(target, media_type=media_type, headers=headers)


    @r.get("/v1/edge/fleet")
    async def fleet_status(request: Request) -> Dict[str, Any]:
        """Devices (version, health, backlog, last seen) and rollouts."""
        require_admin(request, cfg.admin_token)
        return await run_in_threadpool(_fleet(home).status)


    @r.get("/v1/edge/channels")
    async def edge_channels(request: Request) -> Dict[str, Any]:
        """Published channels with their signed rollout metadata."""
        from edge_export.tuf_repo import channels

        require_admin(request, cfg.admin_token)
        repo = _tuf(home)
        if not repo.exists():
            return {"channels": []}
        return {"channels": await run_in_threadpool(channels, repo)}


    @r.post("/v1/edge/rollouts")
    async def edge_rollout(request: Request) -> Dict[str, Any]:
        """Change a channel's rollout percentage, or halt / resume it (re-signed in TUF)."""
        from edge_export.tuf_repo import RepositoryMissing, SigningKeysMissing, set_rollout

        require_admin(request, cfg.admin_token)
        body = await _parse(request, RolloutBody, 64 * 1024)

        def change() -> Dict[str, Any]:
            doc = set_rollout(_tuf(home), body.model, body.target, rollout=body.rollout, halted=body.halted,
                              reason=body.reason)
            status = "rolling" if not doc.get("halted") else "halted"
            _fleet(home).set_rollout_status(body.model, body.target, doc["bundle_id"], status, body.reason, doc.get("rollout"))
            return doc

        try:
            return {"channel": await run_in_threadpool(change)}
        except SigningKeysMissing as exc:
            raise ApiError(503, str(exc)) from None
        except RepositoryMissing as exc:
            raise ApiError(404, str(exc)) from None
        except LookupError as exc:
            raise ApiError(404, str(exc).strip("'\"")) from None
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    return r
