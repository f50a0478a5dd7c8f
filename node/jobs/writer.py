"""What every writer of job rows shares: guarded transitions and the timeline row.

A state change is a conditional UPDATE on the state (and holder) the caller believes
in, so two processes can never both move a job; each change also writes a row to
``job_events``, the job's timeline.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Result, Select, and_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from node.db import utcnow
from node.jobs.records import JobView, from_row
from node.jobs.states import EventKind, JobState, TransitionError, check_transition
from node.jobs.tables import Job, JobEvent

#: The order in which workers and senders take jobs: higher priority first, then oldest.
PRIORITY_ORDER = (Job.priority.desc(), Job.id)


class LostClaim(TransitionError):
    """The job is no longer held by this process (cancelled, or taken after a stall)."""


def event_row(
    job_id: int,
    actor: str,
    kind: EventKind,
    message: str,
    *,
    from_state: JobState | None = None,
    to_state: JobState | None = None,
    at: datetime | None = None,
) -> JobEvent:
    """A timeline row for the caller's session: a transition when given its states, and
    stamped ``at`` (the moment the caller wrote on the job row) or now."""
    return JobEvent(
        job_id=job_id,
        at=at or utcnow(),
        kind=kind,
        from_state=from_state,
        to_state=to_state,
        actor=actor,
        message=message,
    )


class JobWriter:
    """Owns the session factory; subclasses add the verbs of one stage each."""

    def __init__(self, sessions: sessionmaker[Session], max_attempts: int = 3) -> None:
        self._sessions = sessions
        self.max_attempts = max_attempts

    def add_event(self, job_id: int, actor: str, kind: EventKind, message: str) -> None:
        """A timeline row that changes no state."""
        with self._sessions.begin() as session:
            session.add(event_row(job_id, actor, kind, message))

    def _claim(
        self,
        query: Select[Any],
        expected: JobState,
        new_state: JobState,
        holder: str,
        now: datetime,
        attempt: bool,
    ) -> JobView | None:
        with self._sessions.begin() as session:
            job_id = session.scalar(query)
            if job_id is None:
                return None
            values: dict[str, Any] = {
                "state": new_state,
                "claimed_by": holder,
                "heartbeat_at": now,
                "updated_at": now,
                "run_after": None,
            }
            if attempt:
                values.update(attempts=Job.attempts + 1, started_at=now)
            done = session.execute(
                update(Job).where(Job.id == job_id, Job.state == expected).values(**values)
            )
            if rows_changed(done) != 1:
                return None
            job = session.get(Job, job_id)
            assert job is not None
            session.refresh(job)
            message = (
                f"claimed by {holder} (attempt {job.attempts} of {job.max_attempts})"
                if attempt
                else f"sending by {holder}"
            )
            session.add(
                event_row(
                    job_id,
                    holder,
                    EventKind.CLAIMED,
                    message,
                    from_state=expected,
                    to_state=new_state,
                    at=now,
                )
            )
            return from_row(JobView, job)

    @staticmethod
    def _require_holder(session: Session, job_id: int, holder: str, state: JobState) -> None:
        held = session.scalar(
            select(Job.id).where(Job.id == job_id, Job.claimed_by == holder, Job.state == state)
        )
        if held is None:
            raise LostClaim(f"job {job_id} is no longer {state} by {holder}")

    def _current_state(self, job_id: int) -> JobState:
        with self._sessions() as session:
            state = session.scalar(select(Job.state).where(Job.id == job_id))
        if state is None:
            raise TransitionError(f"job {job_id} does not exist")
        return JobState(state)

    def _transition(
        self,
        job_id: int,
        current: JobState,
        new: JobState,
        kind: EventKind,
        actor: str,
        message: str,
        holder: str | None = None,
        _also: Callable[[Session], object] | None = None,
        **values: Any,
    ) -> None:
        """Move a job from ``current`` to ``new`` if it is still there (and still held)."""
        check_transition(current, new)
        now = utcnow()
        conditions = [Job.id == job_id, Job.state == current]
        if holder is not None:
            conditions.append(Job.claimed_by == holder)
        with self._sessions.begin() as session:
            done = session.execute(
                update(Job).where(and_(*conditions)).values(state=new, updated_at=now, **values)
            )
            if rows_changed(done) != 1:
                if holder is not None:
                    raise LostClaim(f"job {job_id} is no longer {current} by {holder}")
                raise TransitionError(f"job {job_id} is no longer {current}")
            if _also is not None:
                _also(session)
            session.add(
                event_row(job_id, actor, kind, message, from_state=current, to_state=new, at=now)
            )


def rows_changed(result: Result[Any]) -> int:
    """The row count of an UPDATE or DELETE (a CursorResult at run time)."""
    return cast(CursorResult[Any], result).rowcount


def dialect_of(bind: Session | Engine) -> Any:
    """The dialect module whose ``insert`` has ON CONFLICT (PostgreSQL or SQLite)."""
    engine = bind.get_bind() if isinstance(bind, Session) else bind
    return postgresql if engine.dialect.name == "postgresql" else sqlite
