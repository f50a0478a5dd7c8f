"""Sending: the writes of the sender, one destination's acknowledgements at a time.

Each destination of a job has a delivery state (``job_destinations``): ``pending``
until every instance is acknowledged (``acknowledged``, or ``committed`` where storage
commitment is asked for), or ``failed`` with the reason: refused ``max_attempts`` times,
or unreachable for longer than the give-up time.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import or_, select, update

from node.db import utcnow
from node.jobs.records import DestinationView, JobView, from_row
from node.jobs.states import DeliveryState, EventKind, JobState
from node.jobs.tables import Delivery, Job, JobDestination
from node.jobs.writer import PRIORITY_ORDER, JobWriter, event_row


class Deliveries(JobWriter):
    """What the sender writes: its claim, acknowledgements, postponements and the outcome."""

    def open_destinations(
        self, job_id: int, holder: str, names: list[str]
    ) -> list[DestinationView]:
        """The delivery state of each of ``names``; a destination seen first is ``pending``."""
        now = utcnow()
        with self._sessions.begin() as session:
            self._require_holder(session, job_id, holder, JobState.SENDING)
            rows = {
                row.destination: row
                for row in session.scalars(
                    select(JobDestination).where(JobDestination.job_id == job_id)
                )
            }
            for name in names:
                if name not in rows:
                    rows[name] = JobDestination(
                        job_id=job_id,
                        destination=name,
                        state=DeliveryState.PENDING,
                        attempts=0,
                        updated_at=now,
                    )
                    session.add(rows[name])
            session.flush()
            return [from_row(DestinationView, rows[name]) for name in names]

    def acknowledge_destination(self, job_id: int, holder: str, name: str) -> None:
        """Every instance is acknowledged by ``name``."""
        with self._sessions.begin() as session:
            self._require_holder(session, job_id, holder, JobState.SENDING)
            session.execute(
                update(JobDestination)
                .where(JobDestination.job_id == job_id, JobDestination.destination == name)
                .values(
                    state=DeliveryState.ACKNOWLEDGED,
                    failing_since=None,
                    reason=None,
                    updated_at=utcnow(),
                )
            )

    def record_destination_failure(
        self,
        job_id: int,
        holder: str,
        name: str,
        reason: str,
        refusals_allowed: int | None,
        give_up_after: float,
    ) -> DeliveryState:
        """Count a failure to send to ``name``; ``failed`` once it cannot be expected to pass.

        ``refusals_allowed`` is how many refusals fail the destination (None: the failure
        is transient, and the destination fails once it has failed for ``give_up_after`` s).
        """
        now = utcnow()
        with self._sessions.begin() as session:
            self._require_holder(session, job_id, holder, JobState.SENDING)
            row = session.scalars(
                select(JobDestination).where(
                    JobDestination.job_id == job_id, JobDestination.destination == name
                )
            ).one()
            row.failing_since = row.failing_since or now
            row.reason, row.updated_at = reason, now
            if refusals_allowed is not None:
                row.attempts += 1
                give_up = row.attempts >= refusals_allowed
                why = f"refused {row.attempts} time(s)"
            else:
                give_up = (now - row.failing_since).total_seconds() >= give_up_after
                why = f"failing since {row.failing_since:%Y-%m-%d %H:%M:%S} UTC, gave up"
            if give_up:
                row.state = DeliveryState.FAILED
                row.reason = f"{reason} ({why})"
                message = f"destination {name} failed: {row.reason}"
                session.add(event_row(job_id, holder, EventKind.GAVE_UP, message, at=now))
            return DeliveryState(row.state)

    def claim_sending_job(self, sender: str, stale_after: float) -> JobView | None:
        """Take a job in ``sending`` that nobody holds (or whose holder went silent)."""
        now = utcnow()
        stale = now - timedelta(seconds=stale_after)
        query = (
            select(Job.id)
            .where(Job.state == JobState.SENDING)
            .where(or_(Job.claimed_by.is_(None), Job.heartbeat_at < stale))
            .where(or_(Job.run_after.is_(None), Job.run_after <= now))
            .order_by(*PRIORITY_ORDER)
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
            message = f"send postponed {delay:.0f} s: {error}"
            session.add(event_row(job_id, holder, EventKind.POSTPONED, message, at=now))

    def release_sending(self, job_id: int, holder: str, message: str) -> None:
        """Give a ``sending`` job back at once (graceful shutdown); deliveries stay recorded."""
        with self._sessions.begin() as session:
            self._require_holder(session, job_id, holder, JobState.SENDING)
            now = utcnow()
            session.execute(
                update(Job).where(Job.id == job_id).values(claimed_by=None, updated_at=now)
            )
            session.add(event_row(job_id, holder, EventKind.RELEASED, message, at=now))

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
