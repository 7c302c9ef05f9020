"""Every entry point opens the registry of the settings: an S3 store and a database shared by
nodes that share no disk, the embedded default unchanged, clear start-time errors, and a
store outage that costs only the requests that need the store (503) and heals when it returns.

Real components: moto's S3 server, PostgreSQL, SQLite, ONNX Runtime and the ingress's FastAPI
app in this process (tests/slow/test_store_outage_serve.py has the Serve HTTP version).
"""

from __future__ import annotations

import hashlib
import json
import socket
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from test_offline_inference import LABELS, _colour_model  # noqa: E402  (tests/unit is on sys.path)
from visionfleet.cli import app as cli
from visionfleet.imaging import encode_image
from visionfleet.registry import Registry
from visionfleet.settings import Settings
from visionfleet.spec import ModelCard
from visionfleet.store import open_store

runner = CliRunner()
_UNSET = {"VISIONFLEET_STORE": None, "VISIONFLEET_DB": None, "VISIONFLEET_NODE_HOME": None}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _vf(home: Path, *args: str, **env: str | None):
    result = runner.invoke(cli, list(args), env={**_UNSET, "VISIONFLEET_HOME": str(home), **env})
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "model.onnx"
    path.parent.mkdir()
    onnx.save(_colour_model(16), path)
    return path


def _image(tmp_path: Path) -> Path:
    p = tmp_path / "red.png"
    p.write_bytes(encode_image(np.full((20, 20, 3), (220, 10, 10), np.uint8), "png"))
    return p


def _import(home: Path, model_file: Path, **env: str | None) -> dict:
    r = _vf(home, "models", "import", "--name", "colour", "--labels", ",".join(LABELS), str(model_file),
            "--outputs-are", "probs", "--json", **env)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_two_nodes_share_the_registry_on_s3_and_postgres(s3_env: str, pg_url: str, tmp_path: Path,
                                                         model_file: Path) -> None:
    """Register on one home, list / predict / register again on another: no shared disk."""
    shared = {"VISIONFLEET_STORE": f"{s3_env}/vf", "VISIONFLEET_DB": pg_url}
    node1, node2 = tmp_path / "node1", tmp_path / "node2"
    card = _import(node1, model_file, **shared)
    assert card["version"] == 1
    listed = json.loads(_vf(node2, "models", "list", "--json", **shared).stdout)["models"]
    assert [(m["model"], m["version"], m["aliases"]) for m in listed] == [("colour", 1, ["production"])]
    pred = _vf(node2, "predict", str(_image(tmp_path)), "--local", "--model", "colour", "--json", **shared)
    assert pred.exit_code == 0, pred.output
    assert json.loads(pred.stdout)["label"] == "red"
    # node2 loaded the version from its own cache, keyed by the content hash of the card's file entry
    (entry,) = card["files"]
    blob = node2 / "cache" / "registry" / "blobs" / entry["sha256"]
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == entry["sha256"]
    assert _import(node2, model_file, **shared)["version"] == 2  # allocated in the database
    r = _vf(node1, "models", "promote", "colour:2", **shared)
    assert r.exit_code == 0, r.output
    listed = json.loads(_vf(node2, "models", "list", "--json", **shared).stdout)["models"]
    assert [(m["version"], m["aliases"]) for m in listed] == [(1, []), (2, ["production"])]
    # the blobs are in the bucket, nothing under either node's registry folder
    store = open_store(f"{s3_env}/vf")
    assert store.exists("registry/colour/1/card.json") and store.exists("registry/colour/2/model.onnx")
    for node in (node1, node2):
        assert not [p for p in (node / "registry").rglob("*")], list((node / "registry").rglob("*"))


def test_the_embedded_default_still_writes_under_home(tmp_path: Path, model_file: Path) -> None:
    home = tmp_path / "home"
    assert _import(home, model_file)["version"] == 1
    assert (home / "registry" / "colour" / "1" / "card.json").is_file()
    assert json.loads((home / "registry" / "colour" / "aliases.json").read_text())["aliases"] == {"production": 1}
    assert Registry(home / "registry").versions("colour") == [1]  # files, readable without a database
    assert Registry.from_settings(Settings.from_env(home))._db is None


def _fails(r, *needles: str) -> str:
    assert r.exit_code == 1, r.output
    text = " ".join(r.output.split())  # rich wraps long lines
    for n in needles:
        assert n in text, text
    return text


def test_start_checks_name_the_setting_and_the_reason(s3_env: str, tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "h"
    missing = f"s3://vf-missing-{uuid.uuid4().hex[:12]}/p"
    _fails(_vf(home, "models", "list", VISIONFLEET_STORE=missing),
           f"Got {missing} for VISIONFLEET_STORE; expected a reachable bucket", "NoSuchBucket")
    _fails(_vf(home, "predict", str(_image(tmp_path)), "--local", "--model", "colour", VISIONFLEET_STORE=missing),
           "NoSuchBucket")
    _fails(_vf(home, "models", "list", VISIONFLEET_STORE_REGISTRY=missing),
           f"Got {missing} for VISIONFLEET_STORE_REGISTRY")
    monkeypatch.setenv("VISIONFLEET_S3_TIMEOUT", "1")
    nowhere = f"http://127.0.0.1:{_free_port()}"
    _fails(_vf(home, "models", "list", VISIONFLEET_STORE=s3_env, AWS_ENDPOINT_URL=nowhere, AWS_ENDPOINT_URL_S3=nowhere),
           f"Got {s3_env} for VISIONFLEET_STORE", "no answer from the endpoint")
    port = _free_port()  # nothing listens there: PostgreSQL is down
    text = _fails(_vf(home, "models", "list", VISIONFLEET_DB=f"postgresql+psycopg://vf:secret@127.0.0.1:{port}/vf"),
                  f"Got postgresql+psycopg://vf:***@127.0.0.1:{port}/vf for VISIONFLEET_DB; expected a reachable database")
    assert "secret" not in text
    assert not (home / "registry").exists()  # nothing was created before the check failed


def test_wrong_credentials_are_named(tmp_path: Path, monkeypatch) -> None:
    """moto accepts any key unless auth is switched on (INITIAL_NO_AUTH_ACTION_COUNT): then an
    unknown key is refused as S3 would refuse it."""
    from cluster.services import start_s3

    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")
    srv = start_s3()
    try:
        monkeypatch.delenv("INITIAL_NO_AUTH_ACTION_COUNT")
        for k, v in srv.env().items():
            monkeypatch.setenv(k, v)
        _fails(_vf(tmp_path / "h", "models", "list", VISIONFLEET_STORE="s3://any-bucket/vf"),
               "Got s3://any-bucket/vf for VISIONFLEET_STORE", "InvalidAccessKeyId")
    finally:
        srv.stop()


def test_serve_up_checks_state_before_starting_ray(s3_env: str, tmp_path: Path) -> None:
    missing = s3_env + "-gone/p"
    _fails(_vf(tmp_path / "h", "serve", "up", "--no-retrain", VISIONFLEET_STORE=missing), "NoSuchBucket")
    assert not (tmp_path / "h" / "ray").exists()  # no head was started


# ---------------------------------------------------------------------------- a store outage
@pytest.fixture
def served(s3_env: str, tmp_path: Path, monkeypatch, model_file: Path):
    """The ingress's FastAPI app, models in this process, the registry on S3 + SQLite."""
    from starlette.testclient import TestClient

    from serve_apps.api import build_api
    from serve_apps.config import AppConfig, IngressConfig, ReplicaConfig, SamplingConfig
    from serve_apps.ingress import Actors, _LocalRunner
    from serve_apps.pipeline import PredictionService

    monkeypatch.setenv("VISIONFLEET_S3_TIMEOUT", "1")  # a call to a paused store fails within seconds
    settings = Settings(home=tmp_path / "node", store=f"{s3_env}/vf", db_url=f"sqlite:///{tmp_path}/shared.db")
    reg = Registry.from_settings(settings)
    for _ in range(2):
        reg.register(ModelCard(name="colour", labels=LABELS, input_size=(16, 16)), {"onnx": model_file})
    cfg = AppConfig(home=str(settings.home), default_model="colour", replica=ReplicaConfig(ort_threads=1),
                    ingress=IngressConfig(inference_in="ingress", alias_ttl_s=0.0),
                    sampling=SamplingConfig(enabled=False))
    local = _LocalRunner(reg, cfg)
    svc = PredictionService(cfg, reg, local, telemetry=None, max_concurrent=1)
    with TestClient(build_api(svc, Actors(None, None), local.stats)) as client:
        yield client


def test_a_store_outage_is_503_for_what_needs_it_and_heals(served, s3_server) -> None:
    client = served
    png = encode_image(np.full((16, 16, 3), (220, 10, 10), np.uint8), "png")

    def predict(query: str = ""):
        return client.post(f"/v1/predict{query}", content=png, headers={"Content-Type": "image/png"})

    assert predict().json()["version"] == 1  # @production: v1 loaded, its card cached
    s3_server.pause()
    try:
        ok = predict()  # the loaded model keeps serving (aliases live in the database)
        assert ok.status_code == 200 and ok.json()["label"] == "red", ok.text
        assert predict("?model=colour:1").status_code == 200
        new = predict("?model=colour:2")  # a version not loaded yet needs the store
        assert new.status_code == 503 and "store unavailable" in new.json()["error"], new.text
        assert new.headers["retry-after"] == "1"
        listed = client.get("/v1/models")  # versions and aliases come from the database
        assert listed.status_code == 200 and listed.json()["models"][0]["versions"] == [1, 2]
    finally:
        s3_server.resume()
    back = predict("?model=colour:2")  # the store is back: the version loads now
    assert back.status_code == 200 and back.json()["version"] == 2, back.text


def test_adopt_brings_a_file_registry_into_the_database(tmp_path: Path, model_file: Path) -> None:
    """A home used without a database, then given one: `models adopt` records its versions and aliases."""
    home = tmp_path / "home"
    files = Registry(home / "registry")  # the embedded default's layout
    for _ in range(2):
        files.register(ModelCard(name="colour", labels=LABELS, input_size=(16, 16)), {"onnx": model_file})
    files.set_alias("colour", "production", 2)
    db = {"VISIONFLEET_DB": f"sqlite:///{tmp_path}/shared.db"}
    r = _vf(home, "models", "adopt", "--json", **db)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"adopted": {"colour": [1, 2]}}
    listed = json.loads(_vf(home, "models", "list", "--json", **db).stdout)["models"]
    assert [(m["version"], m["aliases"]) for m in listed] == [(1, []), (2, ["production"])]
    assert json.loads(_vf(home, "models", "adopt", "--json", **db).stdout) == {"adopted": {}}  # idempotent
    shared = Registry.from_settings(Settings(home=home, db_url=db["VISIONFLEET_DB"]))
    card = shared.register(ModelCard(name="colour", labels=LABELS, input_size=(16, 16)), {"onnx": model_file})
    assert card.version == 3  # allocation continues after the adopted versions
    _fails(_vf(home, "models", "adopt"), "expected one (set VISIONFLEET_DB")


def test_the_node_cache_is_keyed_and_checked_by_content_hash(s3_env: str, tmp_path: Path, model_file: Path) -> None:
    from visionfleet.registry import RegistryError

    db = f"sqlite:///{tmp_path}/state.db"
    reg = Registry(f"{s3_env}/registry", cache_dir=tmp_path / "cache", db=db)
    card = reg.register(ModelCard(name="colour", labels=LABELS, input_size=(16, 16)), {"onnx": model_file})
    folder = reg.local_dir("colour", 1)
    assert reg.local_dir("colour", 1) == folder  # downloaded once
    blob = tmp_path / "cache" / "blobs" / card.files[0].sha256
    assert (folder / "model.onnx").samefile(blob)  # the version's folder links the blob
    open_store(f"{s3_env}/registry").write_bytes("colour/1/model.onnx", b"not the registered bytes")
    other = Registry(f"{s3_env}/registry", cache_dir=tmp_path / "cache2", db=db)
    with pytest.raises(RegistryError, match="expected .* from its card"):
        other.local_dir("colour", 1)
    assert not [p for p in (tmp_path / "cache2").rglob("*") if p.is_file()]  # nothing half-written is kept
