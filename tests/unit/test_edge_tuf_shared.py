"""The TUF repository on a shared store: S3 (moto) for metadata and bundles, the database for the lock.

Publishers on two "nodes" (two homes, nothing shared but the store, the database and the
operator's key folder) sign into one repository; the server's ``GET /tuf/{path}`` route
streams it from the store, and a real device (``tuf.ngclient`` through ``edge_agent.ota``)
verifies and installs a bundle from it. The embedded profile (``<home>/tuf``, fcntl) is
covered by ``test_edge_tuf.py``.
"""

from __future__ import annotations

import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from test_edge_tuf import Device, bundles  # noqa: F401  (the module-scoped bundle fixture)


def _settings(home: Path, store: str, db: str):
    from visionfleet.settings import Settings

    return Settings(home=home, store=store, db_url=db)


@pytest.fixture
def edge_server(monkeypatch: pytest.MonkeyPatch):
    """Start the edge routes of a server on its own home; returns a function home -> base URL."""
    import uvicorn
    from fastapi import FastAPI

    from serve_apps.api import error_response
    from serve_apps.config import AppConfig
    from serve_apps.inputs import ApiError
    from serve_apps.routes_edge import router

    servers = []

    def start(home: Path) -> str:
        app = FastAPI()
        app.add_exception_handler(ApiError, lambda _r, e: error_response(e.status, e.message, e.headers))
        app.include_router(router(AppConfig(home=str(home))))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
        t.start()
        deadline = time.monotonic() + 30
        while not srv.started:
            assert time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.05)
        servers.append((srv, t))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for srv, t in servers:
        srv.should_exit = True
        t.join(10)


def _get(url: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_publish_on_s3_and_postgres_and_a_device_updates_through_the_route(
        s3_env: str, pg_url: str, tmp_path: Path, bundles, edge_server, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        request: pytest.FixtureRequest) -> None:
    import json

    from edge_export.tuf_repo import SigningKeysMissing, TufRepository, publish_bundle, set_rollout
    from visionfleet.store import open_store

    keys = tmp_path / "secret-keys"
    publisher = TufRepository.from_settings(_settings(tmp_path / "node1", s3_env, pg_url), keys_dir=keys)
    assert publisher.shared and publisher.location == f"{s3_env}/tuf"
    assert publisher.init() and not publisher.init()
    doc = publish_bundle(publisher, bundles[0], rollout=100)
    # Keys stay with the operator, private; the store holds metadata and targets only.
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert {p.name for p in keys.iterdir()} == {"root.pem", "targets.pem", "snapshot.pem", "timestamp.pem"}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in keys.iterdir())
    objects = {k for k, _, d in open_store(f"{s3_env}/tuf").list("", recursive=True) if not d}
    assert not any(k.endswith(".pem") for k in objects)
    assert {"config.json", "repo/metadata/1.root.json", "repo/metadata/root.json", "repo/metadata/2.targets.json",
            "repo/metadata/2.snapshot.json", "repo/metadata/timestamp.json",
            f"repo/targets/toy/x86-cpu/{doc['sha256']}.bundle.tar"} <= objects
    assert not (tmp_path / "node1" / "tuf").exists()  # nothing of the repository on the node's disk
    assert not list((tmp_path / "node1" / "cache" / "tuf" / "archives").glob("*.tar"))  # the scratch archive went

    # A server on another node, configured by the environment as a deployment would be.
    monkeypatch.setenv("VISIONFLEET_STORE", s3_env)
    monkeypatch.setenv("VISIONFLEET_DB", pg_url)
    monkeypatch.setenv("VISIONFLEET_TUF_KEYS", str(keys))
    monkeypatch.setenv("VISIONFLEET_S3_TIMEOUT", "1")  # an outage below fails in seconds
    url = edge_server(tmp_path / "node2")
    status, body = _get(f"{url}/tuf/metadata/root.json")
    assert status == 200 and body == publisher.root_bytes()
    status, body = _get(f"{url}/tuf/metadata/9.targets.json")
    assert status == 404 and json.loads(body) == {"error": "no such repository file"}
    assert _get(f"{url}/tuf/keys/targets.pem")[0] == 404 and _get(f"{url}/tuf/config.json")[0] == 404

    dev = Device(tmp_path / "device", url, publisher.root_bytes())
    decision, result = dev.update()
    assert decision.action == "install" and result.outcome == "installed", (decision, result)
    dev.serves(doc["bundle_id"])
    cached = list((tmp_path / "node2" / "cache" / "tuf" / "cache" / "targets" / "toy" / "x86-cpu").iterdir())
    assert [p.name for p in cached] == [f"{doc['sha256']}.bundle.tar"]  # the read-through cache

    # The next version, published from a third node; the device takes it through the same server.
    other = TufRepository.from_settings(_settings(tmp_path / "node3", s3_env, pg_url), keys_dir=keys)
    doc2 = publish_bundle(other, bundles[1], rollout=100)
    decision, result = dev.update()
    assert result is not None and result.outcome == "installed" and result.bundle_id == doc2["bundle_id"]
    dev.serves(doc2["bundle_id"])
    assert set_rollout(publisher, "toy", "x86-cpu", halted=True, reason="test")["halted"] is True
    assert publisher.describe()["roles"]["targets"]["version"] == 4

    # The store goes away: devices get a 503 with a JSON error (and retry), never a 500.
    s3_server = request.getfixturevalue("s3_server")
    s3_server.pause()
    try:
        status, body = _get(f"{url}/tuf/metadata/timestamp.json")
    finally:
        s3_server.resume()
    assert status == 503 and "store did not answer" in json.loads(body)["error"]
    assert _get(f"{url}/tuf/metadata/timestamp.json")[0] == 200

    # Without the operator's key folder, signing fails with the way out in the message.
    monkeypatch.delenv("VISIONFLEET_TUF_KEYS")
    keyless = TufRepository.from_settings(_settings(tmp_path / "node4", s3_env, pg_url))
    assert keyless.exists() and keyless.targets()  # reading needs no keys
    with pytest.raises(SigningKeysMissing, match=r"VISIONFLEET_TUF_KEYS is not set.*expected \$VISIONFLEET_TUF_KEYS"):
        set_rollout(keyless, "toy", "x86-cpu", rollout=50)


def publish_many(store: str, db: str, keys: str, home: str, name: str, n: int) -> None:
    """One node's publisher: ``n`` new files on channel ``<name>/x86-cpu`` (its own home and engine)."""
    from edge_export.tuf_repo import TufRepository

    repo = TufRepository(store=store, db=db, keys_dir=keys, work_dir=home)
    for i in range(n):
        f = Path(home) / f"{name}-{i}.bin"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(f"{name} {i}".encode() * 100)
        repo.add_target(f"{name}/x86-cpu/bundle.tar", f, {"model": name, "version": i + 1})


def check_both_landed(repo, names: list[str], n: int, client_dir: Path) -> None:  # noqa: ANN001
    """Versions went up by one per publish (none signed twice), and a TUF client verifies every channel."""
    from tuf.ngclient import Updater

    d = repo.describe()
    total = 1 + len(names) * n  # init signs version 1
    assert d["roles"]["targets"]["version"] == total
    assert d["roles"]["snapshot"]["version"] == d["roles"]["timestamp"]["version"] == total
    t = repo.targets()
    assert sorted(t) == sorted(f"{name}/x86-cpu/bundle.tar" for name in names)
    assert {p: t[p].custom["version"] for p in t} == {f"{name}/x86-cpu/bundle.tar": n for name in names}
    # Python-tuf's client, reading the store's objects: root -> timestamp -> snapshot -> targets -> files.
    (client_dir / "metadata").mkdir(parents=True)
    (client_dir / "dl").mkdir()
    up = Updater(str(client_dir / "metadata"), "file:///unused/", str(client_dir / "dl"), "file:///unused/",
                 fetcher=_StoreFetcher(repo._files.store), bootstrap=repo.root_bytes())
    up.refresh()
    for path in t:
        info = up.get_targetinfo(path)
        assert info is not None and info.custom["version"] == n
        got = Path(up.download_target(info))
        assert got.read_bytes() == f"{path.split('/')[0]} {n - 1}".encode() * 100


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_two_publishers_on_two_nodes_both_land(backend: str, s3_env: str, tmp_path: Path, request) -> None:
    """Two publishers (own homes, own database engines) sign into one repository at once; the process
    version, with two real processes, is tests/slow/test_edge_tuf_race.py."""
    from edge_export.tuf_repo import TufRepository

    db = request.getfixturevalue("pg_url") if backend == "postgresql" else f"sqlite:///{tmp_path}/shared.db"
    keys = tmp_path / "keys"
    repo = TufRepository(store=f"{s3_env}/tuf", db=db, keys_dir=keys, work_dir=tmp_path / "n0")
    repo.init()
    n = 4
    errors: list[BaseException] = []

    def node(name: str) -> None:
        try:
            publish_many(f"{s3_env}/tuf", db, str(keys), str(tmp_path / name), name, n)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=node, args=(name,)) for name in ("alpha", "beta")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    check_both_landed(repo, ["alpha", "beta"], n, tmp_path / "client")


class _StoreFetcher:
    """A python-tuf fetcher that reads ``file:///unused/<name>`` from the store's ``repo/`` (metadata or targets)."""

    def __new__(cls, store):  # noqa: ANN001
        from tuf.api import exceptions
        from tuf.ngclient.fetcher import FetcherInterface

        class Fetcher(FetcherInterface):
            def _fetch(self, url: str):  # noqa: ANN202
                name = url[len("file:///unused/"):]
                key = f"repo/metadata/{name}" if name.endswith(".json") else f"repo/targets/{name}"
                if not store.exists(key):
                    raise exceptions.DownloadHTTPError(f"{key} not found", 404)
                return iter([store.read_bytes(key)])

        return Fetcher()
