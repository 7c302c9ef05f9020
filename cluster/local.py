"""Local Ray: an embedded in-process cluster, or a persistent head under the state dir.

``start_head`` runs ``ray start --head`` on a free port with its own temp dir and
records it in ``<state>/ray/head.json``; ``stop_head`` stops exactly those processes
(never every Ray on the machine, as ``ray stop`` would). ``init_embedded`` starts
an in-process cluster for library code, demos and tests.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from visionfleet.settings import Settings

__all__ = [
    "HeadInfo",
    "free_port",
    "start_head",
    "stop_head",
    "read_head",
    "head_alive",
    "connect",
    "connect_ray",
    "init_embedded",
    "runtime_env",
    "auth_env",
    "init_token_auth_driver",
    "ingress_mode_env",
    "INGRESS_MODES",
    "RAY_NAMESPACE",
]

from visionfleet.names import RAY_NAMESPACE  # noqa: E402  (re-exported)
# Set by Ray's job supervisor in a submitted job's driver (`ray job submit`).
_SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
_HEAD_FILE = "head.json"
# AF_UNIX socket paths are limited to 107 bytes; Ray puts sockets ~60 bytes deep
# under its temp dir, so a long state dir gets a short temp dir in /tmp instead.
_MAX_TEMP_DIR = 40


@dataclass
class HeadInfo:
    address: str  # GCS address host:port
    temp_dir: str
    num_cpus: int
    started_at: str
    pid: int | None = None  # pid of the GCS server, for liveness checks
    http_host: str | None = None
    http_port: int | None = None
    ingress_mode: str = "proxy"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def runtime_env(settings: Settings) -> dict:
    """The runtime_env every job, actor, replica and Train worker gets."""
    env = settings.runtime_env_vars()
    env.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if "WANDB_MODE" not in os.environ and "WANDB_API_KEY" not in os.environ:
        env["WANDB_MODE"] = "offline"  # upload later with `wandb sync`
    env.setdefault("WANDB_DIR", str(settings.home / "wandb"))
    env.setdefault("WANDB_SILENT", "true")
    return {"env_vars": env}


def _temp_dir(settings: Settings) -> Path:
    preferred = settings.ray_dir / "head"
    if len(str(preferred)) <= _MAX_TEMP_DIR:
        return preferred
    digest = hashlib.sha256(str(settings.home).encode()).hexdigest()[:10]
    return Path("/tmp") / f"vf-ray-{digest}"


def auth_env(settings: Settings) -> dict[str, str]:
    """Ray token authentication bound to this state dir.

    Ray keeps one token per user in ``~/.ray/auth_token`` by default; two clusters on a
    machine (a test run beside a dev head) then share a file that either may replace,
    and clients of the other cluster fail with ``InvalidAuthToken``. visionfleet keeps a
    token per state dir (``<state>/ray/auth_token``, mode 0600) and points Ray at it.
    """
    import secrets

    path = settings.ray_dir / "auth_token"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # first writer wins; later ones read the same token
        except FileExistsError:
            pass
        tmp.unlink(missing_ok=True)
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


INGRESS_MODES = ("proxy", "haproxy")


def ingress_mode_env(mode: str) -> dict[str, str]:
    """Environment that selects how HTTP reaches the ingress, cluster-wide.

    ``proxy`` (default): Ray Serve's HTTP proxy actor forwards each request to an
    ingress replica. ``haproxy``: Serve's direct ingress — each ingress replica serves
    HTTP itself and HAProxy (bundled with Ray) balances the public port across them;
    no Python proxy hop, about half the CPU per request on a 2-core box
    (docs/performance.md). Ray marks direct ingress as a limited, newer mode.

    ``haproxy`` also turns on Ray Serve's throughput-optimized settings
    (``RAY_SERVE_THROUGHPUT_OPTIMIZED``, the bundle Ray pairs with direct ingress): user
    code and the router on the replica's main event loop instead of separate threads,
    gRPC for handle calls, buffered request logs that do not go to stderr, and a GC
    freeze after start-up. Measured with the demo model at 16 clients: 448 -> 677 req/s
    with models in replicas (docs/performance.md#serving).
    """
    if mode not in INGRESS_MODES:
        raise ValueError(f"Got {mode!r} for the ingress mode; expected one of {', '.join(INGRESS_MODES)}")
    if mode == "proxy":
        return {}
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    }


def _head_path(settings: Settings) -> Path:
    return settings.ray_dir / _HEAD_FILE


def read_head(settings: Settings) -> HeadInfo | None:
    p = _head_path(settings)
    if not p.is_file():
        return None
    return HeadInfo(**json.loads(p.read_text()))


def _cluster_processes(temp_dir: str):
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(proc.info.get("cmdline") or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if temp_dir in cmd and proc.pid != os.getpid():
            found.append(proc)
    return found


def head_alive(info: HeadInfo) -> bool:
    host, port = info.address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def start_head(
    settings: Settings, *, num_cpus: int | None = None, port: int | None = None, ingress_mode: str = "proxy"
) -> HeadInfo:
    """Start (or join) the persistent local head for this state dir."""
    settings.ensure()
    settings.ray_dir.mkdir(parents=True, exist_ok=True)
    ingress_mode_env(ingress_mode)  # validate
    existing = read_head(settings)
    if existing and head_alive(existing):
        if existing.ingress_mode != ingress_mode:
            raise RuntimeError(
                f"The running head uses the {existing.ingress_mode!r} ingress mode, not {ingress_mode!r}; "
                "stop it first (visionfleet serve down) to change modes"
            )
        return existing
    port = port or free_port()
    temp_dir = _temp_dir(settings)
    temp_dir.mkdir(parents=True, exist_ok=True)
    ncpu = num_cpus or os.cpu_count() or 2
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [
        str(ray_bin) if ray_bin.exists() else "ray",
        "start",
        "--head",
        f"--port={port}",
        f"--temp-dir={temp_dir}",
        f"--num-cpus={ncpu}",
        "--node-ip-address=127.0.0.1",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    env = {**os.environ, **settings.runtime_env_vars(), **auth_env(settings), **ingress_mode_env(ingress_mode),
           "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(f"ray start failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    info = HeadInfo(
        address=f"127.0.0.1:{port}",
        temp_dir=str(temp_dir),
        num_cpus=ncpu,
        started_at=_dt.datetime.now(_dt.timezone.utc).isoformat(),
        ingress_mode=ingress_mode,
    )
    gcs = [p for p in _cluster_processes(str(temp_dir)) if "gcs_server" in " ".join(p.cmdline())]
    info.pid = gcs[0].pid if gcs else None
    _write_head(settings, info)
    return info


def _write_head(settings: Settings, info: HeadInfo) -> None:
    p = _head_path(settings)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(info.to_json())
    tmp.replace(p)


def update_head(settings: Settings, **fields) -> HeadInfo:
    info = read_head(settings)
    if info is None:
        raise RuntimeError("no local head is recorded; run `visionfleet serve up` first")
    for k, v in fields.items():
        setattr(info, k, v)
    _write_head(settings, info)
    return info


def stop_head(settings: Settings, *, timeout: float = 20.0) -> bool:
    """Stop the processes of the head recorded for this state dir; True when one was found."""
    import psutil

    info = read_head(settings)
    if info is None:
        return False
    from cluster.multinode import _stop_processes

    roots = _cluster_processes(info.temp_dir)
    procs = list(roots)
    for p in roots:
        try:
            procs.extend(p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    # The raylet (with its workers) first, then the GCS and the rest, which get a short grace:
    # signalled all at once they waited for each other and two of them outlived the full
    # timeout every time (measured: `serve down` 28 s, 20 of them waiting for SIGKILL).
    _stop_processes(procs, timeout)
    _head_path(settings).unlink(missing_ok=True)
    return bool(roots)


def _quiet_driver_logs() -> None:
    """Serve's driver-side INFO lines would interleave with our progress output."""
    import logging

    for name in ("ray.serve", "ray.train", "ray.tune", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


def connect(settings: Settings, *, log_to_driver: bool = False):
    """``ray.init`` against the recorded head (raises when none is running)."""
    import ray

    info = read_head(settings)
    if info is None or not head_alive(info):
        raise RuntimeError("no local head is running; start one with `visionfleet serve up`")
    _quiet_driver_logs()
    if ray.is_initialized():
        return info
    os.environ.update(auth_env(settings))
    init_token_auth_driver(info.address, settings, log_to_driver=log_to_driver)
    return info


def init_token_auth_driver(address: str, settings: Settings, *, log_to_driver: bool = False) -> None:
    """``ray.init(address)`` after the auth variables were put in ``os.environ``.

    Ray reads RAY_AUTH_MODE into its C++ config when it is imported; re-read it now, as
    Ray's own ``_enable_token_auth`` does, so this driver speaks token auth to the head.
    """
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    ray.init(
        address=address,
        namespace=RAY_NAMESPACE,
        runtime_env=runtime_env(settings),
        log_to_driver=log_to_driver,
        logging_level="WARNING",
    )


def init_embedded(
    settings: Settings,
    *,
    num_cpus: int | None = None,
    log_to_driver: bool = False,
    metrics_port: int | None = None,
    ingress_mode: str = "proxy",
) -> None:
    """Start an in-process local Ray (or reuse the one already started).

    ``metrics_port`` exposes Prometheus metrics (``ray.util.metrics`` and
    ``ray.serve.metrics``) at ``http://127.0.0.1:<port>/metrics``.
    """
    import ray

    _quiet_driver_logs()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_AUTH_TOKEN_PATH"] = auth_env(settings)["RAY_AUTH_TOKEN_PATH"]  # see connect()
    os.environ.update(ingress_mode_env(ingress_mode))  # read by the Serve processes this starts
    for k, v in runtime_env(settings)["env_vars"].items():
        os.environ.setdefault(k, v)  # the driver itself reads the same settings
    ray.init(
        # "local": always a new in-process cluster. With no address Ray would join whatever
        # `ray start` head it finds in /tmp/ray/ray_current_cluster (another user's, another
        # state dir's) and then refuse num_cpus.
        address="local",
        num_cpus=num_cpus,
        namespace=RAY_NAMESPACE,
        runtime_env=runtime_env(settings),
        include_dashboard=False,
        log_to_driver=log_to_driver,
        logging_level="WARNING",
        **({"_metrics_export_port": metrics_port} if metrics_port else {}),
    )


def connect_ray(settings: Settings, address: str | None = None, *, join_head: bool = True) -> None:
    """The one way a job driver (tune sweep, batch inference) reaches Ray.

    Joins ``address`` / ``$RAY_ADDRESS`` (set by ``ray job submit``); else this state
    dir's running head when ``join_head``; else starts an embedded local Ray.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Under `ray job submit` the job's own runtime_env reaches every task and actor,
        # and Ray refuses a driver runtime_env that sets the same variables again.
        submitted = _SUBMITTED_JOB_ENV in os.environ
        for k, v in runtime_env(settings)["env_vars"].items():
            os.environ.setdefault(k, v)  # the driver itself reads the same settings
        _quiet_driver_logs()
        ray.init(address=address, namespace=RAY_NAMESPACE, runtime_env=None if submitted else runtime_env(settings),
                 log_to_driver=False, logging_level="WARNING")
        return
    head = read_head(settings) if join_head else None
    if head is not None and head_alive(head):
        connect(settings)
    else:
        init_embedded(settings)


def wait_http(url: str, timeout: float = 120.0, interval: float = 0.5) -> bool:
    """Poll ``url`` until it answers 200; False on timeout."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(interval)
    return False
