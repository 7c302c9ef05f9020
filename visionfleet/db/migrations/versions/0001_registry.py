"""registry tables: model_versions, aliases, alias_history

Revision ID: 0001_registry
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001_registry"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("created_ts", sa.Float, nullable=False),
    )
    op.create_table(
        "aliases",
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("alias", sa.String(200), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("updated_ts", sa.Float, nullable=False),
    )
    op.create_table(
        "alias_history",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(200), nullable=False, index=True),
        sa.Column("alias", sa.String(200), nullable=False),
        sa.Column("from_version", sa.Integer, nullable=True),
        sa.Column("to_version", sa.Integer, nullable=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("at", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("alias_history")
    op.drop_table("aliases")
    op.drop_table("model_versions")
