"""Storage commitment: the request sent to each destination that asks for it.

``commitment_uid`` is the Transaction UID of the current request (NULL: none made);
``commitment_requested_at`` starts the commitment timeout, ``commitment_sent_at`` is the
last time the request went out; ``commitment_resends`` counts the rounds in which
instances the PACS reported as failed were sent again (one is allowed).  Job events
gain the kind ``commitment`` (a request sent, a report received).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 06:50:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

#: The event kinds of 0002 (as of 0008); this revision adds ``commitment``.
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


def _event_kinds(kinds: tuple[str, ...]) -> None:
    with op.batch_alter_table("job_events", schema=None) as batch_op:
        batch_op.drop_constraint("job_event_kind", type_="check")
        batch_op.create_check_constraint("job_event_kind", sa.column("kind").in_(kinds))


def upgrade() -> None:
    with op.batch_alter_table("job_destinations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("commitment_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("commitment_requested_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("commitment_sent_at", sa.DateTime(), nullable=True))
        batch_op.add_column(
            sa.Column("commitment_resends", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.create_index(
            batch_op.f("ix_job_destinations_commitment_uid"), ["commitment_uid"], unique=True
        )
    _event_kinds((*KINDS, "commitment"))


def downgrade() -> None:
    op.execute("UPDATE job_events SET kind = 'warning' WHERE kind = 'commitment'")
    _event_kinds(KINDS)
    with op.batch_alter_table("job_destinations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_destinations_commitment_uid"))
        batch_op.drop_column("commitment_resends")
        batch_op.drop_column("commitment_sent_at")
        batch_op.drop_column("commitment_requested_at")
        batch_op.drop_column("commitment_uid")
