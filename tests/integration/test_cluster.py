"""A real local multi-node cluster whose nodes share no disk: `cluster up --own-disks` →
`cluster status` → `serve deploy` → HTTP → `cluster down`.

The nodes are `ray start` subprocesses, each with its own home, working dir, TMPDIR and Ray
temp dir; the shared state is on a real S3-API server (moto) and a real PostgreSQL, both
started by the suite. Nothing here touches the session's in-process Ray.
"""

from __future__ import annotations

import json
import os
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


def _files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_serve_deploy_to_a_local_multinode_cluster_sharing_no_disk(tmp_path: Path, trained, settings, s3_env,
                                                                   pg_url) -> None:
    from train.pipeline import register_checkpoint
    from visionfleet.datasets.store import load_arrays
    from visionfleet.registry import Registry
    from visionfleet.settings import Settings
    from visionfleet.store import open_store

    home = tmp_path / "home"
    env = {**os.environ, "VISIONFLEET_HOME": str(home), "VISIONFLEET_STORE": f"{s3_env}/vf", "VISIONFLEET_DB": pg_url}
    shared = Settings(home=home, store=f"{s3_env}/vf", db_url=pg_url)
    # the model trained by this session, registered on the shared store + database
    parity, _ = load_arrays(trained.dataset, "holdout", (32, 32), limit=32)
    card = register_checkpoint(trained.result.checkpoint, Registry.from_settings(shared), "tiny", parity_images=parity)
    assert card.version == 1 and open_store(shared.store_uri("registry")).exists("tiny/1/card.json")
    vf = str(BIN / "visionfleet")

    # the embedded store cannot serve nodes that share no disk: refused before anything starts
    lone = _run(vf, "cluster", "up", "--own-disks", env={**env, "VISIONFLEET_STORE": "", "VISIONFLEET_DB": ""})
    assert lone.returncode != 0 and "VISIONFLEET_STORE=s3://" in lone.stderr + lone.stdout, lone.stderr

    up = _run(vf, "cluster", "up", "--workers", "2", "--worker-cpus", "1", "--head-cpus", "1", "--own-disks", "--json",
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
        homes = {n.name: Path(n.home) for n in info.nodes}
        assert sorted(homes) == ["vf-head", "vf-worker-1", "vf-worker-2"] and len(set(homes.values())) == 3
        assert sorted((n["name"], n["role"], n["alive"], n["resources"]["CPU"]) for n in nodes) == [
            ("vf-head", "head", True, 1.0), ("vf-worker-1", "worker", True, 1.0), ("vf-worker-2", "worker", True, 1.0)
        ]
        assert {n["name"]: n["home"] for n in nodes} == {k: str(v) for k, v in homes.items()}  # status shows them
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
        # the replica that served it loaded the model from the store into its own node's cache (a
        # replica loads a model on its first request for it: Serve's model multiplexing); a model
        # file is nowhere else, nothing shared landed in the driver's home, no node has a registry
        by_name = {n["node_id"]: n["name"] for n in nodes}
        onnx = {name: [f for f in _files_under(h) if f.endswith(".onnx")] for name, h in homes.items()}
        loaded = {name for name, files in onnx.items() if files}
        assert loaded and loaded <= {by_name[i] for i in placed}, onnx
        assert all(f.startswith("cache/") for files in onnx.values() for f in files), onnx
        for h in homes.values():
            assert not _files_under(h / "registry"), h
        assert not _files_under(home / "registry") and not (home / "state.db").exists()

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
