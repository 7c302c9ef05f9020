"""The model registry: ``<root>/<model>/<version>/`` folders with a ``card.json``.

Blobs (the version folders) live under ``root``: a local path or ``s3://bucket/prefix``,
opened through :mod:`visionfleet.store` (``pyarrow.fs``, bounded S3 timeouts). Metadata
(which versions exist, aliases and their history) lives either beside the blobs — versions
allocated by an atomic rename of a staging folder, aliases in ``<root>/<model>/aliases.json``
replaced atomically under a file lock (one machine) — or, given a database, in its tables as
transactions (``visionfleet.db``: several nodes).

:meth:`Registry.from_settings` picks the mode from the settings: the embedded default (local
home, no ``$VISIONFLEET_DB``) keeps the files exactly as before; an object store or a
configured database puts versions and aliases in the database.

A remote version is loaded from this node's cache (:meth:`Registry.local_dir`): files keyed
by their content hash, each downloaded once, verified, then renamed into place.

When the store or the database does not answer, calls raise
:class:`~visionfleet.store.StoreUnavailable` (serving turns it into a 503); a store that
cannot be used at all raises :class:`~visionfleet.store.StoreError`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

import pyarrow.fs as pafs

try:  # only a registry given a database needs SQLAlchemy
    import sqlalchemy as sa
except ImportError:  # pragma: no cover
    sa = None  # type: ignore[assignment]

from visionfleet.spec import DEFAULT_ALIAS, FileEntry, ModelCard, ModelRef, parse_ref, validate_name
from visionfleet.store import StoreError, StoreUnavailable, open_store

__all__ = ["Registry", "ResolvedModel", "NotFound", "RegistryError", "StoreError", "StoreUnavailable", "uses_db"]

_ALIAS_FILE = "aliases.json"
_CARD = "card.json"
_HISTORY_KEEP = 200
_CHUNK = 1 << 20


class RegistryError(RuntimeError):
    pass


class NotFound(RegistryError, LookupError):
    """Unknown model, version or alias."""


F = TypeVar("F", bound=Callable[..., Any])
# Transient database states worth a retry (SQLite's writer lock, PostgreSQL's serialization
# failures); anything else from the driver (a refused connection, a server gone) is an outage.
_DB_RETRY_MARKERS = ("database is locked", "could not serialize", "deadlock detected", "database table is locked")


def _db_transient(exc: BaseException) -> bool:
    return sa is not None and (isinstance(exc, sa.exc.IntegrityError) or (
        isinstance(exc, sa.exc.OperationalError) and any(m in str(exc) for m in _DB_RETRY_MARKERS)))


def _as_store_error(exc: BaseException, what: str) -> StoreError | None:
    """The StoreError an I/O or database failure means, or None for errors that keep their type."""
    if isinstance(exc, (StoreError, FileNotFoundError, NotFound)):
        return None
    if sa is not None and isinstance(exc, sa.exc.DBAPIError) and not isinstance(exc, sa.exc.IntegrityError):
        first = str(exc.orig if exc.orig is not None else exc).strip().splitlines()
        return StoreUnavailable(f"{what}: the database did not answer: {first[0] if first else type(exc).__name__}")
    try:
        import pyarrow as pa

        arrow_error: tuple[type, ...] = (OSError, pa.ArrowException)
    except ImportError:  # pragma: no cover
        arrow_error = (OSError,)
    if isinstance(exc, arrow_error):
        from visionfleet.store import _classify  # one classification of S3 errors (network / credentials)

        return _classify(exc, what)
    return None


def _guarded(fn: F) -> F:
    """Turn a failing store or database under a public method into StoreError / StoreUnavailable."""

    @functools.wraps(fn)
    def wrapper(self: "Registry", *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except Exception as exc:
            mapped = _as_store_error(exc, f"registry {self.uri} ({fn.__name__})")
            if mapped is None:
                raise
            raise mapped from exc

    return wrapper  # type: ignore[return-value]


def uses_db(settings) -> bool:  # noqa: ANN001 - visionfleet.settings.Settings
    """Whether the registry of ``settings`` keeps versions and aliases in the database.

    The embedded default (the registry on this node's disk, no ``$VISIONFLEET_DB``) keeps
    them in files beside the blobs, as it always has; an object store or a configured
    database moves them into the database."""
    default_db = settings.db_url == f"sqlite:///{settings.home}/state.db"
    return not default_db or "://" in settings.store_uri("registry")


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"


class Registry:
    """Read and write registered model versions.

    Args:
        root: a local directory or a ``pyarrow.fs`` URI such as ``s3://bucket/models``.
        cache_dir: where remote versions are downloaded for local loading.
    """

    def __init__(self, root: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None,
                 db: object | None = None) -> None:
        if isinstance(db, str):
            from visionfleet.db import open_db

            db = open_db(db)
        self._db = db  # a visionfleet.db.Database: versions and aliases live there when given
        root_s = os.fspath(root)
        if "://" in root_s:
            store = open_store(root_s)  # s3:// with the AWS variables and bounded timeouts
            self._fs, self._root = store.fs, store.root
            self._local = False
        else:
            self._root = str(Path(root_s).expanduser().resolve())
            self._fs = pafs.LocalFileSystem()
            self._local = True
            Path(self._root).mkdir(parents=True, exist_ok=True)
        self.uri = root_s
        self._cache_dir = Path(cache_dir) if cache_dir else None

    @classmethod
    def from_settings(cls, settings, db: object | None = None) -> "Registry":  # noqa: ANN001 - Settings
        """The registry of ``settings``: blobs at ``store_uri("registry")``, versions and aliases
        in ``db_url`` when the store is shared or a database is configured (:func:`uses_db`),
        remote files cached by content hash under ``cache_dir/registry``.

        Args:
            settings: a ``visionfleet.settings.Settings``.
            db: an already opened ``visionfleet.db.Database`` of ``settings.db_url`` to reuse.

        Raises:
            StoreError: the store URL cannot be used.
            visionfleet.db.DatabaseError: the database cannot be opened.
        """
        if not uses_db(settings):
            db = None
        elif db is None:
            db = settings.db_url
        return cls(settings.store_uri("registry"), cache_dir=settings.cache_dir / "registry", db=db)

    # ------------------------------------------------------------------ paths & io
    def _p(self, *parts: str | int) -> str:
        return "/".join([self._root.rstrip("/"), *(str(p) for p in parts)])

    def _exists(self, path: str) -> bool:
        return self._fs.get_file_info(path).type != pafs.FileType.NotFound

    def _read_json(self, path: str) -> dict:
        with self._fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())

    def _write_atomic(self, path: str, data: bytes) -> None:
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with self._fs.open_output_stream(tmp) as f:
            f.write(data)
        if self._local:
            with open(tmp, "rb+") as fh:  # durable before it becomes visible
                os.fsync(fh.fileno())
        self._fs.move(tmp, path)  # rename(2) on a local disk: readers see old or new, never half

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        """Serialize read-modify-write of a model's aliases (local disks only)."""
        if not self._local:
            yield
            return
        import fcntl

        lock_path = Path(self._p(name)) / ".lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ queries
    @_guarded
    def list_models(self) -> list[str]:
        if self._db is not None:
            from visionfleet.db import model_versions as mv

            with self._db.engine.connect() as c:
                return sorted(c.execute(sa.select(mv.c.model).distinct()).scalars())
        infos = self._fs.get_file_info(pafs.FileSelector(self._root, allow_not_found=True))
        return sorted(
            i.base_name for i in infos if i.type == pafs.FileType.Directory and not i.base_name.startswith(".")
        )

    @_guarded
    def versions(self, name: str) -> list[int]:
        if self._db is not None:
            from visionfleet.db import model_versions as mv

            with self._db.engine.connect() as c:
                return sorted(c.execute(sa.select(mv.c.version).where(mv.c.model == name)).scalars())
        infos = self._fs.get_file_info(pafs.FileSelector(self._p(name), allow_not_found=True))
        out = []
        for i in infos:
            if i.type == pafs.FileType.Directory and i.base_name.isdigit():
                out.append(int(i.base_name))
        return sorted(out)

    @_guarded
    def aliases(self, name: str) -> dict[str, int]:
        if self._db is not None:
            from visionfleet.db import aliases as al

            with self._db.engine.connect() as c:
                return {a: int(v) for a, v in c.execute(sa.select(al.c.alias, al.c.version).where(al.c.model == name))}
        path = self._p(name, _ALIAS_FILE)
        if not self._exists(path):
            return {}
        return {k: int(v) for k, v in self._read_json(path).get("aliases", {}).items()}

    @_guarded
    def alias_history(self, name: str) -> list[dict]:
        if self._db is not None:
            from visionfleet.db import alias_history as ah

            with self._db.engine.connect() as c:
                rows = c.execute(sa.select(ah).where(ah.c.model == name).order_by(ah.c.id)).mappings().all()
            return [{"at": r["at"], "alias": r["alias"], "from": r["from_version"], "to": r["to_version"],
                     "reason": r["reason"]} for r in rows][-_HISTORY_KEEP:]
        path = self._p(name, _ALIAS_FILE)
        return self._read_json(path).get("history", []) if self._exists(path) else []

    @_guarded
    def resolve(self, ref: str | ModelRef) -> ResolvedModel:
        """Turn ``NAME[:VERSION|@ALIAS]`` into a concrete version.

        Raises:
            ValueError: malformed reference.
            NotFound: unknown model, version or alias.
        """
        r = parse_ref(ref) if isinstance(ref, str) else ref
        versions = self.versions(r.name)
        if not versions:
            raise NotFound(f"unknown model {r.name!r}")
        if r.version is not None:
            if r.version not in versions:
                raise NotFound(f"model {r.name!r} has no version {r.version} (versions: {versions})")
            return ResolvedModel(r.name, r.version)
        alias = r.alias or DEFAULT_ALIAS
        aliases = self.aliases(r.name)
        if alias not in aliases:
            raise NotFound(f"model {r.name!r} has no alias @{alias} (aliases: {sorted(aliases)})")
        return ResolvedModel(r.name, aliases[alias])

    @_guarded
    def card(self, name: str, version: int) -> ModelCard:
        # one read, no stat first: on an object store each call is a round trip
        return ModelCard.model_validate(json.loads(self._read_card_bytes(name, version).decode()))

    def card_for(self, ref: str | ModelRef) -> ModelCard:
        r = self.resolve(ref)
        return self.card(r.name, r.version)

    @_guarded
    def read_bytes(self, name: str, version: int, filename: str) -> bytes:
        _check_filename(filename)
        with self._fs.open_input_stream(self._p(name, version, filename)) as f:
            return f.read()

    @_guarded
    def local_dir(self, name: str, version: int) -> Path:
        """A local folder holding the version's files (downloaded once per node when remote).

        Remote files land in this node's cache keyed by content hash
        (``<cache_dir>/blobs/<sha256>``: downloaded to a temp name, hash verified, renamed),
        and the version's folder (``<cache_dir>/models/<name>/<version>-<card digest>``) holds
        its ``card.json`` and links to those blobs; two versions sharing a file share its blob.
        When the store does not answer, a version already cached here is still returned
        (versions are immutable).

        Raises:
            NotFound: no such version.
            StoreUnavailable: the store did not answer and the version is not cached here.
            RegistryError: a downloaded file does not match its card's hash.
        """
        if self._local:
            path = Path(self._p(name, version))
            if not path.is_dir():
                raise NotFound(f"model {name!r} has no version {version}")
            return path
        if self._cache_dir is None:
            raise RegistryError("a remote registry needs cache_dir to load models locally")
        versions_dir = self._cache_dir / "models" / name
        try:
            raw = self._read_card_bytes(name, version)
        except NotFound:
            raise
        except Exception as exc:  # noqa: BLE001 - only an outage falls back to the cache
            mapped = _as_store_error(exc, f"registry {self.uri} (local_dir)")
            cached = sorted(versions_dir.glob(f"{int(version)}-*/{_CARD}"), key=lambda p: p.stat().st_mtime)
            if isinstance(mapped, StoreUnavailable) and cached:
                return cached[-1].parent
            raise
        dest = versions_dir / f"{int(version)}-{hashlib.sha256(raw).hexdigest()[:16]}"
        if (dest / _CARD).exists():
            return dest
        card = ModelCard.model_validate(json.loads(raw.decode()))
        blobs = self._cache_dir / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
        tmp.mkdir(parents=True)
        try:
            for entry in card.files:
                _check_filename(entry.name)
                blob = self._fetch_blob(name, version, entry, blobs)
                try:
                    os.link(blob, tmp / entry.name)  # same file system: no second copy
                except OSError:
                    shutil.copyfile(blob, tmp / entry.name)
            (tmp / _CARD).write_bytes(raw)
            try:
                tmp.rename(dest)
            except OSError:  # another process on this node finished first
                if not (dest / _CARD).exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def _read_card_bytes(self, name: str, version: int) -> bytes:
        path = self._p(name, version, _CARD)
        try:
            with self._fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            raise NotFound(f"model {name!r} has no version {version}") from None

    def _fetch_blob(self, name: str, version: int, entry: FileEntry, blobs: Path) -> Path:
        """``blobs/<sha256>`` for one file of a version: downloaded once, verified, renamed into place."""
        blob = blobs / entry.sha256
        if blob.is_file():
            return blob
        tmp = blobs / f".{entry.sha256}.tmp-{uuid.uuid4().hex}"
        digest = hashlib.sha256()
        try:
            with self._fs.open_input_stream(self._p(name, version, entry.name)) as src, open(tmp, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            if digest.hexdigest() != entry.sha256:
                raise RegistryError(f"Got sha256 {digest.hexdigest()} for {name}:{version}/{entry.name}; "
                                    f"expected {entry.sha256} from its card (a corrupt or changed object)")
            os.replace(tmp, blob)  # atomic: a reader sees no blob or the whole, verified one
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return blob

    # ------------------------------------------------------------------ writes
    @_guarded
    def register(
        self,
        card: ModelCard,
        files: Mapping[str, str | os.PathLike[str]],
        *,
        set_production_if_none: bool = True,
        aliases: tuple[str, ...] = (),
    ) -> ModelCard:
        """Copy ``files`` (role -> local path) into a new version and write its card.

        The first version of a model becomes ``production`` unless told otherwise.
        Returns the card as stored (with version and file hashes).
        """
        name = validate_name(card.name)
        if not files:
            raise ValueError("Got no files; expected at least the model file")
        staging = self._p(name, f".staging-{uuid.uuid4().hex}")
        self._fs.create_dir(staging, recursive=True)
        entries: list[FileEntry] = []
        seen: set[str] = set()
        try:
            for role, src in files.items():
                src_path = Path(src)
                if not src_path.is_file():
                    raise FileNotFoundError(f"no such file: {src_path}")
                fname = src_path.name
                _check_filename(fname)
                if fname in seen or fname == _CARD:
                    raise ValueError(f"Got duplicate or reserved file name {fname!r}")
                seen.add(fname)
                digest = hashlib.sha256()
                size = 0
                with open(src_path, "rb") as fin, self._fs.open_output_stream(f"{staging}/{fname}") as fout:
                    while chunk := fin.read(_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        fout.write(chunk)
                entries.append(FileEntry(name=fname, role=role, bytes=size, sha256=digest.hexdigest()))
            if card.model_file not in seen:
                raise ValueError(f"Got files {sorted(seen)}; expected the card's model_file {card.model_file!r}")
            if self._db is not None:
                version, stored = self._allocate_db(name, card, staging, entries)
            # Allocate the version by renaming the staging folder; retry on a race.
            for _ in range(0 if self._db is not None else 100):
                version = (max(self.versions(name), default=0)) + 1
                entries = [self._stamp(staging, e, name, version) for e in entries]
                stored = card.model_copy(update={"version": version, "files": entries})
                self._write_atomic(f"{staging}/{_CARD}", stored.model_dump_json(indent=2).encode())
                if self._local and Path(self._p(name, version)).exists():
                    continue
                try:
                    self._fs.move(staging, self._p(name, version))
                    break
                except OSError:
                    continue
            else:
                if self._db is None:  # pragma: no cover - 100 concurrent writers
                    raise RegistryError(f"could not allocate a version for {name!r}")
                with contextlib.suppress(Exception):  # the blobs now live under the committed version
                    self._fs.delete_dir(staging)
        except BaseException:
            with contextlib.suppress(Exception):
                self._fs.delete_dir(staging)
            raise
        wanted = list(aliases)
        if set_production_if_none and DEFAULT_ALIAS not in self.aliases(name):
            wanted.append(DEFAULT_ALIAS)
        for alias in dict.fromkeys(wanted):
            self.set_alias(name, alias, version, reason="registered")
        return stored

    def _allocate_db(self, name: str, card: ModelCard, staging: str, entries: list[FileEntry]):
        """INSERT max+1 into model_versions, copy the staged blobs under the version, then commit.

        Until the commit the version is invisible (readers list versions from the database);
        two writers racing for the same number: one gets a unique-constraint conflict and retries."""
        import time

        from visionfleet.db import model_versions as mv

        for _ in range(200):
            try:
                with self._db.engine.begin() as c:
                    cur = c.execute(sa.select(sa.func.max(mv.c.version)).where(mv.c.model == name)).scalar()
                    version = int(cur or 0) + 1
                    c.execute(mv.insert().values(model=name, version=version, created_ts=time.time()))
                    stamped = [self._stamp(staging, e, name, version) for e in entries]
                    stored = card.model_copy(update={"version": version, "files": stamped})
                    final = self._p(name, version)
                    self._fs.create_dir(final, recursive=True)
                    for e in stamped:
                        self._fs.copy_file(f"{staging}/{e.name}", f"{final}/{e.name}")
                    self._write_atomic(f"{final}/{_CARD}", stored.model_dump_json(indent=2).encode())
                return version, stored
            except sa.exc.DBAPIError as exc:
                if not _db_transient(exc):
                    raise
                time.sleep(0.01)
                continue
        raise RegistryError(f"could not allocate a version for {name!r} in the database")

    def _db_alias(self, name: str, alias: str, version: int | None, reason: str) -> int | None:
        """Set (or remove, version=None) an alias and append its history in one transaction."""
        from visionfleet.db import alias_history as ah
        from visionfleet.db import aliases as al

        import time

        for _ in range(200):
            try:
                with self._db.engine.begin() as c:
                    where = (al.c.model == name) & (al.c.alias == alias)
                    previous = c.execute(sa.select(al.c.version).where(where)).scalar()
                    if version is None:
                        if previous is None:
                            return None
                        c.execute(al.delete().where(where))
                    elif previous is None:
                        c.execute(al.insert().values(model=name, alias=alias, version=version, updated_ts=time.time()))
                    else:
                        c.execute(al.update().where(where).values(version=version, updated_ts=time.time()))
                    c.execute(ah.insert().values(model=name, alias=alias, from_version=previous, to_version=version,
                                                 reason=reason, at=_dt.datetime.now(_dt.timezone.utc).isoformat()))
                return previous
            except sa.exc.DBAPIError as exc:
                if not _db_transient(exc):
                    raise
                time.sleep(0.01)
        raise RegistryError(f"could not switch {name}@{alias} in the database")

    def _stamp(self, staging: str, entry: FileEntry, name: str, version: int) -> FileEntry:
        """Write name and version into an ONNX file's metadata_props (self-describing files)."""
        if not entry.name.endswith(".onnx"):
            return entry
        import onnx  # server-side only; the registry is not part of the device install

        path = f"{staging}/{entry.name}"
        with self._fs.open_input_stream(path) as f:
            proto = onnx.load_from_string(f.read())
        props = {p.key: p for p in proto.metadata_props}
        for key, value in (("model_name", name), ("version", str(version))):
            if key in props:
                props[key].value = value
            else:
                p = proto.metadata_props.add()
                p.key, p.value = key, value
        data = proto.SerializeToString()
        with self._fs.open_output_stream(path) as f:
            f.write(data)
        return entry.model_copy(update={"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})

    @_guarded
    def set_alias(self, name: str, alias: str, version: int, *, reason: str = "") -> int | None:
        """Point ``name@alias`` at ``version`` atomically; returns the previous version."""
        parse_ref(f"{name}@{alias}")  # validates both
        if version not in self.versions(name):
            raise NotFound(f"model {name!r} has no version {version}")
        if self._db is not None:
            return self._db_alias(name, alias, int(version), reason)
        with self._lock(name):
            path = self._p(name, _ALIAS_FILE)
            doc = self._read_json(path) if self._exists(path) else {"aliases": {}, "history": []}
            previous = doc["aliases"].get(alias)
            doc["aliases"][alias] = int(version)
            doc["history"] = (
                doc.get("history", [])
                + [
                    {
                        "at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                        "alias": alias,
                        "from": previous,
                        "to": int(version),
                        "reason": reason,
                    }
                ]
            )[-_HISTORY_KEEP:]
            self._write_atomic(path, json.dumps(doc, indent=2).encode())
        return previous

    @_guarded
    def remove_alias(self, name: str, alias: str, *, reason: str = "") -> int | None:
        if self._db is not None:
            return self._db_alias(name, alias, None, reason)
        with self._lock(name):
            path = self._p(name, _ALIAS_FILE)
            if not self._exists(path):
                return None
            doc = self._read_json(path)
            previous = doc["aliases"].pop(alias, None)
            if previous is None:
                return None
            doc["history"] = (
                doc.get("history", [])
                + [
                    {
                        "at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                        "alias": alias,
                        "from": previous,
                        "to": None,
                        "reason": reason,
                    }
                ]
            )[-_HISTORY_KEEP:]
            self._write_atomic(path, json.dumps(doc, indent=2).encode())
            return previous

    @_guarded
    def update_metrics(self, name: str, version: int, metrics: Mapping[str, object]) -> ModelCard:
        """Merge measured metrics into a version's card (cards are otherwise immutable)."""
        card = self.card(name, version)
        merged = {**card.metrics, **dict(metrics)}
        new = card.model_copy(update={"metrics": merged})
        with self._lock(name):
            self._write_atomic(self._p(name, version, _CARD), new.model_dump_json(indent=2).encode())
        return new

    @_guarded
    def adopt(self) -> dict[str, list[int]]:
        """Record in the database the versions already under the root (a registry kept in files,
        before ``$VISIONFLEET_DB`` was set or the folders were copied to a bucket), and their
        ``aliases.json`` aliases where the database has none for that model.

        Versions the database already knows are left alone; running it twice changes nothing.
        Returns the versions adopted, per model.
        """
        if self._db is None:
            raise RegistryError("Got a registry without a database; expected one (set VISIONFLEET_DB or a store URI)")
        import time

        from visionfleet.db import aliases as al
        from visionfleet.db import model_versions as mv

        adopted: dict[str, list[int]] = {}
        infos = self._fs.get_file_info(pafs.FileSelector(self._root, allow_not_found=True))
        for model in sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory
                            and not i.base_name.startswith(".")):
            on_disk = []
            for i in self._fs.get_file_info(pafs.FileSelector(self._p(model), allow_not_found=True)):
                if i.type == pafs.FileType.Directory and i.base_name.isdigit() and self._exists(
                        self._p(model, i.base_name, _CARD)):
                    on_disk.append(int(i.base_name))
            alias_path = self._p(model, _ALIAS_FILE)
            file_aliases = ({k: int(v) for k, v in self._read_json(alias_path).get("aliases", {}).items()}
                            if self._exists(alias_path) else {})
            with self._db.engine.begin() as c:
                known = set(c.execute(sa.select(mv.c.version).where(mv.c.model == model)).scalars())
                new = sorted(set(on_disk) - known)
                for v in new:
                    c.execute(mv.insert().values(model=model, version=v, created_ts=time.time()))
                has_aliases = c.execute(sa.select(sa.func.count()).select_from(al).where(al.c.model == model)).scalar()
            if not has_aliases:
                for alias, v in sorted(file_aliases.items()):
                    if v in set(on_disk) | known:
                        self._db_alias(model, alias, v, reason="adopted from aliases.json")
            if new:
                adopted[model] = new
        return adopted


def _check_filename(fname: str) -> None:
    if not fname or "/" in fname or "\\" in fname or fname in (".", "..") or fname.startswith("."):
        raise ValueError(f"Got {fname!r} for a registry file name; expected a plain file name")
