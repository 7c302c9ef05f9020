"""The closed loop in small: monitoring metrics in Prometheus and W&B, active-learning
samples, a drift that the controller detects, a retrain that passes its gate, a canary
that promotes it — and a failing retrain that leaves production alone."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.integration.conftest import ADMIN_TOKEN
from visionfleet.datasets.synth import CLASSES, Drift, apply_drift, render_sample
from visionfleet.imaging import encode_image

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_window_metrics_reach_prometheus_and_wandb(serve_url, settings, metrics_port) -> None:
    """The numbers the trigger reads are the ones exported: Prometheus and the W&B summary."""
    from visionfleet.wandb_offline import find_runs, read_run

    with httpx.Client(base_url=serve_url, timeout=30) as c:
        for i in range(40):
            data = encode_image(render_sample(61, i, 32)[0], "png")
            assert c.post("/v1/predict?model=tiny", content=data, headers={"Content-Type": "image/png"}).status_code == 200
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            snap = c.get("/v1/monitor?model=tiny", headers=AUTH).json()["versions"].get("tiny:1")
            if snap and snap["current"].get("n", 0) >= 40:
                break
            time.sleep(1)
    assert snap and "confidence/mean" in snap["current"] and "confidence/low_rate" in snap["current"]
    deadline = time.monotonic() + 90
    found_prom = found_wandb = False
    while time.monotonic() < deadline and not (found_prom and found_wandb):
        text = _scrape(metrics_port)
        found_prom = any(line.startswith("ray_vf_confidence_mean{") and 'model="tiny"' in line for line in text.splitlines()) and \
            any(line.startswith("ray_vf_confidence_low_rate{") for line in text.splitlines())
        runs = [r for r in find_runs(settings.home / "wandb") if r.name.endswith("monitor-tiny-1")]
        if runs:
            summary = read_run(runs[0])["summary"]
            found_wandb = "confidence/mean" in summary and "confidence/low_rate" in summary
        time.sleep(2)
    assert found_prom, "vf_confidence_mean / vf_confidence_low_rate not in the Prometheus scrape"
    assert found_wandb, "confidence/mean and confidence/low_rate not in the W&B monitor run's summary"
    assert "ray_vf_requests" in text  # per-request ingress metrics, with a model_version tag
    assert 'model_version="1"' in text


# v1 of the loop: the demo model as `make demo` trains it (shipped in tests/data, 1.3 MB;
# 0.964 top-1), because no model a CI-sized run can train on this hard data is good
# enough for the gate and the canary to be decided by a real difference rather than by
# noise (a 10-class model trained for a minute here scores ~28%).
SHIPPED = Path(__file__).resolve().parents[1] / "data" / "demo64.pt"


@pytest.fixture(scope="module")
def loop_v1(settings) -> Path:
    """The shipped checkpoint, its base dataset regenerated here (same generator, fresh samples)."""
    import torch

    from visionfleet.datasets.store import synthesize

    ds = settings.datasets_dir / "loopbase"
    synthesize(ds, n_train=1000, n_holdout=200, size=64, seed=7)
    blob = torch.load(SHIPPED, weights_only=True)
    blob["dataset"] = str(ds)
    path = settings.home / "loop-v1.pt"
    torch.save(blob, path)
    return path


def _send(c: httpx.Client, i: int, drifted: bool, truth: dict, failures: list) -> None:
    img, y = render_sample(91, i, 64)
    name = CLASSES[y]
    if drifted:
        img = apply_drift(img, Drift(brightness=-70, contrast=0.6, blur=1.5, color_cast=(30, 10, -30)), np.random.default_rng(i))
    rid = f"loop-{i}"
    truth[rid] = name
    try:
        r = c.post("/v1/predict?model=loopm", content=encode_image(img, "png"),
                   headers={"Content-Type": "image/png", "X-Request-Id": rid})
        if r.status_code != 200:
            failures.append(("predict", r.status_code, r.text[:200]))
            return
        fb = c.post("/v1/feedback", json={"request_id": rid, "label": truth[rid]})
        if fb.status_code != 202:
            failures.append(("feedback", fb.status_code, fb.text[:200]))
    except httpx.HTTPError as exc:
        failures.append(("http", 0, repr(exc)))


def test_small_loop_detects_retrains_canaries_and_promotes(serve_url, settings, loop_v1, ray_session) -> None:
    import ray

    from train.controller import ControllerConfig, get_or_create_controller, read_timeline
    from train.pipeline import register_checkpoint
    from visionfleet.datasets.store import load_arrays
    from visionfleet.registry import Registry

    reg = Registry(settings.registry_dir)
    parity, _ = load_arrays(settings.datasets_dir / "loopbase", "holdout", (64, 64), limit=16)
    v1 = register_checkpoint(loop_v1, reg, "loopm", parity_images=parity, run_id="loop-v1")
    assert reg.aliases("loopm")["production"] == v1.version
    from visionfleet.names import COORDINATOR_NAME, SINK_NAME

    sink = ray.get_actor(SINK_NAME, namespace="visionfleet")
    coordinator = ray.get_actor(COORDINATOR_NAME, namespace="visionfleet")
    ray.get(sink.configure.remote({"reference_size": 40, "window_size": 40, "min_samples": 30, "psi": 0.25}, None))
    ctl = get_or_create_controller(str(settings.home), ControllerConfig(
        model="loopm", interval_s=1.0, debounce=2, min_samples=30, min_labels=30, cooldown_s=3600,
        epochs=2, lr=0.01, batch_size=64, compress=True, canary_share=0.5, canary_min_samples=15, base_limit=800,
        # ~40 new labels and 800 base images in a CI-sized run: a smaller share of drifted
        # images per epoch, and 5 pt of room on the 200-image base holdout (the default is
        # 1 pt; measured here: 0.945 vs 0.97, as BatchNorm statistics follow the drift)
        new_data_share=0.25, max_base_drop=0.05, wandb=False))
    truth: dict[str, str] = {}
    failures: list = []
    stop = threading.Event()
    sent = {"n": 0}

    lock = threading.Lock()

    def traffic() -> None:
        with httpx.Client(base_url=serve_url, timeout=60) as c:
            while not stop.is_set():
                with lock:
                    i = sent["n"]
                    sent["n"] += 1
                _send(c, i, drifted=i >= 60, truth=truth, failures=failures)
                time.sleep(0.05)

    # three clients: labels reach the canary's sequential test three times as fast
    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 420
        outcome = None
        while time.monotonic() < deadline and outcome is None:
            for e in read_timeline(settings.home):
                if e.get("model") == "loopm" and e["kind"] in ("promoted", "rolled_back", "retrain_failed", "canary_stopped"):
                    outcome = e
            time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
        ray.get(ctl.stop.remote())
    kinds = [e["kind"] for e in read_timeline(settings.home) if e.get("model") == "loopm"]
    if outcome is None:
        exps = [e for e in ray.get(coordinator.list.remote()) if e["model"] == "loopm"]
        status = [ray.get(coordinator.status.remote(e["name"])) for e in exps]
        pytest.fail(f"the loop did not finish after {sent['n']} requests; timeline: {kinds}; "
                    f"failures: {failures[:5]}; experiments: {json.dumps(status, default=str)[:3000]}")
    assert not failures, failures[:5]
    assert outcome["kind"] == "promoted", outcome
    for k in ("degraded", "triggered", "retrain_started", "step:gate", "candidate", "canary_started", "promoted"):
        assert k in kinds, (k, kinds)
    prod = reg.resolve("loopm@production")
    assert prod.version != v1.version
    card = reg.card("loopm", prod.version)
    assert card.precision == "int8" and any(s.get("op") == "retrain" for s in card.lineage.steps)
    samples = outcome["samples"]
    assert samples["treatment"]["labeled"] >= 15 and samples["control"]["labeled"] >= 15


def test_failing_retrain_keeps_production(settings, ray_session, trained) -> None:
    from train.retrain import RetrainConfig, RetrainFailed, retrain
    from visionfleet.registry import Registry

    reg = Registry(settings.registry_dir)
    before = reg.aliases("tiny")
    with pytest.raises(RetrainFailed) as exc:
        retrain(settings, RetrainConfig(model="tiny", min_new_labels=10**6, compress=False, wandb=False), reason="test")
    assert exc.value.step == "data"
    assert reg.aliases("tiny") == before
    logs = sorted((settings.home / "retraining").glob("retrain-*/log.jsonl"))
    assert logs and json.loads(logs[-1].read_text().splitlines()[-1])["step"] == "data"
