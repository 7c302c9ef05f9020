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
