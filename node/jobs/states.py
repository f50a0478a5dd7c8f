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
