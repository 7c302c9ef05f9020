"""The durable outbox: every prediction and sampled image waits here until the server has it.

SQLite in WAL mode with ``synchronous=FULL``: a committed row survives a power cut
(the WAL is fsynced on every commit), and readers never block the inference loop's
writes. A record is written in the same transaction as the *frame key* it came from,
so a restarted agent never predicts the same frame twice, and each record carries an
id made on the device; the server de-duplicates by ``(device, id)``, so a batch resent
after a lost acknowledgement never counts twice. Rows leave only after the server
acknowledged them (``ack``), once they are older than the retention (``prune``, run by
the agent's network loop; 1 h by default).

The outbox is bounded in bytes (``max_bytes``, 256 MiB by default; database file and
WAL together): a device offline for weeks fills it, and then, in this order, it drops
acknowledged rows, the oldest unsent sampled *images*, and only if still over, the
oldest unsent *records*. Every unsent row dropped is counted (``backlog()``:
``dropped_samples``, ``dropped_records``; the agent sends them with its status), so a
loss is never silent. Unsent images are also capped in number (``max_unsent_samples``).
The file gives the space back: ``auto_vacuum=INCREMENTAL`` (an older file is converted
once, by a ``VACUUM`` at open) and the WAL is truncated to a bounded size.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

__all__ = ["Outbox", "Batch", "DEFAULT_MAX_BYTES", "DEFAULT_RETENTION_S", "MIN_MAX_BYTES"]

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_RETENTION_S = 3600.0
MIN_MAX_BYTES = 4 * 1024 * 1024
_ROW_OVERHEAD = 64  # bytes a row costs beyond its columns (keys, index entries, page slack)
_LOW_WATER = 0.9  # when over the cap, free down to this share of it, so a full outbox does not drop on every add

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
# Counted in `counters`: unsent rows dropped (lost to the server) and acknowledged rows removed.
_COUNTERS = ("dropped_samples", "dropped_records", "pruned")


@dataclass
class Batch:
    """Unsent rows, oldest first, within the size limits of one sync request."""

    records: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)  # body fields + "image": bytes
    reports: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records) + len(self.samples) + len(self.reports)


class Outbox:
    """One connection to the outbox database; make one per thread.

    Args:
        path: the SQLite file.
        max_unsent_samples: unsent sampled images kept at most (oldest dropped, counted).
        max_bytes: cap of the database file plus its WAL (at least 4 MiB).
        retention_s: acknowledged rows older than this go at ``prune()``.

    Raises:
        ValueError: ``max_bytes`` below 4 MiB, a negative retention or sample cap.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_unsent_samples: int = 2000,
                 max_bytes: int = DEFAULT_MAX_BYTES, retention_s: float = DEFAULT_RETENTION_S) -> None:
        if max_bytes < MIN_MAX_BYTES:
            raise ValueError(f"Got {max_bytes} bytes for the outbox cap; expected >= {MIN_MAX_BYTES} (4 MiB)")
        if retention_s < 0:
            raise ValueError(f"Got {retention_s} s for the outbox retention; expected >= 0")
        if max_unsent_samples < 0:
            raise ValueError(f"Got {max_unsent_samples} for max_unsent_samples; expected >= 0")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_unsent_samples = max_unsent_samples
        self.max_bytes = int(max_bytes)
        self.retention_s = float(retention_s)
        # The WAL is part of the cap: truncated to this after a checkpoint, and checkpointed
        # about twice per limit; the data gets what is left, less one limit of headroom.
        self._wal_limit = max(256 * 1024, min(16 * 1024 * 1024, self.max_bytes // 16))
        self._data_budget = self.max_bytes - 2 * self._wal_limit
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout=30000")
        new = self._db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0
        if new:
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only takes before the first table
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        page = self._db.execute("PRAGMA page_size").fetchone()[0]
        self._db.execute(f"PRAGMA journal_size_limit={self._wal_limit}")
        self._db.execute(f"PRAGMA wal_autocheckpoint={max(16, self._wal_limit // page // 2)}")
        for stmt in _SCHEMA:
            self._db.execute(stmt)
        if self._db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            # A file made before the cap: switch it to incremental vacuum, once (rewrites the file).
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("VACUUM")

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
            freed = self._cap_bytes()
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        if freed:
            self._reclaim("PASSIVE")  # the inference loop must not wait for the other thread's reads
        return True

    def _count(self, name: str, n: int) -> None:
        if n > 0:
            self._db.execute("INSERT INTO counters (name, value) VALUES (?, ?) "
                             "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (name, n))

    def _cap_samples(self) -> None:
        n = self._db.execute("SELECT COUNT(*) FROM samples WHERE sent_at IS NULL").fetchone()[0]
        extra = n - self.max_unsent_samples
        if extra > 0:
            self._db.execute("DELETE FROM samples WHERE seq IN (SELECT seq FROM samples WHERE sent_at IS NULL "
                             "ORDER BY seq LIMIT ?)", (extra,))
            self._count("dropped_samples", extra)

    def live_bytes(self) -> int:
        """Bytes the rows occupy in the database file (its pages less the free ones)."""
        page = self._db.execute("PRAGMA page_size").fetchone()[0]
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * page

    def disk_bytes(self) -> int:
        """The outbox's size on disk now: the database file and its WAL."""
        total = 0
        for p in (self.path, self.path.with_name(self.path.name + "-wal")):
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def _cap_bytes(self) -> int:
        """Over the byte cap: drop acked rows, then the oldest unsent images, then the oldest unsent
        records, until under the low-water mark (transaction held). Returns the rows deleted."""
        over = self.live_bytes() - self._data_budget
        if over <= 0:
            return 0
        need = over + int(self._data_budget * (1 - _LOW_WATER))
        deleted = 0
        # Acknowledged rows first: the server has them; an acked sample's image is already gone.
        for table, size in (("samples", "length(body) + COALESCE(length(image), 0)"),
                            ("records", "length(body)"), ("reports", "length(body)")):
            n, freed = self._drop_oldest(table, size, "sent_at IS NOT NULL", need)
            self._count("pruned", n)
            deleted += n
            need -= freed
            if need <= 0:
                return deleted
        for table, size, counter in (("samples", "length(body) + COALESCE(length(image), 0)", "dropped_samples"),
                                     ("records", "length(body)", "dropped_records")):
            n, freed = self._drop_oldest(table, size, "sent_at IS NULL", need)
            self._count(counter, n)
            deleted += n
            need -= freed
            if need <= 0:
                break
        return deleted

    def _drop_oldest(self, table: str, size: str, where: str, need: int) -> tuple[int, int]:
        """Delete the oldest rows of ``table`` matching ``where`` until about ``need`` bytes are freed."""
        if need <= 0:
            return 0, 0
        # The running sum picks the newest seq that still has to go; one DELETE then takes them all.
        row = self._db.execute(
            f"SELECT seq, total FROM (SELECT seq, SUM({size} + {_ROW_OVERHEAD}) OVER (ORDER BY seq) AS total "  # noqa: S608
            f"FROM {table} WHERE {where}) WHERE total >= ? ORDER BY seq LIMIT 1", (need,)).fetchone()
        if row is None:  # all of them are not enough
            row = self._db.execute(
                f"SELECT MAX(seq), SUM({size} + {_ROW_OVERHEAD}) FROM {table} WHERE {where}").fetchone()  # noqa: S608
            if row[0] is None:
                return 0, 0
        last, freed = row
        n = self._db.execute(f"DELETE FROM {table} WHERE {where} AND seq <= ?", (last,)).rowcount  # noqa: S608
        return n, int(freed)

    def _reclaim(self, checkpoint: str = "TRUNCATE") -> None:
        """Give free pages back to the file system and keep the WAL short."""
        self._db.execute("PRAGMA incremental_vacuum").fetchall()  # it frees one page per step of the statement
        self._db.execute(f"PRAGMA wal_checkpoint({checkpoint})").fetchall()

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

    def prune(self, *, sent_older_than_s: float | None = None) -> int:
        """Delete acknowledged rows older than the cutoff (default: the retention) and give the
        space back; frame keys stay (they prevent re-processing). Returns the rows deleted."""
        cutoff = time.time() - (self.retention_s if sent_older_than_s is None else sent_older_than_s)
        n = 0
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for table in ("records", "samples", "reports"):
                n += self._db.execute(f"DELETE FROM {table} WHERE sent_at IS NOT NULL AND sent_at < ?",  # noqa: S608
                                      (cutoff,)).rowcount
            self._count("pruned", n)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        if n:
            self._reclaim()
        return n

    # ------------------------------------------------------------------ reads
    def _counter(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def backlog(self) -> dict[str, int]:
        """Unsent rows per kind, and the unsent images and records dropped by the caps."""
        q = "SELECT COUNT(*) FROM {} WHERE sent_at IS NULL"
        return {
            "records": self._db.execute(q.format("records")).fetchone()[0],
            "samples": self._db.execute(q.format("samples")).fetchone()[0],
            "reports": self._db.execute(q.format("reports")).fetchone()[0],
            "dropped_samples": self._counter("dropped_samples"),
            "dropped_records": self._counter("dropped_records"),
        }

    def stats(self) -> dict[str, int]:
        """Size on disk, the cap, and the acknowledged rows removed (by retention or for space)."""
        return {"bytes": self.disk_bytes(), "max_bytes": self.max_bytes, "pruned": self._counter("pruned")}

    def totals(self) -> dict[str, int]:
        """All rows kept now (sent or not) per kind, and frames seen."""
        return {t: self._db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]  # noqa: S608
                for t in ("records", "samples", "reports", "frames")}

    def record_ids(self, *, sent: bool | None = None) -> list[str]:
        """Ids of records (all, only sent, or only unsent), oldest first."""
        where = "" if sent is None else (" WHERE sent_at IS NOT NULL" if sent else " WHERE sent_at IS NULL")
        return [r[0] for r in self._db.execute(f"SELECT id FROM records{where} ORDER BY seq")]  # noqa: S608
