"""The installed commands end to end: serve up/status/predict/down, the edge CLI, demo --quick."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from visionfleet.datasets.synth import render_sample
from visionfleet.imaging import encode_image

BIN = Path(sys.executable).parent


def _run(*args: str, home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "VISIONFLEET_HOME": str(home)}
    return subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=timeout)


def test_serve_up_predict_status_down(tmp_path: Path, trained, settings) -> None:
    from cluster.local import free_port

    home = tmp_path / "home"
    shutil.copytree(settings.registry_dir, home / "registry")
    port = free_port()
    image = tmp_path / "x.png"
    image.write_bytes(encode_image(render_sample(9, 9, 64)[0], "png"))
    vf = str(BIN / "visionfleet")
    up = _run(vf, "serve", "up", "--port", str(port), "--model", "tiny", "--ort-threads", "1", "--replica-cpus", "0.25", "--num-cpus", "2", home=home)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        assert f"serving on http://127.0.0.1:{port}" in up.stdout
        pred = _run(vf, "predict", str(image), "--url", f"http://127.0.0.1:{port}", "--json", home=home)
        assert pred.returncode == 0, pred.stderr
        doc = json.loads(pred.stdout)
        assert doc["model"] == "tiny" and doc["version"] == 1 and doc["label"] in trained.card.labels
        local = _run(vf, "predict", str(image), "--local", "--model", "tiny", "--json", home=home)
        assert local.returncode == 0 and json.loads(local.stdout)["label"] == doc["label"]
        bad = _run(vf, "predict", str(image), "--url", f"http://127.0.0.1:{port}", "--model", "nope", home=home)
        assert bad.returncode == 1 and "404" in bad.stderr and "Traceback" not in bad.stderr
        st = _run(vf, "serve", "status", "--json", home=home)
        assert st.returncode == 0, st.stderr
        status = json.loads(st.stdout)
        assert status["head"]["alive"] and status["healthz"]["status"] == 200
        assert status["app"]["visionfleet"]["status"] == "RUNNING"
        # telemetry paused and resumed in place; predictions keep flowing in between
        for state in ("off", "on"):
            t = _run(vf, "serve", "telemetry", state, home=home)
            assert t.returncode == 0 and f"telemetry {state}" in t.stdout, t.stderr
            again = _run(vf, "predict", str(image), "--url", f"http://127.0.0.1:{port}", "--json", home=home)
            assert again.returncode == 0 and json.loads(again.stdout)["model"] == "tiny", again.stderr
        assert _run(vf, "serve", "telemetry", "maybe", home=home).returncode == 2
    finally:
        down = _run(vf, "serve", "down", home=home)
    assert down.returncode == 0, down.stderr
    assert "stopped the local head" in down.stdout
    from cluster.local import read_head

    assert read_head(settings.with_home(home)) is None
    refused = _run(vf, "predict", str(image), "--url", f"http://127.0.0.1:{port}", home=home)
    assert refused.returncode == 1 and "cannot reach" in refused.stderr


def test_edge_cli_predicts_offline_from_a_model_folder(tmp_path: Path, trained, settings) -> None:
    from visionfleet.imaging import load_for_model
    from visionfleet.inference import RuntimeOptions, load_model_dir
    from visionfleet.registry import Registry

    model_dir = Registry(settings.registry_dir).local_dir("tiny", 1)
    paths = []
    for i, fmt in enumerate(("jpeg", "png", "webp")):
        p = tmp_path / f"{i}.{fmt}"
        p.write_bytes(encode_image(render_sample(4, i, 50)[0], fmt))
        paths.append(p)
    r = _run(str(BIN / "visionfleet-edge"), "predict", str(model_dir), *map(str, paths), home=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    model = load_model_dir(model_dir, RuntimeOptions(threads=1))
    for p, line in zip(paths, lines):
        img, _ = load_for_model(p.read_bytes(), model.card.input_size, model.card.resize)
        assert line["label"] == model.card.labels[int(model.run(img[None])[0][0].argmax())]
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    r = _run(str(BIN / "visionfleet-edge"), "predict", str(model_dir), str(tmp_path / "bad.jpg"), home=tmp_path)
    assert r.returncode == 1 and "error" in json.loads(r.stdout.splitlines()[0])
    r = _run(str(BIN / "visionfleet-edge"), "predict", str(tmp_path), str(paths[0]), home=tmp_path)
    assert r.returncode == 2 and "no card.json" in r.stderr


def test_demo_quick_runs_end_to_end(tmp_path: Path, ray_session) -> None:
    # 2 epochs: this checks the whole slice runs; the accuracy targets are test-slow's (test_demo_targets)
    r = _run(str(BIN / "visionfleet"), "demo", "--quick", "--epochs", "2", "--requests", "40", "--json",
             home=tmp_path / "home", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    assert doc["http"]["requests"] == 40 and doc["http"]["errors"] == 0
    assert doc["model"] == "demo:1" and doc["holdout_images"] == 500
    assert set(doc["http"]["by_variant"]) == {
        "jpeg", "png", "webp", "bmp", "tiff", "png-gray", "png-rgba", "png-16bit", "tiff-16bit", "jpeg-exif-rotated"
    }
