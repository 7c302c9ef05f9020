"""The one typed app builder: ``build_app(config) -> Application`` (STYLE 5)."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from ray.serve import Application

from serve_apps.config import AppConfig, IngressUserConfig
from serve_apps.ingress import Ingress
from serve_apps.replica import ModelReplica

__all__ = ["build_app", "app_builder", "APP_NAME"]

from visionfleet.names import APP_NAME  # noqa: E402  (re-exported)


@lru_cache(maxsize=1)
def _source_digest() -> str:
    """A digest of the code the replicas run (serve_apps and the visionfleet core)."""
    import visionfleet

    h = hashlib.sha256()
    for pkg in (Path(__file__).parent, Path(visionfleet.__file__).parent):
        for f in sorted(pkg.rglob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def code_version(config: AppConfig) -> str:
    """A stable deployment version: same code and same AppConfig, same version.

    ``serve.run`` gives each deployment a random version unless one is set, and a new
    version restarts every replica. With a stable version, a redeploy that changes only
    ``user_config`` is a lightweight update: Serve calls ``reconfigure`` in place, which
    is how experiments start and stop without a restart or a dropped request.
    """
    h = hashlib.sha256(_source_digest().encode())
    h.update(config.model_dump_json().encode())
    return h.hexdigest()[:20]


def build_app(
    config: AppConfig,
    user_config: IngressUserConfig | None = None,
    *,
    version: str | None = None,
) -> Application:
    """Bind the model replicas and pass their handle to the ingress (or ``None`` when the
    ingress runs the models itself, ``IngressConfig.inference_in == "ingress"``).

    ``user_config`` is the ingress's runtime state (experiments, batch knobs); changing
    only it on a redeploy reconfigures the running replicas in place. ``version``
    pins the deployment version (to reconfigure what is deployed); by default it is
    :func:`code_version`.
    """
    cfg = config.model_dump()
    env = {"VISIONFLEET_HOME": config.home, **_state_env(config.home)}
    version = version or code_version(config)
    # `version` is an internal option of Deployment.options (the public `serve deploy`
    # path derives it from the config file); see code_version() for why it matters.
    if config.ingress.inference_in == "ingress":  # the ingress runs the models itself: no replicas to bind
        replica = None
    else:
        replica = _bind_replica(config, cfg, env, version)
    return Ingress.options(version=version, _internal=True).options(
        user_config=(user_config or IngressUserConfig()).model_dump(mode="json"),
        **_scaling(config.ingress),
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        # When every ingress replica is full the proxy sheds load itself: a fast 503 with
        # Retry-After (its body is Serve's text, not our JSON — documented).
        max_queued_requests=config.ingress.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": config.ingress.retry_after_s},
        ray_actor_options={"num_cpus": config.ingress.num_cpus, "runtime_env": {"env_vars": env}},
    ).bind(cfg, replica)


def _state_env(home: str) -> dict[str, str]:
    """The store and database settings of this process (``$VISIONFLEET_STORE[_<AREA>]``,
    ``$VISIONFLEET_DB``) for the replicas' runtime_env: on a node that did not start with them,
    a replica would otherwise fall back to its own disk."""
    from visionfleet.settings import ENV_DB, ENV_STORE, Settings

    env = Settings.from_env(home).runtime_env_vars()
    return {k: v for k, v in env.items() if k == ENV_DB or k == ENV_STORE or k.startswith(f"{ENV_STORE}_")}


def _scaling(cfg: Any) -> dict[str, Any]:
    """``num_replicas`` or Serve's ``autoscaling_config`` (never both: Serve refuses that)."""
    if cfg.autoscaling is not None:
        return {"autoscaling_config": cfg.autoscaling.serve_dict()}
    return {"num_replicas": cfg.num_replicas}


def _bind_replica(config: AppConfig, cfg: dict, env: dict, version: str):
    return ModelReplica.options(version=version, _internal=True).options(
        **_scaling(config.replica),
        max_ongoing_requests=config.replica.max_ongoing_requests,
        max_queued_requests=config.replica.max_queued_requests,
        health_check_period_s=config.replica.health_check_period_s,
        **({"max_replicas_per_node": config.replica.max_replicas_per_node} if config.replica.max_replicas_per_node else {}),
        ray_actor_options={"num_cpus": config.replica.num_cpus, "runtime_env": {"env_vars": env}},
    ).bind(cfg)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for ``serve run serve_apps.app:app_builder home=...`` and Serve YAML configs."""
    args = dict(args)
    user = IngressUserConfig.model_validate(args.pop("user_config", {}) or {})
    return build_app(AppConfig.model_validate(args), user)
