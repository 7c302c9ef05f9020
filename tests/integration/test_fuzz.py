"""Hostile input across every route: at least 1,000 requests, 0 responses with status
5xx, every error as ``{"error": ...}``, the server healthy afterwards and its memory
bounded (RSS after <= 1.2 x before + 50 MB)."""

from __future__ import annotations

import base64
import json
import random
import socket
import struct
import time
import zlib
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from tests.integration.conftest import ADMIN_TOKEN
from visionfleet.datasets.synth import render_sample
from visionfleet.imaging import encode_image

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FORMATS = ("jpeg", "png", "webp", "bmp", "tiff")


def _serve_rss() -> int:
    import psutil

    total = 0
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if "ServeReplica:visionfleet" in cmd or "ProxyActor" in cmd or "TelemetrySink" in cmd or "CoordinatorActor" in cmd:
            total += p.info["memory_info"].rss
    return total


def _png_header(w: int, h: int, depth: int = 8, color: int = 2) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _bmp_header(w: int, h: int) -> bytes:
    return b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 0, 0, 0, 0)


def _bomb(w: int = 5000, h: int = 5000) -> bytes:
    row = b"\x00" * (1 + (w + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _hostile_images(rng: random.Random) -> list[bytes]:
    good = {f: encode_image(render_sample(5, i, 48)[0], f) for i, f in enumerate(FORMATS)}
    out: list[bytes] = [b"", b"\x00", b"GIF89a" + b"\x00" * 40, b"%PDF-1.4", b"<svg></svg>", bytes(range(256)) * 8]
    for f, data in good.items():
        for _ in range(8):
            out.append(data[: rng.randrange(1, len(data))])  # truncated anywhere
        for _ in range(6):
            b = bytearray(data)
            for _ in range(rng.randrange(1, 20)):
                b[rng.randrange(0, len(b))] = rng.randrange(256)  # flipped bytes
            out.append(bytes(b))
        out.append(data[:16] + bytes(rng.randrange(256) for _ in range(200)))  # valid magic, garbage after
    out += [_png_header(100_000, 100_000), _png_header(1, 1, depth=3), _png_header(0, 0), _bmp_header(60_000, 60_000),
            _bmp_header(-5, 10), b"II*\x00" + struct.pack("<I", 8) + b"\xff" * 64, _bomb()]
    return out


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _requests(rng: random.Random) -> list[tuple[str, str, bytes | None, dict]]:
    """(method, path, body, headers) covering every route."""
    imgs = _hostile_images(rng)
    good = encode_image(render_sample(9, 9, 32)[0], "png")
    reqs: list[tuple[str, str, bytes | None, dict]] = []
    ctypes = ["image/png", "image/jpeg", "application/octet-stream", "text/plain", "application/xml", "",
              "image/png; charset=utf-8", "multipart/form-data", "application/json", "video/mp4"]
    for img in imgs:
        for style in ("raw", "json", "multipart"):
            if style == "raw":
                reqs.append(("POST", "/v1/predict", img, {"Content-Type": rng.choice(ctypes[:3])}))
            elif style == "json":
                reqs.append(("POST", "/v1/predict", json.dumps({"image": _b64(img)}).encode(), {"Content-Type": "application/json"}))
            else:
                boundary = "fuzzb"
                body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\n").encode() + img + f"\r\n--{boundary}--\r\n".encode()
                reqs.append(("POST", "/v1/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
        reqs.append(("POST", "/v1/predict/batch", json.dumps({"images": [_b64(img), _b64(good)]}).encode(), {"Content-Type": "application/json"}))
    for ct in ctypes:
        reqs.append(("POST", "/v1/predict", good, {"Content-Type": ct} if ct else {}))
    junk_json = [b"{", b"[]", b"null", b"\"x\"", b"{\"image\": 5}", b"{\"image\": \"%%%\"}", b"{\"image\": [1,2]}",
                 b"{\"images\": \"x\"}", b"{\"images\": [1]}", b"{\"image\": \"" + b"A" * 10 + b"\", \"top_k\": \"x\"}",
                 ("{\"image\": \"%s\", \"model\": \"../../etc\"}" % _b64(good)).encode(), b"\xff\xfe\x00junk", b"[" * 5000 + b"]" * 5000]
    for j in junk_json:
        for path in ("/v1/predict", "/v1/predict/batch", "/v1/feedback", "/v1/edge/sync", "/v1/edge/rollouts", "/v1/experiments"):
            hdr = {"Content-Type": "application/json", **(AUTH if "experiments" in path or "rollouts" in path else {})}
            reqs.append(("POST", path, j, hdr))
    for q in ("top_k=-1", "top_k=1000000000", "top_k=abc", "model=../../etc/passwd", "model=%00", "model=" + "a" * 5000,
              "version=-3", "version=%20", "model=tiny&version=999999999999", "model=tiny:1@x", "model=ünïcødé"):
        reqs.append(("POST", f"/v1/predict?{q}", good, {"Content-Type": "image/png"}))
    # v2
    for shape, dtype, data in (([1, 32, 32, 3], "FP64", [0.0] * 3072), ([1, 32, 32], "UINT8", [0] * 1024), ([0, 32, 32, 3], "UINT8", []),
                               ([1, 100000, 100000, 3], "UINT8", [0]), ([1, 2, 2, 3], "UINT8", [256] * 12), ([1, 2, 2, 3], "UINT8", [-1] * 12),
                               ([2], "BYTES", ["%%%", "@@@"]), ([1, 2, 2, 3], "INT64", [10**30] * 12), ("x", "UINT8", [0]), ([1.5], "UINT8", [0])):
        body = json.dumps({"id": "fz", "inputs": [{"name": "images", "shape": shape, "datatype": dtype, "data": data}]}).encode()
        for path in ("/v2/models/tiny/infer", "/v2/models/tiny/versions/1/infer", "/v2/models/nope/infer"):
            reqs.append(("POST", path, body, {"Content-Type": "application/json"}))
    blob = np.zeros((1, 32, 32, 3), np.uint8).tobytes()
    for declared, hlen in ((len(blob) + 1, None), (len(blob) - 1, None), (len(blob), "abc"), (len(blob), "-5"), (len(blob), "999999999"), (-1, None)):
        head = json.dumps({"inputs": [{"name": "images", "shape": [1, 32, 32, 3], "datatype": "UINT8",
                                       "parameters": {"binary_data_size": declared}}]}).encode()
        reqs.append(("POST", "/v2/models/tiny/infer", head + blob,
                     {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": hlen or str(len(head))}))
    # oversized bodies (the test app allows 2 MiB)
    big = b"\xff\xd8\xff" + b"\x00" * (2 * 1024 * 1024 + 100)
    for path in ("/v1/predict", "/v1/predict/batch", "/v2/models/tiny/infer", "/v1/feedback", "/v1/edge/sync"):
        reqs.append(("POST", path, big, {"Content-Type": "application/octet-stream"}))
    # GET routes with hostile paths and params
    for path in ("/v1/models/" + "x" * 3000, "/v1/models/..%2F..%2Fetc", "/v1/models/tiny?version=abc", "/tuf/../../etc/passwd",
                 "/tuf/%2e%2e/%2e%2e/etc/passwd", "/tuf/metadata/.hidden", "/tuf/" + "a/" * 200, "/v2/models/tiny/versions/..%2F1",
                 "/v2/models/%00", "/v1/experiments/none", "/v1/monitor?model=" + "m" * 1000, "/v1/labeling/pending?limit=-1",
                 "/v1/labeling/pending?limit=abc", "/v1/edge/fleet", "/v1/edge/channels", "/nope", "/v1/stats", "/v2", "/healthz"):
        reqs.append(("GET", path, None, AUTH if rng.random() < 0.5 else {}))
    for path in ("/v1/experiments", "/v1/experiments/x/stop", "/v1/experiments/x/weights", "/v1/edge/rollouts"):
        for hdr in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer " + "x" * 4000}):
            reqs.append(("POST", path, b"{}", {"Content-Type": "application/json", **hdr}))
    for method in ("PUT", "DELETE", "PATCH"):
        for path in ("/v1/predict", "/v1/models", "/v2/models/tiny/infer"):
            reqs.append((method, path, b"x", {}))
    return reqs


def _slowloris(host: str, port: int, n: int) -> list[socket.socket]:
    socks = []
    for i in range(n):
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n" + b"\x89PNG" * (i + 1))
        socks.append(s)
    return socks


def test_fuzz_every_route(serve_url: str) -> None:
    from websockets.sync.client import connect

    rng = random.Random(20261126)
    reqs = _requests(rng)
    assert len(reqs) >= 500
    host = urlparse(serve_url)
    with httpx.Client(base_url=serve_url, timeout=60) as warm:
        assert warm.post("/v1/predict", content=encode_image(render_sample(1, 1, 32)[0], "png"),
                         headers={"Content-Type": "image/png"}).status_code == 200
    time.sleep(2)
    rss_before = _serve_rss()
    slow = _slowloris(host.hostname, host.port, 20)  # held open during the whole run
    statuses: dict[int, int] = {}
    bad: list[tuple] = []
    n = 0
    try:
        with httpx.Client(base_url=serve_url, timeout=60) as c:
            for rep in range(2 if len(reqs) < 1000 else 1):
                for method, path, body, headers in reqs:
                    r = c.request(method, path, content=body, headers=headers)
                    n += 1
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if r.status_code >= 500:
                        bad.append((method, path[:80], r.status_code, r.text[:200]))
                    elif r.status_code >= 400:
                        try:
                            doc = r.json()
                        except ValueError:
                            doc = None
                        if not (isinstance(doc, dict) and isinstance(doc.get("error"), str)):
                            bad.append((method, path[:80], r.status_code, "non-JSON error: " + r.text[:120]))
        # WebSocket abuse: junk text, corrupt frames, a frame over the limit
        ws_url = serve_url.replace("http://", "ws://") + "/v1/stream?model=tiny&max_in_flight=4"
        for payload in ("not json", json.dumps({"type": "nope"}), b"\x00" * 10, b"\x89PNG" + b"\x00" * 50, b"\xff" * (3 * 1024 * 1024)):
            with connect(ws_url, max_size=2**23) as ws:
                assert json.loads(ws.recv(timeout=30))["type"] == "ready"
                ws.send(payload)
                msg = json.loads(ws.recv(timeout=60))
                assert msg["type"] == "error" and msg["status"] < 500, msg
                n += 1
        with httpx.Client(base_url=serve_url, timeout=30) as c:  # normal traffic still flows beside slow clients
            for _ in range(10):
                assert c.post("/v1/predict", content=encode_image(render_sample(2, 2, 32)[0], "png"),
                              headers={"Content-Type": "image/png"}).status_code == 200
    finally:
        for s in slow:
            s.close()
    assert n >= 1000, n
    assert not bad, f"{len(bad)} bad responses, e.g. {bad[:8]}; statuses {statuses}"
    with httpx.Client(base_url=serve_url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        assert c.post("/v1/predict", content=encode_image(render_sample(3, 3, 32)[0], "png"), headers={"Content-Type": "image/png"}).status_code == 200
    time.sleep(2)
    rss_after = _serve_rss()
    assert rss_before > 0
    assert rss_after <= 1.2 * rss_before + 50 * 1024 * 1024, (rss_before, rss_after)
    print(f"fuzz: {n} requests, statuses {dict(sorted(statuses.items()))}, serve RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
