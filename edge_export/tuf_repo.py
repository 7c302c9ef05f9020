"""The server-side TUF repository that signs model bundles for devices (python-tuf).

Layout under ``<state>/tuf/``::

    keys/<role>.pem          ed25519 private keys (PKCS#8 PEM), mode 0600, folder 0700
    config.json              expiry periods of the four roles
    repo/metadata/N.root.json, N.targets.json, N.snapshot.json, timestamp.json
    repo/targets/<model>/<target>/<sha256>.bundle.tar

Why each piece (https://theupdateframework.io/docs/security/):

* **four roles, four keys**: a stolen timestamp key (the one that must stay online to
  re-sign every day) can only delay updates, not forge a bundle; targets signs what a
  bundle *is*; root says which keys count.
* **versions only go up** and devices remember the highest they saw: an older
  (validly signed) repository replayed by an attacker is refused (rollback attack).
* **expiry dates**: an attacker who freezes a device's view of the repository gets
  refused once the timestamp expires (1 day by default), so a device notices.
* **snapshot** pins the exact version and hash of targets metadata, so metadata from
  two repository states cannot be mixed (mix-and-match).
* **consistent snapshots**: metadata files are named by version and bundles by hash
  and never overwritten, and publishing writes the bundle, then targets, then
  snapshot, and replaces ``timestamp.json`` last, each durably. A device that reads
  the repository while a publish runs sees the old state or the new one, never half.

A bundle is published as the target ``<model>/<target>/bundle.tar`` (the *channel*);
its custom metadata — model, version, bundle id, rollout percentage, halted flag,
sha256 — is signed with the rest, so a rollout change is as protected as the bundle.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

from edge_agent.durable import atomic_write, fsync_dir, write_file
from edge_agent.ota import channel_path

__all__ = [
    "ROLES",
    "Expiry",
    "TufRepository",
    "RepositoryMissing",
    "channel_path",
    "publish_bundle",
    "set_rollout",
    "channels",
]

ROLES = ("root", "targets", "snapshot", "timestamp")
_HASH = "sha256"
_KEEP_TARGET_FILES = 3  # per channel: old bundles a slow device may still be fetching


class RepositoryMissing(FileNotFoundError):
    """No TUF repository in this state dir yet (``visionfleet edge keys`` creates one)."""


@dataclass(frozen=True)
class Expiry:
    """How long each role's metadata stays valid after signing (seconds)."""

    root: int = 365 * 86400
    targets: int = 90 * 86400
    snapshot: int = 14 * 86400
    timestamp: int = 86400

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"Got {getattr(self, f.name)} s for {f.name} expiry; expected >= 1")

    def seconds(self, role: str) -> int:
        return int(getattr(self, role))


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


class TufRepository:
    """Create, sign and publish to the repository under ``<home>/tuf``.

    Safe across processes: every change holds an exclusive lock on ``<home>/tuf/.lock``.
    """

    def __init__(self, home: str | os.PathLike[str]) -> None:
        self.base = Path(home) / "tuf"
        self.keys_dir = self.base / "keys"
        self.repo_dir = self.base / "repo"
        self.metadata_dir = self.repo_dir / "metadata"
        self.targets_dir = self.repo_dir / "targets"

    # ------------------------------------------------------------------ setup
    def exists(self) -> bool:
        return (self.metadata_dir / "1.root.json").is_file() and (self.metadata_dir / "timestamp.json").is_file()

    def require(self) -> None:
        if not self.exists():
            raise RepositoryMissing(f"no TUF repository at {self.base}; create it with `visionfleet edge keys`")

    def init(self, expiry: Expiry | None = None) -> bool:
        """Create keys and the first signed metadata; returns False when it already exists."""
        from securesystemslib.signer import CryptoSigner
        from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

        with self._lock():
            if self.exists():
                return False
            expiry = expiry or Expiry()
            self.keys_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.keys_dir, 0o700)
            self.metadata_dir.mkdir(parents=True, exist_ok=True)
            self.targets_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.base / "config.json", json.dumps({"expiry": asdict(expiry)}, indent=2).encode())
            signers = {}
            for role in ROLES:
                signer = CryptoSigner.generate_ed25519()
                key_file = self.keys_dir / f"{role}.pem"
                if key_file.exists():
                    key_file.unlink()  # a half-made repository from a crash: start over
                write_file(key_file, signer.private_bytes, mode=0o600)
                signers[role] = signer
            fsync_dir(self.keys_dir)
            now = _now()
            root = Root(expires=now + _dt.timedelta(seconds=expiry.root), consistent_snapshot=True)
            for role, signer in signers.items():
                root.add_key(signer.public_key, role)
            targets = Targets(expires=now + _dt.timedelta(seconds=expiry.targets))
            md_root = Metadata(root)
            md_root.sign(signers["root"])
            self._store("root", md_root)
            md_targets = Metadata(targets)
            md_targets.sign(signers["targets"])
            targets_bytes = self._store("targets", md_targets)
            self._snapshot_and_timestamp(targets_bytes, 1, signers, expiry, snapshot_version=1, timestamp_version=1)
            return True

    def expiry(self) -> Expiry:
        try:
            doc = json.loads((self.base / "config.json").read_text())
        except FileNotFoundError:
            return Expiry()
        return Expiry(**doc.get("expiry", {}))

    def set_expiry(self, expiry: Expiry) -> None:
        """Change the expiry periods; they apply from the next signature of each role."""
        self.require()
        with self._lock():
            atomic_write(self.base / "config.json", json.dumps({"expiry": asdict(expiry)}, indent=2).encode())

    # ------------------------------------------------------------------ keys and files
    def _signer(self, role: str):
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
        from securesystemslib.signer import CryptoSigner

        key_file = self.keys_dir / f"{role}.pem"
        mode = key_file.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(f"{key_file} has mode {oct(mode)}; expected 0600 (a private key)")
        return CryptoSigner(load_pem_private_key(key_file.read_bytes(), None))

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        import fcntl

        self.base.mkdir(parents=True, exist_ok=True)
        with open(self.base / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _store(self, role: str, md: Any) -> bytes:
        """Write a role's metadata durably: versioned name, and timestamp.json for timestamp."""
        from tuf.api.serialization.json import JSONSerializer

        data = md.to_bytes(JSONSerializer(compact=False))
        name = "timestamp.json" if role == "timestamp" else f"{md.signed.version}.{role}.json"
        atomic_write(self.metadata_dir / name, data)
        if role == "root":
            atomic_write(self.metadata_dir / "root.json", data)  # the newest root, for bootstrapping devices
        return data

    def _load(self, role: str):
        from tuf.api.metadata import Metadata

        self.require()
        if role == "timestamp":
            return Metadata.from_file(str(self.metadata_dir / "timestamp.json"))
        if role == "snapshot":
            v = self._load("timestamp").signed.snapshot_meta.version
            return Metadata.from_file(str(self.metadata_dir / f"{v}.snapshot.json"))
        if role == "targets":
            v = self._load("snapshot").signed.meta["targets.json"].version
            return Metadata.from_file(str(self.metadata_dir / f"{v}.targets.json"))
        if role == "root":
            versions = sorted(int(p.name.split(".")[0]) for p in self.metadata_dir.glob("*.root.json")
                              if p.name.split(".")[0].isdigit())
            return Metadata.from_file(str(self.metadata_dir / f"{versions[-1]}.root.json"))
        raise ValueError(f"Got role {role!r}; expected one of {ROLES}")

    def root_bytes(self) -> bytes:
        """The newest root metadata: what a new device is given as its trust anchor."""
        self.require()
        return (self.metadata_dir / "root.json").read_bytes()

    def _snapshot_and_timestamp(self, targets_bytes: bytes, targets_version: int, signers: dict, expiry: Expiry,
                                *, snapshot_version: int | None = None, timestamp_version: int | None = None) -> None:
        from tuf.api.metadata import Metadata, MetaFile, Snapshot, Timestamp

        now = _now()
        if snapshot_version is None:
            snapshot_version = self._load("snapshot").signed.version + 1
        if timestamp_version is None:
            timestamp_version = self._load("timestamp").signed.version + 1
        snap = Snapshot(version=snapshot_version, expires=now + _dt.timedelta(seconds=expiry.snapshot))
        snap.meta["targets.json"] = MetaFile.from_data(targets_version, targets_bytes, [_HASH])
        md_snap = Metadata(snap)
        md_snap.sign(signers["snapshot"])
        snap_bytes = self._store("snapshot", md_snap)
        ts = Timestamp(version=timestamp_version, expires=now + _dt.timedelta(seconds=expiry.timestamp),
                       snapshot_meta=MetaFile.from_data(snapshot_version, snap_bytes, [_HASH]))
        md_ts = Metadata(ts)
        md_ts.sign(signers["timestamp"])
        self._store("timestamp", md_ts)  # last: the switch from the old state to the new one

    def _sign_targets(self, md_targets: Any, expiry: Expiry) -> None:
        """Bump, sign and store targets, then a new snapshot and timestamp (lock held)."""
        md_targets.signed.version += 1
        md_targets.signed.expires = _now() + _dt.timedelta(seconds=expiry.targets)
        signers = {r: self._signer(r) for r in ("targets", "snapshot", "timestamp")}
        md_targets.sign(signers["targets"])
        data = self._store("targets", md_targets)
        self._snapshot_and_timestamp(data, md_targets.signed.version, signers, expiry)

    # ------------------------------------------------------------------ targets
    def targets(self) -> dict[str, Any]:
        """The signed targets: path -> ``TargetFile``."""
        return dict(self._load("targets").signed.targets)

    def add_target(self, path: str, local_file: str | os.PathLike[str], custom: dict[str, Any]) -> Any:
        """Publish a file as target ``path`` with signed ``custom`` metadata; returns the ``TargetFile``.

        The file is stored as ``targets/<dir>/<sha256>.<name>`` (never overwritten), and
        only then do new targets, snapshot and timestamp metadata make it visible.
        """
        from tuf.api.metadata import TargetFile

        self.require()
        info = TargetFile.from_file(path, os.fspath(local_file), [_HASH])
        info.unrecognized_fields["custom"] = custom
        digest = info.hashes[_HASH]
        dirname, _, basename = path.rpartition("/")
        dest_dir = self.targets_dir / dirname
        dest = dest_dir / f"{digest}.{basename}"
        with self._lock():
            dest_dir.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                tmp = dest_dir / f".{digest}.{uuid.uuid4().hex[:8]}.tmp"
                shutil.copyfile(local_file, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, dest)
                fsync_dir(dest_dir)
            md = self._load("targets")
            md.signed.targets[path] = info
            self._sign_targets(md, self.expiry())
            self._prune(dest_dir, basename, keep={digest})
        return info

    def update_custom(self, path: str, changes: dict[str, Any]) -> Any:
        """Re-sign target ``path`` with its custom metadata updated by ``changes`` (same file)."""
        with self._lock():
            md = self._load("targets")
            info = md.signed.targets.get(path)
            if info is None:
                raise LookupError(f"no published target {path!r}")
            info.unrecognized_fields["custom"] = {**(info.custom or {}), **changes}
            self._sign_targets(md, self.expiry())
            return info

    def _prune(self, dest_dir: Path, basename: str, keep: set[str]) -> None:
        """Keep the newest few files of a channel; older ones are no longer referenced."""
        files = sorted(dest_dir.glob(f"*.{basename}"), key=lambda p: p.stat().st_mtime, reverse=True)
        for p in files[_KEEP_TARGET_FILES:]:
            if p.name.split(".", 1)[0] not in keep:
                p.unlink(missing_ok=True)

    def refresh(self, min_remaining: float = 0.5) -> list[str]:
        """Re-sign roles with less than ``min_remaining`` of their lifetime left; returns them.

        A role whose expiry lies further out than its (possibly shortened) configured
        lifetime is re-signed too.

        Run it more often than the timestamp lifetime (the ingress does it when devices
        fetch ``timestamp.json``; ``visionfleet edge refresh`` does it from cron).
        """
        self.require()
        if not 0.0 < min_remaining <= 1.0:
            raise ValueError(f"Got {min_remaining} for min_remaining; expected 0 < f <= 1")
        expiry = self.expiry()
        now = _now()

        def stale(role: str) -> bool:
            left = (self._load(role).signed.expires - now).total_seconds()
            # Also re-sign when the configured lifetime got shorter than what is left.
            return left < expiry.seconds(role) * min_remaining or left > expiry.seconds(role) + 60

        if not any(stale(r) for r in ("targets", "snapshot", "timestamp")):
            return []
        with self._lock():
            done: list[str] = []
            if stale("targets"):
                self._sign_targets(self._load("targets"), expiry)
                return ["targets", "snapshot", "timestamp"]
            signers = {r: self._signer(r) for r in ("snapshot", "timestamp")}
            if stale("snapshot"):
                md_t = self._load("targets")
                v = md_t.signed.version
                data = (self.metadata_dir / f"{v}.targets.json").read_bytes()
                self._snapshot_and_timestamp(data, v, signers, expiry)
                return ["snapshot", "timestamp"]
            if stale("timestamp"):
                from tuf.api.metadata import Metadata, Timestamp

                old = self._load("timestamp").signed
                ts = Timestamp(version=old.version + 1, expires=now + _dt.timedelta(seconds=expiry.timestamp),
                               snapshot_meta=old.snapshot_meta)
                md = Metadata(ts)
                md.sign(signers["timestamp"])
                self._store("timestamp", md)
                done.append("timestamp")
            return done

    def describe(self) -> dict[str, Any]:
        """Roles, versions, expiry dates and key ids (no secrets)."""
        self.require()
        root = self._load("root").signed
        out: dict[str, Any] = {"path": str(self.base), "consistent_snapshot": root.consistent_snapshot, "roles": {}}
        for role in ROLES:
            s = self._load(role).signed
            out["roles"][role] = {"version": s.version, "expires": s.expires.isoformat(),
                                  "keyids": list(root.roles[role].keyids), "threshold": root.roles[role].threshold}
        out["targets"] = sorted(self.targets())
        return out


# ---------------------------------------------------------------------- channels


def _percent(value: float) -> int:
    """A rollout percentage: a whole number 0..100 (TUF's canonical JSON has no floats)."""
    if isinstance(value, bool) or float(value) != int(float(value)) or not 0 <= int(float(value)) <= 100:
        raise ValueError(f"Got {value} for rollout; expected a whole percentage 0..100")
    return int(float(value))


def publish_bundle(
    repo: TufRepository,
    bundle_dir: str | os.PathLike[str],
    *,
    rollout: int,
    archive_dir: str | os.PathLike[str] | None = None,
    allow_downgrade: bool = False,
) -> dict[str, Any]:
    """Pack a verified bundle folder and publish it on its channel with a rollout percentage.

    Raises:
        ValueError: rollout outside 0..100, or an older version than the channel's
            without ``allow_downgrade``.
    """
    from edge_agent.bundle import read_manifest, verify_files
    from edge_export.bundle import pack_bundle

    rollout = _percent(rollout)
    m = verify_files(bundle_dir, read_manifest(bundle_dir))
    path = channel_path(m.model, m.target)
    current = repo.targets().get(path)
    if current is not None and current.custom and not allow_downgrade:
        cur_v = int(current.custom.get("version", 0))
        if m.version < cur_v:
            raise ValueError(
                f"Got {m.model}:{m.version} for channel {path}, which serves version {cur_v}; expected a newer "
                "version (pass --allow-downgrade to send devices back to an older one)"
            )
    archive_dir = Path(archive_dir) if archive_dir else repo.base / "archives"
    archive = pack_bundle(bundle_dir, archive_dir / f"{m.bundle_id}.tar")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    custom = {
        "model": m.model,
        "version": m.version,
        "target": m.target,
        "bundle_id": m.bundle_id,
        "format": m.format,
        "precision": m.precision,
        "rollout": rollout,
        "halted": False,
        "downgrade": bool(allow_downgrade and current is not None and m.version < int(current.custom.get("version", 0))),
        "sha256": digest,
        "published_at": _now().isoformat(),
    }
    info = repo.add_target(path, archive, custom)
    return {"path": path, "length": info.length, **custom}


def set_rollout(
    repo: TufRepository, model: str, target: str, *, rollout: int | None = None, halted: bool | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """Change a channel's rollout percentage and/or halt flag (re-signed, same bundle).

    Raises:
        LookupError: nothing published on that channel.
        ValueError: rollout outside 0..100.
    """
    changes: dict[str, Any] = {}
    if rollout is not None:
        changes["rollout"] = _percent(rollout)
    if halted is not None:
        changes["halted"] = bool(halted)
        changes["halt_reason"] = reason if halted else None
    if not changes:
        raise ValueError("Got no change; expected a rollout percentage or a halt/resume")
    info = repo.update_custom(channel_path(model, target), changes)
    return {"path": info.path, "length": info.length, **(info.custom or {})}


def channels(repo: TufRepository) -> list[dict[str, Any]]:
    """Every published channel with its signed custom metadata."""
    return [{"path": p, "length": t.length, **(t.custom or {})} for p, t in sorted(repo.targets().items())]
