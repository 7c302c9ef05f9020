"""Server-side fleet state: devices, rollouts, install reports and exactly-once edge sync.

Everything lives in one SQLite database, ``<state>/edge/fleet.sqlite`` (WAL,
``synchronous=FULL``), shared by every ingress replica and the CLI.

**Exactly once into the lake.** A sync batch is committed in one transaction: each
record's ``(device, id)`` goes into ``seen`` (a resent id is a duplicate and is only
acknowledged again), and the *new* events go into ``parts`` as one pending part with
its payload. Only after the commit is the part written to the event lake, under a name
derived from the part id, and marked written. A crash between commit and write leaves
a pending part that :meth:`FleetDB.flush_pending` writes later under the *same* name,
so no event is lost and none lands twice — across server restarts too, because the
de-duplication state is on disk, not in memory. Sampled images go to the labeling
queue *before* the commit; its append is idempotent by sample id, so a retry after a
crash in between is harmless.

Edge events use the server's event schema (``visionfleet.telemetry.EVENT_FIELDS``),
``source = "edge:<device>"``, under
``<state>/telemetry/events/date=YYYY-MM-DD/source=edge_<device>/``: the closed loop
reads edge predictions with the server's.

**Rollouts halt by themselves**: when devices report install outcomes, a bundle whose
health checks fail on too many devices (:func:`should_halt`) is marked halted, and the
caller re-signs its channel as halted (``edge_export.tuf_repo.set_rollout``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "FleetDB",
    "HaltPolicy",
    "SyncResult",
    "should_halt",
    "DEVICE_ID_PATTERN",
    "RECORD_ID_PATTERN",
    "FAILED_OUTCOMES",
]

DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
RECORD_ID_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"
FAILED_OUTCOMES = ("health_failed", "invalid", "rolled_back")
_DEVICE_RE = re.compile(DEVICE_ID_PATTERN)
_ID_RE = re.compile(RECORD_ID_PATTERN)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS devices (device_id TEXT PRIMARY KEY, first_seen REAL, last_seen REAL, model TEXT, "
    "version INTEGER, bundle_id TEXT, target TEXT, health TEXT, backlog_records INTEGER, backlog_samples INTEGER, "
    "dropped_samples INTEGER, agent TEXT, status TEXT, records INTEGER NOT NULL DEFAULT 0, "
    "samples INTEGER NOT NULL DEFAULT 0, duplicates INTEGER NOT NULL DEFAULT 0, syncs INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS seen (device_id TEXT NOT NULL, kind TEXT NOT NULL, id TEXT NOT NULL, ts REAL NOT NULL, "
    "PRIMARY KEY (device_id, kind, id)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS parts (part_id INTEGER PRIMARY KEY AUTOINCREMENT, created_ms INTEGER NOT NULL, "
    "device_id TEXT NOT NULL, n INTEGER NOT NULL, payload TEXT, written INTEGER NOT NULL DEFAULT 0)",
    "CREATE INDEX IF NOT EXISTS parts_pending ON parts(part_id) WHERE written = 0",
    "CREATE TABLE IF NOT EXISTS updates (device_id TEXT NOT NULL, report_id TEXT NOT NULL, ts REAL, bundle_id TEXT, "
    "model TEXT, version INTEGER, target TEXT, outcome TEXT, error TEXT, PRIMARY KEY (device_id, report_id))",
    "CREATE INDEX IF NOT EXISTS updates_bundle ON updates(bundle_id)",
    "CREATE TABLE IF NOT EXISTS rollouts (model TEXT NOT NULL, target TEXT NOT NULL, bundle_id TEXT NOT NULL, "
    "version INTEGER, rollout INTEGER, status TEXT NOT NULL, published_at REAL, changed_at REAL, reason TEXT, "
    "PRIMARY KEY (model, target, bundle_id))",
)


@dataclass(frozen=True)
class HaltPolicy:
    """When a rollout halts: at least ``min_failures`` devices failed and more than
    ``max_failure_rate`` of the devices that tried it."""

    max_failure_rate: float = 0.2
    min_failures: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_failure_rate < 1.0:
            raise ValueError(f"Got {self.max_failure_rate} for max_failure_rate; expected 0 <= r < 1")
        if self.min_failures < 1:
            raise ValueError(f"Got {self.min_failures} for min_failures; expected >= 1")


def should_halt(attempts: int, failures: int, policy: HaltPolicy = HaltPolicy()) -> str | None:
    """The reason to halt a rollout, or None to let it continue.

    One failed device is not enough (a flaky board); a few failures among many
    successes are tolerated up to ``max_failure_rate``.
    """
    if attempts <= 0 or failures < policy.min_failures:
        return None
    rate = failures / attempts
    if rate > policy.max_failure_rate:
        return f"{failures} of {attempts} devices failed the health check ({rate:.0%} > {policy.max_failure_rate:.0%})"
    return None


@dataclass(frozen=True)
class SyncResult:
    """What the server did with one sync batch."""

    acked: dict[str, list[str]]
    new: dict[str, int]
    duplicates: dict[str, int]
    rejected: list[dict[str, str]] = field(default_factory=list)
    halts: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"acked": self.acked, "new": self.new, "duplicates": self.duplicates, "rejected": self.rejected,
                "halts": self.halts, "server_time": time.time()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _date(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d")


class FleetDB:
    """The fleet database of one state dir; cheap to construct, safe across processes."""

    def __init__(self, home: str | os.PathLike[str], *, policy: HaltPolicy = HaltPolicy()) -> None:
        self.home = Path(home)
        self.root = self.home / "edge"
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "fleet.sqlite"
        self.events_dir = self.home / "telemetry" / "events"
        self.policy = policy
        with self._db() as db:
            for stmt in _SCHEMA:
                db.execute(stmt)

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=30000")
        return db

    # ------------------------------------------------------------------ sync
    def ingest(
        self,
        device_id: str,
        *,
        status: dict[str, Any] | None = None,
        records: Sequence[dict[str, Any]] = (),
        samples: Sequence[dict[str, Any]] = (),
        reports: Sequence[dict[str, Any]] = (),
    ) -> SyncResult:
        """Store one sync batch exactly once; returns what to acknowledge.

        ``samples`` carry their encoded image under ``"image"`` (bytes). Every id in the
        batch is acknowledged — new, duplicate or rejected — so the device can drop it.

        Raises:
            ValueError: a malformed device id.
        """
        if not _DEVICE_RE.match(device_id or ""):
            raise ValueError(f"Got {device_id!r} for device_id; expected {DEVICE_ID_PATTERN}")
        now = time.time()
        rejected: list[dict[str, str]] = []

        def valid(kind: str, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
            ok = []
            for it in items:
                rid = str(it.get("id") or "")
                if not _ID_RE.match(rid):
                    rejected.append({"kind": kind, "id": rid[:80], "error": f"id must match {RECORD_ID_PATTERN}"})
                    continue
                ok.append(it)
            return ok

        # Every id is acknowledged, rejected ones too: a malformed row must not block a device's outbox.
        acked = {"records": [str(r.get("id")) for r in records], "samples": [str(s.get("id")) for s in samples],
                 "reports": [str(r.get("id")) for r in reports]}
        records, samples, reports = valid("record", records), valid("sample", samples), valid("report", reports)

        # Images first (idempotent by sample id): a crash after this and before the
        # commit below makes the device resend, and the queue ignores what it has.
        if samples:
            self._queue_samples(device_id, samples)

        db = self._db()
        halts: list[dict[str, Any]] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            fresh_records = self._mark_seen(db, device_id, "record", records, now)
            fresh_samples = self._mark_seen(db, device_id, "sample", samples, now)
            fresh_reports = self._mark_seen(db, device_id, "report", reports, now)
            part_id = None
            if fresh_records:
                events = [self._event(device_id, r) for r in fresh_records]
                cur = db.execute(
                    "INSERT INTO parts (created_ms, device_id, n, payload) VALUES (?, ?, ?, ?)",
                    (int(now * 1000), device_id, len(events), json.dumps(events, separators=(",", ":"))),
                )
                part_id = cur.lastrowid
            touched = set()
            for rep in fresh_reports:
                db.execute(
                    "INSERT OR IGNORE INTO updates (device_id, report_id, ts, bundle_id, model, version, target, outcome, "
                    "error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (device_id, rep["id"], float(rep.get("ts") or now), rep.get("bundle_id"), rep.get("model"),
                     rep.get("version"), rep.get("target"), rep.get("outcome"), (rep.get("error") or "")[:2000]),
                )
                if rep.get("bundle_id"):
                    touched.add(str(rep["bundle_id"]))
            dups = {"records": len(records) - len(fresh_records), "samples": len(samples) - len(fresh_samples),
                    "reports": len(reports) - len(fresh_reports)}
            self._upsert_device(db, device_id, status or {}, now, len(fresh_records), len(fresh_samples),
                                sum(dups.values()))
            for bid in sorted(touched):
                halt = self._evaluate_rollout(db, bid, now)
                if halt:
                    halts.append(halt)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            db.close()
        if part_id is not None or self.pending_parts():
            try:
                self.flush_pending()  # this part, and any a crash left behind
            except Exception:  # noqa: BLE001 - committed is durable; the next sync or start writes it
                logging.getLogger(__name__).exception("writing edge events to the lake failed; will retry")
        return SyncResult(
            acked=acked,
            new={"records": len(fresh_records), "samples": len(fresh_samples), "reports": len(fresh_reports)},
            duplicates=dups,
            rejected=rejected,
            halts=halts,
        )

    @staticmethod
    def _mark_seen(db: sqlite3.Connection, device_id: str, kind: str, items: Sequence[dict[str, Any]],
                   now: float) -> list[dict[str, Any]]:
        fresh = []
        for it in items:
            cur = db.execute("INSERT OR IGNORE INTO seen (device_id, kind, id, ts) VALUES (?, ?, ?, ?)",
                             (device_id, kind, str(it["id"]), now))
            if cur.rowcount:
                fresh.append(it)
        return fresh

    @staticmethod
    def _event(device_id: str, r: dict[str, Any]) -> dict[str, Any]:
        from visionfleet.telemetry import make_event

        return make_event(
            request_id=f"{device_id}:{r['id']}",
            role="primary",
            ts=float(r.get("ts") or time.time()),
            source=f"edge:{device_id}",
            model=r.get("model"),
            version=r.get("version"),
            variant="edge",
            client_key=device_id,
            status=int(r.get("status") or 200),
            error=r.get("error"),
            latency_ms=r.get("latency_ms"),
            task=r.get("task"),
            label=r.get("label"),
            class_id=r.get("class_id"),
            confidence=r.get("confidence"),
            margin=r.get("margin"),
            entropy=r.get("entropy"),
            detections=r.get("detections"),
            width=r.get("width"),
            height=r.get("height"),
            input_size=r.get("input_size"),
            brightness=r.get("brightness"),
            contrast=r.get("contrast"),
            blur=r.get("blur"),
        )

    def _queue_samples(self, device_id: str, samples: Sequence[dict[str, Any]]) -> None:
        from visionfleet.labeling import LabelingQueue

        rows = [{
            "sample_id": f"{device_id}:{s['id']}",
            "ts": float(s.get("ts") or time.time()),
            "source": f"edge:{device_id}",
            "model": s.get("model"),
            "version": s.get("version"),
            "predicted": s.get("predicted"),
            "confidence": s.get("confidence"),
            "margin": s.get("margin"),
            "reason": s.get("reason") or "low_confidence",
            "image": s["image"],
            "width": s.get("width"),
            "height": s.get("height"),
        } for s in samples]
        LabelingQueue(self.home).append(rows)

    @staticmethod
    def _upsert_device(db: sqlite3.Connection, device_id: str, st: dict[str, Any], now: float, n_records: int,
                       n_samples: int, dups: int) -> None:
        backlog = st.get("backlog") or {}
        db.execute(
            "INSERT INTO devices (device_id, first_seen, last_seen, model, version, bundle_id, target, health, "
            "backlog_records, backlog_samples, dropped_samples, agent, status, records, samples, duplicates, syncs) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1) "
            # A batch without a status (a bare resend) keeps the last reported one.
            "ON CONFLICT(device_id) DO UPDATE SET last_seen = excluded.last_seen, "
            "model = COALESCE(excluded.model, model), version = COALESCE(excluded.version, version), "
            "bundle_id = COALESCE(excluded.bundle_id, bundle_id), target = COALESCE(excluded.target, target), "
            "health = COALESCE(excluded.health, health), "
            "backlog_records = COALESCE(excluded.backlog_records, backlog_records), "
            "backlog_samples = COALESCE(excluded.backlog_samples, backlog_samples), "
            "dropped_samples = COALESCE(excluded.dropped_samples, dropped_samples), "
            "agent = COALESCE(excluded.agent, agent), status = COALESCE(excluded.status, status), "
            "records = records + excluded.records, "
            "samples = samples + excluded.samples, duplicates = duplicates + excluded.duplicates, syncs = syncs + 1",
            (device_id, now, now, st.get("model"), st.get("version"), st.get("bundle_id"), st.get("target"),
             st.get("health"), backlog.get("records"), backlog.get("samples"), backlog.get("dropped_samples"),
             st.get("agent"), json.dumps(st, separators=(",", ":"), default=str)[:8000] if st else None, n_records,
             n_samples, dups),
        )

    # ------------------------------------------------------------------ the lake
    def _write_part(self, part_id: int) -> int:
        """Write one committed part to the event lake (idempotent: same part, same file name)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from visionfleet.telemetry import EVENT_FIELDS

        with self._db() as db:
            row = db.execute("SELECT created_ms, device_id, payload, written FROM parts WHERE part_id = ?",
                             (part_id,)).fetchone()
        if row is None or row[3]:
            return 0
        created_ms, device_id, payload, _ = row
        events = json.loads(payload)
        types = {"string": pa.string(), "float64": pa.float64(), "int64": pa.int64()}
        schema = pa.schema([pa.field(k, types[t]) for k, t in EVENT_FIELDS.items()])
        by_date: dict[str, list[dict[str, Any]]] = {}
        for ev in events:
            by_date.setdefault(_date(float(ev["ts"])), []).append(ev)
        for date, items in by_date.items():
            d = self.events_dir / f"date={date}" / f"source=edge_{device_id}"
            d.mkdir(parents=True, exist_ok=True)
            name = f"part-{created_ms}-edge{part_id:010d}.parquet"
            tmp = d / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
            pq.write_table(pa.Table.from_pylist([{k: e.get(k) for k in EVENT_FIELDS} for e in items], schema=schema), tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, d / name)
            _fsync_dir(d)
        with self._db() as db:
            db.execute("UPDATE parts SET written = 1, payload = NULL WHERE part_id = ?", (part_id,))
        return len(events)

    def flush_pending(self) -> int:
        """Write every committed but unwritten part (after a crash); returns the events written."""
        with self._db() as db:
            ids = [r[0] for r in db.execute("SELECT part_id FROM parts WHERE written = 0 ORDER BY part_id")]
        return sum(self._write_part(i) for i in ids)

    def pending_parts(self) -> int:
        with self._db() as db:
            return int(db.execute("SELECT COUNT(*) FROM parts WHERE written = 0").fetchone()[0])

    # ------------------------------------------------------------------ rollouts
    def record_rollout(self, model: str, target: str, bundle_id: str, version: int, rollout: int,
                       status: str = "rolling") -> None:
        """Remember a publish (or a rollout change) of a channel's bundle."""
        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            # A new publish on a channel replaces what it served before.
            db.execute("UPDATE rollouts SET status = 'superseded', changed_at = ? WHERE model = ? AND target = ? "
                       "AND bundle_id != ? AND status = 'rolling'", (now, model, target, bundle_id))
            db.execute(
                "INSERT INTO rollouts (model, target, bundle_id, version, rollout, status, published_at, changed_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(model, target, bundle_id) DO UPDATE SET "
                "rollout = excluded.rollout, status = excluded.status, changed_at = excluded.changed_at, reason = NULL",
                (model, target, bundle_id, version, int(rollout), status, now, now),
            )
            db.execute("COMMIT")

    def set_rollout_status(self, model: str, target: str, bundle_id: str, status: str, reason: str | None = None,
                           rollout: int | None = None) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE rollouts SET status = ?, reason = ?, changed_at = ?, rollout = COALESCE(?, rollout) "
                "WHERE model = ? AND target = ? AND bundle_id = ?",
                (status, reason, time.time(), rollout, model, target, bundle_id),
            )

    def _evaluate_rollout(self, db: sqlite3.Connection, bundle_id: str, now: float) -> dict[str, Any] | None:
        row = db.execute("SELECT model, target, status FROM rollouts WHERE bundle_id = ?", (bundle_id,)).fetchone()
        if row is None or row[2] != "rolling":
            return None
        attempts, failures = self._outcomes(db, bundle_id)
        reason = should_halt(attempts, failures, self.policy)
        if reason is None:
            return None
        db.execute("UPDATE rollouts SET status = 'halted', reason = ?, changed_at = ? WHERE bundle_id = ?",
                   (reason, now, bundle_id))
        return {"model": row[0], "target": row[1], "bundle_id": bundle_id, "reason": reason,
                "attempts": attempts, "failures": failures}

    @staticmethod
    def _outcomes(db: sqlite3.Connection, bundle_id: str) -> tuple[int, int]:
        """Devices that tried a bundle, and those whose last word on it was a failure."""
        rows = db.execute(
            "SELECT device_id, outcome FROM updates WHERE bundle_id = ? ORDER BY ts", (bundle_id,)
        ).fetchall()
        last: dict[str, str] = {}
        for device, outcome in rows:
            last[device] = outcome
        failures = sum(1 for o in last.values() if o in FAILED_OUTCOMES)
        return len(last), failures

    # ------------------------------------------------------------------ views
    def devices(self) -> list[dict[str, Any]]:
        with self._db() as db:
            cur = db.execute("SELECT * FROM devices ORDER BY device_id")
            cols = [c[0] for c in cur.description]
            out = []
            for row in cur.fetchall():
                d = dict(zip(cols, row))
                d["status"] = json.loads(d["status"]) if d.get("status") else {}
                out.append(d)
            return out

    def rollouts(self) -> list[dict[str, Any]]:
        with self._db() as db:
            cur = db.execute("SELECT * FROM rollouts ORDER BY published_at")
            cols = [c[0] for c in cur.description]
            out = []
            for row in cur.fetchall():
                r = dict(zip(cols, row))
                attempts, failures = self._outcomes(db, r["bundle_id"])
                installed = db.execute(
                    "SELECT COUNT(*) FROM devices WHERE bundle_id = ?", (r["bundle_id"],)
                ).fetchone()[0]
                r.update(attempts=attempts, failures=failures, devices_on=int(installed))
                out.append(r)
            return out

    def updates(self, limit: int = 200) -> list[dict[str, Any]]:
        with self._db() as db:
            cur = db.execute("SELECT * FROM updates ORDER BY ts DESC LIMIT ?", (int(limit),))
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, row)) for row in cur.fetchall()]

    def status(self, *, stale_after_s: float = 300.0) -> dict[str, Any]:
        """Devices (version, health, backlog, last seen), rollouts and totals."""
        now = time.time()
        devices = self.devices()
        for d in devices:
            d["online"] = (now - (d.get("last_seen") or 0)) <= stale_after_s
            d["last_seen_s_ago"] = round(now - (d.get("last_seen") or now), 1)
        versions: dict[str, int] = {}
        for d in devices:
            key = f"{d.get('model')}:{d.get('version')}"
            versions[key] = versions.get(key, 0) + 1
        return {
            "devices": devices,
            "rollouts": self.rollouts(),
            "totals": {
                "devices": len(devices),
                "online": sum(1 for d in devices if d["online"]),
                "records": sum(int(d.get("records") or 0) for d in devices),
                "duplicates_refused": sum(int(d.get("duplicates") or 0) for d in devices),
                "backlog_records": sum(int(d.get("backlog_records") or 0) for d in devices),
                "unhealthy": sum(1 for d in devices if d.get("health") not in (None, "ok")),
                "versions": versions,
                "pending_lake_parts": self.pending_parts(),
            },
            "at": now,
        }
