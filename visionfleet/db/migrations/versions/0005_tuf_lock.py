"""tuf_locks: the publish lock of a TUF repository on a shared store

Revision ID: 0005_tuf_lock
Revises: 0001_registry
"""
import sqlalchemy as sa
from alembic import op

revision = "0005_tuf_lock"
down_revision = "0001_registry"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tuf_locks",
        sa.Column("name", sa.String(500), primary_key=True),
        sa.Column("holder", sa.String(200), nullable=True),
        sa.Column("acquired_ts", sa.Float, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("tuf_locks")
