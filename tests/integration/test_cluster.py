"""A real local multi-node cluster: `cluster up` → `cluster status` → `serve deploy` → HTTP → `cluster down`.

The nodes are `ray start` subprocesses with their own temp dir and token; nothing here
touches the session's in-process Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from cluster.local import free_port, wait_http
from cluster.multinode import ClusterInfo, client_environ, cluster_processes, read_cluster
from cluster.serve_config import ProxyLocation, ServeConfigOptions, serve_config, to_yaml, validate_serve_config
from serve_apps.config import AppConfig, ReplicaConfig
from visionfleet.datasets.synth import render_sample
from visionfleet.imaging import encode_image

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def _run(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def _get(url: str, token: str | None = None, timeout: float = 10) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _replicas(info: ClusterInfo, token: str, timeout: float = 240) -> dict[str, list[dict]]:
    """Replicas per deployment (Serve's REST API) once every deployment is healthy."""
    deadline = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < deadline:
        status, body = _get(f"{info.dashboard_url}/api/serve/applications/", token)
        if status == 200:
            last = json.loads(body)
            app = last.get("applications", {}).get("visionfleet", {})
            deps = app.get("deployments", {})
            if app.get("status") == "RUNNING" and deps:
                return {name: d["replicas"] for name, d in deps.items()}
        time.sleep(1.0)
    raise AssertionError(f"the app did not reach RUNNING in {timeout}s: {json.dumps(last)[-2000:]}")


def test_serve_deploy_to_a_local_multinode_cluster(tmp_path: Path, trained, settings) -> None:
    home = tmp_path / "home"
    shutil.copytree(settings.registry_dir, home / "registry")
    env = {**os.environ, "VISIONFLEET_HOME": str(home)}
    vf = str(BIN / "visionfleet")

    up = _run(vf, "cluster", "up", "--workers", "2", "--worker-cpus", "1", "--head-cpus", "1", "--json",
              env=env, timeout=600)
    info = read_cluster(settings.with_home(home))
    pids: dict[int, float] = {}
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        assert info is not None and json.loads(up.stdout)["gcs_address"] == info.gcs_address
        token = Path(info.token_path).read_text().strip()
        assert os.stat(info.token_path).st_mode & 0o077 == 0

        st = _run(vf, "cluster", "status", "--json", env=env)
        assert st.returncode == 0, st.stderr
        nodes = json.loads(st.stdout)["nodes"]
        assert sorted((n["name"], n["role"], n["alive"], n["resources"]["CPU"]) for n in nodes) == [
            ("vf-head", "head", True, 1.0), ("vf-worker-1", "worker", True, 1.0), ("vf-worker-2", "worker", True, 1.0)
        ]
        node_ids = {n["node_id"] for n in nodes}
        # the cluster is not open: its dashboard refuses a client without the token
        assert _get(f"{info.dashboard_url}/api/serve/applications/")[0] == 401

        port = free_port()
        spread = ReplicaConfig(num_replicas=2, num_cpus=0.25, ort_threads=1, max_replicas_per_node=1)
        app_cfg = AppConfig(home=str(home), default_model="tiny", replica=spread)
        # one machine, several nodes: only one proxy can own the port (HeadOnly)
        doc = serve_config(app_cfg, ServeConfigOptions(host="127.0.0.1", port=port,
                                                       proxy_location=ProxyLocation.HEAD_ONLY))
        cfg = tmp_path / "serve.yaml"
        cfg.write_text(to_yaml(doc))
        validate_serve_config(yaml.safe_load(cfg.read_text()))

        deploy = _run(str(BIN / "serve"), "deploy", str(cfg), "-a", info.dashboard_url,
                      env=client_environ(info, env))
        assert deploy.returncode == 0, (deploy.stdout + deploy.stderr)[-3000:]
        assert wait_http(f"http://127.0.0.1:{port}/healthz", timeout=240)
        replicas = _replicas(info, token)
        placed = [r["node_id"] for r in replicas["ModelReplica"] if r["state"] == "RUNNING"]
        assert len(placed) == 2 and len(set(placed)) == 2, replicas  # max_replicas_per_node=1 spread them
        assert set(placed) <= node_ids

        image = encode_image(render_sample(9, 9, 64)[0], "png")
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/predict?model=tiny", data=image,
                                     headers={"Content-Type": "image/png"}, method="POST")
        with urllib.request.urlopen(req, timeout=120) as r:
            pred = json.loads(r.read())
        assert pred["model"] == "tiny" and pred["version"] == 1 and pred["label"] in trained.card.labels

        # a driver from Python (the docs example): token auth handled by connect_cluster
        ex = _run(sys.executable, str(REPO / "docs" / "examples" / "cluster_tasks.py"), env=env)
        assert ex.returncode == 0, ex.stderr[-3000:]
        assert ex.stdout.count("ran_here=True") == 3 and "worker-only task ran on vf-worker-" in ex.stdout

        procs = cluster_processes(info.temp_dir)
        names = set()
        for p in procs:
            try:
                pids[p.pid] = p.create_time()
                names.add(p.name())
            except psutil.NoSuchProcess:
                pass
        assert {"gcs_server", "raylet"} <= names and any("ServeReplica" in n for n in names), names
    finally:
        down = _run(vf, "cluster", "down", env=env, timeout=300)
    assert down.returncode == 0, down.stderr
    assert "stopped the cluster" in down.stdout

    def alive(pid: int, created: float) -> bool:
        try:
            p = psutil.Process(pid)
            return p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    assert not [pid for pid, created in pids.items() if alive(pid, created)]
    assert cluster_processes(info.temp_dir) == [] and not Path(info.temp_dir).exists()
    assert read_cluster(settings.with_home(home)) is None
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
