"""The telemetry sink's state in the shared database: a checkpoint and a journal.

Two tables (migration ``0003_sink_state``), both keyed by the sink (the URI of its lake, the
store area ``telemetry``), so sinks of different lakes can share one database:

* ``sink_docs``: the checkpoint, one small document per thing (an experiment's arm
  accumulators, its shadow comparison, a model version's monitor windows, the pending label
  joins, the configuration, and ``meta``: the counters and ``applied_seq``, the last journal
  entry the checkpoint includes). Rewritten only when the thing changed.
* ``sink_journal``: every acknowledged row and state change, in order (``seq``): events,
  feedback, resets. A restore loads the checkpoint and replays the entries after
  ``applied_seq``; the ``event`` entries are also the de-duplication keys and the join
  partners of late labels, and ``in_lake`` says whether the row reached the Parquet lake.
  Entries are pruned once they are in the lake and in a checkpoint, keeping the last
  ``remember`` events for de-duplication.

Documents are JSON, zlib-compressed (a monitor with two 300-value windows is a few kB).
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import sqlalchemy as sa

from visionfleet.db import Database

__all__ = ["sink_metadata", "sink_docs", "sink_journal", "JournalRow", "SinkState", "encode", "decode"]

sink_metadata = sa.MetaData()
sink_docs = sa.Table(
    "sink_docs", sink_metadata,
    sa.Column("sink", sa.String(500), primary_key=True),
    sa.Column("kind", sa.String(32), primary_key=True),
    sa.Column("key", sa.String(500), primary_key=True),
    sa.Column("doc", sa.LargeBinary, nullable=False),
    sa.Column("updated_ts", sa.Float, nullable=False),
)
sink_journal = sa.Table(
    "sink_journal", sink_metadata,
    sa.Column("sink", sa.String(500), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("kind", sa.String(16), nullable=False),  # event | feedback | op
    sa.Column("doc", sa.LargeBinary, nullable=False),
    sa.Column("in_lake", sa.Boolean, nullable=False),
)

_CHUNK = 500  # seqs per UPDATE ... IN (...)


def _default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"Got {type(o).__name__} in a sink document; expected JSON data")


def encode(doc: Any) -> bytes:
    return zlib.compress(json.dumps(doc, separators=(",", ":"), default=_default).encode(), 1)


def decode(blob: bytes) -> Any:
    return json.loads(zlib.decompress(blob))


@dataclass(frozen=True)
class JournalRow:
    seq: int
    kind: str
    doc: dict[str, Any]
    in_lake: bool = False


class SinkState:
    """Reads and writes one sink's checkpoint and journal (every write one transaction)."""

    def __init__(self, db: Database, sink: str) -> None:
        if len(sink) > 500:
            raise ValueError(f"Got a sink name of {len(sink)} characters; expected at most 500")
        self.db = db
        self.sink = sink

    def load(self) -> tuple[dict[tuple[str, str], Any], list[JournalRow]]:
        """The checkpoint documents by ``(kind, key)`` and the journal in ``seq`` order."""
        with self.db.engine.connect() as c:
            docs = {(r.kind, r.key): decode(r.doc) for r in c.execute(
                sa.select(sink_docs.c.kind, sink_docs.c.key, sink_docs.c.doc).where(sink_docs.c.sink == self.sink))}
            rows = [JournalRow(r.seq, r.kind, decode(r.doc), bool(r.in_lake)) for r in c.execute(
                sa.select(sink_journal.c.seq, sink_journal.c.kind, sink_journal.c.doc, sink_journal.c.in_lake)
                .where(sink_journal.c.sink == self.sink).order_by(sink_journal.c.seq))]
        return docs, rows

    def append(self, rows: Iterable[JournalRow]) -> None:
        """Journal rows (one transaction: all or none)."""
        values = self._values(rows)
        if values:
            with self.db.engine.begin() as c:
                c.execute(sink_journal.insert(), values)

    def unwritten(self, limit: int) -> list[JournalRow]:
        """The oldest journal rows not yet in the lake."""
        q = (sa.select(sink_journal.c.seq, sink_journal.c.kind, sink_journal.c.doc)
             .where(sink_journal.c.sink == self.sink, sink_journal.c.in_lake.is_(False))
             .order_by(sink_journal.c.seq).limit(limit))
        with self.db.engine.connect() as c:
            return [JournalRow(r.seq, r.kind, decode(r.doc)) for r in c.execute(q)]

    def checkpoint(self, *, docs: Mapping[tuple[str, str], Any | None], journal: Iterable[JournalRow],
                   written: Iterable[int], applied_seq: int, keep_events_after: int) -> None:
        """One transaction: journal rows not yet stored, the lake marks, changed documents, pruning.

        Args:
            docs: ``(kind, key) -> document``; ``None`` deletes the document.
            journal: entries that could not be journaled earlier (the database was away).
            written: seqs that reached the lake.
            applied_seq: the last entry the documents include.
            keep_events_after: events with a larger seq stay for de-duplication.
        """
        values = self._values(journal)
        written = sorted(set(written))
        now = time.time()
        j, d = sink_journal.c, sink_docs.c
        with self.db.engine.begin() as c:
            if values:
                c.execute(sink_journal.insert(), values)
            for i in range(0, len(written), _CHUNK):
                c.execute(sink_journal.update().where(j.sink == self.sink, j.seq.in_(written[i:i + _CHUNK]))
                          .values(in_lake=True))
            for (kind, key), doc in docs.items():
                c.execute(sink_docs.delete().where(d.sink == self.sink, d.kind == kind, d.key == key))
                if doc is not None:
                    c.execute(sink_docs.insert().values(sink=self.sink, kind=kind, key=key, doc=encode(doc),
                                                        updated_ts=now))
            c.execute(sink_journal.delete().where(
                j.sink == self.sink, j.in_lake.is_(True), j.seq <= applied_seq,
                sa.or_(j.kind != "event", j.seq <= keep_events_after)))

    def _values(self, rows: Iterable[JournalRow]) -> list[dict[str, Any]]:
        return [{"sink": self.sink, "seq": r.seq, "kind": r.kind, "doc": encode(r.doc), "in_lake": r.in_lake}
                for r in rows]
