"""Signed OTA with TUF: attacks are refused and the device keeps serving its current model.

A real repository (``edge_export.tuf_repo``), a real device (``edge_agent.ota`` with
``tuf.ngclient`` and ``edge_agent.store``), and between them a plain HTTP server
serving a *mirror* of the repository — the attacker's position: it can serve any
bytes it likes, but holds no keys.
"""

from __future__ import annotations

import datetime as _dt
import functools
import http.server
import json
import shutil
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from test_edge_bundle import toy_registry


class _Handler(http.server.SimpleHTTPRequestHandler):
    def translate_path(self, path: str) -> str:
        path = path.split("?", 1)[0]
        if not path.startswith("/tuf/"):
            return "/nonexistent"
        return str(Path(self.directory) / path[len("/tuf/"):])

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture
def mirror(tmp_path: Path):
    """An HTTP server for /tuf/ backed by a folder the test controls."""
    root = tmp_path / "mirror"
    root.mkdir()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def sync_mirror(repo, mirror_root: Path) -> None:
    shutil.rmtree(mirror_root)
    shutil.copytree(repo.repo_dir, mirror_root)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory):
    from edge_export.bundle import export_bundle

    root = tmp_path_factory.mktemp("tufb")
    reg, _ = toy_registry(root, versions=2)
    return [export_bundle(reg, f"toy:{v}", "x86-cpu", out_dir=root / "bundles", golden=4, calibration=20)
            for v in (1, 2)]


class Device:
    """One device: its OTA client and model store, and the check-download-install cycle."""

    def __init__(self, home: Path, url: str, root: bytes) -> None:
        from edge_agent.ota import OtaClient
        from edge_agent.store import ModelStore

        self.ota = OtaClient(home, url, model="toy", target="x86-cpu", device_id="cam-17", root=root, timeout=5)
        self.store = ModelStore(home, threads=1)

    def update(self):
        cur = self.store.current_id()
        version = self.store.manifest(cur).version if cur else None
        decision = self.ota.check(cur, version)
        if decision.action != "install":
            return decision, None
        archive = self.ota.download(decision)
        return decision, self.store.install_archive(archive, expect={"bundle_id": decision.custom["bundle_id"]})

    def serves(self, bundle_id: str) -> None:
        """After a restart the device comes up on ``bundle_id``, verified, and predicts."""
        from edge_agent.predict import predict_bytes
        from visionfleet.datasets.synth import render_sample
        from visionfleet.imaging import encode_image

        active = self.store.open()
        assert active is not None and active.bundle_id == bundle_id
        assert active.health.ok
        pred = predict_bytes(active.model, encode_image(render_sample(0, 1, 20)[0]))
        assert 0.0 < pred.confidence <= 1.0 and pred.result["label"]


@pytest.fixture
def setup(tmp_path: Path, mirror, bundles):
    """A repository with v1 published, a device on v1, and the mirror in sync."""
    from edge_export.tuf_repo import TufRepository, publish_bundle

    mroot, url = mirror
    repo = TufRepository(tmp_path / "server")
    repo.init()
    publish_bundle(repo, bundles[0], rollout=100)
    sync_mirror(repo, mroot)
    dev = Device(tmp_path / "device", url, repo.root_bytes())
    decision, result = dev.update()
    assert decision.action == "install" and result.outcome == "installed", (decision, result)
    return repo, mroot, dev, bundles


def _refused(dev: Device, match: str) -> None:
    from edge_agent.ota import OtaFailure

    with pytest.raises(OtaFailure) as exc:
        dev.update()
    assert exc.value.kind == "refused", str(exc.value)
    assert match in str(exc.value), str(exc.value)


def test_keys_are_private_and_roles_signed(setup) -> None:
    repo, *_ = setup
    assert stat.S_IMODE(repo.keys_dir.stat().st_mode) == 0o700
    for role in ("root", "targets", "snapshot", "timestamp"):
        assert stat.S_IMODE((repo.keys_dir / f"{role}.pem").stat().st_mode) == 0o600
    doc = repo.describe()
    assert doc["consistent_snapshot"] is True
    assert len({r["keyids"][0] for r in doc["roles"].values()}) == 4  # one key per role
    assert doc["roles"]["targets"]["version"] == 2 and doc["targets"] == ["toy/x86-cpu/bundle.tar"]
    # Consistent snapshots: versioned metadata, hash-prefixed bundles.
    names = {p.name for p in repo.metadata_dir.iterdir()}
    assert {"1.root.json", "2.targets.json", "2.snapshot.json", "timestamp.json"} <= names
    assert len(list((repo.targets_dir / "toy" / "x86-cpu").glob("*.bundle.tar"))) == 1


def test_update_installs_and_the_device_comes_up_on_it(setup) -> None:
    from edge_export.tuf_repo import publish_bundle

    repo, mroot, dev, bundles = setup
    publish_bundle(repo, bundles[1], rollout=100)
    sync_mirror(repo, mroot)
    decision, result = dev.update()
    assert decision.version == 2 and result.outcome == "installed" and result.previous == bundles[0].name
    dev.serves(bundles[1].name)
    assert dev.store.previous_id() == bundles[0].name  # the last good one is kept
    decision, result = dev.update()
    assert decision.action == "up_to_date" and result is None


def test_tampered_bundle_is_refused(setup) -> None:
    from edge_export.tuf_repo import publish_bundle

    repo, mroot, dev, bundles = setup
    publish_bundle(repo, bundles[1], rollout=100)
    sync_mirror(repo, mroot)
    (target,) = [p for p in (mroot / "targets" / "toy" / "x86-cpu").glob("*.bundle.tar")
                 if p.stat().st_mtime >= 0 and bundles[1].name.encode() in p.read_bytes()]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the model
    target.write_bytes(bytes(data))
    _refused(dev, "LengthOrHashMismatchError")
    dev.serves(bundles[0].name)


def test_rollback_attack_is_refused(setup, tmp_path: Path) -> None:
    from edge_export.tuf_repo import publish_bundle

    repo, mroot, dev, bundles = setup
    old = tmp_path / "old-state"
    shutil.copytree(mroot, old)  # a validly signed, older repository
    publish_bundle(repo, bundles[1], rollout=100)
    sync_mirror(repo, mroot)
    dev.update()
    dev.serves(bundles[1].name)
    shutil.rmtree(mroot)
    shutil.copytree(old, mroot)  # the attacker replays it
    _refused(dev, "BadVersionNumberError")
    dev.serves(bundles[1].name)


def test_an_older_model_version_is_not_installed(setup) -> None:
    repo, mroot, dev, bundles = setup
    decision = dev.ota.check("some-newer-bundle", 5)
    assert decision.action == "older" and "5" in decision.reason


def test_freeze_attack_ends_when_the_metadata_expires(setup) -> None:
    from edge_export.tuf_repo import Expiry

    repo, mroot, dev, bundles = setup
    repo.set_expiry(Expiry(timestamp=2))
    repo.refresh(1.0)  # re-sign the timestamp with its new, short life
    sync_mirror(repo, mroot)
    assert dev.update()[0].action == "up_to_date"
    time.sleep(2.5)  # the mirror stays frozen; the server would have re-signed by now
    _refused(dev, "ExpiredMetadataError")
    dev.serves(bundles[0].name)
    assert "timestamp" in repo.refresh(0.5)  # the honest server re-signs; devices recover
    sync_mirror(repo, mroot)
    assert dev.update()[0].action == "up_to_date"


def test_snapshot_mix_and_match_is_refused(setup) -> None:
    from edge_export.tuf_repo import publish_bundle

    repo, mroot, dev, bundles = setup
    publish_bundle(repo, bundles[1], rollout=100)
    sync_mirror(repo, mroot)
    v = repo.describe()["roles"]["targets"]["version"]
    # New timestamp and snapshot, but the targets file of an older state under the new name.
    shutil.copy(mroot / "metadata" / f"{v - 1}.targets.json", mroot / "metadata" / f"{v}.targets.json")
    # The snapshot pins the length and sha256 of the targets metadata it goes with.
    _refused(dev, "LengthOrHashMismatchError")
    dev.serves(bundles[0].name)


def test_metadata_signed_by_a_wrong_key_is_refused(setup) -> None:
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata, MetaFile, Snapshot, TargetFile, Targets, Timestamp
    from tuf.api.serialization.json import JSONSerializer

    repo, mroot, dev, bundles = setup
    evil = CryptoSigner.generate_ed25519()
    md = mroot / "metadata"
    tv = repo.describe()["roles"]["targets"]["version"]
    targets = Metadata[Targets].from_file(str(md / f"{tv}.targets.json"))
    # The attacker offers its own "v9" bundle (it even has the right hash and length).
    payload = (bundles[1].parent / "evil.tar")
    payload.write_bytes(b"not a bundle" * 10)
    info = TargetFile.from_file("toy/x86-cpu/bundle.tar", str(payload))
    info.unrecognized_fields["custom"] = {"model": "toy", "target": "x86-cpu", "version": 9, "rollout": 100,
                                          "bundle_id": "evil", "halted": False}
    (mroot / "targets" / "toy" / "x86-cpu" / f"{info.hashes['sha256']}.bundle.tar").write_bytes(payload.read_bytes())
    targets.signed.targets["toy/x86-cpu/bundle.tar"] = info
    targets.signed.version += 1
    targets.sign(evil)
    tb = targets.to_bytes(JSONSerializer())
    (md / f"{targets.signed.version}.targets.json").write_bytes(tb)
    expires = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(days=1)
    snap = Metadata(Snapshot(version=targets.signed.version, expires=expires))
    snap.signed.meta["targets.json"] = MetaFile(targets.signed.version)
    snap.sign(evil)
    (md / f"{snap.signed.version}.snapshot.json").write_bytes(snap.to_bytes(JSONSerializer()))
    ts = Metadata(Timestamp(version=targets.signed.version, expires=expires,
                            snapshot_meta=MetaFile(snap.signed.version)))
    ts.sign(evil)
    (md / "timestamp.json").write_bytes(ts.to_bytes(JSONSerializer()))
    _refused(dev, "UnsignedMetadataError")
    dev.serves(bundles[0].name)


def test_rollout_cohorts_halts_and_downgrades(setup) -> None:
    from edge_agent.rollout import cohort_bucket, in_rollout
    from edge_export.tuf_repo import publish_bundle, set_rollout

    repo, mroot, dev, bundles = setup
    ids = [f"cam-{i}" for i in range(2000)]
    share = np.mean([in_rollout(d, "toy", 10) for d in ids])
    assert 0.07 < share < 0.13
    # Widening keeps everyone who was in: nobody flips back and forth.
    assert all(in_rollout(d, "toy", 50) for d in ids if in_rollout(d, "toy", 10))
    assert cohort_bucket("cam-17", "toy") == cohort_bucket("cam-17", "toy")
    bucket = cohort_bucket("cam-17", "toy")
    publish_bundle(repo, bundles[1], rollout=int(bucket))  # just below this device
    sync_mirror(repo, mroot)
    assert dev.update()[0].action == "not_in_cohort"
    set_rollout(repo, "toy", "x86-cpu", rollout=min(100, int(bucket) + 1))
    set_rollout(repo, "toy", "x86-cpu", halted=True, reason="test")
    sync_mirror(repo, mroot)
    decision, _ = dev.update()
    assert decision.action == "halted" and "test" in decision.reason
    set_rollout(repo, "toy", "x86-cpu", halted=False)
    sync_mirror(repo, mroot)
    assert dev.update()[1].outcome == "installed"
    with pytest.raises(ValueError, match="newer version"):
        publish_bundle(repo, bundles[0], rollout=100)
    with pytest.raises(ValueError, match="whole percentage"):
        set_rollout(repo, "toy", "x86-cpu", rollout=12.5)
    with pytest.raises(LookupError):
        set_rollout(repo, "toy", "android", rollout=10)


def test_a_different_trust_anchor_is_refused(setup, tmp_path: Path) -> None:
    from edge_agent.ota import OtaClient
    from edge_export.tuf_repo import TufRepository

    repo, mroot, dev, bundles = setup
    other = TufRepository(tmp_path / "other")
    other.init()
    with pytest.raises(ValueError, match="already trusted"):
        OtaClient(dev.ota.home, "http://x", model="toy", target="x86-cpu", device_id="d", root=other.root_bytes())
    with pytest.raises(ValueError, match="invalid TUF root"):
        OtaClient(tmp_path / "fresh", "http://x", model="toy", target="x86-cpu", device_id="d", root=b"{}")
    json.loads(repo.root_bytes())  # the served root is plain JSON a device can be given
