"""The device's model store: install next to the current model, health-check, swap atomically.

Layout under the agent home::

    models/<bundle_id>/      complete, verified bundle folders (the current and the last good)
    models/.staging-<uuid>/  an install in progress (deleted on the next start)
    state.json               {"current": <bundle_id>, "previous": <bundle_id>, ...}

An install extracts the archive into a staging folder (every file written and fsynced,
then the folders), verifies every file against the manifest, renames the folder into
place (fsync ``models/``), loads it and replays its golden samples, and only then
switches ``state.json`` (write a temp file, fsync, rename, fsync the home folder). A
power cut or SIGKILL at any point leaves ``state.json`` naming the old model or the new
one, and both folders are complete: :meth:`ModelStore.open` re-verifies the current
bundle on every start and falls back to the previous one if it does not verify. The
previous (last good) model is always kept, so a later failure can roll back.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.bundle import BundleError, BundleManifest, HealthReport, health_check, read_manifest, verify_files
from edge_agent.durable import atomic_write, fsync_dir, write_file

__all__ = ["ModelStore", "InstallResult", "ActiveModel", "MAX_BUNDLE_BYTES"]

STATE = "state.json"
MAX_BUNDLE_BYTES = 2 * 1024**3  # refuse archives that would unpack to more than this
_MAX_MEMBERS = 10_000
_EVENTS_KEPT = 20


@dataclass(frozen=True)
class InstallResult:
    """What an install did. ``outcome``: installed, already_current, invalid, health_failed."""

    outcome: str
    bundle_id: str | None
    model: str | None = None
    version: int | None = None
    previous: str | None = None
    error: str | None = None
    health: dict[str, Any] | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome in ("installed", "already_current")

    def to_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "bundle_id": self.bundle_id, "model": self.model, "version": self.version,
                "previous": self.previous, "error": self.error, "health": self.health, "seconds": round(self.seconds, 3)}


@dataclass
class ActiveModel:
    """The model the agent serves: the loaded session, its manifest and folder."""

    model: Any  # visionfleet.inference.LoadedModel
    manifest: BundleManifest
    path: Path
    health: HealthReport | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def bundle_id(self) -> str:
        return self.manifest.bundle_id


def _safe_member(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and "\\" not in name and all(p not in ("", ".", "..") for p in parts)


class ModelStore:
    """Install, verify, swap and roll back bundles under ``home``.

    Args:
        home: the agent's state folder.
        threads: ONNX Runtime threads (default: the bundle's target profile).
        engine_cache: where TensorRT engines built on the device persist.
    """

    def __init__(self, home: str | os.PathLike[str], *, threads: int | None = None,
                 engine_cache: str | os.PathLike[str] | None = None) -> None:
        self.home = Path(home)
        self.models = self.home / "models"
        self.state_path = self.home / STATE
        self.threads = threads
        self.engine_cache = Path(engine_cache) if engine_cache else self.home / "engine-cache"
        self.models.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.state_path.read_text())
            return doc if isinstance(doc, dict) else {}
        except FileNotFoundError:
            return {}
        except ValueError:
            return {"corrupt": True}

    def _write_state(self, current: str | None, previous: str | None, event: dict[str, Any],
                     failed: str | None = None) -> None:
        old = self.state()
        events = (old.get("events") or [])[-(_EVENTS_KEPT - 1):] + [{**event, "at": time.time()}]
        bad = [b for b in (old.get("failed") or []) if b != failed][-(_EVENTS_KEPT - 1):] + ([failed] if failed else [])
        doc = {"current": current, "previous": previous, "failed": bad, "events": events}
        atomic_write(self.state_path, json.dumps(doc, indent=1).encode())

    def failed_ids(self) -> list[str]:
        """Bundles that failed their health check here: not tried again (a new publish has a new id)."""
        return list(self.state().get("failed") or [])

    def current_id(self) -> str | None:
        return self.state().get("current")

    def previous_id(self) -> str | None:
        return self.state().get("previous")

    def manifest(self, bundle_id: str) -> BundleManifest:
        return read_manifest(self.models / bundle_id)

    # ------------------------------------------------------------------ start-up
    def _verified(self, bundle_id: str | None) -> bool:
        if not bundle_id or not _safe_member(bundle_id) or "/" in bundle_id:
            return False
        try:
            verify_files(self.models / bundle_id)
            return True
        except (BundleError, OSError):
            return False

    def recover(self) -> list[str]:
        """Finish or undo what a crash left: returns notes on what was done.

        Deletes staging folders and temp files, checks that ``current`` verifies (else
        falls back to ``previous``), and removes bundle folders nobody points at.
        """
        notes: list[str] = []
        for p in self.models.glob(".staging-*"):
            shutil.rmtree(p, ignore_errors=True)
            notes.append(f"removed unfinished install {p.name}")
        for p in self.home.glob(f".{STATE}.tmp-*"):
            p.unlink(missing_ok=True)
        st = self.state()
        cur, prev = st.get("current"), st.get("previous")
        if st.get("corrupt"):
            cur, prev = self._best_folder(), None
            notes.append(f"state.json unreadable; chose {cur}")
            self._write_state(cur, None, {"event": "recovered", "current": cur})
        elif cur and not self._verified(cur):
            notes.append(f"current bundle {cur} does not verify")
            if self._verified(prev):
                self._write_state(prev, None, {"event": "rolled_back", "from": cur, "to": prev, "reason": "verify"})
                notes.append(f"rolled back to {prev}")
                cur, prev = prev, None
            else:
                self._write_state(None, None, {"event": "no_model", "reason": f"{cur} does not verify"})
                cur = prev = None
        elif prev and not self._verified(prev):
            self._write_state(cur, None, {"event": "dropped_previous", "previous": prev})
            prev = None
        keep = {cur, prev}
        for p in self.models.iterdir():
            if p.is_dir() and not p.name.startswith(".") and p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)
        return notes

    def _best_folder(self) -> str | None:
        best: tuple[int, str] | None = None
        for p in self.models.iterdir():
            if p.is_dir() and not p.name.startswith(".") and self._verified(p.name):
                v = read_manifest(p).version
                if best is None or v > best[0]:
                    best = (v, p.name)
        return best[1] if best else None

    def open(self) -> ActiveModel | None:
        """Recover, then load and health-check the current model (falling back to the previous)."""
        notes = self.recover()
        for which in ("current", "previous"):
            bid = self.state().get(which)
            if not bid:
                continue
            kept: list = []
            report = health_check(self.models / bid, threads=self.threads, engine_cache=self.engine_cache, keep_model=kept)
            if report.ok:
                if which == "previous":
                    cur = self.current_id()
                    self._write_state(bid, None, {"event": "rolled_back", "from": cur, "to": bid, "reason": "health"})
                    notes.append(f"current {cur} failed its health check; rolled back to {bid}")
                return ActiveModel(kept[0], self.manifest(bid), self.models / bid, report, notes)
            notes.append(f"{which} {bid} failed its health check: {report.error}")
        return None

    # ------------------------------------------------------------------ install
    def _extract(self, archive: Path, staging: Path) -> None:
        created_dirs = {staging}
        total = 0
        with tarfile.open(archive, "r:") as tar:
            members = tar.getmembers()
            if len(members) > _MAX_MEMBERS:
                raise BundleError(f"Got {len(members)} files in {archive.name}; expected at most {_MAX_MEMBERS}")
            for member in members:
                if not _safe_member(member.name):
                    raise BundleError(f"Got archive member {member.name!r}; expected a relative path inside the bundle")
                if member.isdir():
                    continue
                if not member.isreg():
                    raise BundleError(f"Got archive member {member.name!r} of type {member.type!r}; expected files only")
                total += member.size
                if total > MAX_BUNDLE_BYTES:
                    raise BundleError(f"{archive.name} unpacks to more than {MAX_BUNDLE_BYTES} bytes")
                dest = staging / member.name
                for parent in reversed(dest.relative_to(staging).parents[:-1]):
                    d = staging / parent
                    if d not in created_dirs:
                        d.mkdir()
                        created_dirs.add(d)
                src = tar.extractfile(member)
                if src is None:
                    raise BundleError(f"cannot read {member.name!r} from {archive.name}")
                write_file(dest, src.read())
        # Deepest folders first, so each name is durable before its parent's entry is.
        for d in sorted(created_dirs, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(d)

    def install_archive(self, archive: str | os.PathLike[str], *, expect: dict[str, Any] | None = None,
                        loaded: list | None = None) -> InstallResult:
        """Install a bundle archive next to the current model; swap only if it is healthy.

        Args:
            archive: a bundle ``.tar`` (from ``pack_bundle``; over the air, TUF has
                already verified its length and sha256).
            expect: fields the manifest must match (model, version, bundle_id, target),
                taken from the signed TUF metadata.
            loaded: when given a list, the healthy model's loaded session is appended to
                it (so the caller serves it without loading it twice).
        """
        t0 = time.perf_counter()
        archive = Path(archive)
        staging = self.models / f".staging-{uuid.uuid4().hex}"
        staging.mkdir()
        fsync_dir(self.models)
        previous = self.current_id()
        m: BundleManifest | None = None
        try:
            self._extract(archive, staging)
            m = verify_files(staging)
            for key, want in (expect or {}).items():
                have = getattr(m, key, None)
                if want is not None and have != want:
                    raise BundleError(f"Got {key} {have!r} in the bundle; the signed metadata says {want!r}")
            if "/" in m.bundle_id or not _safe_member(m.bundle_id):
                raise BundleError(f"Got bundle id {m.bundle_id!r}; expected a plain name")
        except (BundleError, tarfile.TarError, OSError, ValueError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            return InstallResult("invalid", m.bundle_id if m else None, m.model if m else None, m.version if m else None,
                                 previous, f"{type(exc).__name__}: {exc}", None, time.perf_counter() - t0)
        if m.bundle_id == previous and self._verified(previous):
            shutil.rmtree(staging, ignore_errors=True)
            return InstallResult("already_current", m.bundle_id, m.model, m.version, previous, seconds=time.perf_counter() - t0)
        final = self.models / m.bundle_id
        if final.exists():  # an earlier install of the same bundle that never became current
            shutil.rmtree(final)
        os.rename(staging, final)
        fsync_dir(self.models)
        report = health_check(final, threads=self.threads, engine_cache=self.engine_cache, keep_model=loaded)
        if not report.ok:
            shutil.rmtree(final, ignore_errors=True)
            fsync_dir(self.models)
            self._write_state(previous, self.previous_id(),
                              {"event": "health_failed", "bundle_id": m.bundle_id, "error": report.error},
                              failed=m.bundle_id)
            return InstallResult("health_failed", m.bundle_id, m.model, m.version, previous, report.error,
                                 report.to_dict(), time.perf_counter() - t0)
        # The switch: one rename of state.json. Before it the old model is current, after it the new.
        self._write_state(m.bundle_id, previous, {"event": "installed", "bundle_id": m.bundle_id, "from": previous})
        for p in self.models.iterdir():
            if p.is_dir() and not p.name.startswith(".") and p.name not in (m.bundle_id, previous):
                shutil.rmtree(p, ignore_errors=True)
        return InstallResult("installed", m.bundle_id, m.model, m.version, previous, None, report.to_dict(),
                             time.perf_counter() - t0)

    def install_folder(self, folder: str | os.PathLike[str]) -> InstallResult:
        """Install a bundle folder (e.g. from ``visionfleet edge export``) through the same path."""
        import tempfile

        from edge_agent.bundle import verify_files as _verify

        folder = Path(folder)
        _verify(folder)
        with tempfile.TemporaryDirectory(dir=self.home, prefix=".pack-") as tmp:
            archive = Path(tmp) / "bundle.tar"
            with tarfile.open(archive, "w") as tar:
                for p in sorted(folder.rglob("*")):
                    rel = p.relative_to(folder)
                    if p.is_file() and not any(part.startswith(".") for part in rel.parts):
                        tar.add(p, arcname=rel.as_posix(), recursive=False)
            return self.install_archive(archive)

    def rollback(self, reason: str) -> str | None:
        """Make the previous (last good) model current again; returns its id or None."""
        cur, prev = self.current_id(), self.previous_id()
        if not prev or not self._verified(prev):
            return None
        self._write_state(prev, None, {"event": "rolled_back", "from": cur, "to": prev, "reason": reason})
        return prev
