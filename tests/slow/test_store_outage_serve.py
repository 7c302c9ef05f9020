"""A store that disappears mid-run, on the real Serve app over HTTP (``visionfleet serve up``)
and at the registry: requests that need the store get 503, the loaded model keeps serving,
nothing acknowledged is lost, and everything heals when the store returns. The database
(a private PostgreSQL, stopped and started again) likewise.

The fast route-layer version is tests/unit/test_registry_wiring.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx import TensorProto, helper, numpy_helper

from visionfleet.imaging import encode_image
from visionfleet.registry import Registry
from visionfleet.settings import Settings
from visionfleet.spec import ModelCard
from visionfleet.store import StoreUnavailable

pytestmark = pytest.mark.slow
VF = str(Path(sys.executable).parent / "visionfleet")
PNG = encode_image(np.full((16, 16, 3), (220, 10, 10), np.uint8), "png")
LABELS = ["red", "green", "blue"]


def _colour_model(size: int) -> onnx.ModelProto:
    """uint8 NHWC -> probs [N, 3] from the mean RGB (tests/unit/test_offline_inference.py's model)."""
    w = np.array([[0.05, -0.03, 0.0], [0.0, 0.04, -0.02], [-0.04, 0.0, 0.05]], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["f"], ["m"], axes=[1, 2], keepdims=0),
         helper.make_node("MatMul", ["m", "w"], ["z"]),
         helper.make_node("Softmax", ["z"], ["probs"], axis=1)],
        "colour",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _run(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([VF, *args], capture_output=True, text=True, env=env, timeout=timeout)


def _post(url: str) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=PNG, headers={"Content-Type": "image/png"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "model.onnx"
    path.parent.mkdir()
    onnx.save(_colour_model(16), path)
    return path


def test_serve_on_s3_and_postgres_survives_a_store_outage(s3_env: str, s3_server, pg_url: str, tmp_path: Path,
                                                          model_file: Path) -> None:
    from cluster.local import free_port

    env = {**os.environ, "VISIONFLEET_HOME": str(tmp_path / "node"), "VISIONFLEET_STORE": f"{s3_env}/vf",
           "VISIONFLEET_DB": pg_url, "VISIONFLEET_S3_TIMEOUT": "1"}
    for _ in range(2):
        r = _run("models", "import", "--name", "colour", "--labels", ",".join(LABELS), str(model_file),
                 "--outputs-are", "probs", env=env)
        assert r.returncode == 0, r.stderr[-2000:]
    port = free_port()
    up = _run("serve", "up", "--port", str(port), "--model", "colour", "--ort-threads", "1", "--replica-cpus", "0.25",
              "--num-cpus", "2", "--no-retrain", env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        status, doc = _post(f"{base}/v1/predict")
        assert status == 200 and (doc["version"], doc["label"]) == (1, "red"), doc
        s3_server.pause()
        try:
            status, doc = _post(f"{base}/v1/predict")  # the loaded version keeps serving
            assert status == 200 and doc["version"] == 1, doc
            status, doc = _post(f"{base}/v1/predict?model=colour:2")  # needs the store: 503, not 500
            assert status == 503 and "store unavailable" in doc["error"], doc
        finally:
            s3_server.resume()
        status, doc = _post(f"{base}/v1/predict?model=colour:2")
        assert status == 200 and doc["version"] == 2, doc
        # the replica loaded v2 from this node's cache, by content hash, not from a path in the bucket
        node = Settings(home=tmp_path / "node", store=f"{s3_env}/vf", db_url=pg_url)
        card = Registry.from_settings(node).card("colour", 2)
        assert (tmp_path / "node" / "cache" / "registry" / "blobs" / card.files[0].sha256).is_file()
    finally:
        down = _run("serve", "down", env=env)
    assert down.returncode == 0, down.stderr[-2000:]
    assert not [p for p in (tmp_path / "node" / "registry").rglob("*")]


def test_registry_during_an_outage_refuses_writes_keeps_cached_versions(s3_env: str, s3_server, tmp_path: Path,
                                                                        model_file: Path, monkeypatch) -> None:
    monkeypatch.setenv("VISIONFLEET_S3_TIMEOUT", "1")
    reg = Registry(f"{s3_env}/registry", cache_dir=tmp_path / "cache", db=f"sqlite:///{tmp_path}/state.db")
    card = ModelCard(name="colour", labels=LABELS, input_size=(16, 16))
    reg.register(card, {"onnx": model_file})
    first = reg.local_dir("colour", 1)
    s3_server.pause()
    try:
        with pytest.raises(StoreUnavailable, match="did not answer"):
            reg.register(card, {"onnx": model_file})
        assert reg.local_dir("colour", 1) == first  # cached on this node: loads without the store
        assert reg.versions("colour") == [1] and reg.aliases("colour") == {"production": 1}  # the database answers
    finally:
        s3_server.resume()
    assert reg.register(card, {"onnx": model_file}).version == 2  # the refused write left no version behind
    assert reg.versions("colour") == [1, 2]


def test_registry_database_that_goes_away_and_returns(tmp_path: Path, model_file: Path) -> None:
    from cluster.services import postgres_server

    with postgres_server() as pg:  # a private server: the session's stays up for the other tests
        reg = Registry(tmp_path / "blobs", db=pg.url)
        reg.register(ModelCard(name="colour", labels=LABELS, input_size=(16, 16)), {"onnx": model_file})
        pg.stop()
        with pytest.raises(StoreUnavailable, match="database did not answer"):
            reg.set_alias("colour", "candidate", 1)
        pg.start()
        for _ in range(3):  # a pooled connection from before the restart may fail once
            try:
                reg.set_alias("colour", "candidate", 1)
                break
            except StoreUnavailable:
                continue
        assert reg.aliases("colour") == {"production": 1, "candidate": 1}
