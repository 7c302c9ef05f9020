"""The shared metadata database (``$VISIONFLEET_DB``): SQLAlchemy engine + Alembic migrations.

``open_db(url)`` connects, runs ``alembic upgrade heads`` (migrations ship in
``visionfleet/db/migrations``) and returns a :class:`Database`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

__all__ = ["Database", "DatabaseError", "open_db", "metadata", "model_versions", "aliases", "alias_history"]

metadata = sa.MetaData()
model_versions = sa.Table(
    "model_versions", metadata,
    sa.Column("model", sa.String(200), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("created_ts", sa.Float, nullable=False),
)
aliases = sa.Table(
    "aliases", metadata,
    sa.Column("model", sa.String(200), primary_key=True),
    sa.Column("alias", sa.String(200), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_ts", sa.Float, nullable=False),
)
alias_history = sa.Table(
    "alias_history", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model", sa.String(200), nullable=False, index=True),
    sa.Column("alias", sa.String(200), nullable=False),
    sa.Column("from_version", sa.Integer, nullable=True),
    sa.Column("to_version", sa.Integer, nullable=True),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("at", sa.String(64), nullable=False),
)

_MIGRATIONS = Path(__file__).with_name("migrations")


class DatabaseError(RuntimeError):
    """The database could not be opened (bad URL, server down, migration failed)."""


@dataclass
class Database:
    url: str
    engine: sa.Engine

    def dispose(self) -> None:
        self.engine.dispose()


def _redact(url: str) -> str:
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not even a URL; show it as given
        return url


def open_db(url: str) -> Database:
    """Connect to ``url``, bring the schema to the newest revision, return the Database."""
    shown = _redact(url)
    try:
        u = sa.make_url(url)
        kwargs: dict = {}
        if u.get_backend_name() == "sqlite":
            kwargs["connect_args"] = {"timeout": 30}
        elif u.get_backend_name() == "postgresql":
            kwargs["connect_args"] = {"connect_timeout": 5}
        engine = sa.create_engine(u, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise DatabaseError(
            f"Got {shown} for VISIONFLEET_DB; expected a SQLAlchemy URL such as sqlite:///PATH/state.db "
            f"or postgresql+psycopg://USER:PASS@HOST/DB; could not connect: {e}"
        ) from e
    if u.get_backend_name() == "sqlite":
        local_file = bool(u.database) and u.database != ":memory:" and not u.database.startswith("file:")

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _rec):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=30000")
            if local_file:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

        if local_file:
            Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    try:
        with engine.connect() as c:
            c.execute(sa.text("SELECT 1"))
        _upgrade(engine)
    except Exception as e:  # noqa: BLE001
        engine.dispose()
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DatabaseError(
            f"Got {shown} for VISIONFLEET_DB; expected a reachable database (start it, or fix the URL); "
            f"could not connect: {msg}"
        ) from e
    return Database(url=url, engine=engine)


# Alembic's migration context is a module-level proxy: one upgrade at a time per process.
_UPGRADE_LOCK = threading.Lock()
# Any fixed 64-bit key: serialises the upgrade between processes on PostgreSQL.
_PG_LOCK_KEY = 0x76697369_6F6E666C


def _upgrade(engine: sa.Engine) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    sqlite = engine.dialect.name == "sqlite"
    with _UPGRADE_LOCK:
        for attempt in range(5):
            try:
                with engine.begin() as conn:
                    if engine.dialect.name == "postgresql":
                        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, "heads")  # independent revisions may branch off 0001
                return
            except sa.exc.OperationalError:
                # SQLite: another process created the same tables a moment ago; its
                # revision is now recorded, so the next attempt finds nothing to do.
                if not sqlite or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
