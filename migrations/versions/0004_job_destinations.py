"""Per-destination delivery state: ``job_destinations``.

Rows are made when the sender first takes a job; jobs sent before this revision have none.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 04:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_destinations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("failing_since", sa.DateTime(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "destination"),
    )
    with op.batch_alter_table("job_destinations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_job_destinations_job_id"), ["job_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("job_destinations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_destinations_job_id"))
    op.drop_table("job_destinations")
