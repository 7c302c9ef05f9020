"""`visionfleet serve`: run the Serve app on a persistent local Ray head."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from visionfleet.cli._common import cli_errors, err, out, print_json, settings

app = typer.Typer(help="Serve models over HTTP on a local Ray head.", no_args_is_help=True)


@app.command()
@cli_errors
def up(
    host: Annotated[str, typer.Option(help="HTTP host")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    model: Annotated[str, typer.Option(help="default model name for requests that name none")] = "demo",
    replicas: Annotated[int, typer.Option(help="ModelReplica replicas")] = 1,
    replica_cpus: Annotated[float, typer.Option(help="CPUs per replica")] = 0.5,
    ort_threads: Annotated[int, typer.Option(help="ONNX Runtime threads per session")] = 2,
    max_batch_size: Annotated[int, typer.Option(help="dynamic batching: images per model call (1: off)")] = 16,
    batch_wait_ms: Annotated[float, typer.Option(
        help="dynamic batching: extra wait for a batch to fill (0: a batch leaves as soon as a slot is free)")] = 0.0,
    num_cpus: Annotated[int, typer.Option(help="CPUs the head offers (0: all)")] = 0,
    timeout: Annotated[float, typer.Option(help="seconds to wait for /healthz")] = 180.0,
    retrain: Annotated[bool, typer.Option(help="start the retraining controller for --model")] = True,
    ingress_mode: Annotated[str, typer.Option(help="proxy (Serve's HTTP proxy) or haproxy (direct ingress: less CPU per request)")] = "proxy",
    inference_in: Annotated[str, typer.Option(
        help="where models run: replicas (ModelReplica deployments) or ingress (in the ingress process: no hop)")] = "replicas",
    min_replicas: Annotated[Optional[int], typer.Option(help="autoscale ModelReplica: fewest replicas (with --max-replicas)")] = None,
    max_replicas: Annotated[Optional[int], typer.Option(help="autoscale ModelReplica: most replicas")] = None,
    target_ongoing_requests: Annotated[Optional[float], typer.Option(help="autoscaling: ongoing requests per replica Serve aims for (default 2)")] = None,
    upscale_delay_s: Annotated[Optional[float], typer.Option(help="autoscaling: seconds of high load before a replica is added")] = None,
    downscale_delay_s: Annotated[Optional[float], typer.Option(help="autoscaling: seconds of low load before a replica is removed")] = None,
    ingress_replicas: Annotated[int, typer.Option(help="ingress replicas (fixed count)")] = 1,
    ingress_min_replicas: Annotated[Optional[int], typer.Option(help="autoscale the ingress: fewest replicas (>= 1)")] = None,
    ingress_max_replicas: Annotated[Optional[int], typer.Option(help="autoscale the ingress: most replicas")] = None,
) -> None:
    """Start (or join) the local head, deploy the app and wait until /healthz answers 200."""
    from ray import serve

    from cluster.local import connect, start_head, update_head, wait_http
    from cluster.serve_config import options_from
    from serve_apps.config import AppConfig, ExperimentConfig, IngressUserConfig, ReplicaConfig
    from serve_apps.deploy import deploy
    from visionfleet.auth import admin_token

    _refuse_replica_flags(inference_in, replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas)
    scaling = _scaling_flags(min_replicas, max_replicas, target_ongoing_requests, upscale_delay_s, downscale_delay_s,
                             ingress_replicas, ingress_min_replicas, ingress_max_replicas)
    s = settings().ensure()
    from visionfleet.state import check_state

    check_state(s)  # a bad store URL or a database that is down: one message, before Ray starts
    cfg = AppConfig(
        home=str(s.home),
        default_model=model,
        admin_token=admin_token(s, create=True),
        max_body_bytes=s.max_body_bytes,
        max_pixels=s.max_pixels,
        replica=options_from(ReplicaConfig, num_replicas=replicas, num_cpus=replica_cpus, ort_threads=ort_threads,
                             autoscaling=scaling["replica"]),
        ingress=_ingress_config(inference_in, replica_cpus, max_batch_size=max_batch_size,
                                batch_wait_timeout_s=batch_wait_ms / 1000, num_replicas=ingress_replicas,
                                autoscaling=scaling["ingress"]),
    )
    from cluster.local import ingress_mode_env

    ingress_mode_env(ingress_mode)  # validate before anything starts
    with err.status("starting the local Ray head"):
        info = start_head(s, num_cpus=num_cpus or None, ingress_mode=ingress_mode)
        connect(s)
    with err.status(f"deploying on http://{host}:{port}"):
        # The proxy's own timeout bounds time spent queued before the ingress sees a request.
        serve.start(http_options={"host": host, "port": port, "request_timeout_s": 60})
        # Experiments still running from before a restart keep routing traffic.
        from visionfleet.db.experiments import open_experiments

        running = [ExperimentConfig.model_validate(e.doc) for e in open_experiments(s).all(status="running")]
        deploy(cfg, IngressUserConfig(experiments=running), {"host": host, "port": port})
        update_head(s, http_host=host, http_port=port)
        url = f"http://{host}:{port}/healthz"
        if not wait_http(url, timeout=timeout):
            raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f}s; see `visionfleet serve status`")
    if retrain:
        import ray

        from train.controller import ControllerConfig, get_or_create_controller

        ctl = get_or_create_controller(str(s.home), ControllerConfig(model=model))
        ray.get(ctl.status.remote(), timeout=120)
        err.print(f"retraining controller watching {model}@production (`visionfleet retrain status --model {model}`)")
    out.print(f"serving on http://{host}:{port} (Ray head {info.address}); stop with `visionfleet serve down`")
    err.print(f"admin token: {s.home / 'admin_token'} (or $VISIONFLEET_ADMIN_TOKEN)")


@app.command()
@cli_errors
def down() -> None:
    """Shut down the app and stop the local head that `serve up` started."""
    from cluster.local import connect, read_head, stop_head

    s = settings()
    info = read_head(s)
    if info is None:
        out.print("nothing to stop: no local head is recorded")
        return
    try:
        from ray import serve

        connect(s)
        serve.shutdown()
    except Exception as exc:  # noqa: BLE001 - the head may already be gone; stop it anyway
        err.print(f"[yellow]serve shutdown skipped:[/] {exc}")
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    stopped = stop_head(s)
    out.print("stopped the local head" if stopped else "the local head was not running; cleaned up its record")


@app.command()
@cli_errors
def status(as_json: Annotated[bool, typer.Option("--json", help="print as JSON")] = False) -> None:
    """Show the local head, the app's deployments and whether /healthz answers."""
    import urllib.request

    from cluster.local import head_alive, read_head

    s = settings()
    info = read_head(s)
    doc: dict = {"head": None, "healthz": None, "app": None}
    if info is not None:
        doc["head"] = {**info.__dict__, "alive": head_alive(info)}
        if info.http_port:
            url = f"http://{info.http_host}:{info.http_port}/healthz"
            try:
                with urllib.request.urlopen(url, timeout=3) as r:
                    doc["healthz"] = {"url": url, "status": r.status}
            except Exception as exc:  # noqa: BLE001
                doc["healthz"] = {"url": url, "error": str(exc)}
        if doc["head"]["alive"]:
            from ray import serve

            from cluster.local import connect

            connect(s)
            st = serve.status()
            doc["app"] = {
                name: {
                    "status": str(a.status.value if hasattr(a.status, "value") else a.status),
                    "deployments": {
                        d: str(ds.status.value if hasattr(ds.status, "value") else ds.status)
                        for d, ds in a.deployments.items()
                    },
                }
                for name, a in st.applications.items()
            }
    if as_json:
        print_json(doc)
        return
    if info is None:
        out.print("no local head (start one with `visionfleet serve up`)")
        raise typer.Exit(1)
    out.print(f"head {info.address} alive={doc['head']['alive']} cpus={info.num_cpus} since {info.started_at[:19]}")
    if doc["healthz"]:
        out.print(f"healthz: {doc['healthz']}")
    for name, a in (doc["app"] or {}).items():
        out.print(f"app {name}: {a['status']}  " + ", ".join(f"{d}={st}" for d, st in a["deployments"].items()))


@app.command()
@cli_errors
def batching(
    max_batch_size: Annotated[Optional[int], typer.Option(help="images per model call (1: batching off)")] = None,
    wait_ms: Annotated[Optional[float], typer.Option(help="extra wait for a batch to fill (ms; 0: none)")] = None,
    max_concurrent: Annotated[Optional[int], typer.Option(
        help="model calls in flight per ingress replica while batching (a batch leaves when one is free)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the new settings as JSON")] = False,
) -> None:
    """Change the dynamic-batching knobs of the running app in place (no restart).

    One batcher serves every layout: the ingress's adaptive batcher (docs/serving.md).
    """
    from cluster.local import connect
    from serve_apps.deploy import apply_batching

    if all(v is None for v in (max_batch_size, wait_ms, max_concurrent)):
        raise ValueError("Got no knob; expected at least one of --max-batch-size, --wait-ms, --max-concurrent")
    s = settings()
    connect(s)
    doc = apply_batching(s.home, max_batch_size=max_batch_size,
                         batch_wait_timeout_s=None if wait_ms is None else wait_ms / 1000,
                         max_concurrent_batches=max_concurrent)
    if as_json:
        print_json(doc)
    else:
        out.print(f"batching: {doc['ingress']}")


@app.command("telemetry")
@cli_errors
def telemetry(
    state: Annotated[str, typer.Argument(help="on or off")],
) -> None:
    """Pause or resume telemetry (events, lake, monitoring, sampling) in place, no restart."""
    from cluster.local import connect
    from serve_apps.deploy import apply_telemetry

    if state not in ("on", "off"):
        raise ValueError(f"Got {state!r}; expected on or off")
    s = settings()
    connect(s)
    apply_telemetry(s.home, state == "on")
    out.print(f"telemetry {state}")


# `serve config` (issue 9, clusters): the Serve config file for `serve deploy` and KubeRay.
from pathlib import Path  # noqa: E402

_KUBERAY_ONLY = ("image", "pvc", "workers", "min_workers", "max_workers", "worker_cpus", "worker_memory",
                 "head_cpus", "head_memory", "name", "store", "store_secret", "db_secret", "aws_secret",
                 "aws_endpoint_url", "aws_region")


@app.command("config")
@cli_errors
def config(
    model: Annotated[str, typer.Option(help="default model name for requests that name none")] = "demo",
    host: Annotated[str, typer.Option(help="HTTP host of Serve's proxies (0.0.0.0: from the network)")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="HTTP port of Serve's proxies")] = 8000,
    replicas: Annotated[int, typer.Option(help="ModelReplica replicas")] = 1,
    replica_cpus: Annotated[float, typer.Option(help="CPUs per replica")] = 0.5,
    ingress_cpus: Annotated[float, typer.Option(help="CPUs per ingress replica")] = 0.25,
    inference_in: Annotated[str, typer.Option(
        help="where models run: replicas (ModelReplica deployments) or ingress (in the ingress process: no hop)")] = "replicas",
    ort_threads: Annotated[int, typer.Option(help="ONNX Runtime threads per session")] = 2,
    max_batch_size: Annotated[int, typer.Option(help="dynamic batching: images per model call (1: off)")] = 16,
    batch_wait_ms: Annotated[float, typer.Option(
        help="dynamic batching: extra wait for a batch to fill (0: a batch leaves as soon as a slot is free)")] = 0.0,
    max_replicas_per_node: Annotated[Optional[int], typer.Option(help="spread replicas: at most N per node")] = None,
    min_replicas: Annotated[Optional[int], typer.Option(help="autoscale ModelReplica: fewest replicas (with --max-replicas)")] = None,
    max_replicas: Annotated[Optional[int], typer.Option(help="autoscale ModelReplica: most replicas")] = None,
    target_ongoing_requests: Annotated[Optional[float], typer.Option(help="autoscaling: ongoing requests per replica Serve aims for (default 2)")] = None,
    upscale_delay_s: Annotated[Optional[float], typer.Option(help="autoscaling: seconds of high load before a replica is added")] = None,
    downscale_delay_s: Annotated[Optional[float], typer.Option(help="autoscaling: seconds of low load before a replica is removed")] = None,
    ingress_replicas: Annotated[int, typer.Option(help="ingress replicas (fixed count)")] = 1,
    ingress_min_replicas: Annotated[Optional[int], typer.Option(help="autoscale the ingress: fewest replicas (>= 1)")] = None,
    ingress_max_replicas: Annotated[Optional[int], typer.Option(help="autoscale the ingress: most replicas")] = None,
    request_timeout: Annotated[float, typer.Option(help="Serve's HTTP timeout, s (above the ingress's)")] = 60.0,
    proxy_location: Annotated[str, typer.Option(help="EveryNode, HeadOnly (one machine), Disabled")] = "EveryNode",
    home: Annotated[Optional[str], typer.Option("--home", help="state dir as the nodes see it")] = None,
    admin_token: Annotated[bool, typer.Option(help="embed the admin token (the file then holds a secret)")] = False,
    experiment: Annotated[Optional[list[Path]], typer.Option(help="experiment file (YAML/JSON); repeatable")] = None,
    wandb: Annotated[str, typer.Option(help="WANDB_MODE of the replicas: offline, online or disabled")] = "offline",
    kuberay: Annotated[bool, typer.Option(help="emit a KubeRay RayService manifest that embeds the config")] = False,
    image: Annotated[Optional[str], typer.Option(help="--kuberay: container image with visionfleet installed")] = None,
    pvc: Annotated[Optional[str], typer.Option(help="--kuberay: PersistentVolumeClaim holding the state dir")] = None,
    workers: Annotated[Optional[int], typer.Option(help="--kuberay: worker pods")] = None,
    min_workers: Annotated[Optional[int], typer.Option(help="--kuberay: autoscaling floor")] = None,
    max_workers: Annotated[Optional[int], typer.Option(help="--kuberay: autoscaling ceiling")] = None,
    worker_cpus: Annotated[Optional[float], typer.Option(help="--kuberay: CPUs per worker pod")] = None,
    worker_memory: Annotated[Optional[str], typer.Option(help="--kuberay: memory per worker pod, e.g. 8Gi")] = None,
    head_cpus: Annotated[Optional[float], typer.Option(help="--kuberay: CPUs of the head pod")] = None,
    head_memory: Annotated[Optional[str], typer.Option(help="--kuberay: memory of the head pod, e.g. 8Gi")] = None,
    name: Annotated[Optional[str], typer.Option(help="--kuberay: name of the RayService")] = None,
    store: Annotated[Optional[str], typer.Option(help="--kuberay: VISIONFLEET_STORE (s3://bucket/prefix); home becomes an emptyDir")] = None,
    store_secret: Annotated[Optional[str], typer.Option(help="--kuberay: Secret whose key 'store' holds VISIONFLEET_STORE")] = None,
    db_secret: Annotated[Optional[str], typer.Option(help="--kuberay: Secret whose key 'url' holds VISIONFLEET_DB")] = None,
    aws_secret: Annotated[Optional[str], typer.Option(help="--kuberay: Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY")] = None,
    aws_endpoint_url: Annotated[Optional[str], typer.Option(help="--kuberay: AWS_ENDPOINT_URL (MinIO)")] = None,
    aws_region: Annotated[Optional[str], typer.Option(help="--kuberay: AWS_REGION")] = None,
    out_file: Annotated[Optional[Path], typer.Option("--out", help="write to FILE instead of stdout")] = None,
) -> None:
    """Print the Serve config YAML for `serve deploy` (or, with --kuberay, a RayService manifest)."""
    import os
    import sys

    import yaml

    from cluster.serve_config import ServeConfigOptions, options_from, serve_config, to_yaml
    from serve_apps.config import AppConfig, ExperimentConfig, IngressConfig, IngressUserConfig, ReplicaConfig
    from visionfleet.auth import admin_token as _admin_token

    kube = {"image": image, "pvc": pvc, "workers": workers, "min_workers": min_workers, "max_workers": max_workers,
            "worker_cpus": worker_cpus, "worker_memory": worker_memory, "head_cpus": head_cpus,
            "head_memory": head_memory, "name": name, "store": store, "store_secret": store_secret,
            "db_secret": db_secret, "aws_secret": aws_secret, "aws_endpoint_url": aws_endpoint_url,
            "aws_region": aws_region}
    given = [f"--{k.replace('_', '-')}" for k in _KUBERAY_ONLY if kube[k] is not None]
    if given and not kuberay:
        raise ValueError(f"Got {', '.join(given)} without --kuberay; expected them only with --kuberay")
    if kuberay and not image:
        raise ValueError("Got --kuberay without --image; expected the container image the pods run")
    _refuse_replica_flags(inference_in, replicas=replicas, max_replicas_per_node=max_replicas_per_node,
                          min_replicas=min_replicas, max_replicas=max_replicas)
    scaling = _scaling_flags(min_replicas, max_replicas, target_ongoing_requests, upscale_delay_s, downscale_delay_s,
                             ingress_replicas, ingress_min_replicas, ingress_max_replicas)
    s = settings()
    experiments = []
    for path in experiment or []:
        try:
            experiments.append(ExperimentConfig.model_validate(yaml.safe_load(path.read_text())))
        except (yaml.YAMLError, ValueError) as exc:
            raise ValueError(f"Got an invalid experiment file {path}: {exc}") from None
    app_cfg = options_from(
        AppConfig,
        home=home if home is not None else str(s.home),
        default_model=model,
        admin_token=_admin_token(s, create=True) if admin_token else None,
        max_body_bytes=s.max_body_bytes,
        max_pixels=s.max_pixels,
        replica=options_from(ReplicaConfig, num_replicas=replicas, num_cpus=replica_cpus, ort_threads=ort_threads,
                             max_replicas_per_node=max_replicas_per_node, autoscaling=scaling["replica"]),
        ingress=options_from(IngressConfig, num_cpus=ingress_cpus, inference_in=_inference_in(inference_in),
                             max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_ms / 1000,
                             num_replicas=ingress_replicas, autoscaling=scaling["ingress"]),
    )
    options = options_from(ServeConfigOptions, host=host, port=port, request_timeout_s=request_timeout,
                           proxy_location=proxy_location, wandb_mode=wandb)
    doc = serve_config(app_cfg, options, user=IngressUserConfig(experiments=experiments))
    if kuberay:
        from cluster.kuberay import RayServiceOptions, manifest_yaml, rayservice_manifest

        manifest = rayservice_manifest(
            doc, options_from(RayServiceOptions, **{k: v for k, v in kube.items() if v is not None})
        )
        text = manifest_yaml(manifest)
    else:
        text = to_yaml(doc)
    if out_file is None:
        sys.stdout.write(text)
        return
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if admin_token else 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    if admin_token:
        os.chmod(out_file, 0o600)  # an existing file keeps its mode on O_TRUNC
    what = "RayService manifest" if kuberay else "Serve config"
    hint = "kubectl apply -f" if kuberay else 'eval "$(visionfleet cluster env)"; serve deploy'
    err.print(f"wrote the {what} to {out_file} ({hint} {out_file})")


def _inference_in(value: str) -> str:
    if value not in ("replicas", "ingress"):
        raise ValueError(f"Got {value!r} for --inference-in; expected replicas or ingress")
    return value


_REPLICA_FIELDS = {"replicas": "num_replicas", "max_replicas_per_node": "max_replicas_per_node",
                   "min_replicas": None, "max_replicas": None}


def _scaling_flags(min_replicas: Optional[int], max_replicas: Optional[int], target: Optional[float],
                   upscale_delay_s: Optional[float], downscale_delay_s: Optional[float], ingress_replicas: int,
                   ingress_min: Optional[int], ingress_max: Optional[int]) -> dict[str, Any]:
    """The ``AutoscalingConfig`` of ModelReplica and of the ingress from the flags (None: a fixed count).

    ``--min-replicas``/``--max-replicas`` autoscale ModelReplica, ``--ingress-min-replicas``/
    ``--ingress-max-replicas`` the ingress; the target and the delays apply to both.

    Raises:
        ValueError: ``Got …; expected …`` for a half-given range, a fixed count beside a range,
            or a value ``AutoscalingConfig`` refuses.
    """
    from cluster.serve_config import options_from
    from serve_apps.config import AutoscalingConfig

    out: dict[str, Any] = {"replica": None, "ingress": None}
    for key, lo, hi, flag in (("replica", min_replicas, max_replicas, "--min-replicas/--max-replicas"),
                              ("ingress", ingress_min, ingress_max, "--ingress-min-replicas/--ingress-max-replicas")):
        if lo is None and hi is None:
            continue
        if lo is None or hi is None:
            raise ValueError(f"Got only one of {flag}; expected both (the autoscaling range)")
        if key == "ingress" and ingress_replicas != 1:
            raise ValueError(f"Got --ingress-replicas {ingress_replicas} with {flag}; expected one of them")
        extra = {k: v for k, v in (("target_ongoing_requests", target), ("upscale_delay_s", upscale_delay_s),
                                   ("downscale_delay_s", downscale_delay_s)) if v is not None}
        out[key] = options_from(AutoscalingConfig, min_replicas=lo, max_replicas=hi, **extra)
    if out["replica"] is None and out["ingress"] is None and any(
            v is not None for v in (target, upscale_delay_s, downscale_delay_s)):
        raise ValueError("Got --target-ongoing-requests/--upscale-delay-s/--downscale-delay-s without an autoscaling "
                         "range; expected them with --min-replicas/--max-replicas or --ingress-min-replicas/"
                         "--ingress-max-replicas")
    return out


def _refuse_replica_flags(inference_in: str, **values: Any) -> None:
    """Refuse ModelReplica scaling flags with ``--inference-in ingress``, where the app deploys no ModelReplica.

    ``values`` are the command's own flags (``replicas``, ``max_replicas_per_node``); one
    equal to its ``ReplicaConfig`` default is not a request and passes.

    Raises:
        ValueError: naming the flags, so the CLI exits 2 before anything starts.
    """
    from serve_apps.config import ReplicaConfig

    if _inference_in(inference_in) != "ingress":
        return
    defaults = {flag: ReplicaConfig.model_fields[field].default if field else None
                for flag, field in _REPLICA_FIELDS.items()}
    given = [f"--{flag.replace('_', '-')} {v}" for flag, v in values.items() if v != defaults[flag]]
    if given:
        names = " and ".join(f"--{flag.replace('_', '-')}" for flag in values)
        raise ValueError(
            f"Got {', '.join(given)} with --inference-in ingress; expected {names} only with --inference-in replicas "
            "(with ingress the models run in the ingress process and there is no ModelReplica to scale)"
        )


def _ingress_config(inference_in: str, replica_cpus: float, **settings: Any):
    """The ingress of `serve up`: running the models itself, it reserves the replica's CPUs."""
    from cluster.serve_config import options_from
    from serve_apps.config import IngressConfig

    if _inference_in(inference_in) == "ingress":
        return options_from(IngressConfig, inference_in="ingress", num_cpus=replica_cpus, **settings)
    return options_from(IngressConfig, **settings)
