"""Edge against the real server: publish with the CLI, a real agent process takes the update over
TUF served by the ingress, infers offline, syncs exactly once (resends, SIGKILLs and a cut
network included), the fleet view shows it; the TUF route refuses paths outside the repository."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ADMIN_TOKEN

REPO = Path(__file__).resolve().parents[2]
MODEL = "edgetiny"


def _cli(settings, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "VISIONFLEET_HOME": str(settings.home)}
    return subprocess.run([str(Path(sys.executable).parent / "visionfleet"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


def _agent(home: Path, *args: str, quiet: bool = False) -> list[str]:
    return [sys.executable, "-m", "edge_agent.cli", "run", "--home", str(home), *args] + (["--quiet"] if quiet else [])


def _frames(folder: Path, n: int, start: int = 0) -> None:
    from visionfleet.datasets.synth import render_sample
    from visionfleet.imaging import encode_image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        (folder / f"f{i:05d}.png").write_bytes(encode_image(render_sample(5, i, 40)[0]))


def _lake(settings, device: str) -> list[str]:
    import pyarrow.parquet as pq

    ids: list[str] = []
    for p in (settings.home / "telemetry" / "events").glob(f"date=*/source=edge_{device}/part-*.parquet"):
        ids += pq.read_table(p, columns=["request_id"]).column("request_id").to_pylist()
    return ids


def register_copies(settings, trained, name: str, n: int = 2) -> None:
    """``name:1..n``: the session's trained tiny model registered again under its own name
    (each version's ONNX metadata differs, so each makes a distinct bundle)."""
    from visionfleet.registry import Registry

    reg = Registry(settings.registry_dir)
    if name in reg.list_models():
        return
    src = reg.local_dir("tiny", trained.card.version)
    card = reg.card("tiny", trained.card.version)
    for _ in range(n):
        reg.register(card.model_copy(update={"name": name, "version": None, "files": []}), {"onnx": src / card.model_file})


@pytest.fixture(scope="module")
def published(settings, trained, serve_url, tmp_path_factory):
    """edgetiny:1 and :2, :1 published at 100% with the CLI, and the root devices trust."""
    register_copies(settings, trained, MODEL)
    r = _cli(settings, "edge", "publish", f"{MODEL}:1", "--target", "x86-cpu", "--rollout", "100", "--json")
    assert r.returncode == 0, r.stderr
    channel = json.loads(r.stdout)
    root = tmp_path_factory.mktemp("edgeroot") / "root.json"
    r = _cli(settings, "edge", "keys", "--export-root", str(root), "--json")
    assert r.returncode == 0, r.stderr
    assert f"{MODEL}/x86-cpu/bundle.tar" in json.loads(r.stdout)["targets"]
    return {"channel": channel, "root": root}


def test_tuf_route_serves_the_repository_read_only(serve_url, published) -> None:
    ts = httpx.get(f"{serve_url}/tuf/metadata/timestamp.json", timeout=30)
    assert ts.status_code == 200 and json.loads(ts.content)["signed"]["_type"] == "timestamp"
    assert ts.headers["cache-control"] == "no-cache"
    root = httpx.get(f"{serve_url}/tuf/metadata/1.root.json", timeout=30)
    assert root.status_code == 200 and "immutable" in root.headers["cache-control"]
    for bad in ("metadata/../../admin_token", "keys/root.pem", "metadata/%2e%2e/keys/root.pem", "../tuf/keys/root.pem",
                "metadata/.lock", "targets/../../keys/targets.pem", "metadata/nope.json"):
        r = httpx.get(f"{serve_url}/tuf/{bad}", timeout=30)
        assert r.status_code == 404, (bad, r.status_code)
        assert b"PRIVATE KEY" not in r.content
    ch = httpx.get(f"{serve_url}/v1/edge/channels", timeout=30)
    assert ch.status_code == 401
    ch = httpx.get(f"{serve_url}/v1/edge/channels", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
    assert ch.status_code == 200
    mine = [c for c in ch.json()["channels"] if c["path"] == f"{MODEL}/x86-cpu/bundle.tar"]
    assert mine and mine[0]["bundle_id"] == published["channel"]["bundle_id"] and mine[0]["rollout"] == 100
    r = httpx.post(f"{serve_url}/v1/edge/rollouts", json={"model": MODEL, "target": "x86-cpu", "rollout": 100},
                   headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert r.status_code == 403


def test_agent_takes_the_update_infers_offline_and_syncs_exactly_once(settings, serve_url, published, tmp_path) -> None:
    device = f"itcam-{random.randrange(10**6)}"
    home, frames = tmp_path / "dev", tmp_path / "frames"
    _frames(frames, 30)
    r = subprocess.run(_agent(home, "--device-id", device, "--server", serve_url, "--source", str(frames),
                              "--root", str(published["root"]), "--model", MODEL, "--target", "x86-cpu", "--once",
                              "--sync-interval", "1", "--ota-interval", "2", "--threads", "1"),
                       capture_output=True, text=True, cwd=REPO, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["frames"] == 30 and summary["backlog"]["records"] == 0
    assert summary["model"] == published["channel"]["bundle_id"]
    ids = _lake(settings, device)
    assert len(ids) == len(set(ids)) == 30 and all(i.startswith(f"{device}:") for i in ids)
    # The untrained tiny model is rarely confident: low-confidence frames reached the labeling queue.
    from visionfleet.labeling import LabelingQueue

    assert any(s["source"] == f"edge:{device}" for s in LabelingQueue(settings.home).pending(limit=100000))
    # Resending a batch the server already has counts nothing twice.
    from edge_agent.outbox import Outbox

    with Outbox(home / "outbox.sqlite") as ob:
        rows = [json.loads(b) for (b,) in ob._db.execute("SELECT body FROM records ORDER BY seq LIMIT 10")]
    doc = {"device_id": device, "records": rows}
    first = httpx.post(f"{serve_url}/v1/edge/sync", json=doc, timeout=30).json()
    assert first["new"]["records"] == 0 and first["duplicates"]["records"] == 10 and len(first["acked"]["records"]) == 10
    assert len(_lake(settings, device)) == 30
    bad = httpx.post(f"{serve_url}/v1/edge/sync", json={"device_id": "../x", "records": []}, timeout=30)
    assert bad.status_code == 400 and "device_id" in bad.json()["error"]
    assert httpx.post(f"{serve_url}/v1/edge/sync", content=b"x", timeout=30).status_code == 415
    fleet = httpx.get(f"{serve_url}/v1/edge/fleet", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
    dev = next(d for d in fleet.json()["devices"] if d["device_id"] == device)
    assert dev["bundle_id"] == published["channel"]["bundle_id"] and dev["health"] == "ok" and dev["records"] == 30
    r = _cli(settings, "fleet", "status", "--json")
    assert r.returncode == 0 and any(d["device_id"] == device for d in json.loads(r.stdout)["devices"])


def test_sigkill_and_network_cuts_during_sync_lose_and_duplicate_nothing(settings, serve_url, published, tmp_path) -> None:
    """Small version (4 kills, 2 cuts); tests/slow runs the full campaign."""
    from bench.fleet_sim import TcpProxy
    from urllib.parse import urlparse

    device = f"itkill-{random.randrange(10**6)}"
    home, frames = tmp_path / "dev", tmp_path / "frames"
    _frames(frames, 120)
    # Offline first: everything lands in the outbox, nothing is sent.
    bundle = settings.home / "edge" / "bundles" / published["channel"]["bundle_id"]
    r = subprocess.run(_agent(home, "--device-id", device, "--source", str(frames), "--bundle", str(bundle), "--once",
                              "--threads", "1"), capture_output=True, text=True, cwd=REPO, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["backlog"]["records"] == 120
    u = urlparse(serve_url)
    proxy = TcpProxy((u.hostname, u.port)).start()
    rng = random.Random(7)
    cmd = _agent(home, "--device-id", device, "--server", proxy.url, "--once", "--sync-batch", "5",
                 "--sync-interval", "0.2", "--ota-interval", "3600", "--threads", "1", "--timeout", "3")
    try:
        for k in range(6):
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
            while "serving" not in (p.stderr.readline() or "serving"):
                pass
            time.sleep(rng.uniform(0.05, 0.8))
            if k in (1, 4):
                proxy.cut()  # mid-request: connections reset, new ones refused
                time.sleep(rng.uniform(0.2, 1.0))
                proxy.restore()
                time.sleep(rng.uniform(0.05, 0.5))
            p.send_signal(signal.SIGKILL)
            p.wait()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=180)
        assert p.returncode == 0, p.stderr[-2000:]
        assert json.loads(p.stdout.strip().splitlines()[-1])["backlog"]["records"] == 0
    finally:
        proxy.close()
    ids = _lake(settings, device)
    assert len(ids) == 120, f"{120 - len(set(ids))} lost, {len(ids) - len(set(ids))} duplicated"
    assert len(set(ids)) == 120
    from visionfleet.fleet import FleetDB

    dev = next(d for d in FleetDB(settings.home).devices() if d["device_id"] == device)
    print(f"resent batches refused as duplicates: {dev['duplicates']} rows")
