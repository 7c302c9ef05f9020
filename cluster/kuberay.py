"""A KubeRay ``RayService`` manifest that embeds the visionfleet Serve config.

``kubectl apply -f`` the result on a Kubernetes cluster with the KubeRay operator
(v1.5.1 or newer for ``authOptions``). The operator creates a Ray cluster from
``spec.rayClusterConfig`` (a head group and one worker group, all pods mounting the
state dir from one PersistentVolumeClaim, or, with an object store set, a node-local
``emptyDir``, with the store, database and S3 credentials as env from Secrets) and deploys ``spec.serveConfigV2`` — the very
document ``serve deploy`` takes, as a YAML string — onto it. See
https://docs.ray.io/en/latest/cluster/kubernetes/getting-started/rayservice-quick-start.html
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.serve_config import REPLICA_DEPLOYMENT, app_config_from_serve_config, to_yaml, validate_serve_config

__all__ = ["RayServiceOptions", "rayservice_manifest", "manifest_yaml", "serve_config_of", "STATE_VOLUME",
           "validate_manifest", "SCHEMA_PATH"]

STATE_VOLUME = "visionfleet-state"
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
_DNS_SUBDOMAIN = r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
SCHEMA_PATH = Path(__file__).parent / "schemas" / "rayservice-crd.json"
_QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$"
# The ports a head pod exposes: GCS, dashboard (job server and `serve deploy`), Ray
# client, and Serve's HTTP proxy (its number follows the Serve config).
_HEAD_PORTS = (("gcs-server", 6379), ("dashboard", 8265), ("client", 10001))


def _ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


class RayServiceOptions(BaseModel):
    """The Kubernetes side of a RayService: image, pods, the state volume."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="visionfleet", pattern=_DNS_LABEL, description="metadata.name of the RayService")
    namespace: str | None = Field(default=None, pattern=_DNS_LABEL, description="metadata.namespace (None: kubectl's)")
    image: str = Field(min_length=1, description="container image with visionfleet installed ('.[cluster]')")
    ray_version: str = Field(default_factory=_ray_version, pattern=r"^\d+\.\d+\.\d+", description="Ray in the image")
    pvc: str = Field(default=STATE_VOLUME, pattern=_DNS_LABEL,
                     description="PersistentVolumeClaim (ReadWriteMany) that holds the state dir")
    head_cpus: float = Field(default=2, gt=0, le=512, description="CPU request and limit of the head pod")
    head_memory: str = Field(default="8Gi", pattern=_QUANTITY, description="memory request and limit of the head pod")
    head_runs_replicas: bool = Field(
        default=False, description="let Serve place replicas on the head (False: rayStartParams num-cpus=0)"
    )
    workers: int = Field(default=2, ge=0, le=1000, description="worker pods to start with")
    min_workers: int | None = Field(default=None, ge=0, le=1000, description="autoscaling floor (default: workers)")
    max_workers: int | None = Field(default=None, ge=0, le=1000, description="autoscaling ceiling (default: workers)")
    worker_cpus: float = Field(default=2, gt=0, le=512, description="CPU request and limit of a worker pod")
    worker_memory: str = Field(default="8Gi", pattern=_QUANTITY, description="memory request and limit of a worker pod")
    auth: bool = Field(default=True, description="Ray token authentication (KubeRay authOptions, v1.5.1+)")
    # Issue 15: the shared store and the database, as container environment. With a store
    # the home is a node-local emptyDir and no ReadWriteMany volume is needed.
    store: str | None = Field(default=None, description="VISIONFLEET_STORE as a plain value (s3://bucket/prefix)")
    store_secret: str | None = Field(default=None, description="Secret whose key 'store' holds VISIONFLEET_STORE")
    db_secret: str | None = Field(default=None, description="Secret whose key 'url' holds VISIONFLEET_DB")
    aws_secret: str | None = Field(
        default=None, description="Secret with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    aws_endpoint_url: str | None = Field(default=None, description="AWS_ENDPOINT_URL (MinIO, moto), plain")
    aws_region: str | None = Field(default=None, description="AWS_REGION, plain")

    @model_validator(mode="after")
    def _bounds(self) -> "RayServiceOptions":
        for flag, value in (("store-secret", self.store_secret), ("db-secret", self.db_secret),
                            ("aws-secret", self.aws_secret)):
            if value is not None and not re.fullmatch(_DNS_SUBDOMAIN, value):
                raise ValueError(f"Got {value!r} for --{flag}; expected a Kubernetes Secret name (lower-case "
                                 "letters, digits, '-' and '.', at most 253 characters)")
        if self.store is not None and not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?", self.store):
            raise ValueError(f"Got {self.store!r} for --store; expected s3://bucket/prefix (a path in the pods "
                             "goes in --home with --pvc)")
        if self.store is not None and self.store_secret is not None:
            raise ValueError("Got both --store and --store-secret; expected one of them")
        if self.aws_endpoint_url is not None and not re.fullmatch(r"https?://\S+", self.aws_endpoint_url):
            raise ValueError(f"Got {self.aws_endpoint_url!r} for --aws-endpoint-url; expected http(s)://host[:port]")
        if self.has_store and "pvc" in self.model_fields_set:
            raise ValueError("Got --pvc with a store; expected one of them (with --store the home is an emptyDir)")
        if not self.has_store and (self.aws_secret or self.aws_endpoint_url or self.aws_region):
            raise ValueError("Got AWS settings without --store or --store-secret; expected them only with a store")
        lo = self.workers if self.min_workers is None else self.min_workers
        hi = self.workers if self.max_workers is None else self.max_workers
        if not lo <= self.workers <= hi:
            raise ValueError(
                f"Got min_workers={lo}, workers={self.workers}, max_workers={hi}; expected min ≤ workers ≤ max"
            )
        return self

    @property
    def has_store(self) -> bool:
        return self.store is not None or self.store_secret is not None

    @property
    def floor(self) -> int:
        return self.workers if self.min_workers is None else self.min_workers

    @property
    def ceiling(self) -> int:
        return self.workers if self.max_workers is None else self.max_workers


def _cpu(quantity: float) -> str:
    return str(int(quantity)) if float(quantity).is_integer() else f"{round(quantity * 1000)}m"


def _secret(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _env(home: str, options: RayServiceOptions) -> list[dict[str, Any]]:
    # Jobs (`ray job submit`) and the retraining controller resolve state through these.
    env: list[dict[str, Any]] = [{"name": "VISIONFLEET_HOME", "value": home}]
    if options.store is not None:
        env.append({"name": "VISIONFLEET_STORE", "value": options.store})
    if options.store_secret is not None:
        env.append(_secret("VISIONFLEET_STORE", options.store_secret, "store"))
    if options.db_secret is not None:
        env.append(_secret("VISIONFLEET_DB", options.db_secret, "url"))
    if options.aws_secret is not None:
        env += [_secret(k, options.aws_secret, k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    if options.aws_endpoint_url is not None:
        env.append({"name": "AWS_ENDPOINT_URL", "value": options.aws_endpoint_url})
    if options.aws_region is not None:
        env.append({"name": "AWS_REGION", "value": options.aws_region})
    return env


def _container(name: str, image: str, home: str, cpus: float, memory: str, ports: list[dict],
               options: RayServiceOptions) -> dict[str, Any]:
    res = {"cpu": _cpu(cpus), "memory": memory}
    c: dict[str, Any] = {
        "name": name,
        "image": image,
        "env": _env(home, options),
        # Requests = limits: Guaranteed QoS, so Ray's CPU count matches what the pod gets.
        "resources": {"requests": dict(res), "limits": dict(res)},
        "volumeMounts": [{"name": STATE_VOLUME, "mountPath": home}],
    }
    if ports:
        c["ports"] = ports
    return c


def _volumes(options: RayServiceOptions) -> list[dict[str, Any]]:
    if options.has_store:  # shared state is in the object store: home is node-local scratch
        return [{"name": STATE_VOLUME, "emptyDir": {}}]
    return [{"name": STATE_VOLUME, "persistentVolumeClaim": {"claimName": options.pvc}}]


def _check_capacity(doc: dict[str, Any], options: RayServiceOptions) -> None:
    """Refuse a layout Serve could never place, instead of a RayService stuck in 'deploying'."""
    app = app_config_from_serve_config(doc)
    nodes = options.ceiling + (1 if options.head_runs_replicas else 0)
    if nodes == 0:
        raise ValueError(
            "Got max_workers=0 with head_runs_replicas=False; expected at least one pod that runs replicas"
        )
    per_node = None
    for a in doc["applications"]:
        for d in a.get("deployments", []):
            if d.get("name") == REPLICA_DEPLOYMENT:
                per_node = d.get("max_replicas_per_node")
    if per_node is not None and app.replica.num_replicas > per_node * nodes:
        raise ValueError(
            f"Got {app.replica.num_replicas} replicas with max_replicas_per_node={per_node} on at most {nodes} "
            f"pod(s) that run replicas; expected at most {per_node * nodes} replicas (or more workers)"
        )
    biggest = max(options.worker_cpus if options.ceiling else 0, options.head_cpus if options.head_runs_replicas else 0)
    for what, cpus in (("replica", app.replica.num_cpus), ("ingress", app.ingress.num_cpus)):
        if cpus > biggest:
            raise ValueError(
                f"Got {cpus:g} CPUs per {what} with pods of at most {biggest:g} CPUs; expected a {what} that fits a pod"
            )


def rayservice_manifest(serve_doc: dict[str, Any], options: RayServiceOptions) -> dict[str, Any]:
    """A ``ray.io/v1`` ``RayService`` whose ``serveConfigV2`` is ``serve_doc`` (as YAML).

    The pods mount the PersistentVolumeClaim ``options.pvc`` at the app's ``home``, so
    every replica, job and Train worker sees the same registry and telemetry.

    Raises:
        ValueError: the Serve config is invalid, or the replicas cannot fit the pods.
    """
    validate_serve_config(serve_doc)
    app = app_config_from_serve_config(serve_doc)
    if "://" in app.home:  # the store URI goes in options.store; home is a path in the pods
        raise ValueError(f"Got {app.home!r} for home; expected a path inside the pods (the volume's mount path)")
    _check_capacity(serve_doc, options)
    serve_port = int(serve_doc.get("http_options", {}).get("port", 8000))
    if serve_port in {p for _, p in _HEAD_PORTS}:
        raise ValueError(f"Got {serve_port} for the Serve HTTP port; expected one not used by Ray ({_HEAD_PORTS})")
    head_ports = [{"containerPort": p, "name": n} for n, p in _HEAD_PORTS] + [
        {"containerPort": serve_port, "name": "serve"}
    ]
    head_params: dict[str, str] = {"dashboard-host": "0.0.0.0"}
    if not options.head_runs_replicas:
        head_params["num-cpus"] = "0"  # the head keeps GCS, controller and proxy; replicas go to workers
    cluster: dict[str, Any] = {
        "rayVersion": options.ray_version,
        "enableInTreeAutoscaling": options.ceiling > options.floor,
        "headGroupSpec": {
            "rayStartParams": head_params,
            "template": {
                "spec": {
                    "containers": [
                        _container("ray-head", options.image, app.home, options.head_cpus, options.head_memory,
                                   head_ports, options)
                    ],
                    "volumes": _volumes(options),
                }
            },
        },
        "workerGroupSpecs": [
            {
                "groupName": "workers",
                "replicas": options.workers,
                "minReplicas": options.floor,
                "maxReplicas": options.ceiling,
                "rayStartParams": {},
                "template": {
                    "spec": {
                        "containers": [
                            _container("ray-worker", options.image, app.home, options.worker_cpus,
                                       options.worker_memory, [], options)
                        ],
                        "volumes": _volumes(options),
                    }
                },
            }
        ],
    }
    if options.auth:
        # The operator creates a Secret with a random token and sets RAY_AUTH_MODE and
        # RAY_AUTH_TOKEN in every Ray container (the dashboard then needs the token too).
        cluster["authOptions"] = {"mode": "token"}
    metadata: dict[str, Any] = {"name": options.name, "labels": {"app.kubernetes.io/name": "visionfleet"}}
    if options.namespace:
        metadata["namespace"] = options.namespace
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": metadata,
        "spec": {
            "serveConfigV2": to_yaml(serve_doc),
            "rayClusterConfig": cluster,
        },
    }


def serve_config_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """Parse ``spec.serveConfigV2`` of a RayService back into a Serve config dict."""
    import yaml

    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


def manifest_yaml(manifest: dict[str, Any]) -> str:
    """The manifest as YAML, with ``serveConfigV2`` as a readable literal block."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    return yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def _strict(node: Any) -> Any:
    """The CRD schema as plain JSON Schema: ``x-kubernetes-int-or-string`` becomes
    ``anyOf`` integer/string (as the API server reads it); an object with ``properties``
    and neither ``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields``
    rejects unknown fields, as ``kubectl apply --validate=strict`` (kubectl's default)
    does, where the API server alone would silently prune them. Other ``x-kubernetes-*``
    keys (list types, map keys, embedded resources) and ``format`` are not checked."""
    if isinstance(node, list):
        return [_strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items() if k != "description"}
    if out.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Check a RayService against KubeRay's vendored ``ray.io/v1`` CRD schema.

    Raises:
        ValueError: the first schema violation, with its path in the manifest.
    """
    import json

    import jsonschema

    schema = _strict(json.loads(SCHEMA_PATH.read_text())["openAPIV3Schema"])
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(manifest), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ValueError(f"Got a RayService that KubeRay's CRD rejects at {where}: {e.message}; expected a manifest "
                         f"that matches {SCHEMA_PATH.name}")
