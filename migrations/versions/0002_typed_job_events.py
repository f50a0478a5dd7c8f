"""Typed job events: ``job_events.kind``, converted from the message texts of 0001.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07 03:40:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

KINDS = (
    "settled",
    "skipped",
    "claimed",
    "denoised",
    "released",
    "attempt_failed",
    "stalled",
    "postponed",
    "delivered",
    "failed",
    "admin_action",
    "purged",
    "warning",
    "superseded",
    "gave_up",
)

#: How 0001's writers worded each kind of event; the first match decides, in this order.
CONVERSION = """
UPDATE job_events SET kind = CASE
    WHEN message LIKE 'spool purged%' THEN 'purged'
    WHEN message LIKE 'send postponed%' THEN 'postponed'
    WHEN message LIKE 'retry requested by %' OR message LIKE 'cancelled by %'
        OR message LIKE 'resend to % requested by %' THEN 'admin_action'
    WHEN message LIKE 'instance % received again %' THEN 'warning'
    WHEN actor = 'settler' AND to_state = 'skipped' THEN 'skipped'
    WHEN actor = 'settler' THEN 'settled'
    WHEN message LIKE 'claimed by %' OR message LIKE 'sending by %' THEN 'claimed'
    WHEN actor = 'stall-detector' THEN 'stalled'
    WHEN from_state = 'running' AND to_state = 'sending' THEN 'denoised'
    WHEN to_state = 'done' THEN 'delivered'
    WHEN message LIKE 'attempt % failed%' THEN 'attempt_failed'
    WHEN to_state = 'failed' THEN 'failed'
    WHEN to_state = 'queued' OR to_state IS NULL THEN 'released'
    ELSE 'warning'
END
"""


def upgrade() -> None:
    with op.batch_alter_table("job_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=16), nullable=True))
    op.execute(CONVERSION)
    with op.batch_alter_table("job_events", schema=None) as batch_op:
        batch_op.alter_column("kind", existing_type=sa.String(length=16), nullable=False)
        batch_op.create_check_constraint("job_event_kind", sa.column("kind").in_(KINDS))


def downgrade() -> None:
    with op.batch_alter_table("job_events", schema=None) as batch_op:
        batch_op.drop_constraint("job_event_kind", type_="check")
        batch_op.drop_column("kind")
