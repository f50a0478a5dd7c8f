"""Series generation: the reception's mark in derived UIDs, set when a series row is made.

Rows of series first received before this revision stay NULL: their derived UIDs were
made without a reception mark, and a retry or a late instance must keep them.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 07:50:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.add_column(sa.Column("generation", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_column("generation")
