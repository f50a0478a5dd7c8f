"""Sending: the writes of the sender, one destination's acknowledgements at a time."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import or_, select, update

from node.db import utcnow
from node.jobs.records import JobView
from node.jobs.states import EventKind, JobState
from node.jobs.tables import Delivery, Job, JobEvent
from node.jobs.writer import JobWriter


class Deliveries(JobWriter):
    """What the sender writes: its claim, acknowledgements, postponements and the outcome."""

    def claim_sending_job(self, sender: str, stale_after: float) -> JobView | None:
        """Take a job in ``sending`` that nobody holds (or whose holder went silent)."""
        now = utcnow()
        stale = now - timedelta(seconds=stale_after)
        query = (
            select(Job.id)
            .where(Job.state == JobState.SENDING)
            .where(or_(Job.claimed_by.is_(None), Job.heartbeat_at < stale))
            .where(or_(Job.run_after.is_(None), Job.run_after <= now))
            .order_by(Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        return self._claim(query, JobState.SENDING, JobState.SENDING, sender, now, attempt=False)

    def record_delivery(self, job_id: int, destination: str, sop_uid: str, status: int) -> None:
        with self._sessions.begin() as session:
            exists = session.scalar(
                select(Delivery.id).where(
                    Delivery.job_id == job_id,
                    Delivery.destination == destination,
                    Delivery.sop_instance_uid == sop_uid,
                )
            )
            if exists is None:
                session.add(
                    Delivery(
                        job_id=job_id,
                        destination=destination,
                        sop_instance_uid=sop_uid,
                        status=status,
                        sent_at=utcnow(),
                    )
                )

    def postpone_sending(self, job_id: int, holder: str, error: str, delay: float) -> None:
        """A destination is unreachable: keep the job in ``sending`` and try later."""
        with self._sessions.begin() as session:
            self._require_holder(session, job_id, holder, JobState.SENDING)
            now = utcnow()
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    claimed_by=None,
                    last_error=error,
                    run_after=now + timedelta(seconds=delay),
                    updated_at=now,
                )
            )
            session.add(
                JobEvent(
                    job_id=job_id,
                    at=now,
                    kind=EventKind.POSTPONED,
                    actor=holder,
                    message=f"send postponed {delay:.0f} s: {error}",
                )
            )

    def release_sending(self, job_id: int, holder: str, message: str) -> None:
        """Give a ``sending`` job back at once (graceful shutdown); deliveries stay recorded."""
        with self._sessions.begin() as session:
            self._require_holder(session, job_id, holder, JobState.SENDING)
            now = utcnow()
            session.execute(
                update(Job).where(Job.id == job_id).values(claimed_by=None, updated_at=now)
            )
            session.add(
                JobEvent(
                    job_id=job_id, at=now, kind=EventKind.RELEASED, actor=holder, message=message
                )
            )

    def finish_sending(self, job_id: int, holder: str, message: str) -> None:
        self._transition(
            job_id,
            JobState.SENDING,
            JobState.DONE,
            EventKind.DELIVERED,
            holder,
            message,
            holder=holder,
            claimed_by=None,
            last_error=None,
            finished_at=utcnow(),
        )

    def fail_sending(self, job_id: int, holder: str, error: str) -> None:
        self._transition(
            job_id,
            JobState.SENDING,
            JobState.FAILED,
            EventKind.FAILED,
            holder,
            f"failed: {error}",
            holder=holder,
            claimed_by=None,
            last_error=error,
            finished_at=utcnow(),
        )
