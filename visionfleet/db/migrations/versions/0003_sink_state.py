"""sink_docs, sink_journal: the telemetry sink's checkpoint and its journal of acknowledged rows

Revision ID: 0003_sink_state
Revises: 0001_registry
"""
import sqlalchemy as sa
from alembic import op

revision = "0003_sink_state"
down_revision = "0001_registry"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sink_docs",
        sa.Column("sink", sa.String(500), primary_key=True),
        sa.Column("kind", sa.String(32), primary_key=True),
        sa.Column("key", sa.String(500), primary_key=True),
        sa.Column("doc", sa.LargeBinary, nullable=False),
        sa.Column("updated_ts", sa.Float, nullable=False),
    )
    op.create_table(
        "sink_journal",
        sa.Column("sink", sa.String(500), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("doc", sa.LargeBinary, nullable=False),
        sa.Column("in_lake", sa.Boolean, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("sink_journal")
    op.drop_table("sink_docs")
