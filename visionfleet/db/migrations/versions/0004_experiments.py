"""experiments, experiment_timeline: A/B experiment state and its snapshots

Revision ID: 0004_experiments
Revises: 0001_registry
"""
import sqlalchemy as sa
from alembic import op

revision = "0004_experiments"
down_revision = "0001_registry"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "experiments",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("model", sa.String(200), nullable=False, index=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("doc", sa.Text, nullable=False),
        sa.Column("rev", sa.Integer, nullable=False),
        sa.Column("updated_ts", sa.Float, nullable=False),
    )
    op.create_table(
        "experiment_timeline",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False, index=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("row", sa.Text, nullable=False),
    )
    # At most one running experiment per model: two coordinators racing cannot both start one.
    running = sa.text("status = 'running'")
    op.create_index("experiments_one_running_per_model", "experiments", ["model"], unique=True,
                    sqlite_where=running, postgresql_where=running)


def downgrade() -> None:
    op.drop_index("experiments_one_running_per_model", table_name="experiments")
    op.drop_table("experiment_timeline")
    op.drop_table("experiments")
