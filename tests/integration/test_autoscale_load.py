"""Serve autoscaling under load, over real HTTP: replicas are added, then removed, no request fails.

An app of its own on the integration tier's local Ray (this folder's fixtures: the tiny trained
model, Serve's HTTP proxy; marked slow, so it runs in `make test-slow`, not in `make test`) with ``autoscaling`` on the scaled deployment: min 1, max 2, a low
``target_ongoing_requests`` and short delays. Concurrent clients raise the load until
``serve.status()`` shows two RUNNING replicas, the load drops to one sequential client until
it shows one again, and every answer on the way is a 200. Once for the ModelReplica
deployment, once for ``--inference-in ingress`` (the ingress replicas scale).

Serve samples the load every ``metrics_interval_s`` (10 s) and averages it over
``look_back_period_s`` (30 s), so each case takes about a minute: this is the slow tier.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from visionfleet.datasets.synth import render_sample
from visionfleet.imaging import encode_image

pytestmark = pytest.mark.slow

_TIMEOUT_S = 240  # per phase; Serve's own loop is ~10 s per step, a loaded 2-core box is slower


def _running(app: str, deployment: str) -> int:
    from ray import serve

    d = serve.status().applications[app].deployments[deployment]
    return int(d.replica_states.get("RUNNING", 0))


class _Load:
    """``clients`` threads posting images in a loop; every status code is kept."""

    def __init__(self, url: str, clients: int, pause_s: float = 0.0) -> None:
        self._pause = pause_s
        self.url, self._stop = url, threading.Event()
        self.codes: list[int] = []
        self.failures: list[str] = []
        self._images = [encode_image(render_sample(7, i, 40)[0], "png") for i in range(4)]
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        with httpx.Client(timeout=120) as c:
            while not self._stop.is_set():
                r = c.post(f"{self.url}/v1/predict", content=self._images[i % 4], headers={"Content-Type": "image/png"})
                self.codes.append(r.status_code)
                if r.status_code != 200:
                    self.failures.append(f"{r.status_code} {r.text[:300]}")
                self._stop.wait(self._pause)

    def __enter__(self) -> "_Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self._stop.set()
        for t in self._threads:
            t.join(180)


def _wait_for(app: str, deployment: str, n: int, load: _Load) -> float:
    t0 = time.monotonic()
    while _running(app, deployment) != n:
        assert time.monotonic() - t0 < _TIMEOUT_S, (f"{deployment} did not reach {n} RUNNING replicas in {_TIMEOUT_S}s: "
                                                   f"{_running(app, deployment)}; answers so far {len(load.codes)}")
        time.sleep(0.5)
    return time.monotonic() - t0


def _scale_up_and_down(app: str, url: str, deployment: str) -> dict[str, float]:
    assert _running(app, deployment) == 1
    with _Load(url, clients=8) as heavy:
        up_s = _wait_for(app, deployment, 2, heavy)
        time.sleep(3)  # both replicas serve for a while
    # Light traffic (well under the target) goes on while a replica is drained and removed.
    with _Load(url, clients=1, pause_s=0.25) as light:
        down_s = _wait_for(app, deployment, 1, light)
        time.sleep(2)
    codes = heavy.codes + light.codes
    assert all(c == 200 for c in codes), (heavy.failures + light.failures)[:10]
    assert len(heavy.codes) > 0 and len(light.codes) > 0
    return {"up_s": up_s, "down_s": down_s, "requests": float(len(codes))}


def _deploy(serve_url: str, settings, app: str, **ingress_or_replica) -> str:  # noqa: ANN001
    from ray import serve

    from cluster.local import wait_http
    from serve_apps.app import build_app
    from serve_apps.config import AppConfig

    cfg = AppConfig(home=str(settings.home), default_model="tiny", telemetry=False, **ingress_or_replica)
    serve.run(build_app(cfg), name=app, route_prefix=f"/{app}")
    url = f"{serve_url}/{app}"
    assert wait_http(f"{url}/healthz", timeout=180)
    return url


def _autoscaling():
    from serve_apps.config import AutoscalingConfig

    return AutoscalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=0.5,
                             upscale_delay_s=1.0, downscale_delay_s=3.0)


def test_model_replicas_scale_up_under_load_and_back_down(serve_url, settings, trained) -> None:
    from ray import serve

    from serve_apps.config import IngressConfig, ReplicaConfig

    app = "vf-as-replicas"
    url = _deploy(serve_url, settings, app,
                  replica=ReplicaConfig(ort_threads=1, num_cpus=0.1, autoscaling=_autoscaling()),
                  ingress=IngressConfig(num_cpus=0.1, max_concurrent_batches=4))
    try:
        t = _scale_up_and_down(app, url, "ModelReplica")
        print(f"\nModelReplica 1->2 in {t['up_s']:.1f}s, 2->1 in {t['down_s']:.1f}s, {t['requests']:.0f} requests, all 200")
    finally:
        serve.delete(app)


def test_ingress_replicas_scale_up_under_load_and_back_down_with_inference_in_ingress(serve_url, settings, trained) -> None:
    from ray import serve

    from serve_apps.config import IngressConfig, ReplicaConfig

    app = "vf-as-ingress"
    url = _deploy(serve_url, settings, app, replica=ReplicaConfig(ort_threads=1),
                  ingress=IngressConfig(inference_in="ingress", num_cpus=0.1, autoscaling=_autoscaling()))
    try:
        assert set(serve.status().applications[app].deployments) == {"Ingress"}
        t = _scale_up_and_down(app, url, "Ingress")
        print(f"\nIngress (inference in ingress) 1->2 in {t['up_s']:.1f}s, 2->1 in {t['down_s']:.1f}s, "
              f"{t['requests']:.0f} requests, all 200")
    finally:
        serve.delete(app)
