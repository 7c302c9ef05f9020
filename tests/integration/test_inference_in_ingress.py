"""Models run inside the ingress (`inference_in="ingress"`): same answers, no replica hop.

A second app ("vf-local", under /local) on the session's Ray, deployed with the models
in the ingress, is checked against ONNX Runtime run by hand and against the same bad
inputs as the default app.
"""

from __future__ import annotations

import json
import threading

import httpx
import numpy as np
import pytest

from visionfleet.datasets.synth import render_sample
from visionfleet.imaging import encode_image, load_for_model
from visionfleet.inference import RuntimeOptions, load_model_dir
from visionfleet.registry import Registry

from .conftest import ADMIN_TOKEN

APP = "vf-local"


@pytest.fixture(scope="module")
def local_url(serve_url, settings, trained):
    from ray import serve

    from cluster.local import wait_http
    from serve_apps.app import build_app
    from serve_apps.config import AppConfig, IngressConfig, ReplicaConfig

    cfg = AppConfig(home=str(settings.home), default_model="tiny", admin_token=ADMIN_TOKEN, telemetry=False,
                    replica=ReplicaConfig(ort_threads=1), ingress=IngressConfig(inference_in="ingress", num_cpus=0.25))
    serve.run(build_app(cfg), name=APP, route_prefix="/local")
    url = f"{serve_url}/local"
    assert wait_http(f"{url}/healthz", timeout=120)
    yield url
    serve.delete(APP)


def test_predictions_match_onnx_runtime_and_no_replica_is_deployed(local_url, settings, trained) -> None:
    from ray import serve

    model = load_model_dir(Registry(settings.registry_dir).local_dir("tiny", trained.card.version), RuntimeOptions(threads=1))
    images = [encode_image(render_sample(31, i, 40)[0], "png") for i in range(8)]
    answers: dict[int, dict] = {}

    def send(i: int) -> None:  # concurrent clients, so the ingress forms batches of several requests
        with httpx.Client(timeout=60) as c:
            for _ in range(5):
                r = c.post(f"{local_url}/v1/predict?top_k=10", content=images[i], headers={"Content-Type": "image/png"})
                assert r.status_code == 200, r.text
                answers[i] = r.json()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, data in enumerate(images):
        img, _ = load_for_model(data, model.card.input_size, model.card.resize)
        expected = model.run(img[None])[0][0]
        got = np.array([answers[i]["probs"][label] for label in model.card.labels])
        assert answers[i]["label"] == model.card.labels[int(expected.argmax())]
        assert np.allclose(got, expected, atol=1e-5)
    stats = httpx.get(f"{local_url}/v1/stats", timeout=30).json()
    assert stats["ingress"]["inference_in"] == "ingress" and stats["ingress"]["max_concurrent_batches"] == 1
    assert stats["replica"]["inference_in"] == "ingress" and stats["replica"]["loaded"] == [f"tiny:{trained.card.version}"]
    assert stats["replica"]["loads"] == 1 and stats["replica"]["images"] >= 40
    assert stats["ingress"]["requests"] >= 40 and stats["ingress"]["replica_calls"] <= stats["ingress"]["requests"]
    deployments = serve.status().applications[APP].deployments
    assert set(deployments) == {"Ingress"}


def test_v2_batch_and_stream_routes_and_their_errors(local_url, trained) -> None:
    from websockets.sync.client import connect

    n = len(trained.card.labels)
    h, w = trained.card.input_size
    with httpx.Client(base_url=local_url, timeout=60) as c:
        x = np.zeros((2, h, w, 3), np.uint8)
        body = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "UINT8", "data": x.flatten().tolist()}]})
        r = c.post("/v2/models/tiny/infer", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["shape"] == [2, n]
        bad = json.dumps({"inputs": [{"name": "images", "shape": [1, 4, 4, 3], "datatype": "FP32", "data": [0.0] * 48}]})
        r = c.post("/v2/models/tiny/infer", content=bad, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "error" in r.json()
        r = c.post("/v1/predict?model=tiny&version=99", content=encode_image(render_sample(1, 1, 32)[0], "png"),
                   headers={"Content-Type": "image/png"})
        assert r.status_code == 404 and "error" in r.json()
        r = c.post("/v1/predict", content=b"not an image", headers={"Content-Type": "image/png"})
        assert r.status_code == 415 and "error" in r.json()
        files = [("file", (f"{i}.png", encode_image(render_sample(5, i, 32)[0], "png"), "image/png")) for i in range(3)]
        r = c.post("/v1/predict/batch", files=files)
        assert r.status_code == 200 and [x["label"] in trained.card.labels for x in r.json()["results"]] == [True] * 3
    ws_url = local_url.replace("http://", "ws://") + "/v1/stream?model=tiny&max_in_flight=2"
    with connect(ws_url) as ws:
        assert json.loads(ws.recv(timeout=60))["type"] == "ready"
        for i in range(3):
            ws.send(encode_image(render_sample(6, i, 32)[0], "png"))
        frames = [json.loads(ws.recv(timeout=60)) for _ in range(3)]
        assert [f["frame"] for f in frames] == [0, 1, 2] and {f["type"] for f in frames} == {"prediction"}
        ws.send(json.dumps({"type": "close"}))
        assert json.loads(ws.recv(timeout=60))["frames"] == 3


def test_serve_config_leaves_the_replica_deployment_out(tmp_path) -> None:
    from cluster.serve_config import serve_config
    from serve_apps.config import AppConfig, IngressConfig

    doc = serve_config(AppConfig(home=str(tmp_path), ingress=IngressConfig(inference_in="ingress")))
    assert [d["name"] for d in doc["applications"][0]["deployments"]] == ["Ingress"]
    doc = serve_config(AppConfig(home=str(tmp_path)))
    assert [d["name"] for d in doc["applications"][0]["deployments"]] == ["Ingress", "ModelReplica"]
