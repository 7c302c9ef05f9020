"""A/B experiments end to end on the real Serve app.

Two versions of different accuracy (a trained model and the same network with its
class outputs rotated, so it is systematically wrong), labeled traffic through
/v1/feedback, automatic promotion; sticky clients; re-weighting under load with zero
failed requests; shadow traffic; admin auth.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from tests.integration.conftest import ADMIN_TOKEN
from visionfleet.datasets.synth import CLASSES, render_sample
from visionfleet.imaging import encode_image

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _image(i: int) -> tuple[bytes, str]:
    img, label = render_sample(77, i, 48)
    return encode_image(img, "png"), CLASSES[label]


def _start(client: httpx.Client, **spec) -> dict:
    r = client.post("/v1/experiments", json=spec, headers=AUTH)
    assert r.status_code == 201, r.text
    return r.json()


def test_admin_routes_need_the_token(serve_url) -> None:
    with httpx.Client(base_url=serve_url, timeout=30) as c:
        assert c.get("/v1/experiments").status_code == 401
        r = c.get("/v1/experiments", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 403 and r.json() == {"error": "admin route: wrong token"}
        assert c.post("/v1/experiments", json={}, headers={"Authorization": "Basic x"}).status_code == 401
        assert c.get("/v1/experiments", headers=AUTH).status_code == 200


def test_bad_experiment_and_feedback_requests(serve_url, ab_model) -> None:
    v_bad, v_good = ab_model
    with httpx.Client(base_url=serve_url, timeout=30) as c:
        arms = [{"name": "control", "model": f"abm:{v_bad}", "weight": 1}, {"name": "treatment", "model": f"abm:{v_good}", "weight": 1}]
        cases = [
            ({"name": "x1", "model": "abm", "arms": arms[:1]}, 400),  # one arm
            ({"name": "x2", "model": "abm", "arms": [arms[0], {**arms[1], "model": "abm:99"}]}, 404),
            ({"name": "x3", "model": "abm", "arms": [arms[0], {**arms[1], "model": "tiny:1"}]}, 400),
            ({"name": "x4", "model": "abm", "arms": [arms[0], {**arms[0], "name": "treatment"}]}, 400),
            ({"name": "x5", "model": "abm", "arms": arms, "metric": "vibes"}, 400),
            ({"name": "x6", "model": "abm", "arms": arms, "surprise": 1}, 400),
            ({"name": "bad name!", "model": "abm", "arms": arms}, 400),
        ]
        for spec, status in cases:
            r = c.post("/v1/experiments", json=spec, headers=AUTH)
            assert r.status_code == status, (spec, r.text)
            assert set(r.json()) == {"error"}
        assert c.post("/v1/experiments", content=b"{", headers={**AUTH, "Content-Type": "application/json"}).status_code == 400
        assert c.post("/v1/experiments", content=b"x", headers={**AUTH, "Content-Type": "text/plain"}).status_code == 415
        assert c.get("/v1/experiments/nope", headers=AUTH).status_code == 404
        assert c.post("/v1/experiments/nope/stop", json={"action": "promote"}, headers=AUTH).status_code == 404
        # feedback
        assert c.post("/v1/feedback", json={"request_id": "r1"}).status_code == 400
        assert c.post("/v1/feedback", json={"request_id": "bad id!", "label": "circle"}).status_code == 400
        assert c.post("/v1/feedback", content=b"label=x", headers={"Content-Type": "text/plain"}).status_code == 415
        r = c.post("/v1/feedback", json={"request_id": "never-seen-yet", "label": "circle"})
        assert r.status_code == 202 and r.json()["matched"] is False  # late labels are normal
        data, _ = _image(1)
        rid = c.post("/v1/predict?model=abm", content=data, headers={"Content-Type": "image/png"}).json()["request_id"]
        deadline = time.monotonic() + 10
        while True:  # the event reaches the sink asynchronously
            r = c.post("/v1/feedback", json={"request_id": rid, "label": "not-a-class"})
            if r.status_code == 400 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert r.status_code == 400 and "not-a-class" in r.json()["error"]
        # a class index is a label too (the datasets store integer labels); the answer says how it was read
        r = c.post("/v1/feedback", json={"request_id": rid, "label": 1})
        assert r.status_code == 202 and r.json()["given"] == "class_index" and r.json()["class_id"] == 1, r.text
        assert r.json()["label"] == c.get("/v1/models/abm").json()["card"]["labels"][1]
        r = c.post("/v1/feedback", json={"request_id": rid, "label": 99})
        assert r.status_code == 400 and "Got class index 99" in r.json()["error"]
        assert c.post("/v1/feedback", json={"request_id": rid, "label": 1.5}).status_code == 400


def test_sticky_reweight_under_load_and_shadow(serve_url, ab_model) -> None:
    v_bad, v_good = ab_model
    with httpx.Client(base_url=serve_url, timeout=30) as admin:
        _start(admin, name="sticky-1", model="abm", sticky=True,
               arms=[{"name": "control", "model": f"abm:{v_bad}", "weight": 90},
                     {"name": "treatment", "model": f"abm:{v_good}", "weight": 10}],
               shadow={"model": f"abm:{v_good}", "share": 0.5})
        seen: dict[str, list[str]] = defaultdict(list)
        failures: list[tuple[int, str]] = []
        stop = threading.Event()
        lock = threading.Lock()

        def load(worker: int) -> None:
            rng = random.Random(worker)
            with httpx.Client(base_url=serve_url, timeout=30) as c:
                i = 0
                while not stop.is_set():
                    client = f"client-{rng.randrange(60)}"
                    data, _ = _image(worker * 100_000 + i)
                    i += 1
                    r = c.post("/v1/predict?model=abm", content=data, headers={"Content-Type": "image/png", "X-Client-Id": client})
                    with lock:
                        if r.status_code != 200:
                            failures.append((r.status_code, r.text))
                            continue
                        body = r.json()
                        seen[client].append(body["variant"])
                        expected = {"control": v_bad, "treatment": v_good}.get(body["variant"])
                        if body["version"] != expected:
                            failures.append((200, f"variant {body['variant']} answered by version {body['version']}"))

        threads = [threading.Thread(target=load, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        try:
            time.sleep(4)
            for split in ({"control": 50, "treatment": 50}, {"control": 20, "treatment": 80}):
                r = admin.post("/v1/experiments/sticky-1/weights", json={"weights": split}, headers=AUTH)
                assert r.status_code == 200, r.text
                time.sleep(4)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not failures, failures[:5]
        total = sum(len(v) for v in seen.values())
        assert total > 100
        for client, variants in seen.items():
            # control only ever shrank: a client may move control -> treatment, never back
            switches = [(a, b) for a, b in zip(variants, variants[1:]) if a != b]
            assert all(s == ("control", "treatment") for s in switches), (client, variants)
            assert len(switches) <= 1, (client, variants)
        status = admin.get("/v1/experiments/sticky-1", headers=AUTH).json()
        assert status["shadow"] is not None and status["shadow"]["n"] > 0
        assert 0.0 <= status["shadow"]["agreement"] <= 1.0
        arms = status["arms"]
        assert arms["control"]["n"] + arms["treatment"]["n"] >= total * 0.9
        r = admin.post("/v1/experiments/sticky-1/stop", json={"action": "none"}, headers=AUTH)
        assert r.status_code == 200 and r.json()["status"] == "stopped"
        assert admin.post("/v1/experiments/sticky-1/stop", json={}, headers=AUTH).status_code == 409


def test_auto_decide_promotes_the_better_version(serve_url, ab_model, settings) -> None:
    from visionfleet.registry import Registry

    v_bad, v_good = ab_model
    with httpx.Client(base_url=serve_url, timeout=30) as admin:
        _start(admin, name="auto-1", model="abm", sticky=False, auto_decide=True, metric="accuracy", min_samples=40,
               arms=[{"name": "control", "model": f"abm:{v_bad}", "weight": 1},
                     {"name": "treatment", "model": f"abm:{v_good}", "weight": 1}])
        status = "running"
        sent = 0
        lock = threading.Lock()

        def worker(w: int) -> None:
            nonlocal sent
            with httpx.Client(base_url=serve_url, timeout=30) as c:
                for i in range(400):
                    if status != "running":
                        return
                    data, label = _image(1_000_000 + w * 10_000 + i)
                    r = c.post("/v1/predict?model=abm", content=data, headers={"Content-Type": "image/png"})
                    assert r.status_code == 200, r.text
                    body = r.json()
                    fb = c.post("/v1/feedback", json={"request_id": body["request_id"], "label": label})
                    assert fb.status_code == 202, fb.text
                    with lock:
                        sent += 1

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            doc = admin.get("/v1/experiments/auto-1", headers=AUTH).json()
            status = doc["experiment"]["status"]
            if status != "running":
                break
            time.sleep(1)
        status = status if status != "running" else "timeout"
        for t in threads:
            t.join()
        doc = admin.get("/v1/experiments/auto-1", headers=AUTH).json()
        exp = doc["experiment"]
        assert exp["status"] == "promoted", exp
        assert "accuracy" in exp["decision"]["reason"]
        assert Registry(settings.registry_dir).aliases("abm")["production"] == v_good
        data, _ = _image(5)
        # Two things propagate asynchronously: the alias (the ingress caches it ~1 s) and the end
        # of the experiment (a reconfigure of the ingress replicas). Until the latter lands, a
        # request may still be routed to the treatment arm, which is v_good too.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = admin.post("/v1/predict?model=abm", content=data, headers={"Content-Type": "image/png"})
            if r.json()["version"] == v_good and r.json()["variant"] == "default":
                break
            time.sleep(0.3)
        assert r.json()["version"] == v_good and r.json()["variant"] == "default"
        assert sent < 1200


def test_ab_cli_start_status_weights_stop_report(serve_url, ab_model, settings, tmp_path) -> None:
    import json
    import os
    import subprocess
    import sys

    v_bad, v_good = ab_model
    vf = str(Path(sys.executable).parent / "visionfleet")
    env = {**os.environ, "VISIONFLEET_HOME": str(settings.home), "VISIONFLEET_ADMIN_TOKEN": ADMIN_TOKEN}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([vf, *args], capture_output=True, text=True, env=env, timeout=120)

    r = run("ab", "start", "--name", "cli-1", "--control", f"abm:{v_bad}", "--treatment", f"abm:{v_good}",
            "--split", "50/50", "--url", serve_url, "--min-samples", "1000", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "running"
    with httpx.Client(base_url=serve_url, timeout=30) as c:
        for i in range(60):
            data, label = _image(3_000_000 + i)
            body = c.post("/v1/predict?model=abm", content=data, headers={"Content-Type": "image/png"}).json()
            c.post("/v1/feedback", json={"request_id": body["request_id"], "label": label})
        # events reach the sink asynchronously and a tick snapshots them: wait for that, not a fixed 3 s
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            arms = c.get("/v1/experiments/cli-1", headers=AUTH).json().get("arms") or {}
            if sum((arms.get(k) or {}).get("n", 0) for k in ("control", "treatment")) >= 55:
                break
            time.sleep(0.25)
    r = run("ab", "status", "cli-1", "--url", serve_url, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)["experiments"][0]
    assert doc["arms"]["control"]["n"] + doc["arms"]["treatment"]["n"] >= 55
    assert doc["now"]["action"] == "continue"  # min_samples not reached
    r = run("ab", "status", "--url", serve_url)
    assert r.returncode == 0 and "cli-1" in r.stdout and "control" in r.stdout
    r = run("ab", "weights", "cli-1", "--split", "30/70", "--url", serve_url)
    assert r.returncode == 0 and "treatment 70%" in r.stdout, r.stdout + r.stderr
    r = run("ab", "stop", "cli-1", "--rollback", "--url", serve_url, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "rolled_back"
    from visionfleet.wandb_offline import find_runs, read_run

    runs = [r for r in find_runs(settings.home / "wandb") if r.name.endswith("exp-cli-1")]
    assert runs, "no W&B run for the experiment"
    wb = read_run(runs[0])
    assert "control/requests" in wb["summary"] and wb["summary"]["decision"] == "rollback"
    report = tmp_path / "cli-1.html"
    r = run("ab", "report", "cli-1", "--out", str(report))
    assert r.returncode == 0, r.stderr
    html = report.read_text()
    assert "cli-1" in html and "data:image/png;base64," in html
    # bad arguments: a clear message and a non-zero exit, never a traceback
    for args, code, needle in (
        (("ab", "start", "--name", "x", "--control", "abm:1", "--treatment", "tiny:1", "--url", serve_url), 2, "same model"),
        (("ab", "start", "--name", "x", "--control", "abm:1", "--treatment", "abm:2", "--split", "a/b", "--url", serve_url), 2, "--split"),
        (("ab", "stop", "nope", "--url", serve_url), 1, "404"),
        (("ab", "stop", "cli-1", "--promote", "--rollback", "--url", serve_url), 2, "at most one"),
        (("ab", "report", "nope"), 2, "no experiment"),
    ):
        r = run(*args)
        assert r.returncode == code and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
