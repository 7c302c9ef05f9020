"""labeling_* (the labeling queue and label provenance) and fleet_* (devices, sync keys, parts, updates, rollouts)

Revision ID: 0002_labeling_fleet
Revises: 0001_registry
"""
import sqlalchemy as sa
from alembic import op

revision = "0002_labeling_fleet"
down_revision = "0001_registry"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from visionfleet.db import fleet

    # The fleet tables as declared (a new table needs no ALTER; later changes get their own revision).
    fleet.metadata.create_all(op.get_bind())
    op.create_table(
        "labeling_samples",
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
    )
    op.create_index("labeling_samples_model_ts", "labeling_samples", ["model", "ts"])
    op.create_table(
        "labeling_labels",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("sample_id", sa.String(200), nullable=False),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("labeler", sa.String(200), nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.UniqueConstraint("sample_id", "label", "labeler", name="labeling_labels_once"),
    )
    op.create_table(
        "labeling_imports",
        sa.Column("source", sa.String(1000), primary_key=True),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
    )


def downgrade() -> None:
    from visionfleet.db import fleet

    fleet.metadata.drop_all(op.get_bind())
    op.drop_table("labeling_imports")
    op.drop_table("labeling_labels")
    op.drop_index("labeling_samples_model_ts", "labeling_samples")
    op.drop_table("labeling_samples")
