"""The Serve config file for the visionfleet app: what ``serve deploy`` and KubeRay read.

One :class:`~serve_apps.config.AppConfig` goes in; a ``serve deploy``-ready document
comes out, checked with Ray's own ``ray.serve.schema.ServeDeploySchema``:

- ``applications[0].args`` is the ``AppConfig`` itself (``serve_apps.app:app_builder``
  parses it back with the same pydantic model, so the YAML cannot drift from the code);
- ``runtime_env`` carries ``VISIONFLEET_HOME`` (and the W&B mode) to every replica;
- ``deployments`` repeat the app's resource knobs as Serve overrides (``num_replicas`` or
  ``autoscaling_config``,
  ``ray_actor_options``, ``max_replicas_per_node``) so an operator edits them where Serve
  looks, and carry each deployment's ``user_config`` (experiments, batching knobs).

Why the runtime state goes in the deployments' ``user_config`` and not in ``args``:
Serve hashes ``import_path``, ``runtime_env`` and ``args`` into the application's code
version, so a changed ``args`` rebuilds the app and restarts every replica, while a
changed deployment ``user_config`` is a lightweight update (``reconfigure`` in place).
Starting or re-weighting an experiment by re-applying the file must not restart
anything (see ``ray/serve/_private/deploy_utils.py:get_app_code_version``).
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_apps.config import AppConfig, IngressUserConfig

__all__ = [
    "APP_NAME",
    "IMPORT_PATH",
    "INGRESS_DEPLOYMENT",
    "REPLICA_DEPLOYMENT",
    "ProxyLocation",
    "WandbMode",
    "ServeConfigOptions",
    "serve_config",
    "validate_serve_config",
    "app_config_from_serve_config",
    "to_yaml",
    "options_from",
]

# Names the Serve app registers, from the core: generating a config imports no Ray Serve runtime.
from visionfleet.names import APP_IMPORT_PATH as IMPORT_PATH  # noqa: E402
from visionfleet.names import APP_NAME, INGRESS_DEPLOYMENT, REPLICA_DEPLOYMENT  # noqa: E402


class ProxyLocation(str, Enum):
    """Where Serve runs its HTTP proxies (``ray.serve.config.ProxyLocation``)."""

    EVERY_NODE = "EveryNode"  # a real cluster: every node with a replica answers on the port
    HEAD_ONLY = "HeadOnly"  # several nodes on one machine: only one process can own the port
    DISABLED = "Disabled"


class WandbMode(str, Enum):
    """``WANDB_MODE`` of the replicas: offline unless the operator provides a key."""

    OFFLINE = "offline"
    ONLINE = "online"  # WANDB_API_KEY must be in the nodes' environment (a Kubernetes Secret)
    DISABLED = "disabled"


class ServeConfigOptions(BaseModel):
    """Cluster-side settings of the Serve config that are not part of the app itself."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="0.0.0.0", min_length=1, description="HTTP host the proxies bind")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port the proxies bind")
    request_timeout_s: float = Field(
        default=60.0, gt=0, le=3600,
        description="Serve's end-to-end HTTP timeout; above the ingress's own timeout, so clients get its JSON 408",
    )
    proxy_location: ProxyLocation = Field(default=ProxyLocation.EVERY_NODE, description="where HTTP proxies run")
    route_prefix: str = Field(default="/", pattern=r"^/", description="route prefix of the app")
    wandb_mode: WandbMode = Field(default=WandbMode.OFFLINE, description="WANDB_MODE of the replicas")
    env: dict[str, str] = Field(default_factory=dict, description="extra env_vars of the app's runtime_env")


def options_from(model: type[BaseModel], **values: Any) -> Any:
    """Build a pydantic options model, turning its first error into one plain sentence.

    Raises:
        ValueError: ``Got X for FIELD; expected …`` for the first invalid value.
    """
    try:
        return model(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or model.__name__
        got = first.get("input")
        msg = str(first.get("msg", "")).removeprefix("Value error, ")
        if msg.startswith("Got "):  # our own validators already say it
            raise ValueError(msg) from None
        if msg.startswith("Input should be "):
            raise ValueError(f"Got {got!r} for {field}; expected {msg.removeprefix('Input should be ')}") from None
        raise ValueError(f"Got {got!r} for {field}: {msg}") from None


def _runtime_env(app: AppConfig, options: ServeConfigOptions) -> dict[str, Any]:
    env = {
        "VISIONFLEET_HOME": app.home,
        "WANDB_MODE": options.wandb_mode.value,
        "WANDB_DIR": f"{app.home.rstrip('/')}/wandb",
        "WANDB_SILENT": "true",
    }
    for key, value in options.env.items():
        if key == "VISIONFLEET_HOME" and value != app.home:
            raise ValueError(f"Got {value!r} for env VISIONFLEET_HOME; expected the app's home {app.home!r}")
        env[key] = value
    return {"env_vars": env}


def _scaling(cfg: Any) -> dict[str, Any]:
    """A deployment's ``num_replicas``, or its ``autoscaling_config`` (Serve refuses a fixed count beside it)."""
    if cfg.autoscaling is not None:
        return {"autoscaling_config": cfg.autoscaling.serve_dict()}
    return {"num_replicas": cfg.num_replicas}


def serve_config(
    app: AppConfig,
    options: ServeConfigOptions | None = None,
    *,
    user: IngressUserConfig | None = None,
) -> dict[str, Any]:
    """The ``serve deploy`` document for ``app``, validated with ``ServeDeploySchema``.

    Args:
        app: the application's configuration (becomes ``args``).
        options: HTTP and proxy placement (spreading is ``app.replica.max_replicas_per_node``).
        user: the ingress's runtime state: experiments and its batching knobs (the
            ModelReplica has no runtime knobs: the ingress's batcher is the only one).

    Returns:
        A plain dict (``to_yaml`` writes it); ``applications[0]`` is the visionfleet app.

    Raises:
        ValueError: when options contradict the app (timeouts, ModelReplica settings with
            the models in the ingress) or Ray's schema refuses the document.
    """
    options = options or ServeConfigOptions()
    user = user or IngressUserConfig()
    if options.request_timeout_s <= app.ingress.request_timeout_s:
        raise ValueError(
            f"Got {options.request_timeout_s:g} for request_timeout_s with the ingress's request_timeout_s="
            f"{app.ingress.request_timeout_s:g}; expected more, so the ingress answers a timeout with its JSON 408 "
            "before Serve's proxy cuts the request"
        )
    if app.ingress.inference_in == "ingress":
        # The document then has no ModelReplica deployment: its scaling settings would be dropped silently.
        defaults = type(app.replica).model_fields
        changed = [f"replica.{k}={getattr(app.replica, k)!r}" for k in ("num_replicas", "max_replicas_per_node",
                                                                      "autoscaling")
                   if getattr(app.replica, k) != defaults[k].default]
        if changed:
            raise ValueError(
                f"Got {', '.join(changed)} with ingress.inference_in='ingress'; expected their defaults "
                "(the models run in the ingress, so the config has no ModelReplica to scale)"
            )
    running = [e.model for e in user.experiments if e.status == "running"]
    if len(set(running)) != len(running):
        raise ValueError(
            f"Got two running experiments on one model ({sorted(running)}); expected at most one per model"
        )
    replica: dict[str, Any] = {
        "name": REPLICA_DEPLOYMENT,
        **_scaling(app.replica),
        "max_ongoing_requests": app.replica.max_ongoing_requests,
        "max_queued_requests": app.replica.max_queued_requests,
        "health_check_period_s": app.replica.health_check_period_s,
        "ray_actor_options": {"num_cpus": app.replica.num_cpus},
    }
    if app.replica.max_replicas_per_node is not None:
        replica["max_replicas_per_node"] = app.replica.max_replicas_per_node
    ingress = {
        "name": INGRESS_DEPLOYMENT,
        **_scaling(app.ingress),
        "max_ongoing_requests": app.ingress.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": app.ingress.num_cpus},
        "user_config": user.model_dump(mode="json", exclude_none=True),
    }
    doc = {
        "proxy_location": options.proxy_location.value,
        "http_options": {
            "host": options.host,
            "port": options.port,
            "request_timeout_s": options.request_timeout_s,
        },
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": options.route_prefix,
                "import_path": IMPORT_PATH,
                "runtime_env": _runtime_env(app, options),
                "args": app.model_dump(mode="json"),
                "deployments": [ingress, replica] if app.ingress.inference_in == "replicas" else [ingress],
            }
        ],
    }
    validate_serve_config(doc)
    return doc


def validate_serve_config(doc: dict[str, Any]) -> None:
    """Check ``doc`` with Ray's ``ServeDeploySchema`` and the app's own ``AppConfig``.

    Ray's schema allows unknown keys (forward compatibility), so the visionfleet app's
    ``args`` and ``user_config`` are checked with our pydantic models as well.

    Raises:
        ValueError: naming what Ray's schema or our models refused.
    """
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(doc)
    except ValidationError as exc:
        raise ValueError(f"Got a Serve config that Ray's ServeDeploySchema refuses: {exc}") from None
    apps = [a for a in doc.get("applications", []) if a.get("import_path") == IMPORT_PATH]
    for a in apps:
        app_config_from_serve_config(doc, a.get("name", APP_NAME))
        for d in a.get("deployments", []):
            if d.get("name") not in (INGRESS_DEPLOYMENT, REPLICA_DEPLOYMENT):
                raise ValueError(
                    f"Got deployment {d.get('name')!r}; expected {INGRESS_DEPLOYMENT!r} or {REPLICA_DEPLOYMENT!r}"
                )
            if d["name"] == REPLICA_DEPLOYMENT:
                if d.get("user_config"):
                    raise ValueError(
                        f"Got a user_config for {REPLICA_DEPLOYMENT}; expected none (it has no runtime knobs: "
                        f"batching is the {INGRESS_DEPLOYMENT}'s user_config: max_batch_size, batch_wait_timeout_s)"
                    )
                continue
            try:
                IngressUserConfig.model_validate(d.get("user_config") or {})
            except ValidationError as exc:
                raise ValueError(f"Got an invalid user_config for {d['name']}: {exc}") from None


def app_config_from_serve_config(doc: dict[str, Any], name: str = APP_NAME) -> AppConfig:
    """Parse the ``args`` of application ``name`` back into an :class:`AppConfig`.

    ``app_builder`` also accepts ``user_config`` inside ``args``; it is runtime state,
    not part of the ``AppConfig``.
    """
    for a in doc.get("applications", []):
        if a.get("name") == name:
            args = {k: v for k, v in (a.get("args") or {}).items() if k != "user_config"}
            try:
                return AppConfig.model_validate(args)
            except ValidationError as exc:
                raise ValueError(f"Got args for application {name!r} that AppConfig refuses: {exc}") from None
    raise ValueError(f"Got no application named {name!r} in the Serve config; expected one")


def to_yaml(doc: dict[str, Any]) -> str:
    """Block-style YAML in the order the document was built (what a person reads)."""
    import yaml

    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=120)
