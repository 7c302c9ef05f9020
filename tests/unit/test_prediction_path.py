"""One prediction path: the server, the edge agent and offline inference agree exactly.

The same encoded images go through

* the server's HTTP app (``serve_apps.api.build_api`` over a ``PredictionService`` whose
  models run in this process: the real FastAPI routes, the real adaptive batcher, real
  ONNX Runtime) on ``/v1/predict``, ``/v1/predict/batch``, the v2 route and the stream;
* the edge agent (``edge_agent.predict.predict_bytes``);
* offline inference (``visionfleet.offline.preprocess_encoded`` + ``result_rows``),

and every answer and every telemetry field must be identical, for a classifier and for
a detector (boxes mapped back to original pixels, letterbox). No Ray cluster.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from visionfleet.imaging import ResizeMode, encode_image
from visionfleet.registry import Registry
from visionfleet.spec import ModelCard, Task

LABELS = ["red", "green", "blue"]
DET_LABELS = ["car", "person", "dog"]
SIZE = 16
DET_SIZE = 64


def _classifier() -> onnx.ModelProto:
    """uint8 NHWC -> probs [N, 3]: softmax of a linear map of the mean RGB (the offline tests' model)."""
    from test_offline_inference import _colour_model

    return _colour_model(SIZE)


def _detector() -> onnx.ModelProto:
    """The registered detection contract: boxes [N, 4, 4], scores [N, 4], classes [N, 4] (padded).

    The scores depend on the image's mean (so images differ), the boxes are fixed in
    model-input pixels; written with the outputs in a different order than the
    contract's, which the loader must fix.
    """
    boxes = np.array([[[8, 8, 24, 24], [30, 10, 50, 40], [2, 40, 20, 60], [0, 0, 0, 0]]], np.float32)
    classes = np.array([[0, 1, 2, -1]], np.int64)
    base = np.array([[0.5, 0.3, 0.2, 0.0]], np.float32)
    slope = np.array([[0.001, 0.0005, 0.0008, 0.0]], np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["f"], ["m"], axes=[1, 2, 3], keepdims=0),  # [N]
            helper.make_node("Unsqueeze", ["m", "ax1"], ["m1"]),  # [N, 1]
            helper.make_node("Mul", ["m1", "slope"], ["ds"]),
            helper.make_node("Add", ["ds", "base"], ["scores"]),  # [N, 4]
            helper.make_node("Mul", ["m1", "zero"], ["z1"]),
            helper.make_node("Unsqueeze", ["z1", "ax2"], ["z2"]),  # [N, 1, 1]
            helper.make_node("Add", ["z2", "boxes_c"], ["boxes"]),  # [N, 4, 4]
            helper.make_node("Cast", ["z1"], ["zi"], to=TensorProto.INT64),
            helper.make_node("Add", ["zi", "classes_c"], ["classes"]),  # [N, 4]
        ],
        "det",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", DET_SIZE, DET_SIZE, 3])],
        [helper.make_tensor_value_info("classes", TensorProto.INT64, ["batch", 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", 4, 4])],
        initializer=[
            numpy_helper.from_array(np.array([1], np.int64), "ax1"),
            numpy_helper.from_array(np.array([2], np.int64), "ax2"),
            numpy_helper.from_array(slope, "slope"), numpy_helper.from_array(base, "base"),
            numpy_helper.from_array(np.zeros((1, 1), np.float32), "zero"),
            numpy_helper.from_array(boxes, "boxes_c"), numpy_helper.from_array(classes, "classes_c"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _dynamic_hw(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with its input's height and width dynamic (served at several sizes)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[1].dim_param, dims[2].dim_param = "height", "width"
    return m


SIZES = [(16, 16), (32, 32)]  # the multi-size classifier's
DET_SIZES = [(64, 64), (96, 96)]  # the multi-size letterbox detector's


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("predpath")
    reg = Registry(root / "registry")
    models = (("cls", _classifier()), ("det", _detector()), ("cls-ms", _dynamic_hw(_classifier())),
              ("det-ms", _dynamic_hw(_detector())))
    for name, model in models:
        (root / name).mkdir()
        onnx.save(model, root / name / "model.onnx")
    reg.register(ModelCard(name="colour", labels=LABELS, input_size=(SIZE, SIZE)), {"onnx": root / "cls/model.onnx"})
    reg.register(ModelCard(name="det", task=Task.DETECTION, labels=DET_LABELS, input_size=(DET_SIZE, DET_SIZE),
                           resize=ResizeMode.LETTERBOX), {"onnx": root / "det/model.onnx"})
    reg.register(ModelCard(name="colour-ms", labels=LABELS, input_size=SIZES[0], input_sizes=SIZES),
                 {"onnx": root / "cls-ms/model.onnx"})
    reg.register(ModelCard(name="det-ms", task=Task.DETECTION, labels=DET_LABELS, input_size=DET_SIZES[0],
                           input_sizes=DET_SIZES, resize=ResizeMode.LETTERBOX), {"onnx": root / "det-ms/model.onnx"})
    return reg


def _images() -> list[bytes]:
    rng = np.random.default_rng(3)
    out = []
    for i, (h, w) in enumerate([(16, 16), (40, 24), (30, 90), (64, 64), (17, 33)]):
        img = np.zeros((h, w, 3), np.uint8)
        img[..., i % 3] = 200
        img += rng.integers(0, 40, img.shape, dtype=np.uint8)
        out.append(encode_image(img, "png" if i % 2 else "jpeg"))
    return out


class _Recorder:
    """The telemetry client's interface, keeping what the ingress records."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.samples: list[dict] = []
        self.sent = self.dropped = 0

    def add(self, ev: dict) -> None:
        self.events.append(ev)

    def add_sample(self, s: dict) -> None:
        self.samples.append(s)


@pytest.fixture(scope="module")
def server(registry: Registry, tmp_path_factory: pytest.TempPathFactory):
    """The ingress's real FastAPI app with the models in this process (no Ray cluster)."""
    from starlette.testclient import TestClient

    from serve_apps.api import build_api
    from serve_apps.config import AppConfig, IngressConfig, ReplicaConfig, SamplingConfig
    from serve_apps.ingress import Actors, _LocalRunner
    from serve_apps.pipeline import PredictionService

    home = tmp_path_factory.mktemp("serverhome")
    cfg = AppConfig(home=str(home), default_model="colour",
                    replica=ReplicaConfig(ort_threads=1), ingress=IngressConfig(inference_in="ingress"),
                    sampling=SamplingConfig(enabled=False))
    runner = _LocalRunner(registry, cfg)  # the registry of the fixture, not one under home
    rec = _Recorder()
    svc = PredictionService(cfg, registry, runner, telemetry=rec, max_concurrent=1)
    with TestClient(build_api(svc, Actors(None, None), runner.stats)) as client:
        client.service = svc  # type: ignore[attr-defined]  # its batcher's counters
        yield client, rec


def _edge(registry: Registry, ref: str, data: bytes, top_k: int, size: str | None = None):
    from edge_agent.predict import predict_bytes
    from visionfleet.inference import load_model_dir

    name, _, v = ref.partition(":")
    return predict_bytes(load_model_dir(registry.local_dir(name, int(v))), data, top_k, size=size)


def _offline(registry: Registry, ref: str, images: list[bytes], top_k: int, size: str | None = None) -> list[dict]:
    from visionfleet.inference import load_model_dir
    from visionfleet.offline import predict_preprocessed, preprocess_encoded

    name, _, v = ref.partition(":")
    model = load_model_dir(registry.local_dir(name, int(v)))
    pre = preprocess_encoded(images, model.card, max_pixels=10_000_000, size=size)
    return predict_preprocessed(model.card, model.run, pre, top_k=top_k)


_TELEMETRY = ("label", "class_id", "confidence", "margin", "entropy", "detections", "width", "height",
              "input_size", "brightness", "contrast", "blur")


@pytest.mark.parametrize("ref", ["colour:1", "det:1"])
def test_server_edge_and_offline_give_identical_predictions(server, registry: Registry, ref: str) -> None:
    client, rec = server
    images = _images()
    top_k = 2
    rows = _offline(registry, ref, images, top_k)
    batch = client.post(f"/v1/predict/batch?model={ref}&top_k={top_k}",
                        json={"images": [base64.b64encode(b).decode() for b in images]}).json()["results"]
    for i, data in enumerate(images):
        rec.events.clear()
        r = client.post(f"/v1/predict?model={ref}&top_k={top_k}", content=data,
                        headers={"Content-Type": "application/octet-stream", "X-Request-Id": f"r{i}"})
        assert r.status_code == 200, r.text
        served = {k: v for k, v in r.json().items() if k not in ("request_id", "model", "version", "variant", "latency_ms")}
        edge = _edge(registry, ref, data, top_k)
        assert served == edge.result == {k: v for k, v in batch[i].items() if k != "index"}
        (ev,) = [e for e in rec.events if e["request_id"] == f"r{i}"]
        for key in _TELEMETRY:  # the server records exactly what the device records
            assert ev.get(key) == pytest.approx(edge.fields.get(key)), key
        row = rows[i]
        assert (row["label"], row["class_id"]) == (edge.prediction.label, edge.prediction.class_id)
        assert row["score"] == pytest.approx(served["score"]) and row["margin"] == pytest.approx(ev["margin"])
        assert (row["width"], row["height"], row["input_size"]) == (ev["width"], ev["height"], ev["input_size"])
        if ref.startswith("det"):
            assert ev["margin"] is not None and ev["detections"] == served["count"] == row["count"]
            assert [d["box"] for d in row["detections"]] == [d["box"] for d in served["detections"]]
        else:
            assert [(p["label"], p["prob"]) for p in row["probs"]] == list(served["probs"].items())
            assert row["entropy"] == pytest.approx(ev["entropy"])


def test_detection_boxes_come_back_in_original_pixels(server) -> None:
    """A 128x64 image is letterboxed to 64x64 (scale 0.5, 16 px bars): x / 0.5, (y - 16) / 0.5, clipped."""
    client, _ = server
    data = encode_image(np.full((64, 128, 3), 100, np.uint8), "png")
    doc = client.post("/v1/predict?model=det:1", content=data, headers={"Content-Type": "image/png"}).json()
    assert [d["label"] for d in doc["detections"]] == ["car", "person", "dog"] and doc["count"] == 3
    np.testing.assert_allclose([d["box"] for d in doc["detections"]],
                               [[16, 0, 48, 16], [60, 0, 100, 48], [4, 48, 40, 64]], atol=1e-3)


def test_the_v2_route_and_the_stream_use_the_same_path(server, registry: Registry) -> None:
    from visionfleet.imaging import decode_image

    client, _ = server
    images = _images()
    r = client.post("/v2/models/colour/versions/1/infer", json={"inputs": [
        {"name": "images", "shape": [len(images)], "datatype": "BYTES",
         "data": [base64.b64encode(b).decode() for b in images]}]})
    assert r.status_code == 200, r.text
    probs = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(len(images), -1)
    pixels = decode_image(images[1])  # the same picture as UINT8 pixels: resized by the server's code
    r = client.post("/v2/models/colour/versions/1/infer", json={"inputs": [
        {"name": "images", "shape": [1, *pixels.shape], "datatype": "UINT8", "data": pixels.reshape(-1).tolist()}]})
    assert r.status_code == 200, r.text
    from_pixels = np.array(r.json()["outputs"][0]["data"], np.float32)
    with client.websocket_connect("/v1/stream?model=colour:1&top_k=2") as ws:
        assert json.loads(ws.receive_text())["type"] == "ready"
        for i, data in enumerate(images):
            edge = _edge(registry, "colour:1", data, 2)
            assert dict(zip(LABELS, probs[i].tolist()))[edge.prediction.label] == pytest.approx(edge.prediction.score)
            ws.send_bytes(data)
            msg = json.loads(ws.receive_text())
            assert {k: msg[k] for k in ("label", "class_id", "score", "probs", "size")} == edge.result
        ws.send_text(json.dumps({"type": "close"}))
        assert json.loads(ws.receive_text())["type"] == "summary"
    np.testing.assert_allclose(from_pixels, probs[1], atol=1e-6)


# --------------------------------------------------------------------------- several input sizes
_KEYS = ("request_id", "model", "version", "variant", "latency_ms")


def _served(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k not in _KEYS}


@pytest.mark.parametrize("ref,size", [("colour-ms:1", "16x16"), ("colour-ms:1", "32"), ("det-ms:1", "64x64"),
                                      ("det-ms:1", "96x96")])
def test_a_request_at_each_listed_size_gives_one_answer_everywhere(server, registry: Registry, ref: str,
                                                                   size: str) -> None:
    """?size=, the JSON and form fields, the batch route, the edge agent and offline inference agree at each size."""
    client, rec = server
    images = _images()
    want = size if "x" in size else f"{size}x{size}"
    rows = _offline(registry, ref, images, 2, size=size)
    batch = client.post(f"/v1/predict/batch?model={ref}&top_k=2",
                        json={"images": [base64.b64encode(b).decode() for b in images], "size": size}).json()
    for i, data in enumerate(images):
        rec.events.clear()
        r = client.post(f"/v1/predict?model={ref}&top_k=2&size={size}", content=data,
                        headers={"Content-Type": "image/png", "X-Request-Id": f"s{i}"})
        assert r.status_code == 200, r.text
        served = _served(r.json())
        assert served["size"] == want
        edge = _edge(registry, ref, data, 2, size=size)
        assert served == edge.result == {k: v for k, v in batch["results"][i].items() if k != "index"}
        as_json = client.post(f"/v1/predict?model={ref}&top_k=2",
                              json={"image": base64.b64encode(data).decode(), "size": size})
        as_form = client.post(f"/v1/predict?model={ref}&top_k=2", files={"file": ("x.png", data)},
                              data={"size": size})
        assert _served(as_json.json()) == _served(as_form.json()) == served
        (ev,) = [e for e in rec.events if e["request_id"] == f"s{i}"]
        assert ev["input_size"] == edge.fields["input_size"] == rows[i]["input_size"] == want
        for key in _TELEMETRY:
            assert ev.get(key) == pytest.approx(edge.fields.get(key)), key
        assert (rows[i]["label"], rows[i]["score"]) == (served.get("label", edge.prediction.label), served["score"])


def test_detection_boxes_map_back_from_each_size(server) -> None:
    """A 128x128 image at 64x64 (scale 0.5) and at 96x96 (scale 0.75): the fixed model-pixel boxes / scale."""
    client, _ = server
    data = encode_image(np.full((128, 128, 3), 100, np.uint8), "png")
    boxes = np.array([[8, 8, 24, 24], [30, 10, 50, 40], [2, 40, 20, 60]], np.float64)
    for size, scale in (("64x64", 0.5), ("96x96", 0.75)):
        doc = client.post(f"/v1/predict?model=det-ms:1&size={size}", content=data,
                          headers={"Content-Type": "image/png"}).json()
        assert doc["size"] == size and [d["label"] for d in doc["detections"]] == ["car", "person", "dog"]
        np.testing.assert_allclose([d["box"] for d in doc["detections"]], boxes / scale, atol=1e-3)


def test_without_a_size_each_image_goes_to_the_nearest_listed_size(server, registry: Registry) -> None:
    """Nearest = pixel count closest as a ratio: 20x20 (400 px) -> 16x16, 30x30 (900 px) -> 32x32.

    Images of different sizes in one batch request never share a tensor: two model calls.
    """
    client, rec = server
    small = encode_image(np.full((20, 20, 3), (200, 30, 30), np.uint8), "png")
    large = encode_image(np.full((30, 30, 3), (30, 200, 30), np.uint8), "png")
    for data, want in ((small, "16x16"), (large, "32x32")):
        doc = client.post("/v1/predict?model=colour-ms:1", content=data, headers={"Content-Type": "image/png"}).json()
        assert doc["size"] == want and _served(doc) == _edge(registry, "colour-ms:1", data, 5).result
    batcher = client.service.batcher  # type: ignore[attr-defined]
    calls = batcher.calls
    doc = client.post("/v1/predict/batch?model=colour-ms:1",
                      json={"images": [base64.b64encode(b).decode() for b in (small, large, small)]}).json()
    assert [r["size"] for r in doc["results"]] == ["16x16", "32x32", "16x16"]
    assert batcher.calls - calls == 2  # one call per size
    rows = _offline(registry, "colour-ms:1", [small, large, small], 5)
    assert [r["input_size"] for r in rows] == ["16x16", "32x32", "16x16"]
    assert [r["label"] for r in rows] == [r["label"] for r in doc["results"]]
    # a model with one size serves everything at it
    assert client.post("/v1/predict?model=colour:1", content=large,
                       headers={"Content-Type": "image/png"}).json()["size"] == "16x16"


@pytest.mark.parametrize("ref,size,message", [
    ("colour-ms:1", "500x500", "Got size 500x500; expected one of 16x16, 32x32"),
    ("det-ms:1", "64x96", "Got size 64x96; expected one of 64x64, 96x96"),
    ("colour:1", "32", "Got size 32x32; expected one of 16x16 (this model's input size is fixed)"),
    ("colour-ms:1", "big", "Got 'big' for size; expected HEIGHTxWIDTH such as 320x320 (or one number)"),
])
def test_an_unlisted_size_is_a_400_on_every_route(server, ref: str, size: str, message: str) -> None:
    client, _ = server
    data = _images()[0]
    b64 = base64.b64encode(data).decode()
    answers = [
        client.post(f"/v1/predict?model={ref}&size={size}", content=data, headers={"Content-Type": "image/png"}),
        client.post(f"/v1/predict?model={ref}", json={"image": b64, "size": size}),
        client.post(f"/v1/predict/batch?model={ref}", json={"images": [b64, b64], "size": size}),
    ]
    name, _, version = ref.partition(":")
    answers.append(client.post(f"/v2/models/{name}/versions/{version}/infer", json={
        "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [b64]}],
        "parameters": {"size": size}}))
    for r in answers:
        assert (r.status_code, r.json()) == (400, {"error": message})
    with client.websocket_connect(f"/v1/stream?model={ref}&size={size}") as ws:
        assert json.loads(ws.receive_text()) == {"type": "error", "status": 400, "error": message}


def test_v2_and_the_stream_take_a_size(server, registry: Registry) -> None:
    client, _ = server
    images = _images()
    b64 = [base64.b64encode(b).decode() for b in images]
    for size in ("16x16", "32x32"):
        r = client.post("/v2/models/colour-ms/versions/1/infer", json={
            "inputs": [{"name": "images", "shape": [len(images)], "datatype": "BYTES", "data": b64}],
            "parameters": {"size": size}})
        assert r.status_code == 200, r.text
        assert r.json()["parameters"]["sizes"] == [size] * len(images)
        probs = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(len(images), -1)
        for i, data in enumerate(images):
            edge = _edge(registry, "colour-ms:1", data, 3, size=size)
            assert dict(zip(LABELS, probs[i].tolist())) == pytest.approx(edge.result["probs"])
    meta = client.get("/v2/models/colour-ms/versions/1").json()
    assert meta["parameters"]["input_sizes"] == ["16x16", "32x32"]
    with client.websocket_connect("/v1/stream?model=colour-ms:1&size=32x32&top_k=2") as ws:
        ready = json.loads(ws.receive_text())
        assert (ready["sizes"], ready["size"]) == (["16x16", "32x32"], "32x32")
        for data in images[:2]:
            ws.send_bytes(data)
            msg = json.loads(ws.receive_text())
            assert {k: msg[k] for k in ("label", "class_id", "score", "probs", "size")} == _edge(
                registry, "colour-ms:1", data, 2, size="32x32").result
        ws.send_text(json.dumps({"type": "close"}))
        assert json.loads(ws.receive_text())["type"] == "summary"
