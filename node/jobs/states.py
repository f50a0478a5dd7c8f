"""Job states and the transitions between them; anything else is a bug or a race."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


class EventKind(StrEnum):
    """What a row of a job's timeline records; queries select events by it, never by text."""

    SETTLED = "settled"  # the series settled and became a queued job
    SKIPPED = "skipped"  # the series settled but no rule selects it
    CLAIMED = "claimed"  # a worker (→ running) or a sender (in sending) took the job
    DENOISED = "denoised"  # the derived series is complete (running → sending)
    RELEASED = "released"  # the holder gave the job back on shutdown
    ATTEMPT_FAILED = "attempt_failed"  # a denoising attempt failed; the job runs again later
    STALLED = "stalled"  # the holder stopped heartbeating
    POSTPONED = "postponed"  # a destination is unreachable; sending waits
    DELIVERED = "delivered"  # every destination acknowledged (→ done)
    FAILED = "failed"  # the job failed for good
    ADMIN_ACTION = "admin_action"  # retry, cancel or resend by an administrator
    PURGED = "purged"  # the job's spool files were removed by retention
    WARNING = "warning"  # something an operator should see, e.g. a conflicting resend
    SUPERSEDED = "superseded"  # a newer job of the same series replaces this one
    GAVE_UP = "gave_up"  # a destination failed for good: refused, or unreachable too long
    COMMITMENT = "commitment"  # storage commitment requested from, or confirmed by, a destination


class DeliveryState(StrEnum):
    """Where a job's derived series stands with one destination."""

    PENDING = "pending"  # instances to send, or a failure that may pass
    ACKNOWLEDGED = "acknowledged"  # every instance acknowledged
    COMMITTED = "committed"  # storage commitment confirmed (where a destination asks for it)
    FAILED = "failed"  # refused for good, or the give-up time passed; ``reason`` says why


#: Delivery states after which nothing more is sent to the destination.
DELIVERED_STATES = frozenset({DeliveryState.ACKNOWLEDGED, DeliveryState.COMMITTED})


FINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.SKIPPED, JobState.CANCELLED})

ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset(
        {JobState.SENDING, JobState.QUEUED, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.SENDING: frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED}),
    JobState.DONE: frozenset({JobState.QUEUED, JobState.SENDING}),
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.SENDING}),
    JobState.CANCELLED: frozenset({JobState.QUEUED}),
    JobState.SKIPPED: frozenset({JobState.QUEUED}),
}


class TransitionError(Exception):
    """A job was asked to move to a state it cannot reach from where it is."""


def check_transition(current: JobState, new: JobState) -> None:
    if new not in ALLOWED[current]:
        raise TransitionError(f"a {current} job cannot become {new}")
