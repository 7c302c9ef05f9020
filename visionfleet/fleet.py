"""Server-side fleet state: devices, rollouts, install reports and exactly-once edge sync.

Everything lives in the shared database (``$VISIONFLEET_DB``, default
``sqlite:///<home>/state.db``; tables ``fleet_*`` of :mod:`visionfleet.db.fleet`), shared
by every ingress replica, server process and the CLI. An older home's
``<home>/edge/fleet.sqlite`` is imported once on first open.

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
``source = "edge:<device>"``, under ``events/date=YYYY-MM-DD/source=edge_<device>/`` of
the store area ``telemetry`` (``<home>/telemetry`` by default): the closed loop
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import sqlalchemy as sa

from visionfleet.db import fleet as _t
from visionfleet.db.labeling import insert_ignore as _insert_ignore

if TYPE_CHECKING:
    from visionfleet.settings import Settings

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


def _date(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d")


class FleetDB:
    """The fleet state in the shared database; cheap to construct, safe across processes.

    ``FleetDB(home)`` is the embedded default (``<home>/state.db``, lake parts under
    ``<home>/telemetry``); :meth:`from_settings` follows ``$VISIONFLEET_DB`` and the store.
    """

    def __init__(self, home: str | os.PathLike[str], *, policy: HaltPolicy = HaltPolicy(), db_url: str | None = None,
                 telemetry_uri: str | None = None, samples_uri: str | None = None) -> None:
        from visionfleet.db import open_db
        from visionfleet.store import open_store

        self.home = Path(home)
        self.policy = policy
        self.db = open_db(db_url or f"sqlite:///{self.home}/state.db")
        self.lake = open_store(telemetry_uri or str(self.home / "telemetry"))
        self._db_url = self.db.url
        self._samples_uri = samples_uri
        self._queue = None
        self._import_legacy()

    @classmethod
    def from_settings(cls, settings: "Settings", *, policy: HaltPolicy = HaltPolicy()) -> "FleetDB":
        """The fleet of these settings: their database, store areas ``telemetry`` and ``samples``."""
        return cls(settings.home, policy=policy, db_url=settings.db_url, telemetry_uri=settings.store_uri("telemetry"),
                   samples_uri=settings.store_uri("samples"))

    def _labeling(self):
        from visionfleet.labeling import LabelingQueue

        if self._queue is None:
            self._queue = LabelingQueue(self.home, db_url=self._db_url, samples_uri=self._samples_uri)
        return self._queue

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

        halts: list[dict[str, Any]] = []
        with self.db.engine.begin() as db:
            fresh_records = self._mark_seen(db, device_id, "record", records, now)
            fresh_samples = self._mark_seen(db, device_id, "sample", samples, now)
            fresh_reports = self._mark_seen(db, device_id, "report", reports, now)
            part_id = None
            if fresh_records:
                events = [self._event(device_id, r) for r in fresh_records]
                part_id = db.execute(sa.text(
                    "INSERT INTO fleet_parts (created_ms, device_id, n, payload, written) "
                    "VALUES (:ms, :d, :n, :p, 0) RETURNING part_id"),
                    {"ms": int(now * 1000), "d": device_id, "n": len(events),
                     "p": json.dumps(events, separators=(",", ":"))}).scalar_one()
            touched = set()
            for rep in fresh_reports:
                _insert_ignore(db, _t.updates, {
                    "device_id": device_id, "report_id": rep["id"], "ts": float(rep.get("ts") or now),
                    "bundle_id": rep.get("bundle_id"), "model": rep.get("model"), "version": rep.get("version"),
                    "target": rep.get("target"), "outcome": rep.get("outcome"), "error": (rep.get("error") or "")[:2000]})
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
    def _mark_seen(db: sa.Connection, device_id: str, kind: str, items: Sequence[dict[str, Any]],
                   now: float) -> list[dict[str, Any]]:
        # A primary key per (device, kind, id): a second server process inserting the same key
        # waits for the first one's commit and then skips it, so a batch counts once.
        return [it for it in items
                if _insert_ignore(db, _t.seen, {"device_id": device_id, "kind": kind, "id": str(it["id"]), "ts": now})]

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
        self._labeling().append(rows)

    @staticmethod
    def _upsert_device(db: sa.Connection, device_id: str, st: dict[str, Any], now: float, n_records: int,
                       n_samples: int, dups: int) -> None:
        backlog = st.get("backlog") or {}
        db.execute(sa.text(
            "INSERT INTO fleet_devices (device_id, first_seen, last_seen, model, version, bundle_id, target, health, "
            "backlog_records, backlog_samples, dropped_samples, agent, status, records, samples, duplicates, syncs) "
            "VALUES (:d, :now, :now, :model, :version, :bundle, :target, :health, :br, :bs, :ds, :agent, :status, "
            ":nr, :ns, :dups, 1) "
            # A batch without a status (a bare resend) keeps the last reported one.
            "ON CONFLICT(device_id) DO UPDATE SET last_seen = excluded.last_seen, "
            "model = COALESCE(excluded.model, fleet_devices.model), "
            "version = COALESCE(excluded.version, fleet_devices.version), "
            "bundle_id = COALESCE(excluded.bundle_id, fleet_devices.bundle_id), "
            "target = COALESCE(excluded.target, fleet_devices.target), "
            "health = COALESCE(excluded.health, fleet_devices.health), "
            "backlog_records = COALESCE(excluded.backlog_records, fleet_devices.backlog_records), "
            "backlog_samples = COALESCE(excluded.backlog_samples, fleet_devices.backlog_samples), "
            "dropped_samples = COALESCE(excluded.dropped_samples, fleet_devices.dropped_samples), "
            "agent = COALESCE(excluded.agent, fleet_devices.agent), "
            "status = COALESCE(excluded.status, fleet_devices.status), "
            "records = fleet_devices.records + excluded.records, "
            "samples = fleet_devices.samples + excluded.samples, "
            "duplicates = fleet_devices.duplicates + excluded.duplicates, syncs = fleet_devices.syncs + 1"),
            {"d": device_id, "now": now, "model": st.get("model"), "version": st.get("version"),
             "bundle": st.get("bundle_id"), "target": st.get("target"), "health": st.get("health"),
             "br": backlog.get("records"), "bs": backlog.get("samples"), "ds": backlog.get("dropped_samples"),
             "agent": st.get("agent"),
             "status": json.dumps(st, separators=(",", ":"), default=str)[:8000] if st else None,
             "nr": n_records, "ns": n_samples, "dups": dups},
        )

    # ------------------------------------------------------------------ the lake
    def _write_part(self, part_id: int) -> int:
        """Write one committed part to the event lake (idempotent: same part, same object name)."""
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        from visionfleet.telemetry import EVENT_FIELDS

        p = _t.parts
        with self.db.engine.connect() as db:
            row = db.execute(sa.select(p.c.created_ms, p.c.device_id, p.c.payload, p.c.written)
                             .where(p.c.part_id == part_id)).first()
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
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist([{k: e.get(k) for k in EVENT_FIELDS} for e in items], schema=schema), buf)
            name = f"part-{created_ms}-edge{part_id:010d}.parquet"
            # Through the store (atomic: a reader sees the whole part or none); same name on a retry.
            self.lake.write_bytes(f"events/date={date}/source=edge_{device_id}/{name}", buf.getvalue())
        with self.db.engine.begin() as db:
            db.execute(sa.update(p).where(p.c.part_id == part_id).values(written=1, payload=None))
        return len(events)

    def flush_pending(self) -> int:
        """Write every committed but unwritten part (after a crash); returns the events written."""
        p = _t.parts
        with self.db.engine.connect() as db:
            ids = [r[0] for r in db.execute(sa.select(p.c.part_id).where(p.c.written == 0).order_by(p.c.part_id))]
        return sum(self._write_part(i) for i in ids)

    def pending_parts(self) -> int:
        p = _t.parts
        with self.db.engine.connect() as db:
            return int(db.execute(sa.select(sa.func.count()).select_from(p).where(p.c.written == 0)).scalar_one())

    # ------------------------------------------------------------------ rollouts
    def record_rollout(self, model: str, target: str, bundle_id: str, version: int, rollout: int,
                       status: str = "rolling") -> None:
        """Remember a publish (or a rollout change) of a channel's bundle."""
        now = time.time()
        with self.db.engine.begin() as db:
            # A new publish on a channel replaces what it served before.
            db.execute(sa.text(
                "UPDATE fleet_rollouts SET status = 'superseded', changed_at = :now WHERE model = :m AND target = :t "
                "AND bundle_id != :b AND status = 'rolling'"), {"now": now, "m": model, "t": target, "b": bundle_id})
            db.execute(sa.text(
                "INSERT INTO fleet_rollouts (model, target, bundle_id, version, rollout, status, published_at, "
                "changed_at) VALUES (:m, :t, :b, :v, :r, :s, :now, :now) ON CONFLICT(model, target, bundle_id) "
                "DO UPDATE SET rollout = excluded.rollout, status = excluded.status, changed_at = excluded.changed_at, "
                "reason = NULL"),
                {"m": model, "t": target, "b": bundle_id, "v": version, "r": int(rollout), "s": status, "now": now})

    def set_rollout_status(self, model: str, target: str, bundle_id: str, status: str, reason: str | None = None,
                           rollout: int | None = None) -> None:
        r = _t.rollouts
        values: dict[str, Any] = {"status": status, "reason": reason, "changed_at": time.time()}
        if rollout is not None:
            values["rollout"] = rollout
        with self.db.engine.begin() as db:
            db.execute(sa.update(r).where(r.c.model == model, r.c.target == target, r.c.bundle_id == bundle_id)
                       .values(**values))

    def _evaluate_rollout(self, db: sa.Connection, bundle_id: str, now: float) -> dict[str, Any] | None:
        r = _t.rollouts
        row = db.execute(sa.select(r.c.model, r.c.target, r.c.status).where(r.c.bundle_id == bundle_id)).first()
        if row is None or row[2] != "rolling":
            return None
        attempts, failures = self._outcomes(db, bundle_id)
        reason = should_halt(attempts, failures, self.policy)
        if reason is None:
            return None
        db.execute(sa.update(r).where(r.c.bundle_id == bundle_id).values(status="halted", reason=reason, changed_at=now))
        return {"model": row[0], "target": row[1], "bundle_id": bundle_id, "reason": reason,
                "attempts": attempts, "failures": failures}

    @staticmethod
    def _outcomes(db: sa.Connection, bundle_id: str) -> tuple[int, int]:
        """Devices that tried a bundle, and those whose last word on it was a failure."""
        u = _t.updates
        rows = db.execute(sa.select(u.c.device_id, u.c.outcome).where(u.c.bundle_id == bundle_id)
                          .order_by(u.c.ts, u.c.report_id)).all()
        last: dict[str, str] = {}
        for device, outcome in rows:
            last[device] = outcome
        failures = sum(1 for o in last.values() if o in FAILED_OUTCOMES)
        return len(last), failures

    # ------------------------------------------------------------------ views
    def devices(self) -> list[dict[str, Any]]:
        with self.db.engine.connect() as db:
            out = []
            for row in db.execute(sa.select(_t.devices).order_by(_t.devices.c.device_id)).mappings().all():
                d = dict(row)
                d["status"] = json.loads(d["status"]) if d.get("status") else {}
                out.append(d)
            return out

    def rollouts(self) -> list[dict[str, Any]]:
        r_t, d_t = _t.rollouts, _t.devices
        with self.db.engine.connect() as db:
            out = []
            for row in db.execute(sa.select(r_t).order_by(r_t.c.published_at)).mappings().all():
                r = dict(row)
                attempts, failures = self._outcomes(db, r["bundle_id"])
                installed = db.execute(sa.select(sa.func.count()).select_from(d_t)
                                       .where(d_t.c.bundle_id == r["bundle_id"])).scalar_one()
                r.update(attempts=attempts, failures=failures, devices_on=int(installed))
                out.append(r)
            return out

    def updates(self, limit: int = 200) -> list[dict[str, Any]]:
        u = _t.updates
        with self.db.engine.connect() as db:
            return [dict(r) for r in db.execute(sa.select(u).order_by(u.c.ts.desc()).limit(int(limit))).mappings()]

    # ------------------------------------------------------------------ upgrade
    def _import_legacy(self) -> None:
        """Import ``<home>/edge/fleet.sqlite`` once (idempotent): devices, seen keys, updates,
        rollouts and any part a crash left unwritten (as a new pending part)."""
        from visionfleet.db import labeling as _lt

        legacy = self.home / "edge" / "fleet.sqlite"
        if not legacy.exists():
            return
        source = f"legacy-fleet:{legacy.resolve()}"
        with self.db.engine.connect() as c:
            if c.execute(sa.select(_lt.imports.c.source).where(_lt.imports.c.source == source)).first():
                return
        import sqlite3

        old = sqlite3.connect(legacy, timeout=30)
        old.row_factory = sqlite3.Row
        try:
            tables = {r[0] for r in old.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            data = {name: [dict(r) for r in old.execute(f"SELECT * FROM {name}")]  # noqa: S608 - fixed names
                    for name in ("devices", "seen", "updates", "rollouts") if name in tables}
            pending = ([dict(r) for r in old.execute("SELECT * FROM parts WHERE written = 0 ORDER BY part_id")]
                       if "parts" in tables else [])
        finally:
            old.close()
        n = 0
        with self.db.engine.begin() as c:
            for name, table in (("devices", _t.devices), ("seen", _t.seen), ("updates", _t.updates),
                                ("rollouts", _t.rollouts)):
                for row in data.get(name, []):
                    n += _insert_ignore(c, table, {k: v for k, v in row.items() if k in table.c})
            for part in pending:
                c.execute(sa.insert(_t.parts).values(created_ms=part["created_ms"], device_id=part["device_id"],
                                                     n=part["n"], payload=part["payload"], written=0))
            _insert_ignore(c, _lt.imports, {"source": source, "rows": n + len(pending), "ts": time.time()})

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
