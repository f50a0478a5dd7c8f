"""Per-job noise figures: the series' noise before and after, and each derived slice's.

``jobs.noise_slices`` counts the measurable slices behind the job's figure (0: nothing was
measurable); NULL on every column means the job was not measured (jobs before this revision).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 04:40:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("noise_before_hu", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("noise_after_hu", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("noise_slices", sa.Integer(), nullable=True))
    with op.batch_alter_table("derived_instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("noise_before_hu", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("noise_after_hu", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("derived_instances", schema=None) as batch_op:
        batch_op.drop_column("noise_after_hu")
        batch_op.drop_column("noise_before_hu")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("noise_slices")
        batch_op.drop_column("noise_after_hu")
        batch_op.drop_column("noise_before_hu")
