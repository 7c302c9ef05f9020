"""Deploying the app and changing its runtime state through ``reconfigure``.

The last deployed :class:`AppConfig`, ingress user config and HTTP options are saved in
``<state>/serve/app.json``. Redeploying with the same ``AppConfig`` and a different
user config makes Serve call ``Ingress.reconfigure`` in place — no replica restarts,
no dropped requests — which is how experiments start, re-weight and stop.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path
from typing import Any

from serve_apps.config import AppConfig, IngressUserConfig, ReplicaUserConfig

__all__ = ["deploy", "apply_user_config", "apply_batching", "apply_telemetry", "load_state", "save_state", "state_path"]

_LOCK = threading.Lock()


def state_path(home: str | os.PathLike[str]) -> Path:
    return Path(home) / "serve" / "app.json"


def save_state(
    app_cfg: AppConfig,
    user_cfg: IngressUserConfig,
    http: dict[str, Any] | None,
    version: str,
    replica_user_cfg: ReplicaUserConfig | None = None,
) -> None:
    p = state_path(app_cfg.home)
    p.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "app": app_cfg.model_dump(mode="json"),
        "user_config": user_cfg.model_dump(mode="json"),
        "replica_user_config": (replica_user_cfg or ReplicaUserConfig()).model_dump(mode="json"),
        "http": http or {},
        "version": version,
    }
    tmp = p.with_name(f".app.{uuid.uuid4().hex}.json")
    tmp.write_text(json.dumps(doc, indent=2))
    os.chmod(tmp, 0o600)  # it holds the admin token
    tmp.replace(p)


def load_state(home: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"app": AppConfig, "user_config": IngressUserConfig, "http": {...}, "version": str}``."""
    p = state_path(home)
    if not p.is_file():
        raise FileNotFoundError(f"no deployed app recorded at {p}; run `visionfleet serve up` first")
    doc = json.loads(p.read_text())
    return {
        "app": AppConfig.model_validate(doc["app"]),
        "user_config": IngressUserConfig.model_validate(doc["user_config"]),
        "replica_user_config": ReplicaUserConfig.model_validate(doc.get("replica_user_config") or {}),
        "http": doc.get("http", {}),
        "version": doc.get("version"),
    }


def deploy(
    app_cfg: AppConfig,
    user_cfg: IngressUserConfig | None = None,
    http: dict[str, Any] | None = None,
    *,
    replica_user_cfg: ReplicaUserConfig | None = None,
    version: str | None = None,
):
    """``serve.run`` the app (Ray must be connected) and record what was deployed."""
    from ray import serve

    from serve_apps.app import APP_NAME, build_app, code_version

    user_cfg = user_cfg or IngressUserConfig()
    version = version or code_version(app_cfg)
    with _LOCK:
        app = build_app(app_cfg, user_cfg, replica_user_config=replica_user_cfg, version=version)
        handle = serve.run(app, name=APP_NAME, route_prefix="/")
        save_state(app_cfg, user_cfg, http, version, replica_user_cfg)
    return handle


def apply_user_config(home: str | os.PathLike[str], user_cfg: IngressUserConfig) -> None:
    """Reconfigure the deployed app with a new ingress user config (same version: no restart)."""
    st = load_state(home)
    deploy(st["app"], user_cfg, st["http"], replica_user_cfg=st["replica_user_config"], version=st["version"])


def apply_batching(
    home: str | os.PathLike[str],
    *,
    replica: ReplicaUserConfig | None = None,
    ingress_max_batch_size: int | None = None,
    ingress_batch_wait_timeout_s: float | None = None,
    ingress_max_concurrent_batches: int | None = None,
) -> dict[str, Any]:
    """Change batching knobs of the running app in place (reconfigure, no restart)."""
    st = load_state(home)
    user = st["user_config"]
    knobs = (("max_batch_size", ingress_max_batch_size), ("batch_wait_timeout_s", ingress_batch_wait_timeout_s),
             ("max_concurrent_batches", ingress_max_concurrent_batches))
    if any(v is not None for _, v in knobs):
        user = user.model_copy(update={k: v for k, v in knobs if v is not None})
    rep = st["replica_user_config"]
    if replica is not None:
        rep = rep.model_copy(update={k: v for k, v in replica.model_dump().items() if v is not None})
    deploy(st["app"], user, st["http"], replica_user_cfg=rep, version=st["version"])
    return {"ingress": {"max_batch_size": user.max_batch_size, "batch_wait_timeout_s": user.batch_wait_timeout_s,
                        "max_concurrent_batches": user.max_concurrent_batches},
            "replica": rep.model_dump()}


def apply_telemetry(home: str | os.PathLike[str], on: bool) -> None:
    """Pause or resume telemetry of the running app in place (reconfigure, no restart)."""
    st = load_state(home)
    user = st["user_config"].model_copy(update={"telemetry": bool(on)})
    deploy(st["app"], user, st["http"], replica_user_cfg=st["replica_user_config"], version=st["version"])
