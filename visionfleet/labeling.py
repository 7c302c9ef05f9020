"""The labeling queue: sampled inputs waiting for ground truth, and the labels they get.

Layout under ``<state>/labeling/``::

    samples/date=YYYY-MM-DD/part-*.parquet   sample_id, ts, source, model, version,
                                             predicted, confidence, margin, reason,
                                             image (encoded bytes), width, height
    labels/date=YYYY-MM-DD/part-*.parquet    sample_id, label, ts, labeler
    index.sqlite                              which sample ids exist / are labeled

Samples come from the server's active-learning sampler and from edge devices
(``/v1/edge/sync``); labels from ``/v1/feedback``, a label file
(``visionfleet label import``) or, in the drift scenario, the generator's truth. The
SQLite index makes appends idempotent (a sample id is stored once, whoever sends it
twice) and lets readers find unlabeled samples without scanning every file.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["LabelingQueue", "SAMPLE_FIELDS"]

SAMPLE_FIELDS: dict[str, str] = {
    "sample_id": "string",
    "ts": "float64",
    "source": "string",
    "model": "string",
    "version": "int64",
    "predicted": "string",
    "confidence": "float64",
    "margin": "float64",
    "reason": "string",
    "image": "binary",
    "width": "int64",
    "height": "int64",
}


def _date(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d")


class LabelingQueue:
    """Append samples and labels; read what is labeled. Safe across processes."""

    def __init__(self, home: str | os.PathLike[str]) -> None:
        self.root = Path(home) / "labeling"
        self.root.mkdir(parents=True, exist_ok=True)
        self._db_path = self.root / "index.sqlite"
        with self._db() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS samples (sample_id TEXT PRIMARY KEY, ts REAL, model TEXT, "
                "version INTEGER, predicted TEXT, source TEXT, label TEXT, labeler TEXT, labeled_ts REAL)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS samples_unlabeled ON samples(label) WHERE label IS NULL")

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._db_path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    # ------------------------------------------------------------------ writes
    def append(self, rows: Sequence[dict[str, Any]]) -> int:
        """Store new samples (ids already present are skipped); returns how many were new."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not rows:
            return 0
        for r in rows:
            if not r.get("sample_id") or not isinstance(r.get("image"), (bytes, bytearray)):
                raise ValueError("a sample needs a sample_id and encoded image bytes")
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            fresh = []
            for r in rows:
                cur = db.execute(
                    "INSERT OR IGNORE INTO samples (sample_id, ts, model, version, predicted, source) VALUES (?, ?, ?, ?, ?, ?)",
                    (r["sample_id"], r.get("ts") or time.time(), r.get("model"), r.get("version"), r.get("predicted"), r.get("source")),
                )
                if cur.rowcount:
                    fresh.append(r)
            if fresh:
                # Write the Parquet part before committing the index: a crash in between
                # leaves an unindexed part (harmless, re-appended on retry) rather than an
                # indexed sample without its image.
                by_date: dict[str, list[dict]] = {}
                for r in fresh:
                    r = {k: r.get(k) for k in SAMPLE_FIELDS} | {"ts": r.get("ts") or time.time()}
                    by_date.setdefault(_date(r["ts"]), []).append(r)
                schema = _schema(SAMPLE_FIELDS)
                for date, items in by_date.items():
                    d = self.root / "samples" / f"date={date}"
                    d.mkdir(parents=True, exist_ok=True)
                    tmp = d / f".part-{uuid.uuid4().hex}.parquet"
                    pq.write_table(pa.Table.from_pylist(items, schema=schema), tmp)
                    _fsync(tmp)
                    tmp.rename(d / f"part-{int(time.time() * 1000)}-{uuid.uuid4().hex[:8]}.parquet")
            db.execute("COMMIT")
            return len(fresh)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def add_labels(self, pairs: Iterable[tuple[str, str]], labeler: str = "file") -> dict[str, int]:
        """Attach labels to queued samples; unknown ids are counted, not stored."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        now = time.time()
        known = unknown = 0
        rows = []
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            for sample_id, label in pairs:
                if not label:
                    raise ValueError(f"Got an empty label for {sample_id!r}")
                cur = db.execute(
                    "UPDATE samples SET label = ?, labeler = ?, labeled_ts = ? WHERE sample_id = ?",
                    (label, labeler, now, sample_id),
                )
                if cur.rowcount:
                    known += 1
                    rows.append({"sample_id": sample_id, "label": label, "ts": now, "labeler": labeler})
                else:
                    unknown += 1
            if rows:
                d = self.root / "labels" / f"date={_date(now)}"
                d.mkdir(parents=True, exist_ok=True)
                tmp = d / f".part-{uuid.uuid4().hex}.parquet"
                pq.write_table(pa.Table.from_pylist(rows), tmp)
                _fsync(tmp)
                tmp.rename(d / f"part-{int(now * 1000)}-{uuid.uuid4().hex[:8]}.parquet")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            db.close()
        return {"labeled": known, "unknown": unknown}

    def import_csv(self, path: str | os.PathLike[str], labeler: str = "file") -> dict[str, int]:
        """Labels from a CSV with columns ``sample_id,label`` (header required)."""
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"sample_id", "label"} <= set(reader.fieldnames):
                raise ValueError(f"Got columns {reader.fieldnames} in {path}; expected a header with sample_id,label")
            pairs = [(row["sample_id"].strip(), row["label"].strip()) for row in reader]
        return self.add_labels(pairs, labeler=labeler)

    # ------------------------------------------------------------------ reads
    def counts(self) -> dict[str, int]:
        with self._db() as db:
            total, labeled = db.execute("SELECT COUNT(*), COUNT(label) FROM samples").fetchone()
        return {"samples": int(total), "labeled": int(labeled), "pending": int(total - labeled)}

    def pending(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Unlabeled samples (without image bytes), oldest first."""
        with self._db() as db:
            cur = db.execute(
                "SELECT sample_id, ts, model, version, predicted, source FROM samples WHERE label IS NULL ORDER BY ts LIMIT ?",
                (int(limit),),
            )
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, row)) for row in cur.fetchall()]

    def samples(self, *, labeled_only: bool = False, since: float | None = None):
        """A pyarrow Table of samples (with images) joined with their labels."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = sorted((self.root / "samples").rglob("part-*.parquet"))
        if not parts:
            return pa.Table.from_pylist([], schema=_schema({**SAMPLE_FIELDS, "label": "string", "labeler": "string"}))
        table = pa.concat_tables([pq.read_table(p, schema=_schema(SAMPLE_FIELDS)) for p in parts])
        with self._db() as db:
            labels = dict(db.execute("SELECT sample_id, label FROM samples WHERE label IS NOT NULL").fetchall())
            labelers = dict(db.execute("SELECT sample_id, labeler FROM samples WHERE label IS NOT NULL").fetchall())
        ids = table.column("sample_id").to_pylist()
        # A sample id may sit in two parts after a crash between write and commit: keep the first.
        seen: set[str] = set()
        keep = []
        for i, sid in enumerate(ids):
            if sid in seen:
                continue
            seen.add(sid)
            if labeled_only and sid not in labels:
                continue
            keep.append(i)
        table = table.take(pa.array(keep, type=pa.int64()))
        if since is not None:
            import pyarrow.compute as pc

            table = table.filter(pc.greater_equal(table.column("ts"), since))
        sel = table.column("sample_id").to_pylist()
        table = table.append_column("label", pa.array([labels.get(s) for s in sel], pa.string()))
        return table.append_column("labeler", pa.array([labelers.get(s) for s in sel], pa.string()))


def _schema(fields: dict[str, str]):
    import pyarrow as pa

    types = {"string": pa.string(), "float64": pa.float64(), "int64": pa.int64(), "binary": pa.binary()}
    return pa.schema([pa.field(k, types[t]) for k, t in fields.items()])


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
