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

**Where it lives.** On one machine (the embedded profile) all of the above is a folder,
``<home>/tuf``, and an ``fcntl`` lock serialises publishers. On a cluster with no shared
disk (:meth:`TufRepository.from_settings` with an ``s3://`` store) ``config.json`` and
``repo/`` live on the store area ``tuf`` (same keys); every write is one atomic PUT, and
because consistent snapshots never rewrite a versioned file, a reader sees the old state
or the new one. Publishers on different nodes are serialised by a lock in the shared
database (``visionfleet.db.tuf``). The signing keys do not go to the object store: the
operator gives a folder (``$VISIONFLEET_TUF_KEYS``, a mounted Secret) holding
``targets.pem``, ``snapshot.pem`` and ``timestamp.pem`` (``root.pem`` is needed only to
create the repository; keep it offline afterwards).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from edge_agent.durable import atomic_write, fsync_dir, write_file
from edge_agent.ota import channel_path

if TYPE_CHECKING:
    from visionfleet.db import Database
    from visionfleet.settings import Settings
    from visionfleet.store import Store

__all__ = [
    "ROLES",
    "Expiry",
    "TufRepository",
    "RepositoryMissing",
    "SigningKeysMissing",
    "ENV_KEYS",
    "channel_path",
    "publish_bundle",
    "set_rollout",
    "channels",
]

ROLES = ("root", "targets", "snapshot", "timestamp")
_HASH = "sha256"
_KEEP_TARGET_FILES = 3  # per channel: old bundles a slow device may still be fetching
ENV_KEYS = "VISIONFLEET_TUF_KEYS"  # the signing keys' folder for a repository on a shared store
_ONLINE_ROLES = ("targets", "snapshot", "timestamp")
_CHUNK = 8 * 1024 * 1024


class RepositoryMissing(FileNotFoundError):
    """No TUF repository in this state dir yet (``visionfleet edge keys`` creates one)."""


class SigningKeysMissing(FileNotFoundError):
    """A repository on a shared store, and no signing keys where the operator said they are."""


class _LocalFiles:
    """The repository in a folder of this disk: every write fsynced and renamed, as on a device."""

    def __init__(self, base: Path) -> None:
        self.base = base

    def read(self, key: str) -> bytes:
        return (self.base / key).read_bytes()

    def exists(self, key: str) -> bool:
        return (self.base / key).is_file()

    def write(self, key: str, data: bytes) -> None:
        atomic_write(self.base / key, data)

    def put_file(self, key: str, local_file: str | os.PathLike[str]) -> None:
        dest = self.base / key
        if dest.exists():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name.split('.', 1)[0]}.{uuid.uuid4().hex[:8]}.tmp"
        shutil.copyfile(local_file, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)

    def names(self, prefix: str) -> list[tuple[str, float]]:
        """(file name, mtime) of the files directly under ``prefix`` (no hidden ones)."""
        d = self.base / prefix
        return [(p.name, p.stat().st_mtime) for p in d.glob("[!.]*") if p.is_file()] if d.is_dir() else []

    def delete(self, key: str) -> None:
        (self.base / key).unlink(missing_ok=True)


class _StoreFiles:
    """The repository on a store (``s3://``): each object written whole by one PUT or upload."""

    def __init__(self, store: "Store") -> None:
        self.store = store

    def read(self, key: str) -> bytes:
        from visionfleet.store import StoreError, StoreUnavailable

        try:
            return self.store.read_bytes(key)
        except StoreUnavailable:
            raise
        except StoreError:
            if not self.store.exists(key):
                raise FileNotFoundError(f"{self.store.uri}/{key}") from None
            raise

    def exists(self, key: str) -> bool:
        return self.store.exists(key)

    def write(self, key: str, data: bytes) -> None:
        self.store.write_bytes(key, data)

    def _size(self, key: str) -> int | None:
        import pyarrow.fs as pafs

        info = self.store._call(f"stat {self.store.uri}/{key}", self.store.fs.get_file_info, self.store.path(key))
        return None if info.type == pafs.FileType.NotFound else int(info.size or 0)

    def put_file(self, key: str, local_file: str | os.PathLike[str]) -> None:
        """Upload a file under a content-addressed key; checked by size, so a cut upload is redone."""
        from visionfleet.store import StoreError

        size = os.path.getsize(local_file)
        if self._size(key) == size:
            return

        def _upload() -> None:
            with open(local_file, "rb") as src, self.store.fs.open_output_stream(self.store.path(key)) as dst:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
        self.store._call(f"upload {self.store.uri}/{key}", _upload)
        if self._size(key) != size:  # an aborted multipart upload can still complete short
            self.store.delete(key)
            raise StoreError(f"upload {self.store.uri}/{key}: the object is not {size} bytes; retry the publish")

    def names(self, prefix: str) -> list[tuple[str, float]]:
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.store.path(prefix), allow_not_found=True)
        infos = self.store._call(f"list {self.store.uri}/{prefix}", self.store.fs.get_file_info, sel)
        return [(i.base_name, i.mtime.timestamp() if i.mtime else 0.0) for i in infos
                if i.type == pafs.FileType.File and not i.base_name.startswith(".")]

    def delete(self, key: str) -> None:
        self.store.delete(key)

    def download(self, key: str, dest: Path, sha256: str | None) -> None:
        """Copy an object to ``dest`` (temp file, renamed), refused if its hash is not ``sha256``."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        h = hashlib.sha256()

        def _copy() -> None:
            with self.store.fs.open_input_stream(self.store.path(key)) as src, open(tmp, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
        try:
            if not self.store.exists(key):
                raise FileNotFoundError(f"{self.store.uri}/{key}")
            self.store._call(f"read {self.store.uri}/{key}", _copy)
            if sha256 is not None and h.hexdigest() != sha256:
                raise ValueError(f"Got sha256 {h.hexdigest()} for {self.store.uri}/{key}; expected {sha256}")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)


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
    """Create, sign and publish to the repository under ``<home>/tuf``, or on a shared store.

    ``TufRepository(home)``: the embedded profile, a folder; every change holds an
    exclusive lock on ``<home>/tuf/.lock``. ``TufRepository(store=URI, db=URL, keys_dir=…)``:
    metadata and targets on the store, changes serialised by a lock in the database, keys
    from ``keys_dir``. :meth:`from_settings` picks one from the settings.
    """

    def __init__(self, home: str | os.PathLike[str] | None = None, *, store: "str | Store | None" = None,
                 db: "str | Database | None" = None, keys_dir: str | os.PathLike[str] | None = None,
                 work_dir: str | os.PathLike[str] | None = None, base: str | os.PathLike[str] | None = None) -> None:
        if sum(x is not None for x in (home, store, base)) != 1:
            raise ValueError("Got home, store and base together (or none); expected exactly one")
        self._db_arg = db
        self._database: Database | None = None
        if store is None:
            self.base = Path(base) if base is not None else Path(home) / "tuf"  # type: ignore[arg-type]
            self.keys_dir: Path | None = self.base / "keys"
            self.repo_dir = self.base / "repo"
            self.metadata_dir = self.repo_dir / "metadata"
            self.targets_dir = self.repo_dir / "targets"
            self.location = str(self.base)
            self.shared = False
            self.work_dir = self.base
            self._files: Any = _LocalFiles(self.base)
            return
        from visionfleet.store import open_store

        if db is None:
            raise ValueError(f"Got a TUF repository on {store} without a database; expected db= (VISIONFLEET_DB): "
                             "publishers on different nodes are serialised by a lock in it")
        st = open_store(store) if isinstance(store, (str, os.PathLike)) else store
        self.shared = True
        self.location = st.uri
        self.keys_dir = Path(keys_dir) if keys_dir is not None else None
        self.work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.gettempdir()) / "visionfleet-tuf"
        # No local folders: what devices fetch is on the store, read through ``read_public``.
        self.base = self.repo_dir = self.metadata_dir = self.targets_dir = None  # type: ignore[assignment]
        self._files = _StoreFiles(st)

    @classmethod
    def from_settings(cls, settings: "Settings", *, keys_dir: str | os.PathLike[str] | None = None) -> "TufRepository":
        """The repository of these settings: a folder for a local store area ``tuf`` (the embedded
        profile: ``<home>/tuf``), else the store area with the database lock and the keys from
        ``keys_dir`` or ``$VISIONFLEET_TUF_KEYS``."""
        uri = settings.store_uri("tuf")
        if "://" not in uri:
            return cls(base=uri)
        keys = keys_dir if keys_dir is not None else (os.environ.get(ENV_KEYS) or None)
        return cls(store=uri, db=settings.db_url, keys_dir=keys, work_dir=settings.cache_dir / "tuf")

    @property
    def archive_dir(self) -> Path:
        """Where ``publish_bundle`` packs archives (a local folder in both profiles)."""
        return self.work_dir / "archives"

    def _db(self) -> "Database":
        if self._database is None:
            from visionfleet.db import Database, open_db

            self._database = self._db_arg if isinstance(self._db_arg, Database) else open_db(str(self._db_arg))
        return self._database

    # ------------------------------------------------------------------ setup
    def exists(self) -> bool:
        return self._files.exists("repo/metadata/1.root.json") and self._files.exists("repo/metadata/timestamp.json")

    def require(self) -> None:
        if not self.exists():
            raise RepositoryMissing(f"no TUF repository at {self.location}; create it with `visionfleet edge keys`")

    def init(self, expiry: Expiry | None = None) -> bool:
        """Create keys and the first signed metadata; returns False when it already exists."""
        from securesystemslib.signer import CryptoSigner
        from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

        with self._lock():
            if self.exists():
                return False
            expiry = expiry or Expiry()
            if self.keys_dir is None:
                raise SigningKeysMissing(self._keys_message("creating it"))
            self.keys_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.keys_dir, 0o700)
            if not self.shared:
                self.metadata_dir.mkdir(parents=True, exist_ok=True)
                self.targets_dir.mkdir(parents=True, exist_ok=True)
            self._files.write("config.json", json.dumps({"expiry": asdict(expiry)}, indent=2).encode())
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
            doc = json.loads(self._files.read("config.json"))
        except FileNotFoundError:
            return Expiry()
        return Expiry(**doc.get("expiry", {}))

    def set_expiry(self, expiry: Expiry) -> None:
        """Change the expiry periods; they apply from the next signature of each role."""
        self.require()
        with self._lock():
            self._files.write("config.json", json.dumps({"expiry": asdict(expiry)}, indent=2).encode())

    # ------------------------------------------------------------------ keys and files
    def _signer(self, role: str):
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
        from securesystemslib.signer import CryptoSigner

        if self.shared and (self.keys_dir is None or not (self.keys_dir / f"{role}.pem").is_file()):
            raise SigningKeysMissing(self._keys_message(f"signing {role}"))
        key_file = self.keys_dir / f"{role}.pem"  # type: ignore[operator]
        mode = key_file.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(f"{key_file} has mode {oct(mode)}; expected 0600 (a private key)")
        return CryptoSigner(load_pem_private_key(key_file.read_bytes(), None))

    def _keys_message(self, doing: str) -> str:
        where = f"{self.keys_dir} has no such key" if self.keys_dir is not None else f"${ENV_KEYS} is not set"
        return (f"Got no TUF signing keys for the repository on {self.location} while {doing} ({where}); expected "
                f"${ENV_KEYS}=/path to a folder with {', '.join(r + '.pem' for r in _ONLINE_ROLES)} (readable by the owner only, "
                "mounted from a Secret; docs/edge.md, 'The repository on a shared store')")

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        if self.shared:
            from visionfleet.db.tuf import repository_lock

            with repository_lock(self._db(), self.location):
                yield
            return
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
        self._files.write(f"repo/metadata/{name}", data)
        if role == "root":
            self._files.write("repo/metadata/root.json", data)  # the newest root, for bootstrapping devices
        return data

    def _load(self, role: str):
        from tuf.api.metadata import Metadata

        self.require()

        def read(name: str) -> Any:
            return Metadata.from_bytes(self._files.read(f"repo/metadata/{name}"))

        if role == "timestamp":
            return read("timestamp.json")
        if role == "snapshot":
            return read(f"{self._load('timestamp').signed.snapshot_meta.version}.snapshot.json")
        if role == "targets":
            return read(f"{self._load('snapshot').signed.meta['targets.json'].version}.targets.json")
        if role == "root":
            versions = sorted(int(n.split(".")[0]) for n, _ in self._files.names("repo/metadata")
                              if n.endswith(".root.json") and n.split(".")[0].isdigit())
            return read(f"{versions[-1]}.root.json")
        raise ValueError(f"Got role {role!r}; expected one of {ROLES}")

    def root_bytes(self) -> bytes:
        """The newest root metadata: what a new device is given as its trust anchor."""
        self.require()
        return self._files.read("repo/metadata/root.json")

    def read_public(self, path: str) -> "bytes | Path":
        """A file devices fetch (``metadata/...`` or ``targets/...``): a local path, or, on a store,
        the bytes of metadata (read each time: ``timestamp.json`` changes) and a path in the local
        read-through cache for targets (hash-named, checked on download, so never stale).

        Raises:
            FileNotFoundError: no such file, or a path outside ``metadata/`` and ``targets/``.
            visionfleet.store.StoreUnavailable: the store did not answer.
        """
        parts = path.split("/")
        if parts[0] not in ("metadata", "targets") or len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
            raise FileNotFoundError(path)
        if not self.shared:
            root = self.repo_dir.resolve()
            target = (root / path).resolve()
            if root not in target.parents or not target.is_file():
                raise FileNotFoundError(path)
            return target
        if parts[0] == "metadata":
            return self._files.read(f"repo/{path}")
        cached = self.work_dir / "cache" / path
        if not cached.is_file():
            digest = parts[-1].split(".", 1)[0]
            self._files.download(f"repo/{path}", cached, digest if len(digest) == 64 else None)
            # The store keeps a few bundles per channel; the cache keeps a few more, newest first.
            old = sorted((p for p in cached.parent.glob("[!.]*") if p.is_file()), key=lambda p: p.stat().st_mtime,
                         reverse=True)[2 * _KEEP_TARGET_FILES:]
            for p in old:
                if p != cached:
                    p.unlink(missing_ok=True)
        return cached

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
        key = f"repo/targets/{dirname}/{digest}.{basename}"
        if self.shared:
            # Content-addressed, so it can go up before the lock: other publishers wait less.
            self._files.put_file(key, local_file)
        with self._lock():
            if not self.shared:
                self._files.put_file(key, local_file)
            md = self._load("targets")
            md.signed.targets[path] = info
            self._sign_targets(md, self.expiry())
            self._prune(f"repo/targets/{dirname}", basename, keep={digest})
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

    def _prune(self, prefix: str, basename: str, keep: set[str]) -> None:
        """Keep the newest few files of a channel; older ones are no longer referenced."""
        files = sorted((f for f in self._files.names(prefix) if f[0].endswith(f".{basename}")),
                       key=lambda f: f[1], reverse=True)
        for name, _ in files[_KEEP_TARGET_FILES:]:
            if name.split(".", 1)[0] not in keep:
                self._files.delete(f"{prefix}/{name}")

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
                data = self._files.read(f"repo/metadata/{v}.targets.json")
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
        out: dict[str, Any] = {"path": self.location, "consistent_snapshot": root.consistent_snapshot, "roles": {}}
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
    scratch = repo.shared and not archive_dir  # on a shared store the archive's home is the store
    archive_dir = Path(archive_dir) if archive_dir else repo.archive_dir
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
    try:
        info = repo.add_target(path, archive, custom)
    finally:
        if scratch:
            archive.unlink(missing_ok=True)
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
