"""Alembic environment: runs on the connection ``visionfleet.db.open_db`` passes in."""

from alembic import context

from visionfleet.db import metadata

conn = context.config.attributes.get("connection")
if conn is None:  # pragma: no cover - only open_db runs migrations
    raise RuntimeError("Got no connection; expected visionfleet.db.open_db to run the migrations")
context.configure(connection=conn, target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
