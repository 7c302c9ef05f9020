"""The one typed app builder: ``build_app(config) -> Application`` (STYLE 5)."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve_apps.config import AppConfig
from serve_apps.ingress import Ingress
from serve_apps.replica import ModelReplica

__all__ = ["build_app", "app_builder", "APP_NAME"]

APP_NAME = "visionfleet"


def build_app(config: AppConfig) -> Application:
    """Bind the model replicas and pass their handle to the ingress."""
    cfg = config.model_dump()
    env = {"VISIONFLEET_HOME": config.home}
    replica = ModelReplica.options(
        num_replicas=config.replica.num_replicas,
        max_ongoing_requests=config.replica.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.replica.num_cpus, "runtime_env": {"env_vars": env}},
    ).bind(cfg)
    return Ingress.options(
        num_replicas=config.ingress.num_replicas,
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.ingress.num_cpus, "runtime_env": {"env_vars": env}},
    ).bind(cfg, replica)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for ``serve run serve_apps.app:app_builder home=...`` and Serve YAML configs."""
    return build_app(AppConfig.model_validate(args))
