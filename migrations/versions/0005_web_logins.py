"""Dashboard logins in the database: ``web_logins`` (they survive restarts).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 04:45:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "web_logins",
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("user_name", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("token_sha256"),
    )
    with op.batch_alter_table("web_logins", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_web_logins_expires_at"), ["expires_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("web_logins", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_web_logins_expires_at"))
    op.drop_table("web_logins")
