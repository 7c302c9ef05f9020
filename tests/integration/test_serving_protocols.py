"""Open Inference Protocol v2 through the real tritonclient, and the WebSocket stream."""

from __future__ import annotations

import json
import struct
import time
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from visionfleet.datasets.synth import render_sample
from visionfleet.imaging import encode_image, load_for_model
from visionfleet.inference import RuntimeOptions, load_model_dir
from visionfleet.registry import Registry


@pytest.fixture(scope="module")
def triton(serve_url):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(url=urlparse(serve_url).netloc, connection_timeout=30, network_timeout=60)


@pytest.fixture(scope="module")
def local(trained, settings):
    return load_model_dir(Registry(settings.registry_dir).local_dir("tiny", 1), RuntimeOptions(threads=1))


def _images(n: int, size: int = 32) -> np.ndarray:
    return np.stack([render_sample(31, i, size)[0] for i in range(n)])


def test_metadata_and_readiness_through_tritonclient(triton, local) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "visionfleet" and "binary_tensor_data" in meta["extensions"]
    assert triton.is_model_ready("tiny") and triton.is_model_ready("tiny", "1")
    assert not triton.is_model_ready("nope")
    md = triton.get_model_metadata("tiny")
    assert md["inputs"][0] == {"name": "images", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}
    assert md["outputs"][0] == {"name": "probs", "datatype": "FP32", "shape": [-1, len(local.card.labels)]}
    assert md["versions"] == ["1"] and md["parameters"]["version"] == "1"
    assert triton.get_model_metadata("tiny", "1")["name"] == "tiny"


@pytest.mark.parametrize("binary", [True, False])
def test_infer_uint8_binary_and_json_match_onnx_runtime(triton, local, binary: bool) -> None:
    import tritonclient.http as httpclient

    x = _images(5)
    inp = httpclient.InferInput("images", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("probs", binary_data=binary)
    res = triton.infer("tiny", [inp], outputs=[out], request_id="req-42")
    probs = res.as_numpy("probs")
    assert probs.shape == (5, len(local.card.labels)) and probs.dtype == np.float32
    assert np.allclose(probs, local.run(x)[0], atol=1e-5)
    assert res.get_response()["id"] == "req-42" and res.get_response()["model_version"] == "1"


def test_infer_bytes_of_encoded_images_and_any_size(triton, local) -> None:
    import tritonclient.http as httpclient

    big = _images(3, size=80)  # not the model size: resized with the model's own mode
    encoded = np.array([encode_image(im, "png") for im in big], dtype=np.object_)
    inp = httpclient.InferInput("images", [3], "BYTES")
    inp.set_data_from_numpy(encoded, binary_data=True)
    probs = triton.infer("tiny", [inp]).as_numpy("probs")
    expected = np.stack([local.run(load_for_model(e, (32, 32), "stretch")[0][None])[0][0] for e in encoded])
    assert np.allclose(probs, expected, atol=1e-5)
    inp2 = httpclient.InferInput("images", list(big.shape), "UINT8")
    inp2.set_data_from_numpy(big)
    probs2 = triton.infer("tiny", [inp2], model_version="1").as_numpy("probs")
    expected2 = np.stack([local.run(load_for_model(encode_image(im, "png"), (32, 32), "stretch")[0][None])[0][0] for im in big])
    assert np.allclose(probs2, expected2, atol=1e-5)


def test_error_case_through_tritonclient(triton) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    x = np.zeros((2, 32, 32, 3), np.float32)
    inp = httpclient.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="UINT8"):
        triton.infer("tiny", [inp])
    ok = httpclient.InferInput("images", [1, 32, 32, 3], "UINT8")
    ok.set_data_from_numpy(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(InferenceServerException, match="unknown model"):
        triton.infer("nope", [ok])


def _binary_request(header: dict, blob: bytes) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


BAD_V2 = [
    ("not json", b"{oops", {"Content-Type": "application/json"}, 400),
    ("no inputs", json.dumps({"inputs": []}).encode(), {}, 400),
    ("wrong input name", json.dumps({"inputs": [{"name": "x", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [0] * 3072}]}).encode(), {}, 400),
    ("bad datatype", json.dumps({"inputs": [{"name": "images", "shape": [1], "datatype": "FLOAT99", "data": [0]}]}).encode(), {}, 400),
    ("shape/data mismatch", json.dumps({"inputs": [{"name": "images", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [0, 1]}]}).encode(), {}, 400),
    ("wrong rank", json.dumps({"inputs": [{"name": "images", "shape": [32, 32], "datatype": "UINT8", "data": [0] * 1024}]}).encode(), {}, 400),
    ("negative shape", json.dumps({"inputs": [{"name": "images", "shape": [-1, 32, 32, 3], "datatype": "UINT8", "data": []}]}).encode(), {}, 400),
    ("values out of range", json.dumps({"inputs": [{"name": "images", "shape": [1, 1, 1, 3], "datatype": "UINT8", "data": [1, 2, "x"]}]}).encode(), {}, 400),
    ("unknown output", json.dumps({"inputs": [{"name": "images", "shape": [1, 1, 1, 3], "datatype": "UINT8", "data": [1, 2, 3]}], "outputs": [{"name": "logits"}]}).encode(), {}, 400),
]


@pytest.mark.parametrize("name,body,headers,status", BAD_V2, ids=[b[0] for b in BAD_V2])
def test_bad_v2_requests(serve_url, name, body, headers, status) -> None:
    with httpx.Client(base_url=serve_url, timeout=30) as c:
        r = c.post("/v2/models/tiny/infer", content=body, headers=headers or {"Content-Type": "application/json"})
    assert r.status_code == status, (name, r.text)
    assert set(r.json()) == {"error"}


def test_inconsistent_binary_sizes(serve_url) -> None:
    blob = np.zeros((1, 32, 32, 3), np.uint8).tobytes()
    header = {"inputs": [{"name": "images", "shape": [1, 32, 32, 3], "datatype": "UINT8", "parameters": {"binary_data_size": len(blob) + 10}}]}
    with httpx.Client(base_url=serve_url, timeout=30) as c:
        body, h = _binary_request(header, blob)
        assert c.post("/v2/models/tiny/infer", content=body, headers=h).status_code == 400
        header["inputs"][0]["parameters"]["binary_data_size"] = len(blob) - 3
        body, h = _binary_request(header, blob)
        assert c.post("/v2/models/tiny/infer", content=body, headers=h).status_code == 400
        h["Inference-Header-Content-Length"] = str(10 ** 9)
        assert c.post("/v2/models/tiny/infer", content=body, headers=h).status_code == 400
        bytes_header = {"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 8}}]}
        body, h = _binary_request(bytes_header, struct.pack("<I", 100) + b"abcd")
        r = c.post("/v2/models/tiny/infer", content=body, headers=h)
        assert r.status_code == 400 and "BYTES" in r.json()["error"]
        garbage = b"not an image"
        bytes_header["inputs"][0]["shape"] = [1]
        bytes_header["inputs"][0]["parameters"]["binary_data_size"] = 4 + len(garbage)
        body, h = _binary_request(bytes_header, struct.pack("<I", len(garbage)) + garbage)
        r = c.post("/v2/models/tiny/infer", content=body, headers=h)
        assert r.status_code == 415 and "images[0]" in r.json()["error"]
        assert c.get("/v2/models/nope").status_code == 404
        assert c.get("/v2/models/tiny/versions/9/ready").status_code == 404


# ----------------------------------------------------------------------------- WebSocket


def _ws_url(serve_url: str, query: str = "") -> str:
    return serve_url.replace("http://", "ws://") + "/v1/stream" + query


def _windowed(ws, frames: list[bytes], window: int) -> list[dict]:
    """Send frames keeping at most `window` unanswered, as the protocol asks."""
    got, sent = [], 0
    while len(got) < len(frames):
        while sent < len(frames) and sent - len(got) < window:
            ws.send(frames[sent])
            sent += 1
        got.append(json.loads(ws.recv(timeout=60)))
    return got


def test_stream_answers_in_order_with_a_summary(serve_url, local) -> None:
    from websockets.sync.client import connect

    frames = [encode_image(render_sample(41, i, 48)[0], "jpeg") for i in range(20)]
    frames[7] = frames[7][: len(frames[7]) // 2]  # a truncated frame: its own error, the stream goes on
    with connect(_ws_url(serve_url, "?model=tiny&top_k=2&max_in_flight=4"), max_size=2**22) as ws:
        hello = json.loads(ws.recv(timeout=30))
        assert hello == {"type": "ready", "model": "tiny", "version": 1, "variant": "default", "max_in_flight": 4,
                         "sizes": ["32x32"], "size": None}
        got = _windowed(ws, frames, 4)
        ws.send(json.dumps({"type": "close"}))
        summary = json.loads(ws.recv(timeout=60))
    assert [g["frame"] for g in got] == list(range(20))
    assert got[7]["type"] == "error" and got[7]["status"] == 400
    for i, g in enumerate(got):
        if i == 7:
            continue
        img, _ = load_for_model(frames[i], (32, 32), "stretch")
        assert g["label"] == local.card.labels[int(local.run(img[None])[0][0].argmax())] and len(g["probs"]) == 2
    assert summary["type"] == "summary" and summary["frames"] == 20 and summary["ok"] == 19 and summary["errors"] == 1
    assert summary["max_in_flight_observed"] <= 4


def test_stream_flow_control_closes_a_flooding_client(serve_url) -> None:
    """A client that ignores the window is cut off (1008) before it can pile up frames;
    the server stays healthy and serves the next stream normally."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    import threading

    frame = encode_image(render_sample(3, 3, 48)[0], "png")
    closed = None
    messages: list[dict] = []
    with connect(_ws_url(serve_url, "?model=tiny&max_in_flight=2"), max_size=2**22) as ws:
        json.loads(ws.recv(timeout=30))  # ready

        def flood() -> None:
            try:
                for _ in range(500):
                    ws.send(frame)
            except ConnectionClosed:
                pass

        sender = threading.Thread(target=flood)
        sender.start()
        try:
            while True:
                messages.append(json.loads(ws.recv(timeout=60)))
        except ConnectionClosed as exc:
            closed = exc
        sender.join()
    assert closed is not None and closed.rcvd is not None and closed.rcvd.code == 1008
    errors = [m for m in messages if m["type"] == "error" and "flow control" in m.get("error", "")]
    assert errors and errors[0]["status"] == 429
    assert len([m for m in messages if m["type"] == "prediction"]) <= 4
    with connect(_ws_url(serve_url, "?model=tiny&max_in_flight=2")) as ws:
        json.loads(ws.recv(timeout=30))
        assert [g["type"] for g in _windowed(ws, [frame] * 6, 2)] == ["prediction"] * 6
    with httpx.Client(base_url=serve_url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200


def test_stream_errors(serve_url) -> None:
    from websockets.sync.client import connect

    with connect(_ws_url(serve_url, "?model=nope")) as ws:
        msg = json.loads(ws.recv(timeout=30))
    assert msg["type"] == "error" and msg["status"] == 404
    with connect(_ws_url(serve_url, "?model=tiny&max_in_flight=1000")) as ws:
        assert json.loads(ws.recv(timeout=30))["status"] == 400
    with connect(_ws_url(serve_url, "?model=tiny")) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        ws.send("hello")
        assert json.loads(ws.recv(timeout=30))["status"] == 400
        ws.send(json.dumps({"type": "close"}))
        assert json.loads(ws.recv(timeout=30))["type"] == "summary"
