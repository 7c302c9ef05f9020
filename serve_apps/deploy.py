"""Deploying the app and changing its runtime state through ``reconfigure``.

This is the composition root of the serving room: :func:`deploy` starts the
ExperimentCoordinator actor with the callback it needs (:func:`apply_user_config`,
which redeploys with a new ingress user config), so neither the coordinator nor the
telemetry sink imports this module.

The last deployed :class:`AppConfig`, ingress user config and HTTP options are saved in
``<state>/serve/app.json``. Redeploying with the same ``AppConfig`` and a different
user config makes Serve call ``Ingress.reconfigure`` in place — no replica restarts,
no dropped requests — which is how experiments start, re-weight and stop.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import uuid
from pathlib import Path
from typing import Any

from serve_apps.config import AppConfig, IngressUserConfig

__all__ = ["deploy", "apply_user_config", "apply_batching", "apply_telemetry", "load_state", "save_state", "state_path"]

_LOCK = threading.Lock()


def state_path(home: str | os.PathLike[str]) -> Path:
    return Path(home) / "serve" / "app.json"


def save_state(app_cfg: AppConfig, user_cfg: IngressUserConfig, http: dict[str, Any] | None, version: str) -> None:
    p = state_path(app_cfg.home)
    p.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "app": app_cfg.model_dump(mode="json"),
        "user_config": user_cfg.model_dump(mode="json"),
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
        "http": doc.get("http", {}),
        "version": doc.get("version"),
    }


def deploy(
    app_cfg: AppConfig,
    user_cfg: IngressUserConfig | None = None,
    http: dict[str, Any] | None = None,
    *,
    version: str | None = None,
):
    """``serve.run`` the app (Ray must be connected) and record what was deployed.

    With telemetry on, the experiment coordinator is started first (it adopts the
    experiments the ingress finds in its user config), given the callback that
    reconfigures this app.
    """
    from ray import serve

    from serve_apps.app import APP_NAME, build_app, code_version

    user_cfg = user_cfg or IngressUserConfig()
    version = version or code_version(app_cfg)
    with _LOCK:
        if app_cfg.telemetry:
            from serve_apps.experiments import get_or_create_coordinator

            get_or_create_coordinator(app_cfg.home, functools.partial(apply_user_config, app_cfg.home),
                                      app_cfg.ray_namespace)
        app = build_app(app_cfg, user_cfg, version=version)
        handle = serve.run(app, name=APP_NAME, route_prefix="/")
        save_state(app_cfg, user_cfg, http, version)
    return handle


def apply_user_config(home: str | os.PathLike[str], user_cfg: IngressUserConfig) -> None:
    """Reconfigure the deployed app with a new ingress user config (same version: no restart)."""
    st = load_state(home)
    deploy(st["app"], user_cfg, st["http"], version=st["version"])


def apply_batching(
    home: str | os.PathLike[str],
    *,
    max_batch_size: int | None = None,
    batch_wait_timeout_s: float | None = None,
    max_concurrent_batches: int | None = None,
) -> dict[str, Any]:
    """Change the ingress's batching knobs of the running app in place (reconfigure, no restart)."""
    st = load_state(home)
    user = st["user_config"]
    knobs = {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s,
             "max_concurrent_batches": max_concurrent_batches}
    user = user.model_copy(update={k: v for k, v in knobs.items() if v is not None})
    deploy(st["app"], user, st["http"], version=st["version"])
    return {"ingress": {k: getattr(user, k) for k in knobs}}


def apply_telemetry(home: str | os.PathLike[str], on: bool) -> None:
    """Pause or resume telemetry of the running app in place (reconfigure, no restart)."""
    st = load_state(home)
    user = st["user_config"].model_copy(update={"telemetry": bool(on)})
    deploy(st["app"], user, st["http"], version=st["version"])
