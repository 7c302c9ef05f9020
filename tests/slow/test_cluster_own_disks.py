"""The full no-shared-disk cluster (issue 15, item 6): `cluster up --own-disks` with the state on
the suite's S3 server (moto) + PostgreSQL, then, as a user would: a dataset on the store
(`visionfleet data synth`), training as a `ray job submit` job, `serve deploy` with replicas
spread over the nodes, the compression sweep as a `ray job submit` job, the closed loop and an
edge device syncing against the deployed server. Every node keeps only caches and scratch.

The steps are tests of one module sharing one cluster (module fixture), in file order; a step
whose room has not landed yet is marked xfail with what is missing. `make test-slow`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from tests.integration.test_tune_job import TINY_SPACE

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
VF = str(BIN / "visionfleet")
MODEL = "owndisk"
# What only the store or the database may hold: none of it may appear in a node's own home
# (caches under cache/ and scratch are fine) nor in the driver's home.
SHARED_NAMES = ("registry", "datasets", "telemetry", "samples", "tune", "tuf", "experiments", "labeling",
                "retraining", "edge", "fleet", "state.db")


def _run(*args: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _shared_state_in(home: Path) -> list[str]:
    found = [n for n in SHARED_NAMES if (home / n).exists()]
    found += [f for f in _files(home) if f.endswith((".db", ".sqlite")) and not f.startswith("cache/")]
    return found


class Own:
    """The cluster and what the steps hand on to each other."""

    def __init__(self, home: Path, env: dict[str, str], info, shared) -> None:
        self.home, self.env, self.info, self.shared = home, env, info, shared
        self.homes = {n.name: Path(n.home) for n in info.nodes}
        self.facts: dict = {}

    def client_env(self) -> dict[str, str]:
        from cluster.multinode import client_environ

        return client_environ(self.info, self.env)

    def job(self, *entrypoint: str, timeout: float = 1500) -> subprocess.CompletedProcess:
        """`ray job submit` (waits for the end; the job's logs are in stdout)."""
        return _run(str(BIN / "ray"), "job", "submit", "--address", self.info.dashboard_url, "--", *entrypoint,
                    env=self.client_env(), timeout=timeout)

    def nodes(self) -> dict[str, str]:
        """node_id -> node name, as the GCS sees them."""
        st = _run(VF, "cluster", "status", "--json", env=self.env, timeout=120)
        assert st.returncode == 0, st.stderr
        return {n["node_id"]: n["name"] for n in json.loads(st.stdout)["nodes"]}


@pytest.fixture(scope="module")
def own(s3_server, pg_server, tmp_path_factory: pytest.TempPathFactory):
    import sqlalchemy as sa

    from cluster.multinode import read_cluster
    from visionfleet.settings import Settings

    bucket = s3_server.create_bucket(f"vf-{uuid.uuid4().hex[:12]}")
    name = f"vf_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_server.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    db = pg_server.url.rsplit("/", 1)[0] + f"/{name}"
    root = tmp_path_factory.mktemp("owndisks")
    home = root / "home"
    keys = root / "tuf-keys"  # the operator's signing keys: never on the store, never on a node
    extra = {**s3_server.env(), "VISIONFLEET_HOME": str(home), "VISIONFLEET_STORE": f"{bucket}/vf",
             "VISIONFLEET_DB": db, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **extra}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in extra.items():  # the test's own checks read the same store and database
            mp.setenv(k, v)
        shared = Settings.from_env()
        up = _run(VF, "cluster", "up", "--workers", "2", "--worker-cpus", "1", "--head-cpus", "1", "--own-disks",
                  "--json", env=env, timeout=900)
        try:
            assert up.returncode == 0, up.stderr[-3000:]
            info = read_cluster(shared)
            assert info is not None and len({n.home for n in info.nodes}) == 3
            o = Own(home, env, info, shared)
            o.facts["keys"] = keys
            yield o
        finally:
            down = _run(VF, "cluster", "down", env=env, timeout=300)
            assert down.returncode == 0, down.stderr


def test_dataset_is_created_on_the_store(own: Own) -> None:
    from visionfleet.store import open_store

    r = _run(VF, "data", "synth", "--name", MODEL, "--n-train", "600", "--n-holdout", "160", "--size", "32",
             env=own.env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert open_store(own.shared.store_uri("datasets")).exists(f"{MODEL}/_content.json")
    assert not (own.home / "datasets").exists()


def test_training_runs_as_a_job_and_registers_on_the_store(own: Own) -> None:
    from visionfleet.registry import Registry
    from visionfleet.store import open_store

    r = own.job(VF, "train", "--data", MODEL, "--name", MODEL, "--epochs", "2", "--workers", "1",
                "--cpus-per-worker", "1", "--no-wandb", "--address", "auto", "--json")
    assert r.returncode == 0 and "succeeded" in r.stdout, (r.stdout + r.stderr)[-4000:]
    reg = Registry.from_settings(own.shared)
    assert reg.versions(MODEL) == [1]  # allocated in PostgreSQL
    assert open_store(own.shared.store_uri("registry")).exists(f"{MODEL}/1/card.json")
    runs = [k for k, _, d in open_store(own.shared.store_uri("runs")).list("", recursive=True) if not d]
    assert runs, "Ray Train wrote no run state to the store area runs"
    # the Train worker copied the dataset from the store into its own node's cache (the job's
    # driver, on the head, copied it too, for the parity images)
    cached = {n for n, h in own.homes.items() if _files(h / "cache" / "datasets")}
    assert "vf-head" in cached, {n: _files(h)[:20] for n, h in own.homes.items()}
    own.facts["train_nodes"] = (cached - {"vf-head"}) or {"vf-head"}


def test_serve_deploy_spreads_replicas_that_load_from_the_store(own: Own) -> None:
    from cluster.local import free_port, wait_http
    from cluster.serve_config import ProxyLocation, ServeConfigOptions, serve_config, to_yaml, validate_serve_config
    from serve_apps.config import AppConfig, ReplicaConfig
    from visionfleet.datasets.synth import render_sample
    from visionfleet.imaging import encode_image

    port = free_port()
    spread = ReplicaConfig(num_replicas=2, num_cpus=0.25, ort_threads=1, max_replicas_per_node=1)
    doc = serve_config(AppConfig(home=str(own.home), default_model=MODEL, replica=spread),
                       ServeConfigOptions(host="127.0.0.1", port=port, proxy_location=ProxyLocation.HEAD_ONLY))
    cfg = own.home.parent / "serve.yaml"
    cfg.write_text(to_yaml(doc))
    validate_serve_config(yaml.safe_load(cfg.read_text()))
    d = _run(str(BIN / "serve"), "deploy", str(cfg), "-a", own.info.dashboard_url, env=own.client_env(), timeout=300)
    assert d.returncode == 0, (d.stdout + d.stderr)[-3000:]
    assert wait_http(f"http://127.0.0.1:{port}/healthz", timeout=600)
    from tests.integration.test_cluster import _replicas

    token = Path(own.info.token_path).read_text().strip()
    replicas = _replicas(own.info, token, timeout=600)
    by_id = own.nodes()
    placed = {by_id[r["node_id"]] for r in replicas["ModelReplica"] if r["state"] == "RUNNING"}
    assert len(placed) == 2, replicas  # max_replicas_per_node=1: two nodes
    # two nodes, so at least one replica is away from the training worker's node
    assert placed - own.facts["train_nodes"], (placed, own.facts["train_nodes"])
    image = encode_image(render_sample(9, 9, 64)[0], "png")
    for _ in range(6):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/predict?model={MODEL}", data=image,
                                     headers={"Content-Type": "image/png"}, method="POST")
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.status == 200
            pred = json.loads(resp.read())
        assert pred["model"] == MODEL and pred["version"] == 1
    # the replica that served them fetched the model from the store into its own node's cache (a
    # replica loads a model on its first request for it: Serve's model multiplexing); nowhere else
    onnx = {n: [f for f in _files(h) if f.endswith(".onnx")] for n, h in own.homes.items()}
    loaded = {n for n, files in onnx.items() if files}
    assert loaded and loaded <= placed, onnx
    assert all(f.startswith("cache/") for files in onnx.values() for f in files), onnx
    own.facts["url"] = f"http://127.0.0.1:{port}"


@pytest.mark.xfail(strict=False, reason=(
    "a model trained from a dataset on the store records lineage.dataset = s3://.../datasets/<name>, and the sweep "
    "opens it as a local path: tune/sweep.py _dataset uses resolve_dataset (local only; measured: 'no dataset at "
    "<cwd>/s3:/<bucket>/vf/datasets/owndisk'), and tune/trial.py takes Path(ctx.dataset) on the trial's node; "
    "both need local_dataset(resolve_dataset_ref(ref, settings), settings.cache_dir) on their own node (room T)"))
def test_compression_sweep_runs_as_a_job(own: Own) -> None:
    from visionfleet.registry import Registry
    from visionfleet.store import open_store

    sweep = "own-sweep"
    r = own.job(sys.executable, "-m", "tune.sweep", "--model", f"{MODEL}:1", "--trials", "3",
                "--latency-budget-ms", "1000", "--sweep-id", sweep, *TINY_SPACE)
    assert r.returncode == 0 and "succeeded" in r.stdout, (r.stdout + r.stderr)[-4000:]
    reg = Registry.from_settings(own.shared)
    cand = reg.aliases(MODEL).get("candidate")
    assert cand is not None and cand >= 2 and cand in reg.versions(MODEL), reg.aliases(MODEL)
    assert reg.card(MODEL, cand).lineage.run == f"tune-{sweep}"
    tune_keys = [k for k, _, d in open_store(own.shared.store_uri("tune")).list(sweep, recursive=True) if not d]
    assert tune_keys, "Tune wrote no experiment state to the store area tune"
    head = own.homes["vf-head"]
    if (head / "tune").exists():
        pytest.xfail("tune.sweep writes its results (summary.json, front.*, trials/) to <driver home>/tune/<sweep> "
                     "and the best config the retraining reads to <home>/tune/best/<model>--<target>.json "
                     f"(tune/sweep.py out_dir and the best file): on the head's own disk, not the store area tune "
                     f"({_files(head / 'tune')[:5]})")


@pytest.mark.xfail(run=False, reason=(
    "the closed loop cannot run on nodes that share no disk yet: train.controller keeps its timeline in "
    "<home>/retraining/timeline.jsonl on the controller's node (RetrainingController._timeline, read_timeline(home)), "
    "and the labeling queue is visionfleet.labeling.LabelingQueue(home), a SQLite file in a node's home (room L: "
    "labeling queue on the database, not landed)"))
def test_closed_loop_small_path(own: Own) -> None:
    from train.controller import read_timeline

    # the outcome of the loop must be readable from any node: with the timeline on the database this
    # step runs tests/integration/test_closed_loop.py's small loop against own.facts["url"]
    assert read_timeline(own.home), "no timeline reachable from the driver"


@pytest.mark.xfail(strict=False, reason=(
    "`visionfleet edge publish` of a model whose lineage.dataset is on the store fails: edge_export/bundle.py "
    "_dataset_path opens s3://.../datasets/<name> as a local path (measured: 'no dataset at /work/main/s3:/<bucket>/"
    "vf/datasets/owndisk'), and the bundles folder default is built from Path(registry.uri) (room D); the fleet "
    "tables are FleetDB(home) (room L)"))
def test_edge_device_syncs_against_the_deployed_server(own: Own, tmp_path: Path) -> None:
    from visionfleet.store import open_store

    url = own.facts.get("url")
    assert url, "the serve step did not deploy"
    env = {**own.env, "VISIONFLEET_TUF_KEYS": str(own.facts["keys"])}
    r = _run(VF, "edge", "publish", f"{MODEL}:1", "--target", "x86-cpu", "--rollout", "100", "--json", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    channel = json.loads(r.stdout)
    root = tmp_path / "root.json"
    r = _run(VF, "edge", "keys", "--export-root", str(root), "--json", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert open_store(own.shared.store_uri("tuf")).list("", recursive=True)  # the repository is on the store
    from tests.integration.test_edge_ota_sync import _agent, _frames

    device = f"owncam-{uuid.uuid4().hex[:6]}"
    frames = tmp_path / "frames"
    _frames(frames, 20)
    a = subprocess.run(_agent(tmp_path / "dev", "--device-id", device, "--server", url, "--source", str(frames),
                              "--root", str(root), "--model", MODEL, "--target", "x86-cpu", "--once",
                              "--sync-interval", "1", "--ota-interval", "2", "--threads", "1"),
                       capture_output=True, text=True, cwd=REPO, timeout=600,
                       env={k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VISIONFLEET_"))})
    assert a.returncode == 0, a.stderr[-3000:]
    summary = json.loads(a.stdout.strip().splitlines()[-1])
    assert summary["frames"] == 20 and summary["backlog"]["records"] == 0
    assert summary["model"] == channel["bundle_id"]
    # the synced records reach the telemetry lake on the store (the sink flushes every few seconds)
    lake = open_store(own.shared.store_uri("telemetry"))
    deadline = time.monotonic() + 120
    parts: list[str] = []
    while time.monotonic() < deadline and not parts:
        parts = [k for k, _, d in lake.list("", recursive=True) if not d and f"source=edge_{device}" in k]
        time.sleep(2)
    assert parts, "no lake part for the device on the store"
    edge_dirs = {n: _files(h / "edge")[:5] for n, h in own.homes.items() if (h / "edge").exists()}
    if edge_dirs:
        pytest.xfail("the fleet's devices and sync de-duplication keys are visionfleet.fleet.FleetDB(home): "
                     f"<home>/edge on the ingress node's own disk (room L: fleet tables on the database, not "
                     f"landed): {edge_dirs}")


# Shared state known to land in a node's home until its room moves it (the steps above name them).
KNOWN_MISSING = {
    "tune": "tune.sweep results and the best-config file (<home>/tune)",
    "labeling": "the labeling queue (visionfleet.labeling.LabelingQueue(home): <home>/labeling, room L)",
    "edge": "the fleet tables (visionfleet.fleet.FleetDB(home): <home>/edge, room L)",
}


def test_no_node_home_holds_shared_state(own: Own) -> None:
    """Last: after every step, the nodes' homes and the driver's home hold caches and scratch only."""
    found = {n: _shared_state_in(h) for n, h in own.homes.items()}
    found["driver"] = _shared_state_in(own.home)
    unknown = {n: [f for f in v if f.split("/")[0] not in KNOWN_MISSING] for n, v in found.items()}
    assert not any(unknown.values()), unknown
    known = sorted({f.split("/")[0] for v in found.values() for f in v})
    if known:
        pytest.xfail("shared state still on a node's own disk: " + "; ".join(KNOWN_MISSING[k] for k in known)
                     + f" ({found})")
