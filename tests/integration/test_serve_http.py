"""The Serve app over real HTTP: every input style, the batch route, and every bad input."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import httpx
import numpy as np
import pytest

from visionfleet.client import prepare
from visionfleet.datasets.synth import render_sample
from visionfleet.datasets.variants import VARIANTS, encode_variant
from visionfleet.imaging import encode_image, load_for_model
from visionfleet.inference import RuntimeOptions, load_model_dir
from visionfleet.registry import Registry


@pytest.fixture(scope="module")
def client(serve_url):
    with httpx.Client(base_url=serve_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def local_model(trained, settings):
    return load_model_dir(Registry(settings.registry_dir).local_dir("tiny", trained.card.version), RuntimeOptions(threads=1))


def _expected(local_model, data: bytes) -> np.ndarray:
    img, _ = load_for_model(data, local_model.card.input_size, local_model.card.resize)
    return local_model.run(img[None])[0][0]


@pytest.mark.parametrize("style", ["raw", "multipart", "json"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_style_and_format_predicts_what_onnx_runtime_predicts(client, local_model, style, variant) -> None:
    img, _ = render_sample(11, VARIANTS.index(variant), 80)
    data, ctype = encode_variant(img, variant)
    req = prepare(data, ctype, style)
    r = client.post(req.path + "?top_k=10", content=req.body, headers=req.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"request_id", "model", "version", "variant", "latency_ms", "label", "score", "probs"}
    assert body["model"] == "tiny" and body["version"] == 1 and body["variant"] == "default"
    expected = _expected(local_model, data)
    labels = local_model.card.labels
    assert body["label"] == labels[int(expected.argmax())]
    got = np.array([body["probs"][l] for l in labels])
    assert np.allclose(got, expected, atol=1e-5)


def test_batch_route_keeps_errors_per_item(client, local_model) -> None:
    good = [encode_image(render_sample(12, i, 40)[0], "png") for i in range(3)]
    images = [good[0], b"\x89PNG\r\n\x1a\nbroken", good[1], b"not an image", good[2]]
    body = json.dumps({"images": [base64.b64encode(b).decode() for b in images]})
    r = client.post("/v1/predict/batch", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["index"] for x in results] == [0, 1, 2, 3, 4]
    assert results[1]["status"] == 400 and "error" in results[1]
    assert results[3]["status"] == 415 and "error" in results[3]
    for i, data in zip((0, 2, 4), good):
        assert results[i]["label"] == local_model.card.labels[int(_expected(local_model, data).argmax())]
    # multipart with several files
    files = [("file", (f"{i}.png", g, "image/png")) for i, g in enumerate(good)]
    r = client.post("/v1/predict/batch", files=files)
    assert r.status_code == 200 and len(r.json()["results"]) == 3


def test_model_and_version_selection(client) -> None:
    data = encode_image(render_sample(1, 1, 32)[0], "png")
    h = {"Content-Type": "image/png"}
    assert client.post("/v1/predict?model=tiny&version=1", content=data, headers=h).json()["version"] == 1
    assert client.post("/v1/predict?model=tiny:1", content=data, headers=h).status_code == 200
    assert client.post("/v1/predict?model=tiny@production", content=data, headers=h).status_code == 200
    r = client.post("/v1/predict", content=data, headers={**h, "X-Request-Id": "my-id-1"})
    assert r.json()["request_id"] == "my-id-1"


def test_models_routes(client) -> None:
    doc = client.get("/v1/models").json()
    assert any(m["name"] == "tiny" and m["aliases"]["production"] == 1 for m in doc["models"])
    card = client.get("/v1/models/tiny").json()
    assert card["version"] == 1 and card["card"]["task"] == "classification"
    assert client.get("/v1/models/nope").status_code == 404


def _bomb() -> bytes:
    w = h = 5000  # 25 MP > the app's 4 MP limit
    row = b"\x00" * (1 + (w + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


GOOD = encode_image(render_sample(2, 2, 32)[0], "jpeg")

BAD_REQUESTS = [
    ("empty body", "/v1/predict", b"", {"Content-Type": "image/png"}, 400),
    ("garbage bytes", "/v1/predict", b"hello world", {"Content-Type": "image/png"}, 415),
    ("gif", "/v1/predict", b"GIF89a" + b"\x00" * 64, {"Content-Type": "image/gif"}, 415),
    ("truncated jpeg", "/v1/predict", GOOD[: len(GOOD) // 2], {"Content-Type": "image/jpeg"}, 400),
    ("corrupt png", "/v1/predict", b"\x89PNG\r\n\x1a\n" + b"\x13" * 200, {"Content-Type": "image/png"}, 400),
    ("decompression bomb", "/v1/predict", _bomb(), {"Content-Type": "image/png"}, 413),
    ("oversized body", "/v1/predict", b"\xff\xd8\xff" + b"\x00" * (2 * 1024 * 1024 + 10), {"Content-Type": "image/jpeg"}, 413),
    ("wrong content type", "/v1/predict", GOOD, {"Content-Type": "text/plain"}, 415),
    ("no content type", "/v1/predict", GOOD, {"Content-Type": ""}, 415),
    ("invalid json", "/v1/predict", b"{oops", {"Content-Type": "application/json"}, 400),
    ("json without image", "/v1/predict", b"{}", {"Content-Type": "application/json"}, 400),
    ("invalid base64", "/v1/predict", b'{"image": "%%%"}', {"Content-Type": "application/json"}, 400),
    ("base64 of garbage", "/v1/predict", b'{"image": "aGVsbG8="}', {"Content-Type": "application/json"}, 415),
    ("multipart without file", "/v1/predict", b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--b--\r\n", {"Content-Type": "multipart/form-data; boundary=b"}, 400),
    ("unknown model", "/v1/predict?model=nope", GOOD, {"Content-Type": "image/jpeg"}, 404),
    ("unknown version", "/v1/predict?model=tiny&version=99", GOOD, {"Content-Type": "image/jpeg"}, 404),
    ("unknown alias", "/v1/predict?model=tiny@nope", GOOD, {"Content-Type": "image/jpeg"}, 404),
    ("malformed model ref", "/v1/predict?model=../../etc", GOOD, {"Content-Type": "image/jpeg"}, 400),
    ("bad top_k", "/v1/predict?top_k=abc", GOOD, {"Content-Type": "image/jpeg"}, 400),
    ("bad request id", "/v1/predict", GOOD, {"Content-Type": "image/jpeg", "X-Request-Id": "bad id"}, 400),
    ("batch of raw bytes", "/v1/predict/batch", GOOD, {"Content-Type": "image/jpeg"}, 415),
    ("batch too large", "/v1/predict/batch", json.dumps({"images": ["aGk="] * 65}).encode(), {"Content-Type": "application/json"}, 413),
]


@pytest.mark.parametrize("name,path,body,headers,status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_its_4xx_with_an_error_body(client, name, path, body, headers, status) -> None:
    r = client.post(path, content=body, headers=headers)
    assert r.status_code == status, (name, r.status_code, r.text)
    doc = r.json()
    assert set(doc) == {"error"} and isinstance(doc["error"], str) and doc["error"]


def test_unknown_route_and_method(client) -> None:
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = client.get("/v1/predict")
    assert r.status_code == 405 and "error" in r.json()


def test_healthy_after_bad_input(client) -> None:
    assert client.get("/healthz").status_code == 200
    r = client.post("/v1/predict", content=GOOD, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200
