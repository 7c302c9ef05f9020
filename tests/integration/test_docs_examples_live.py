"""Docs examples that need a running server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from visionfleet.datasets.synth import render_sample
from visionfleet.imaging import encode_image

REPO = Path(__file__).resolve().parents[2]


def test_predict_http_example(serve_url: str, tmp_path: Path) -> None:
    img = tmp_path / "x.jpg"
    img.write_bytes(encode_image(render_sample(0, 0, 64)[0], "jpeg"))
    r = subprocess.run(
        [sys.executable, str(REPO / "docs/examples/predict_http.py"), str(img), serve_url],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "from tiny:1" in r.stdout and len(r.stdout.splitlines()) == 4


def test_v2_client_example(serve_url: str) -> None:
    from urllib.parse import urlparse

    r = subprocess.run(
        [sys.executable, str(REPO / "docs/examples/v2_client.py"), urlparse(serve_url).netloc, "tiny"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "live: True ready: True" in r.stdout and "probs: (2, 10)" in r.stdout


def test_stream_client_example(serve_url: str) -> None:
    r = subprocess.run(
        [sys.executable, str(REPO / "docs/examples/stream_client.py"), serve_url.replace("http://", "ws://"), "tiny"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert [int(x.split()[0]) for x in lines[:10]] == list(range(10)) and lines[-1].startswith("summary: 10 frames, 10 ok")
