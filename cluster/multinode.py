"""A local multi-node Ray cluster for one state dir: a head plus N worker nodes.

Each node is its own ``ray start`` process tree (GCS and dashboard on the head, a
raylet with its agents on every node), as on a real cluster, so ``serve deploy``,
``ray job submit``, ``max_replicas_per_node`` and node failures behave as they do there.

What makes it safe next to other Ray clusters on the same machine:

- ports: the GCS, the dashboard and each node's dashboard agent get free ports (Ray's
  fixed default agent port 52365 would be shared by every node); Ray picks the rest;
- temp dir: one private directory (mode 0700) short enough for AF_UNIX socket paths,
  recorded in ``<state>/ray/cluster.json``; ``stop_cluster`` stops exactly the processes
  whose command line names that directory, and their children — never ``ray stop``;
- token authentication: the cluster runs with ``RAY_AUTH_MODE=token`` and the state
  dir's own token (``cluster.local.auth_env``: ``<state>/ray/auth_token``, 0600), not
  the user-wide ``~/.ray/auth_token``. Ray 2.52+ requires every client of such a
  cluster to send the token: ``ray.init(address=...)`` does not turn token mode on by
  itself for an explicit address, and ``serve deploy`` / ``ray job submit`` talk to the
  dashboard, which answers 401 without it. :func:`client_env` is the environment those
  clients need; :func:`connect_cluster` applies it in-process.

Ray node resources must be whole numbers (``ray start --num-cpus`` is an integer and
Ray refuses fractional node totals), so the CPU budgets of nodes are whole CPUs; the
fractions live in the deployments (``num_cpus: 0.25`` per replica), as on one machine.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from cluster.local import RAY_NAMESPACE, auth_env, free_port, init_token_auth_driver
from visionfleet.settings import ENV_NODE_HOME, Settings

__all__ = [
    "ClusterSpec",
    "NodeRecord",
    "ClusterInfo",
    "ROLE_LABEL",
    "start_cluster",
    "stop_cluster",
    "read_cluster",
    "cluster_status",
    "cluster_processes",
    "client_env",
    "client_environ",
    "connect_cluster",
    "gcs_reachable",
    "check_own_disks",
]

ROLE_LABEL = "visionfleet.io/role"
CLUSTER_LABEL = "visionfleet.io/cluster"
_RECORD = "cluster.json"
# AF_UNIX socket paths are limited to 107 bytes and Ray puts them ~65 bytes below its
# temp dir (session_<date>_<pid>/sockets/plasma_store.N).
_MAX_TEMP_DIR = 40
_TMP_PREFIX = "vf-cluster-"
_NODE_SUFFIX = 4  # "/n16": a node's own Ray temp dir (and "/t16", its $TMPDIR) below the cluster's
# Variables that would point `ray start` or a client somewhere else, or override the
# token we give it (RAY_AUTH_TOKEN wins over RAY_AUTH_TOKEN_PATH in Ray).
_FOREIGN_ENV = (
    "RAY_ADDRESS",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_AUTH_MODE",
    "RAY_DASHBOARD_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_OVERRIDE_RESOURCES",
    "RAY_NAMESPACE",
)


@dataclass(frozen=True)
class ClusterSpec:
    """The shape of a local cluster: one head and ``workers`` worker nodes."""

    workers: int = 2
    worker_cpus: float = 1
    head_cpus: float = 1
    object_store_mb: int = 256
    # Nodes that share no disk: each node gets its own home (``$VISIONFLEET_NODE_HOME``), working
    # directory and ``$TMPDIR`` under ``<home>/ray/nodes/<node>``, and the shared state must be on
    # the store and the database (``$VISIONFLEET_STORE`` = s3://..., ``$VISIONFLEET_DB``).
    own_disks: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.workers <= 16:
            raise ValueError(f"Got {self.workers} for workers; expected 0 to 16 worker nodes")
        for name, value, low in (("worker_cpus", self.worker_cpus, 1), ("head_cpus", self.head_cpus, 0)):
            if not float(value).is_integer() or not low <= value <= 256:
                raise ValueError(
                    f"Got {value:g} for {name}; expected a whole number from {low} to 256: Ray node resources are "
                    "whole CPUs (give the deployments fractions instead, e.g. `serve config --replica-cpus 0.25`)"
                )
        if not 80 <= self.object_store_mb <= 1_000_000:
            raise ValueError(f"Got {self.object_store_mb} for object_store_mb; expected at least 80 (Ray's minimum)")


@dataclass(frozen=True)
class NodeRecord:
    """One node as started: its name (``--node-name``), role and CPU count; ``home`` is its own
    home when the nodes share no disk (else empty: the cluster's home)."""

    name: str
    role: str
    num_cpus: int
    agent_port: int
    home: str = ""


@dataclass(frozen=True)
class ClusterInfo:
    """What ``<state>/ray/cluster.json`` records about the running cluster."""

    name: str
    gcs_address: str
    dashboard_url: str
    temp_dir: str
    token_path: str
    object_store_mb: int
    started_at: str
    nodes: tuple[NodeRecord, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "ClusterInfo":
        return cls(**{**doc, "nodes": tuple(NodeRecord(**n) for n in doc.get("nodes", ()))})


# --------------------------------------------------------------------- records


def _record_path(settings: Settings) -> Path:
    return settings.ray_dir / _RECORD


def read_cluster(settings: Settings) -> ClusterInfo | None:
    """The cluster recorded for this state dir (running or not), or None."""
    p = _record_path(settings)
    if not p.is_file():
        return None
    return ClusterInfo.from_dict(json.loads(p.read_text()))


def _write_cluster(settings: Settings, info: ClusterInfo) -> None:
    p = _record_path(settings)
    tmp = p.with_name(f".{_RECORD}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info.to_dict(), indent=2))
    tmp.replace(p)


def _cluster_name(settings: Settings) -> str:
    return "vf-" + hashlib.sha256(str(settings.home).encode()).hexdigest()[:10]


def _temp_dir(settings: Settings, own_disks: bool = False) -> Path:
    """Under the state dir when that is short enough for socket paths, else in /tmp. Nodes with
    their own disks get their own Ray temp dir and ``$TMPDIR`` below it (``<temp>/n<i>``, ``<temp>/t<i>``:
    up to 4 more bytes)."""
    preferred = settings.ray_dir / "cluster"
    if len(str(preferred)) <= _MAX_TEMP_DIR - (_NODE_SUFFIX if own_disks else 0):
        return preferred
    return Path("/tmp") / f"{_TMP_PREFIX}{hashlib.sha256(str(settings.home).encode()).hexdigest()[:12]}"


# --------------------------------------------------------------------- clients


def client_env(info: ClusterInfo) -> dict[str, str]:
    """Environment a client of this cluster needs: token auth and its addresses.

    ``RAY_ADDRESS`` serves ``ray.init()`` and ``ray status``; ``RAY_DASHBOARD_ADDRESS``
    serves ``serve deploy|status``; ``RAY_API_SERVER_ADDRESS`` serves ``ray job submit``.
    """
    return {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": info.token_path,
        "RAY_ADDRESS": info.gcs_address,
        "RAY_DASHBOARD_ADDRESS": info.dashboard_url,
        "RAY_API_SERVER_ADDRESS": info.dashboard_url,
    }


def client_environ(info: ClusterInfo, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with :func:`client_env` applied, for subprocesses."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _FOREIGN_ENV}
    env.update(client_env(info))
    return env


def _token(info: ClusterInfo) -> str:
    return Path(info.token_path).read_text().strip()


def _dashboard_get(info: ClusterInfo, path: str, timeout: float = 10.0) -> Any:
    req = urllib.request.Request(info.dashboard_url + path, headers={"Authorization": f"Bearer {_token(info)}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def gcs_reachable(info: ClusterInfo) -> bool:
    """True when something accepts connections on the recorded GCS port."""
    host, port = info.gcs_address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def connect_cluster(settings: Settings, *, log_to_driver: bool = False) -> ClusterInfo:
    """``ray.init`` this process as a driver of the recorded cluster (token auth included).

    Raises:
        RuntimeError: no cluster is running for this state dir, or this process is
            already connected to a Ray cluster (auth mode is process-wide in Ray).
    """
    import ray

    info = read_cluster(settings)
    if info is None or not gcs_reachable(info):
        raise RuntimeError("no local cluster is running for this state dir; start one with `visionfleet cluster up`")
    if ray.is_initialized():
        raise RuntimeError("this process is already connected to a Ray cluster; connect from a fresh process")
    for k in _FOREIGN_ENV:
        os.environ.pop(k, None)
    os.environ.update(client_env(info))
    init_token_auth_driver(info.gcs_address, settings, log_to_driver=log_to_driver)
    return info


# --------------------------------------------------------------------- processes


def cluster_processes(temp_dir: str) -> list:
    """Processes whose command line names ``temp_dir`` (as a whole path), and their children."""
    import psutil

    pattern = re.compile(re.escape(temp_dir.rstrip("/")) + r"(?=$|[/\s'\"])")
    found: dict[int, Any] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(proc.info.get("cmdline") or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if proc.pid == os.getpid() or not pattern.search(cmd):
            continue
        found[proc.pid] = proc
        try:
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def _kill(procs: list, timeout: float) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL what is left."""
    import psutil

    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def _stop_processes(procs: list, timeout: float) -> None:
    """Raylets (with their workers and agents) first, then the head's processes.

    The raylets drain in a second or two while the GCS still answers; the head's
    processes then stop at once. In the other order they wait for each other, and the
    autoscaler monitor ignores SIGTERM, so the rest gets a short grace before SIGKILL.
    """
    import psutil

    raylets: dict[int, Any] = {}
    for p in procs:
        try:
            if p.name() == "raylet":
                raylets[p.pid] = p
                for c in p.children(recursive=True):
                    raylets.setdefault(c.pid, c)
        except psutil.NoSuchProcess:
            pass
    _kill(list(raylets.values()), timeout)
    _kill([p for p in procs if p.pid not in raylets], min(timeout, 5.0))


def _ray_bin() -> str:
    ray_bin = Path(sys.executable).with_name("ray")
    return str(ray_bin) if ray_bin.exists() else "ray"


def _node_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
    env.update(settings.runtime_env_vars())
    # `ray job submit -- python …` runs its entrypoint with the head's PATH: make `python`
    # the interpreter the cluster itself runs, even when the venv is not activated.
    bin_dir = str(Path(sys.executable).parent)
    if env.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        env["PATH"] = os.pathsep.join(p for p in (bin_dir, env.get("PATH", "")) if p)
    env.update(auth_env(settings))
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _own_disk(settings: Settings, env: dict[str, str], node: str, tmp: Path) -> tuple[dict[str, str], str, str]:
    """A node's own home, working directory and temp dir: ``(env, cwd, home)``.

    The home and working dir are ``<home>/ray/nodes/<node>/{home,work}``; ``$TMPDIR`` is ``tmp``, a
    short path below the cluster's temp dir: Python's multiprocessing puts its AF_UNIX sockets
    there (the dashboard's forkserver), and a ``<home>`` deep enough fails with "path too long".
    """
    root = settings.ray_dir / "nodes" / node
    dirs = {d: root / d for d in ("home", "work")}
    for d in (*dirs.values(), tmp):
        d.mkdir(parents=True, exist_ok=True)
    os.chmod(tmp, 0o700)
    node_env = {**env, ENV_NODE_HOME: str(dirs["home"]), "TMPDIR": str(tmp)}
    return node_env, str(dirs["work"]), str(dirs["home"])


def check_own_disks(settings: Settings) -> None:
    """Nodes that share no disk need the shared state off the home: refuse otherwise."""
    if not settings.shared:
        raise ValueError(
            f"Got the store on this node's disk ({settings.store}) for nodes that share no disk; expected "
            "VISIONFLEET_STORE=s3://bucket/prefix (an S3-API server: `make s3` starts one locally)"
        )
    if settings.db_url == f"sqlite:///{settings.home}/state.db":
        raise ValueError(
            "Got the embedded SQLite database for nodes that share no disk; expected "
            "VISIONFLEET_DB=postgresql+psycopg://USER:PASS@HOST/DB (`make postgres` starts one locally)"
        )


def _ray_start(args: list[str], env: dict[str, str], timeout: float, cwd: str | None = None) -> None:
    proc = subprocess.run([_ray_bin(), "start", *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=cwd)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip())[-1500:]
        raise RuntimeError(f"`ray start {args[0]}` failed ({proc.returncode}): {tail}")


def _wait_dashboard(info: ClusterInfo, timeout: float) -> None:
    """``ray start --head`` returns before the dashboard's HTTP API answers; wait for it."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            _dashboard_get(info, "/api/version", timeout=5)
            return
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = exc
            time.sleep(0.5)
    raise TimeoutError(f"the dashboard at {info.dashboard_url} did not answer within {timeout:.0f}s ({last})")


def start_cluster(
    settings: Settings,
    spec: ClusterSpec | None = None,
    *,
    timeout: float = 240.0,
    on_step: Callable[[str], None] | None = None,
) -> ClusterInfo:
    """Start a head and ``spec.workers`` worker nodes for this state dir.

    Args:
        settings: the state dir the cluster belongs to (one cluster per state dir).
        spec: node count and CPUs per node.
        timeout: seconds each ``ray start`` (and the dashboard) may take.
        on_step: called with a short description before each step (progress display).

    Returns:
        The recorded :class:`ClusterInfo`.

    Raises:
        RuntimeError: a cluster is already running for this state dir, or a node failed
            to start (everything started so far is stopped again).
    """
    spec = spec or ClusterSpec()
    step = on_step or (lambda _msg: None)
    if spec.own_disks:
        check_own_disks(settings)
    settings.ensure()
    settings.ray_dir.mkdir(parents=True, exist_ok=True)
    existing = read_cluster(settings)
    if existing is not None:
        if gcs_reachable(existing):
            raise RuntimeError(
                f"a cluster is already running for {settings.home} (GCS {existing.gcs_address}); "
                "stop it with `visionfleet cluster down`"
            )
        stop_cluster(settings)  # a stale record: clear what is left of it
    temp_dir = _temp_dir(settings, spec.own_disks)
    temp_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(temp_dir, 0o700)

    def node_temp(i: int) -> list[str]:
        """``--temp-dir`` of node ``i`` (0: the head): the cluster's, or its own below it."""
        if not spec.own_disks:
            return [f"--temp-dir={temp_dir}"]
        d = temp_dir / f"n{i}"
        d.mkdir(exist_ok=True)
        os.chmod(d, 0o700)
        return [f"--temp-dir={d}"]

    env = _node_env(settings)
    token_path = env["RAY_AUTH_TOKEN_PATH"]
    name = _cluster_name(settings)
    common = [
        "--node-ip-address=127.0.0.1",
        f"--object-store-memory={spec.object_store_mb * 1024 * 1024}",
        "--disable-usage-stats",
    ]

    # A free port can be taken between our check and Ray's bind: try fresh ones.
    for attempt in range(3):
        gcs_port, dash_port, agent_port = _distinct_ports(3)
        head_env, head_cwd, head_home = (_own_disk(settings, env, "vf-head", temp_dir / "t0") if spec.own_disks
                                         else (env, None, ""))
        info = ClusterInfo(
            name=name,
            gcs_address=f"127.0.0.1:{gcs_port}",
            dashboard_url=f"http://127.0.0.1:{dash_port}",
            temp_dir=str(temp_dir),
            token_path=token_path,
            object_store_mb=spec.object_store_mb,
            started_at=_dt.datetime.now(_dt.timezone.utc).isoformat(),
            nodes=(NodeRecord("vf-head", "head", int(spec.head_cpus), agent_port, head_home),),
        )
        _write_cluster(settings, info)  # recorded first, so `down` can clean up a half start
        step(f"head on {info.gcs_address}, dashboard {info.dashboard_url}")
        try:
            _ray_start(
                [
                    "--head",
                    f"--port={gcs_port}",
                    f"--num-cpus={int(spec.head_cpus)}",
                    "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash_port}",
                    f"--dashboard-agent-listen-port={agent_port}",
                    "--node-name=vf-head",
                    f"--labels={ROLE_LABEL}=head,{CLUSTER_LABEL}={name}",
                    *node_temp(0),
                    *common,
                ],
                head_env,
                timeout,
                head_cwd,
            )
            break
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            _kill(cluster_processes(str(temp_dir)), timeout=20)
            clash = "already in use" in str(exc) or "address in use" in str(exc).lower()
            if attempt == 2 or not clash:
                stop_cluster(settings)
                raise RuntimeError(f"could not start the head: {exc}") from None
    try:
        for i in range(1, spec.workers + 1):
            name_i = f"vf-worker-{i}"
            node_env, node_cwd, node_home = (_own_disk(settings, env, name_i, temp_dir / f"t{i}") if spec.own_disks
                                             else (env, None, ""))
            node = NodeRecord(name_i, "worker", int(spec.worker_cpus), _distinct_ports(1)[0], node_home)
            step(f"worker {i}/{spec.workers} ({node.num_cpus} CPU)")
            info = replace(info, nodes=(*info.nodes, node))
            _write_cluster(settings, info)
            _ray_start(
                [
                    f"--address={info.gcs_address}",
                    f"--num-cpus={node.num_cpus}",
                    f"--dashboard-agent-listen-port={node.agent_port}",
                    f"--node-name={node.name}",
                    f"--labels={ROLE_LABEL}=worker,{CLUSTER_LABEL}={name}",
                    *node_temp(i),
                    *common,
                ],
                node_env,
                timeout,
                node_cwd,
            )
        step("waiting for the dashboard")
        _wait_dashboard(info, timeout)
    except BaseException:
        stop_cluster(settings)
        raise
    return info


def _distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def stop_cluster(settings: Settings, *, timeout: float = 20.0) -> int:
    """Stop every process of the cluster recorded for this state dir; returns how many.

    Only processes whose command line names the cluster's own temp dir (and their
    children) are signalled: SIGTERM, then SIGKILL after a grace of up to ``timeout``. The record
    and the temp dir go too (the state dir's token stays: ``serve up``'s head uses it).
    Returns 0 when nothing was recorded or running.
    """
    info = read_cluster(settings)
    if info is None:
        return 0
    stopped = 0
    # Raylets start workers while they shut down; sweep until nothing is left.
    for _ in range(3):
        procs = cluster_processes(info.temp_dir)
        if not procs:
            break
        stopped += len(procs)
        _stop_processes(procs, timeout)
    temp = Path(info.temp_dir)
    # Only ever delete a directory this module would have chosen.
    if temp in (settings.ray_dir / "cluster",) or (temp.parent == Path("/tmp") and temp.name.startswith(_TMP_PREFIX)):
        shutil.rmtree(temp, ignore_errors=True)
    _record_path(settings).unlink(missing_ok=True)
    # nodes' own disks (caches and scratch only: the shared state is on the store) go with them
    shutil.rmtree(settings.ray_dir / "nodes", ignore_errors=True)
    return stopped


# --------------------------------------------------------------------- status


def cluster_status(settings: Settings) -> dict[str, Any]:
    """The recorded cluster and its nodes as the GCS sees them (via the dashboard's state API).

    Returns ``{"cluster": None}`` when nothing is recorded; otherwise the record, whether
    the GCS answers, one entry per node (``name``, ``role``, ``alive``, ``resources``,
    ``labels``, ``home``: its own home on nodes that share no disk, else empty) and the cluster's
    total and available resources.
    """
    info = read_cluster(settings)
    if info is None:
        return {"cluster": None, "alive": False, "nodes": []}
    doc: dict[str, Any] = {"cluster": info.to_dict(), "alive": gcs_reachable(info), "nodes": []}
    if not doc["alive"]:
        return doc
    try:
        reply = _dashboard_get(info, "/api/v0/nodes?limit=1000&detail=true")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        doc["error"] = f"the dashboard at {info.dashboard_url} did not answer: {exc}"
        return doc
    nodes = reply.get("data", {}).get("result", {}).get("result", [])
    homes = {n.name: n.home for n in info.nodes}
    for n in sorted(nodes, key=lambda n: (not n.get("is_head_node"), n.get("node_name") or "")):
        labels = n.get("labels") or {}
        doc["nodes"].append(
            {
                "name": n.get("node_name"),
                "node_id": n.get("node_id"),
                "role": labels.get(ROLE_LABEL, "head" if n.get("is_head_node") else "worker"),
                "alive": n.get("state") == "ALIVE",
                "resources": {k: v for k, v in (n.get("resources_total") or {}).items() if not k.startswith("node:")},
                "labels": {k: v for k, v in labels.items() if not k.startswith("ray.io/")},
                # its own home when the nodes share no disk, else "" (the cluster's home)
                "home": homes.get(n.get("node_name") or "", ""),
            }
        )
    # CPUs in use per node: the autoscaler's load report (what `ray status` prints).
    # It is a view for people; a cluster without it still has a status.
    try:
        usage = _dashboard_get(info, "/api/cluster_status?format=0")["data"]["clusterStatus"]["loadMetricsReport"]
        by_node = usage.get("usageByNode") or {}
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        by_node = {}
    for n in doc["nodes"]:
        cpu = (by_node.get(n["node_id"]) or {}).get("CPU")
        n["cpu_used"] = float(cpu[0]) if cpu else None
    totals: dict[str, float] = {}
    for n in doc["nodes"]:
        if n["alive"]:
            for k, v in n["resources"].items():
                totals[k] = totals.get(k, 0.0) + float(v)
    doc["resources"] = totals
    return doc
