"""A job's input set: ``job_instances``, and the source content of each derived instance.

Jobs created before this revision get the instances their series holds now as input.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 03:50:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("spool_path", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "sop_instance_uid"),
    )
    with op.batch_alter_table("job_instances", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_job_instances_job_id"), ["job_id"], unique=False)
    with op.batch_alter_table("derived_instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("source_sha256", sa.String(length=64), nullable=True))
    op.execute(
        "INSERT INTO job_instances (job_id, sop_instance_uid, sha256, spool_path)"
        " SELECT jobs.id, instances.sop_instance_uid, instances.sha256, instances.spool_path"
        " FROM jobs JOIN instances ON instances.series_instance_uid = jobs.series_instance_uid"
    )


def downgrade() -> None:
    with op.batch_alter_table("derived_instances", schema=None) as batch_op:
        batch_op.drop_column("source_sha256")
    with op.batch_alter_table("job_instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_instances_job_id"))
    op.drop_table("job_instances")
