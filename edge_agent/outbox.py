"""The durable outbox: every prediction and sampled image waits here until the server has it.

SQLite in WAL mode with ``synchronous=FULL``: a committed row survives a power cut
(the WAL is fsynced on every commit), and readers never block the inference loop's
writes. A record is written in the same transaction as the *frame key* it came from,
so a restarted agent never predicts the same frame twice, and each record carries an
id made on the device; the server de-duplicates by ``(device, id)``, so a batch resent
after a lost acknowledgement never counts twice. Rows leave only after the server
acknowledged them (``ack``) and, for records, once they are old enough (``prune``).

Sampled images are bounded (``max_unsent_samples``): when a device stays offline for
weeks, the oldest unsent *images* go first; prediction records are small and kept.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

__all__ = ["Outbox", "Batch"]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
    "ts REAL NOT NULL, body TEXT NOT NULL, sent_at REAL)",
    "CREATE INDEX IF NOT EXISTS records_unsent ON records(seq) WHERE sent_at IS NULL",
    "CREATE TABLE IF NOT EXISTS samples (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
    "ts REAL NOT NULL, body TEXT NOT NULL, image BLOB, sent_at REAL)",
    "CREATE INDEX IF NOT EXISTS samples_unsent ON samples(seq) WHERE sent_at IS NULL",
    "CREATE TABLE IF NOT EXISTS reports (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
    "ts REAL NOT NULL, body TEXT NOT NULL, sent_at REAL)",
    "CREATE TABLE IF NOT EXISTS frames (key TEXT PRIMARY KEY, record_id TEXT NOT NULL, ts REAL NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
)


@dataclass
class Batch:
    """Unsent rows, oldest first, within the size limits of one sync request."""

    records: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)  # body fields + "image": bytes
    reports: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records) + len(self.samples) + len(self.reports)


class Outbox:
    """One connection to the outbox database; make one per thread."""

    def __init__(self, path: str | os.PathLike[str], *, max_unsent_samples: int = 2000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_unsent_samples = max_unsent_samples
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=30000")
        for stmt in _SCHEMA:
            self._db.execute(stmt)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writes
    def has_frame(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM frames WHERE key = ?", (key,)).fetchone() is not None

    def add(self, record: dict[str, Any], *, frame_key: str | None = None,
            sample: tuple[bytes, dict[str, Any]] | None = None) -> bool:
        """Store a record (and its sampled image) in one transaction.

        Returns False, storing nothing, when ``frame_key`` was recorded before.
        """
        rid = str(record["id"])
        ts = float(record.get("ts") or time.time())
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if frame_key is not None:
                cur = self._db.execute("INSERT OR IGNORE INTO frames (key, record_id, ts) VALUES (?, ?, ?)",
                                       (frame_key, rid, ts))
                if cur.rowcount == 0:
                    self._db.execute("ROLLBACK")
                    return False
            self._db.execute("INSERT OR IGNORE INTO records (id, ts, body) VALUES (?, ?, ?)",
                             (rid, ts, json.dumps(record, separators=(",", ":"))))
            if sample is not None:
                image, meta = sample
                sid = str(meta["id"])
                self._db.execute("INSERT OR IGNORE INTO samples (id, ts, body, image) VALUES (?, ?, ?, ?)",
                                 (sid, ts, json.dumps(meta, separators=(",", ":")), sqlite3.Binary(image)))
                self._cap_samples()
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return True

    def _cap_samples(self) -> None:
        n = self._db.execute("SELECT COUNT(*) FROM samples WHERE sent_at IS NULL").fetchone()[0]
        extra = n - self.max_unsent_samples
        if extra > 0:
            self._db.execute("DELETE FROM samples WHERE seq IN (SELECT seq FROM samples WHERE sent_at IS NULL "
                             "ORDER BY seq LIMIT ?)", (extra,))
            self._db.execute("INSERT INTO counters (name, value) VALUES ('dropped_samples', ?) "
                             "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (extra,))

    def add_report(self, body: dict[str, Any]) -> str:
        """Queue a report (an install outcome) for the server; ``body["id"]`` is its id."""
        rid = str(body["id"])
        self._db.execute("INSERT OR IGNORE INTO reports (id, ts, body) VALUES (?, ?, ?)",
                         (rid, float(body.get("ts") or time.time()), json.dumps(body, separators=(",", ":"))))
        return rid

    # ------------------------------------------------------------------ sync
    def pending(self, *, max_records: int = 256, max_samples: int = 8, max_bytes: int = 1_000_000) -> Batch:
        """The oldest unsent rows, at most ``max_records`` records and ``max_samples`` images."""
        batch = Batch()
        for (body,) in self._db.execute(
            "SELECT body FROM reports WHERE sent_at IS NULL ORDER BY seq LIMIT 32"
        ).fetchall():
            batch.reports.append(json.loads(body))
        for (body,) in self._db.execute(
            "SELECT body FROM records WHERE sent_at IS NULL ORDER BY seq LIMIT ?", (int(max_records),)
        ).fetchall():
            batch.records.append(json.loads(body))
        budget = max_bytes
        for body, image in self._db.execute(
            "SELECT body, image FROM samples WHERE sent_at IS NULL ORDER BY seq LIMIT ?", (int(max_samples),)
        ).fetchall():
            size = len(image or b"") * 4 // 3 + 512  # base64 on the wire
            if batch.samples and size > budget:
                break
            budget -= size
            batch.samples.append({**json.loads(body), "image": bytes(image or b"")})
        return batch

    def ack(self, *, records: Iterable[str] = (), samples: Iterable[str] = (), reports: Iterable[str] = ()) -> int:
        """Mark rows the server acknowledged as sent; returns how many changed."""
        now = time.time()
        changed = 0
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for table, ids in (("records", records), ("samples", samples), ("reports", reports)):
                for rid in ids:
                    cur = self._db.execute(f"UPDATE {table} SET sent_at = ? WHERE id = ? AND sent_at IS NULL",  # noqa: S608
                                           (now, str(rid)))
                    changed += cur.rowcount
            # Images are not needed once the server has them.
            self._db.execute("UPDATE samples SET image = NULL WHERE sent_at IS NOT NULL AND image IS NOT NULL")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return changed

    def prune(self, *, sent_older_than_s: float = 7 * 86400) -> int:
        """Delete acknowledged rows older than the cutoff (frame keys stay: they prevent re-processing)."""
        cutoff = time.time() - sent_older_than_s
        n = 0
        for table in ("records", "samples", "reports"):
            n += self._db.execute(f"DELETE FROM {table} WHERE sent_at IS NOT NULL AND sent_at < ?",  # noqa: S608
                                  (cutoff,)).rowcount
        return n

    # ------------------------------------------------------------------ reads
    def backlog(self) -> dict[str, int]:
        """Unsent rows per kind, and the images dropped by the cap."""
        q = "SELECT COUNT(*) FROM {} WHERE sent_at IS NULL"
        dropped = self._db.execute("SELECT value FROM counters WHERE name = 'dropped_samples'").fetchone()
        return {
            "records": self._db.execute(q.format("records")).fetchone()[0],
            "samples": self._db.execute(q.format("samples")).fetchone()[0],
            "reports": self._db.execute(q.format("reports")).fetchone()[0],
            "dropped_samples": int(dropped[0]) if dropped else 0,
        }

    def totals(self) -> dict[str, int]:
        """All rows ever kept (sent or not) per kind, and frames seen."""
        return {t: self._db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]  # noqa: S608
                for t in ("records", "samples", "reports", "frames")}

    def record_ids(self, *, sent: bool | None = None) -> list[str]:
        """Ids of records (all, only sent, or only unsent), oldest first."""
        where = "" if sent is None else (" WHERE sent_at IS NOT NULL" if sent else " WHERE sent_at IS NULL")
        return [r[0] for r in self._db.execute(f"SELECT id FROM records{where} ORDER BY seq")]  # noqa: S608
