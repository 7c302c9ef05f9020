"""Tables of the labeling queue (migration ``0002_labeling_fleet``).

``labeling_samples`` holds one row per sampled input (the image itself is on the store
area ``samples``, keyed by its SHA-256), with its current label; ``labeling_labels`` keeps
every label it was given and by whom (provenance); a re-sent label is the same row.
``labeling_imports`` remembers which legacy files were imported, so that happens once.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["metadata", "samples", "labels", "imports", "insert_ignore"]

metadata = sa.MetaData()

samples = sa.Table(
    "labeling_samples", metadata,
    sa.Column("sample_id", sa.String(200), primary_key=True),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("source", sa.String(200)),
    sa.Column("model", sa.String(200)),
    sa.Column("version", sa.Integer),
    sa.Column("predicted", sa.String(200)),
    sa.Column("confidence", sa.Float),
    sa.Column("margin", sa.Float),
    sa.Column("reason", sa.String(64)),
    sa.Column("width", sa.Integer),
    sa.Column("height", sa.Integer),
    sa.Column("image_sha256", sa.String(64), nullable=False),
    sa.Column("label", sa.String(200)),
    sa.Column("labeler", sa.String(200)),
    sa.Column("labeled_ts", sa.Float),
    sa.Index("labeling_samples_model_ts", "model", "ts"),
)
labels = sa.Table(
    "labeling_labels", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("sample_id", sa.String(200), nullable=False),
    sa.Column("label", sa.String(200), nullable=False),
    sa.Column("labeler", sa.String(200), nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.UniqueConstraint("sample_id", "label", "labeler", name="labeling_labels_once"),
)
imports = sa.Table(
    "labeling_imports", metadata,
    sa.Column("source", sa.String(1000), primary_key=True),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
)


def insert_ignore(conn: sa.Connection, table: sa.Table, row: dict) -> bool:
    """INSERT a row unless its key exists (SQLite and PostgreSQL); True when it was new."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    # RETURNING, not rowcount: psycopg does not report 0 for a skipped row reliably.
    stmt = insert(table).values(**row).on_conflict_do_nothing().returning(*table.primary_key.columns)
    return conn.execute(stmt).first() is not None
