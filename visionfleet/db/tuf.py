"""The TUF repository's publish lock in the shared database (no shared disk needed).

Publishers on different nodes write the same repository on the object store; each publish
reads the newest metadata, signs the next versions and writes them, so two at once would
sign the same version twice. :func:`repository_lock` serialises them: a row lock
(``SELECT ... FOR UPDATE``) on PostgreSQL, the database write lock (``BEGIN IMMEDIATE``)
on SQLite. The lock is held in an open transaction and goes with it: a publisher that dies
releases it when its connection closes, there is nothing to clean up.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Iterator

import sqlalchemy as sa

from visionfleet.db import Database

__all__ = ["tuf_metadata", "tuf_locks", "repository_lock"]

tuf_metadata = sa.MetaData()
tuf_locks = sa.Table(
    "tuf_locks", tuf_metadata,
    sa.Column("name", sa.String(500), primary_key=True),  # the repository (its store URI)
    sa.Column("holder", sa.String(200), nullable=True),  # host:pid of the last publisher, for an operator
    sa.Column("acquired_ts", sa.Float, nullable=True),
)


def _holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[:200]


@contextlib.contextmanager
def repository_lock(db: Database, name: str) -> Iterator[None]:
    """Hold the publish lock of repository ``name`` for the ``with`` block (blocks until free)."""
    engine = db.engine
    if engine.dialect.name == "sqlite":
        # pysqlite starts transactions lazily and deferred; take the write lock up front instead.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                c.execute(sa.text("INSERT INTO tuf_locks (name, holder, acquired_ts) VALUES (:n, :h, :t) "
                                  "ON CONFLICT(name) DO UPDATE SET holder = excluded.holder, "
                                  "acquired_ts = excluded.acquired_ts"),
                          {"n": name, "h": _holder(), "t": time.time()})
                yield
            except BaseException:
                c.exec_driver_sql("ROLLBACK")
                raise
            c.exec_driver_sql("COMMIT")
        return
    from sqlalchemy.dialects.postgresql import insert

    with engine.begin() as c:  # the row must exist before it can be locked
        c.execute(insert(tuf_locks).values(name=name).on_conflict_do_nothing(index_elements=["name"]))
    with engine.begin() as c:
        c.execute(sa.select(tuf_locks.c.name).where(tuf_locks.c.name == name).with_for_update())
        c.execute(tuf_locks.update().where(tuf_locks.c.name == name).values(holder=_holder(), acquired_ts=time.time()))
        yield
