"""The model registry: ``<root>/<model>/<version>/`` folders with a ``card.json``.

Versions are integers allocated by an atomic rename of a staging folder; aliases
(``production``, ``candidate``, …) live in ``<root>/<model>/aliases.json``, replaced
atomically (write a temp file, rename). Storage goes through ``pyarrow.fs``, so the
root may be a local path or ``s3://bucket/prefix``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import pyarrow.fs as pafs

try:  # only a registry given a database needs SQLAlchemy
    import sqlalchemy as sa
except ImportError:  # pragma: no cover
    sa = None  # type: ignore[assignment]

from visionfleet.spec import DEFAULT_ALIAS, FileEntry, ModelCard, ModelRef, parse_ref, validate_name

__all__ = ["Registry", "ResolvedModel", "NotFound", "RegistryError"]

_ALIAS_FILE = "aliases.json"
_CARD = "card.json"
_HISTORY_KEEP = 200
_CHUNK = 1 << 20


class RegistryError(RuntimeError):
    pass


class NotFound(RegistryError, LookupError):
    """Unknown model, version or alias."""


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
            self._fs, self._root = pafs.FileSystem.from_uri(root_s)
            self._local = False
        else:
            self._root = str(Path(root_s).expanduser().resolve())
            self._fs = pafs.LocalFileSystem()
            self._local = True
            Path(self._root).mkdir(parents=True, exist_ok=True)
        self.uri = root_s
        self._cache_dir = Path(cache_dir) if cache_dir else None

    @classmethod
    def from_settings(cls, settings) -> "Registry":  # noqa: ANN001 - visionfleet.settings.Settings
        """The registry of ``settings``: blobs at ``store_uri("registry")``, metadata in ``db_url``."""
        return cls(settings.store_uri("registry"), cache_dir=settings.cache_dir / "registry", db=settings.db_url)

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
    def list_models(self) -> list[str]:
        if self._db is not None:
            from visionfleet.db import model_versions as mv

            with self._db.engine.connect() as c:
                return sorted(c.execute(sa.select(mv.c.model).distinct()).scalars())
        infos = self._fs.get_file_info(pafs.FileSelector(self._root, allow_not_found=True))
        return sorted(
            i.base_name for i in infos if i.type == pafs.FileType.Directory and not i.base_name.startswith(".")
        )

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

    def aliases(self, name: str) -> dict[str, int]:
        if self._db is not None:
            from visionfleet.db import aliases as al

            with self._db.engine.connect() as c:
                return {a: int(v) for a, v in c.execute(sa.select(al.c.alias, al.c.version).where(al.c.model == name))}
        path = self._p(name, _ALIAS_FILE)
        if not self._exists(path):
            return {}
        return {k: int(v) for k, v in self._read_json(path).get("aliases", {}).items()}

    def alias_history(self, name: str) -> list[dict]:
        if self._db is not None:
            from visionfleet.db import alias_history as ah

            with self._db.engine.connect() as c:
                rows = c.execute(sa.select(ah).where(ah.c.model == name).order_by(ah.c.id)).mappings().all()
            return [{"at": r["at"], "alias": r["alias"], "from": r["from_version"], "to": r["to_version"],
                     "reason": r["reason"]} for r in rows][-_HISTORY_KEEP:]
        path = self._p(name, _ALIAS_FILE)
        return self._read_json(path).get("history", []) if self._exists(path) else []

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

    def card(self, name: str, version: int) -> ModelCard:
        path = self._p(name, version, _CARD)
        if not self._exists(path):
            raise NotFound(f"model {name!r} has no version {version}")
        return ModelCard.model_validate(self._read_json(path))

    def card_for(self, ref: str | ModelRef) -> ModelCard:
        r = self.resolve(ref)
        return self.card(r.name, r.version)

    def read_bytes(self, name: str, version: int, filename: str) -> bytes:
        _check_filename(filename)
        with self._fs.open_input_stream(self._p(name, version, filename)) as f:
            return f.read()

    def local_dir(self, name: str, version: int) -> Path:
        """A local folder holding the version's files (downloaded once when remote)."""
        if self._local:
            path = Path(self._p(name, version))
            if not path.is_dir():
                raise NotFound(f"model {name!r} has no version {version}")
            return path
        if self._cache_dir is None:
            raise RegistryError("a remote registry needs cache_dir to load models locally")
        dest = self._cache_dir / name / str(version)
        if not (dest / _CARD).exists():
            tmp = dest.with_name(f".{version}.tmp-{uuid.uuid4().hex}")
            tmp.mkdir(parents=True)
            for info in self._fs.get_file_info(pafs.FileSelector(self._p(name, version))):
                with self._fs.open_input_stream(info.path) as src, open(tmp / info.base_name, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
            try:
                tmp.rename(dest)
            except OSError:  # someone else finished first
                shutil.rmtree(tmp, ignore_errors=True)
        return dest

    # ------------------------------------------------------------------ writes
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
            except (sa.exc.IntegrityError, sa.exc.OperationalError):
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
            except (sa.exc.IntegrityError, sa.exc.OperationalError):
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

    def update_metrics(self, name: str, version: int, metrics: Mapping[str, object]) -> ModelCard:
        """Merge measured metrics into a version's card (cards are otherwise immutable)."""
        card = self.card(name, version)
        merged = {**card.metrics, **dict(metrics)}
        new = card.model_copy(update={"metrics": merged})
        with self._lock(name):
            self._write_atomic(self._p(name, version, _CARD), new.model_dump_json(indent=2).encode())
        return new


def _check_filename(fname: str) -> None:
    if not fname or "/" in fname or "\\" in fname or fname in (".", "..") or fname.startswith("."):
        raise ValueError(f"Got {fname!r} for a registry file name; expected a plain file name")
