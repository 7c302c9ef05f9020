"""The full edge campaigns (``make test-slow``):

* SIGKILL at 30 random moments of an install, and at every single durable step of it
  (each ``write``/``fsync``/``rename`` in turn): the device always comes up on a verified
  model, the old one or the new one;
* SIGKILL at 24 random moments of a sync with 6 network cuts in between, against a real
  server (the Serve app in its own process): 0 records lost, 0 duplicated;
* ``visionfleet fleet simulate --devices 20 --minutes 3 --outages 3``: nothing lost or
  duplicated, the broken update halts by itself, the fleet converges on the good one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _unit(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "unit" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory):
    from edge_export.bundle import export_bundle, pack_bundle

    root = tmp_path_factory.mktemp("slowedge")
    reg, _ = _unit("test_edge_bundle").toy_registry(root, versions=2, n_train=240)  # 200 calibration images
    b = [export_bundle(reg, f"toy:{v}", "x86-cpu", out_dir=root / "bundles") for v in (1, 2)]
    return {"v1": pack_bundle(b[0], root / "v1.tar"), "v2": pack_bundle(b[1], root / "v2.tar"),
            "ids": {"v1": b[0].name, "v2": b[1].name}, "root": root}


def test_sigkill_at_30_random_points_of_an_install(tmp_path: Path, archives) -> None:
    seen = _unit("test_edge_store").kill_campaign(tmp_path, archives, kills=30, seed=11)
    print(json.dumps(seen))
    assert seen["old"] + seen["new"] == 30


_AT_OP = """
import os, signal, sys
from edge_agent import durable, store
k = int(sys.argv[3]); n = [0]
class Killer:
    def __getattr__(self, name):
        real = getattr(os, name)
        if name not in ("write", "fsync", "replace", "rename"):
            return real
        def wrapped(*a, **kw):
            n[0] += 1
            if n[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **kw)
        return wrapped
durable.os = store.os = Killer()
st = store.ModelStore(sys.argv[1], threads=1)
print(st.install_archive(sys.argv[2]).outcome, n[0], flush=True)
"""


def test_sigkill_at_every_durable_step_of_an_install(tmp_path: Path, archives) -> None:
    from edge_agent.store import ModelStore

    store_mod = _unit("test_edge_store")
    template = store_mod._home_on_v1(tmp_path / "template", archives)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    home = tmp_path / "count"
    shutil.copytree(template, home)
    r = subprocess.run([sys.executable, "-c", _AT_OP, str(home), str(archives["v2"]), "0"], capture_output=True,
                       text=True, env=env, cwd=REPO, check=True)
    outcome, steps = r.stdout.split()
    assert outcome == "installed" and int(steps) > 20
    results = {"old": 0, "new": 0}
    for k in range(1, int(steps) + 1):
        home = tmp_path / f"op{k}"
        shutil.copytree(template, home)
        r = subprocess.run([sys.executable, "-c", _AT_OP, str(home), str(archives["v2"]), str(k)],
                           capture_output=True, text=True, env=env, cwd=REPO)
        assert r.returncode == -signal.SIGKILL, (k, r.stdout, r.stderr[-500:])
        active = ModelStore(home, threads=1).open()
        assert active is not None and active.health.ok, f"step {k}: no verified model"
        assert active.bundle_id in archives["ids"].values()
        results["new" if active.bundle_id == archives["ids"]["v2"] else "old"] += 1
        shutil.rmtree(home)
    print(json.dumps({"steps": int(steps), **results}))
    assert results["old"] > 0 and results["new"] > 0  # the switch is one step: before it old, after it new


_SERVER = """
import sys
from ray import serve
from cluster.local import init_embedded, wait_http
from serve_apps.config import AppConfig, ReplicaConfig
from serve_apps.deploy import deploy
from visionfleet.settings import Settings
s = Settings.from_env().ensure()
port = int(sys.argv[1])
init_embedded(s, num_cpus=2)
serve.start(http_options={"host": "127.0.0.1", "port": port})
deploy(AppConfig(home=str(s.home), default_model="toy", telemetry=False,
                 replica=ReplicaConfig(ort_threads=1, num_cpus=0.25)), http={"host": "127.0.0.1", "port": port})
assert wait_http(f"http://127.0.0.1:{port}/healthz", timeout=180)
print("ready", flush=True)
sys.stdin.read()  # serve until the test closes stdin
serve.shutdown()
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, archives):
    """A real server in its own process (embedded Ray + the Serve app, as `visionfleet demo` runs it)."""
    from cluster.local import free_port

    home = tmp_path_factory.mktemp("slowserver")
    env = {**os.environ, "VISIONFLEET_HOME": str(home), "PYTHONPATH": str(REPO)}
    port = free_port()
    p = subprocess.Popen([sys.executable, "-c", _SERVER, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=env, cwd=REPO)
    assert p.stdout.readline().strip() == "ready"
    yield {"url": f"http://127.0.0.1:{port}", "home": home}
    p.stdin.close()
    try:
        p.wait(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()


def test_sigkill_at_24_points_of_a_sync_with_network_cuts(tmp_path: Path, server, archives) -> None:
    from urllib.parse import urlparse

    import pyarrow.parquet as pq

    from bench.fleet_sim import TcpProxy
    from visionfleet.datasets.synth import render_sample
    from visionfleet.imaging import encode_image

    device = "slowkill-1"
    home, frames = tmp_path / "dev", tmp_path / "frames"
    frames.mkdir()
    n = 600
    for i in range(n):
        (frames / f"f{i:05d}.png").write_bytes(encode_image(render_sample(9, i, 32)[0]))
    base = [sys.executable, "-m", "edge_agent.cli", "run", "--home", str(home), "--device-id", device, "--threads", "1"]
    bundle = archives["root"] / "bundles" / archives["ids"]["v1"]
    r = subprocess.run(base + ["--source", str(frames), "--bundle", str(bundle), "--once"], capture_output=True,
                       text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    u = urlparse(server["url"])
    proxy = TcpProxy((u.hostname, u.port)).start()
    cmd = base + ["--server", proxy.url, "--once", "--sync-batch", "4", "--sync-interval", "0.1",
                  "--ota-interval", "3600", "--timeout", "3"]
    rng = random.Random(5)
    kills = cuts = 0
    try:
        while kills < 24:
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
            while "serving" not in (p.stderr.readline() or "serving"):
                pass
            time.sleep(rng.uniform(0.05, 1.0))
            if kills % 4 == 1:
                proxy.cut()
                cuts += 1
                time.sleep(rng.uniform(0.1, 1.5))
                proxy.restore()
                time.sleep(rng.uniform(0.05, 0.6))
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(r.stdout.strip().splitlines()[-1])["backlog"]["records"] == 0
    finally:
        proxy.close()
    ids: list[str] = []
    for part in (server["home"] / "telemetry" / "events").glob(f"date=*/source=edge_{device}/part-*.parquet"):
        ids += pq.read_table(part, columns=["request_id"]).column("request_id").to_pylist()
    print(json.dumps({"kills": kills, "cuts": cuts, "records": n, "received": len(set(ids)), "rows": len(ids)}))
    assert len(set(ids)) == n, f"{n - len(set(ids))} records lost"
    assert len(ids) == n, f"{len(ids) - len(set(ids))} records duplicated"


def test_fleet_simulation_20_devices_3_minutes_3_outages(tmp_path: Path, archives) -> None:
    home = tmp_path / "home"
    shutil.copytree(archives["root"] / "registry", home / "registry")
    shutil.copytree(archives["root"] / "datasets", home / "datasets")
    env = {**os.environ, "VISIONFLEET_HOME": str(home)}
    r = subprocess.run([str(BIN / "visionfleet"), "fleet", "simulate", "--devices", "20", "--minutes", "3",
                        "--outages", "3", "--crashes", "10", "--model", "toy:1", "--update", "toy:2", "--json"],
                       capture_output=True, text=True, env=env, timeout=1200)
    doc = json.loads(r.stdout) if r.stdout.strip() else {}
    print(json.dumps({k: v for k, v in doc.items() if k != "timeline"}, indent=2))
    assert r.returncode == 0, r.stderr[-4000:]
    assert doc["lost"] == 0 and doc["duplicates"] == 0 and doc["unexpected"] == 0
    assert doc["records_received"] == doc["records_produced"] >= 20 * 150
    assert doc["bad_rollout_halted"] is True and doc["converged_devices"] == 20
