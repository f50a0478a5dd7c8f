"""Sending: the writes of the sender, one destination's acknowledgements at a time.

Each destination of a job has a delivery state (``job_destinations``): ``pending``
until every instance is acknowledged (``acknowledged``, or ``committed`` where storage
commitment is asked for), or ``failed`` with the reason: refused ``max_attempts`` times,
or unreachable for longer than the give-up time.

Where a destination asks for storage commitment, an ``acknowledged`` destination
carries its request (Transaction UID, first and last time sent) until the report
makes it ``committed``; instances the report names as not committed are sent once
more (the destination is ``pending`` again), then the destination fails.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from node.db import utcnow
from node.jobs.records import DestinationView, JobView, from_row
from node.jobs.states import DeliveryState, EventKind, JobState
from node.jobs.tables import Delivery, Job, JobDestination
from node.jobs.writer import PRIORITY_ORDER, JobWriter, dialect_of, event_row


class ReportOutcome(StrEnum):
    """What a storage commitment report did to its destination."""

    COMMITTED = "committed"  # every delivered instance is committed
    RESEND = "resend"  # some were not: sent once more, then asked again
    FAILED = "failed"  # some were not, after the one resend: the destination failed
    STALE = "stale"  # the destination no longer waits for this report: nothing changed
    LATE = "committed late"  # every instance, after the timeout had failed the destination


@dataclass(frozen=True)
class CommitmentReport:
    """The destination a report's Transaction UID names, and what the report did."""

    job_id: int
    destination: str
    outcome: ReportOutcome
    not_committed: int


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
                _give_up(session, row, holder, f"{reason} ({why})")
            return DeliveryState(row.state)

    def fail_destination(self, job_id: int, holder: str, name: str, reason: str) -> None:
        """``name`` failed for good at once (e.g. no storage commitment report in time)."""
        with self._sessions.begin() as session:
            self._require_holder(session, job_id, holder, JobState.SENDING)
            _give_up(session, _destination_row(session, job_id, name), holder, reason)

    def request_commitment(
        self, job_id: int, holder: str, name: str, new_uid: str, instances: int
    ) -> DestinationView:
        """Record a storage commitment request to ``name`` before it goes out.

        The first request of a round takes ``new_uid`` and starts the timeout; a repeat
        keeps the round's Transaction UID, so a late report of an earlier try still counts.
        """
        now = utcnow()
        with self._sessions.begin() as session:
            self._require_holder(session, job_id, holder, JobState.SENDING)
            row = _destination_row(session, job_id, name)
            again = row.commitment_uid is not None
            if not again:
                row.commitment_uid, row.commitment_requested_at = new_uid, now
            row.commitment_sent_at = row.updated_at = now
            verb = "asked again of" if again else "requested from"
            message = (
                f"storage commitment of {instances} instances {verb} {name} "
                f"(transaction {row.commitment_uid})"
            )
            session.add(event_row(job_id, holder, EventKind.COMMITMENT, message))
            session.flush()
            return from_row(DestinationView, row)

    def wait_for_commitment(
        self, job_id: int, holder: str, delay: float, awaiting: Collection[str]
    ) -> None:
        """Give the job back until a report comes (it wakes the job) or ``delay`` passes.

        The job row is locked first, as ``record_commitment`` locks it: a report recorded
        since the sender read ``awaiting`` is seen here, and the job is due at once.
        """
        now = utcnow()
        with self._sessions.begin() as session:
            _lock_job(session, job_id)
            self._require_holder(session, job_id, holder, JobState.SENDING)
            still = session.scalar(
                select(func.count())
                .select_from(JobDestination)
                .where(JobDestination.job_id == job_id)
                .where(JobDestination.destination.in_(list(awaiting)))
                .where(JobDestination.state == DeliveryState.ACKNOWLEDGED)
            )
            due = now + timedelta(seconds=delay) if still == len(awaiting) else now
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(claimed_by=None, run_after=due, updated_at=now)
            )

    def record_commitment(
        self, transaction_uid: str, committed: Collection[str], detail: str, actor: str
    ) -> CommitmentReport | None:
        """Apply a storage commitment report; None when no request has ``transaction_uid``.

        Every instance delivered to the destination must be in ``committed``; those that
        are not are sent once more, and a second such report fails the destination
        (``detail`` says what the peer gave as reasons).  A job waiting in ``sending``
        is woken so that the sender concludes it at once.  A report committing everything
        after its destination failed (the timeout passed) still counts: the archive holds
        the instances (``_commit_late``).
        """
        with self._sessions.begin() as session:
            by_uid = JobDestination.commitment_uid == transaction_uid
            job_id = session.scalar(select(JobDestination.job_id).where(by_uid))
            if job_id is None:
                return None
            _lock_job(session, job_id)
            row = session.scalars(select(JobDestination).where(by_uid)).one_or_none()
            if row is None:  # a resend round cleared the request meanwhile
                return None
            delivered = set(
                session.scalars(
                    select(Delivery.sop_instance_uid).where(
                        Delivery.job_id == row.job_id, Delivery.destination == row.destination
                    )
                )
            )
            missing = delivered - set(committed)
            if row.state == DeliveryState.FAILED and delivered and not missing:
                outcome = _commit_late(session, row, len(delivered), actor)
            elif row.state != DeliveryState.ACKNOWLEDGED:
                return CommitmentReport(row.job_id, row.destination, ReportOutcome.STALE, 0)
            else:
                outcome = _apply_report(session, row, delivered, missing, detail, actor)
            now = utcnow()
            session.execute(
                update(Job)
                .where(Job.id == row.job_id, Job.state == JobState.SENDING)
                .where(Job.claimed_by.is_(None))
                .values(run_after=now, updated_at=now)
            )
            return CommitmentReport(row.job_id, row.destination, outcome, len(missing))

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

    def record_deliveries(
        self, job_id: int, destination: str, acknowledged: Sequence[tuple[str, int]]
    ) -> None:
        """Record acknowledged (SOP Instance UID, status) pairs in one statement; one
        already recorded (an instance sent again after a lost acknowledgement, or by a
        sender that took the job over) stays as it was."""
        if not acknowledged:
            return
        now = utcnow()
        rows = {
            uid: {
                "job_id": job_id,
                "destination": destination,
                "sop_instance_uid": uid,
                "status": status,
                "sent_at": now,
            }
            for uid, status in acknowledged
        }
        with self._sessions.begin() as session:
            new_rows = (
                dialect_of(session)
                .insert(Delivery)
                .on_conflict_do_nothing(
                    index_elements=[
                        Delivery.job_id,
                        Delivery.destination,
                        Delivery.sop_instance_uid,
                    ]
                )
            )
            session.execute(new_rows, list(rows.values()))

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


def _lock_job(session: Session, job_id: int) -> None:
    """Serialise with other writers that lock the job row first (PostgreSQL; SQLite's
    transactions are serial already)."""
    session.execute(select(Job.id).where(Job.id == job_id).with_for_update())


def _destination_row(session: Session, job_id: int, name: str) -> JobDestination:
    return session.scalars(
        select(JobDestination).where(
            JobDestination.job_id == job_id, JobDestination.destination == name
        )
    ).one()


def _give_up(session: Session, row: JobDestination, actor: str, reason: str) -> None:
    """The destination failed for good, with ``reason``; a ``gave_up`` event says so."""
    row.state, row.reason, row.updated_at = DeliveryState.FAILED, reason, utcnow()
    message = f"destination {row.destination} failed: {reason}"
    session.add(event_row(row.job_id, actor, EventKind.GAVE_UP, message))


def _commit_late(
    session: Session, row: JobDestination, instances: int, actor: str
) -> ReportOutcome:
    """The destination failed waiting for this very report, which now commits everything:
    it is ``committed``, and a job that failed for no other destination is concluded again
    by the sender (back to ``sending``, due at once)."""
    failed_for = row.reason
    row.state, row.reason, row.updated_at = DeliveryState.COMMITTED, None, utcnow()
    message = (
        f"{row.destination} committed {instances} instances (transaction "
        f"{row.commitment_uid}) after it had failed: {failed_for}"
    )
    session.add(event_row(row.job_id, actor, EventKind.COMMITMENT, message))
    others = session.scalar(
        select(func.count())
        .select_from(JobDestination)
        .where(JobDestination.job_id == row.job_id, JobDestination.id != row.id)
        .where(JobDestination.state.in_([DeliveryState.FAILED, DeliveryState.PENDING]))
    )
    job = session.get(Job, row.job_id)
    if job is None or job.state != JobState.FAILED or others:
        return ReportOutcome.LATE
    now = utcnow()
    job.state, job.claimed_by, job.run_after, job.finished_at = JobState.SENDING, None, now, None
    job.updated_at = now
    again = f"late storage commitment report from {row.destination}: concluded again"
    session.add(
        event_row(
            row.job_id,
            actor,
            EventKind.COMMITMENT,
            again,
            from_state=JobState.FAILED,
            to_state=JobState.SENDING,
            at=now,
        )
    )
    return ReportOutcome.LATE


def _apply_report(
    session: Session,
    row: JobDestination,
    delivered: set[str],
    missing: set[str],
    detail: str,
    actor: str,
) -> ReportOutcome:
    """Committed; or the instances not committed go again (once); or the destination fails."""
    name, transaction = row.destination, row.commitment_uid
    if not missing:
        row.state, row.reason, row.updated_at = DeliveryState.COMMITTED, None, utcnow()
        message = f"{name} committed {len(delivered)} instances (transaction {transaction})"
        session.add(event_row(row.job_id, actor, EventKind.COMMITMENT, message))
        return ReportOutcome.COMMITTED
    reason = (
        f"{name} did not commit {len(missing)} of {len(delivered)} instances "
        f"(transaction {transaction}{'; ' + detail if detail else ''})"
    )
    if row.commitment_resends >= 1:
        _give_up(session, row, actor, f"{reason}, after sending them once more")
        return ReportOutcome.FAILED
    session.execute(
        delete(Delivery).where(
            Delivery.job_id == row.job_id,
            Delivery.destination == name,
            Delivery.sop_instance_uid.in_(sorted(missing)),
        )
    )
    row.state, row.reason, row.updated_at = DeliveryState.PENDING, reason, utcnow()
    row.commitment_uid = row.commitment_requested_at = row.commitment_sent_at = None
    row.commitment_resends += 1
    message = f"{reason}: sending them once more"
    session.add(event_row(row.job_id, actor, EventKind.WARNING, message))
    return ReportOutcome.RESEND
