"""Tables of the server's fleet state (migration ``0002_labeling_fleet``).

``fleet_devices`` (last status and counters per device), ``fleet_seen`` (the sync
de-duplication keys: a ``(device, kind, id)`` is stored once, so a re-sent batch is not
counted twice, whichever server process gets it), ``fleet_parts`` (committed edge events
waiting for the lake), ``fleet_updates`` (install reports), ``fleet_rollouts``.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["metadata", "devices", "seen", "parts", "updates", "rollouts"]

metadata = sa.MetaData()

devices = sa.Table(
    "fleet_devices", metadata,
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("first_seen", sa.Float), sa.Column("last_seen", sa.Float),
    sa.Column("model", sa.String(200)), sa.Column("version", sa.Integer), sa.Column("bundle_id", sa.String(200)),
    sa.Column("target", sa.String(200)), sa.Column("health", sa.String(200)),
    sa.Column("backlog_records", sa.Integer), sa.Column("backlog_samples", sa.Integer),
    sa.Column("dropped_samples", sa.Integer), sa.Column("agent", sa.String(200)), sa.Column("status", sa.Text),
    sa.Column("records", sa.Integer, nullable=False, server_default="0"),
    sa.Column("samples", sa.Integer, nullable=False, server_default="0"),
    sa.Column("duplicates", sa.Integer, nullable=False, server_default="0"),
    sa.Column("syncs", sa.Integer, nullable=False, server_default="0"),
)
seen = sa.Table(
    "fleet_seen", metadata,
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), primary_key=True),
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("ts", sa.Float, nullable=False),
)
parts = sa.Table(
    "fleet_parts", metadata,
    sa.Column("part_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("n", sa.Integer, nullable=False),
    sa.Column("payload", sa.Text),
    sa.Column("written", sa.Integer, nullable=False, server_default="0"),
)
updates = sa.Table(
    "fleet_updates", metadata,
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("report_id", sa.String(64), primary_key=True),
    sa.Column("ts", sa.Float), sa.Column("bundle_id", sa.String(200), index=True), sa.Column("model", sa.String(200)),
    sa.Column("version", sa.Integer), sa.Column("target", sa.String(200)), sa.Column("outcome", sa.String(64)),
    sa.Column("error", sa.Text),
)
rollouts = sa.Table(
    "fleet_rollouts", metadata,
    sa.Column("model", sa.String(200), primary_key=True),
    sa.Column("target", sa.String(200), primary_key=True),
    sa.Column("bundle_id", sa.String(200), primary_key=True),
    sa.Column("version", sa.Integer), sa.Column("rollout", sa.Integer), sa.Column("status", sa.String(32), nullable=False),
    sa.Column("published_at", sa.Float), sa.Column("changed_at", sa.Float), sa.Column("reason", sa.Text),
)
