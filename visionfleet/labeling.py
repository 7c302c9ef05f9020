"""The labeling queue: sampled inputs waiting for ground truth, and the labels they get.

Where it lives:

* rows in the database (``$VISIONFLEET_DB``, default ``sqlite:///<home>/state.db``;
  tables in :mod:`visionfleet.db.labeling`): one row per sample id with its current
  label, plus every label given and by whom (``labeling_labels``, unique per
  sample, label and labeler, so a re-sent label is stored once);
* image bytes on the store area ``samples`` (``<store>/samples``, default
  ``<home>/samples``), one object per image keyed by its SHA-256
  (``ab/abcdef….bin``): a re-sent image is the same object.

Samples come from the server's active-learning sampler and from edge devices
(``/v1/edge/sync``); labels from ``/v1/feedback``, a label file
(``visionfleet label import``) or, in the drift scenario, the generator's truth.
Appends are idempotent by sample id (a primary key), counts are SQL ``COUNT``s
that never read an image. An older home's ``<home>/labeling/index.sqlite`` and its
Parquet parts are imported once on first open.
"""

from __future__ import annotations

import csv
import hashlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import sqlalchemy as sa

from visionfleet.db import labeling as _t

if TYPE_CHECKING:
    from visionfleet.settings import Settings

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
_META = [k for k in SAMPLE_FIELDS if k != "image"]


def _image_key(sha: str) -> str:
    return f"{sha[:2]}/{sha}.bin"


class LabelingQueue:
    """Append samples and labels; read what is labeled. Safe across processes and nodes.

    ``LabelingQueue(home)`` is the embedded default (``<home>/state.db``, images under
    ``<home>/samples``); :meth:`from_settings` follows ``$VISIONFLEET_DB`` and the store.
    """

    def __init__(self, home: str | os.PathLike[str], *, db_url: str | None = None,
                 samples_uri: str | None = None) -> None:
        from visionfleet.db import open_db
        from visionfleet.store import open_store

        self.home = Path(home)
        self.db = open_db(db_url or f"sqlite:///{self.home}/state.db")
        self.store = open_store(samples_uri or str(self.home / "samples"))
        self._import_legacy()

    @classmethod
    def from_settings(cls, settings: "Settings") -> "LabelingQueue":
        """The queue of these settings: their database and the store area ``samples``."""
        return cls(settings.home, db_url=settings.db_url, samples_uri=settings.store_uri("samples"))

    # ------------------------------------------------------------------ writes
    def append(self, rows: Sequence[dict[str, Any]]) -> int:
        """Store new samples (ids already present are skipped); returns how many were new."""
        if not rows:
            return 0
        for r in rows:
            if not r.get("sample_id") or not isinstance(r.get("image"), (bytes, bytearray)):
                raise ValueError(f"Got a sample without {'sample_id' if not r.get('sample_id') else 'image bytes'}; "
                                 "expected a sample_id and encoded image bytes")
        with self.db.engine.connect() as c:
            known = {s for (s,) in c.execute(sa.select(_t.samples.c.sample_id).where(
                _t.samples.c.sample_id.in_([str(r["sample_id"]) for r in rows])))}
        # Images first (content-addressed, so a rewrite is harmless): a crash after this
        # and before the commit leaves an unreferenced object, never a row without its image.
        shas = {}
        for r in rows:
            sha = hashlib.sha256(bytes(r["image"])).hexdigest()
            shas[str(r["sample_id"])] = sha
            if str(r["sample_id"]) not in known:
                self.store.write_bytes(_image_key(sha), bytes(r["image"]))
        new = 0
        with self.db.engine.begin() as c:
            for r in rows:
                sid = str(r["sample_id"])
                row = {k: r.get(k) for k in _META} | {"sample_id": sid, "ts": float(r.get("ts") or time.time()),
                                                      "image_sha256": shas[sid]}
                new += _t.insert_ignore(c, _t.samples, row)
        return new

    def add_labels(self, pairs: Iterable[tuple[str, str]], labeler: str = "file") -> dict[str, int]:
        """Attach labels to queued samples; unknown ids are counted, not stored."""
        pairs = list(pairs)
        for sample_id, label in pairs:
            if not label:
                raise ValueError(f"Got an empty label for {sample_id!r}; expected a class name")
        now = time.time()
        known = unknown = 0
        s = _t.samples
        with self.db.engine.begin() as c:
            for sample_id, label in pairs:
                n = c.execute(sa.update(s).where(s.c.sample_id == sample_id)
                              .values(label=label, labeler=labeler, labeled_ts=now)).rowcount
                if n:
                    known += 1
                    _t.insert_ignore(c, _t.labels, {"sample_id": sample_id, "label": label, "labeler": labeler,
                                                    "ts": now})
                else:
                    unknown += 1
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
        s = _t.samples
        with self.db.engine.connect() as c:
            total, labeled = c.execute(sa.select(sa.func.count(), sa.func.count(s.c.label))).one()
        return {"samples": int(total), "labeled": int(labeled), "pending": int(total - labeled)}

    def count_labeled(self, *, model: str | None = None, since: float | None = None) -> int:
        """Labeled samples (of ``model``, taken at or after ``since``): a SQL COUNT, no image read."""
        s = _t.samples
        q = sa.select(sa.func.count()).select_from(s).where(s.c.label.is_not(None))
        if model is not None:
            q = q.where(s.c.model == model)
        if since is not None:
            q = q.where(s.c.ts >= since)
        with self.db.engine.connect() as c:
            return int(c.execute(q).scalar_one())

    def labels_of(self, sample_id: str) -> list[dict[str, Any]]:
        """Every label a sample was given: label, labeler, ts (oldest first)."""
        t = _t.labels
        with self.db.engine.connect() as c:
            rows = c.execute(sa.select(t.c.label, t.c.labeler, t.c.ts).where(t.c.sample_id == sample_id)
                             .order_by(t.c.ts, t.c.id)).mappings().all()
        return [dict(r) for r in rows]

    def pending(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Unlabeled samples (without image bytes), oldest first."""
        s = _t.samples
        q = (sa.select(s.c.sample_id, s.c.ts, s.c.model, s.c.version, s.c.predicted, s.c.source)
             .where(s.c.label.is_(None)).order_by(s.c.ts, s.c.sample_id).limit(int(limit)))
        with self.db.engine.connect() as c:
            return [dict(r) for r in c.execute(q).mappings().all()]

    def samples(self, *, labeled_only: bool = False, since: float | None = None):
        """A pyarrow Table of samples (with images read from the store) and their labels."""
        import pyarrow as pa

        s = _t.samples
        q = sa.select(*[s.c[k] for k in _META], s.c.image_sha256, s.c.label, s.c.labeler).order_by(s.c.ts, s.c.sample_id)
        if labeled_only:
            q = q.where(s.c.label.is_not(None))
        if since is not None:
            q = q.where(s.c.ts >= since)
        with self.db.engine.connect() as c:
            rows = [dict(r) for r in c.execute(q).mappings().all()]
        from concurrent.futures import ThreadPoolExecutor

        # One GET per image; on an object store they overlap (a retrain reads thousands).
        with ThreadPoolExecutor(max_workers=16) as pool:
            images = list(pool.map(lambda r: self.store.read_bytes(_image_key(r.pop("image_sha256"))), rows))
        for r, image in zip(rows, images):
            r["image"] = image
        return pa.Table.from_pylist(rows, schema=_schema({**SAMPLE_FIELDS, "label": "string", "labeler": "string"}))

    # ------------------------------------------------------------------ upgrade
    def _import_legacy(self) -> None:
        """Import ``<home>/labeling`` (index.sqlite + Parquet parts) once; idempotent."""
        legacy = self.home / "labeling" / "index.sqlite"
        if not legacy.exists():
            return
        source = f"legacy:{legacy.resolve()}"
        with self.db.engine.connect() as c:
            if c.execute(sa.select(_t.imports.c.source).where(_t.imports.c.source == source)).first():
                return
        import sqlite3

        import pyarrow.parquet as pq

        images: dict[str, dict[str, Any]] = {}
        for p in sorted((self.home / "labeling" / "samples").rglob("part-*.parquet")):
            for r in pq.read_table(p).to_pylist():
                images.setdefault(r["sample_id"], r)  # a crash could leave a sample in two parts
        db = sqlite3.connect(legacy, timeout=30)
        try:
            index = db.execute("SELECT sample_id, ts, model, version, predicted, source, label, labeler, labeled_ts "
                               "FROM samples").fetchall()
        finally:
            db.close()
        rows, labels = [], []
        for sid, ts, model, version, predicted, source_, label, labeler, labeled_ts in index:
            part = images.get(sid)
            if part is None or not part.get("image"):
                continue  # indexed without an image cannot happen (the part is written first)
            rows.append(part | {"ts": ts or part.get("ts"), "model": model, "version": version, "predicted": predicted,
                                "source": source_})
            if label:
                labels.append((sid, label, labeler or "legacy", labeled_ts or time.time()))
        self.append(rows)
        s = _t.samples
        with self.db.engine.begin() as c:
            for sid, label, labeler, lts in labels:
                c.execute(sa.update(s).where(s.c.sample_id == sid, s.c.label.is_(None))
                          .values(label=label, labeler=labeler, labeled_ts=lts))
                _t.insert_ignore(c, _t.labels, {"sample_id": sid, "label": label, "labeler": labeler, "ts": lts})
            _t.insert_ignore(c, _t.imports, {"source": source, "rows": len(rows), "ts": time.time()})


def _schema(fields: dict[str, str]):
    import pyarrow as pa

    types = {"string": pa.string(), "float64": pa.float64(), "int64": pa.int64(), "binary": pa.binary()}
    return pa.schema([pa.field(k, types[t]) for k, t in fields.items()])
