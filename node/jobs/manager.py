"""The only code that writes the job table.

Every method is one short transaction.  State changes are conditional UPDATEs on the
state (and holder) the caller believes in, so two processes can never both move a
job; each change also writes a row to ``job_events``, the job's timeline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import Select, and_, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from node.db import utcnow
from node.jobs.states import FINAL_STATES, JobState, TransitionError, check_transition
from node.jobs.tables import Delivery, DerivedInstance, Instance, Job, JobEvent, Series, Worker

log = logging.getLogger(__name__)

#: How a postponement starts in the timeline; ``consecutive_postponements`` counts them.
POSTPONED = "send postponed"
#: How a spool purge starts in the timeline; ``purgeable_jobs`` skips purged jobs.
PURGED = "spool purged"


class RecordOutcome(StrEnum):
    NEW = "new"
    IDENTICAL = "identical"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class InstanceRecord:
    """What the receiver knows about one instance that is already durable in the spool."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    spool_path: str
    sha256: str
    size_bytes: int
    header: dict[str, Any]
    calling_ae_title: str
    peer_address: str


@dataclass(frozen=True)
class NewJob:
    """The settler's decision for one settled series."""

    series_instance_uid: str
    study_instance_uid: str
    calling_ae_title: str
    settled_through: datetime
    instance_count: int
    rule: str
    strength: float
    destinations: list[str]
    skip_reason: str | None = None


class LostClaim(TransitionError):
    """The job is no longer held by this process (cancelled, or taken after a stall)."""


class JobManager:
    """Verbs on the job table: record, settle, claim, heartbeat, finish, retry, cancel."""

    def __init__(self, sessions: sessionmaker[Session], max_attempts: int = 3) -> None:
        self._sessions = sessions
        self.max_attempts = max_attempts

    # -- receiving ---------------------------------------------------------------------

    def record_instance(self, record: InstanceRecord) -> tuple[RecordOutcome, str]:
        """Record a spooled instance; returns the outcome and the spool path that holds it.

        A SOP Instance UID seen before is never overwritten: identical content is a
        harmless resend, different content keeps the first copy and is reported.
        """
        now = utcnow()
        with self._sessions.begin() as session:
            # One INSERT that yields to an existing row, so a concurrent association that
            # stored the same UID a moment earlier leads to the same path as any resend.
            insert = _dialect(session).insert(Instance)
            inserted = session.execute(
                insert.values(**record.__dict__, received_at=now)
                .on_conflict_do_nothing(index_elements=[Instance.sop_instance_uid])
                .returning(Instance.id)
            ).scalar()
            if inserted is None:
                existing = session.scalars(
                    select(Instance).where(Instance.sop_instance_uid == record.sop_instance_uid)
                ).one()
                return self._duplicate(session, existing, record, now)
            session.execute(self._upsert_series(session, record, now))
            return RecordOutcome.NEW, record.spool_path

    def _duplicate(
        self, session: Session, existing: Instance, record: InstanceRecord, now: datetime
    ) -> tuple[RecordOutcome, str]:
        if existing.sha256 == record.sha256:
            return RecordOutcome.IDENTICAL, existing.spool_path
        job_id = session.scalar(
            select(Job.id)
            .where(Job.series_instance_uid == existing.series_instance_uid)
            .order_by(Job.id.desc())
            .limit(1)
        )
        if job_id is not None:
            session.add(
                JobEvent(
                    job_id=job_id,
                    at=now,
                    actor="receiver",
                    message=(
                        f"instance {record.sop_instance_uid} received again from "
                        f"{record.calling_ae_title} with different content; first copy kept"
                    ),
                )
            )
        return RecordOutcome.CONFLICT, existing.spool_path

    @staticmethod
    def _upsert_series(session: Session, record: InstanceRecord, now: datetime) -> Any:
        statement = (
            _dialect(session)
            .insert(Series)
            .values(
                series_instance_uid=record.series_instance_uid,
                study_instance_uid=record.study_instance_uid,
                calling_ae_title=record.calling_ae_title,
                instance_count=1,
                first_received_at=now,
                last_received_at=now,
            )
        )
        return statement.on_conflict_do_update(
            index_elements=[Series.series_instance_uid],
            set_={
                "instance_count": Series.instance_count + 1,
                "last_received_at": now,
                "calling_ae_title": record.calling_ae_title,
            },
        )

    # -- settling ----------------------------------------------------------------------

    def settled_series(self, quiet_since: datetime) -> list[Series]:
        """Series with no new instance since ``quiet_since`` and not yet turned into a job."""
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(Series)
                    .where(Series.last_received_at <= quiet_since)
                    .where(
                        or_(
                            Series.settled_through.is_(None),
                            Series.settled_through < Series.last_received_at,
                        )
                    )
                    .order_by(Series.last_received_at)
                )
            )

    def series_instances(self, series_instance_uid: str) -> list[Instance]:
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(Instance)
                    .where(Instance.series_instance_uid == series_instance_uid)
                    .order_by(Instance.id)
                )
            )

    def create_job(self, new: NewJob) -> int | None:
        """Turn a settled series into a queued (or skipped) job, once.

        Returns None when an instance arrived meanwhile: the series settles again later.
        """
        now = utcnow()
        state = JobState.SKIPPED if new.skip_reason else JobState.QUEUED
        with self._sessions.begin() as session:
            marked = session.execute(
                update(Series)
                .where(Series.series_instance_uid == new.series_instance_uid)
                .where(Series.last_received_at == new.settled_through)
                .values(settled_through=new.settled_through)
            )
            if marked.rowcount != 1:
                return None
            job = Job(
                series_instance_uid=new.series_instance_uid,
                study_instance_uid=new.study_instance_uid,
                calling_ae_title=new.calling_ae_title,
                state=state,
                rule=new.rule,
                strength=new.strength,
                destinations=new.destinations,
                instance_count=new.instance_count,
                max_attempts=self.max_attempts,
                reason=new.skip_reason,
                created_at=now,
                updated_at=now,
                finished_at=now if new.skip_reason else None,
            )
            session.add(job)
            session.flush()
            message = (
                f"skipped: {new.skip_reason}"
                if new.skip_reason
                else f"{new.instance_count} instances settled; rule {new.rule!r}"
            )
            session.add(
                JobEvent(job_id=job.id, at=now, to_state=state, actor="settler", message=message)
            )
            return job.id

    # -- working -----------------------------------------------------------------------

    def claim_next_job(self, worker: str) -> Job | None:
        """Atomically take the oldest runnable queued job for ``worker``.

        PostgreSQL: ``FOR UPDATE SKIP LOCKED`` so workers never wait on each other.
        SQLite: the write lock taken at BEGIN serialises claims; the conditional
        UPDATE checked by its row count guards both.
        """
        now = utcnow()
        query = (
            select(Job.id)
            .where(Job.state == JobState.QUEUED)
            .where(or_(Job.run_after.is_(None), Job.run_after <= now))
            .order_by(Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        return self._claim(query, JobState.QUEUED, JobState.RUNNING, worker, now, attempt=True)

    def claim_sending_job(self, sender: str, stale_after: float) -> Job | None:
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

    def _claim(
        self,
        query: Select[Any],
        expected: JobState,
        new_state: JobState,
        holder: str,
        now: datetime,
        attempt: bool,
    ) -> Job | None:
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
            if done.rowcount != 1:
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
                JobEvent(
                    job_id=job_id,
                    at=now,
                    from_state=expected,
                    to_state=new_state,
                    actor=holder,
                    message=message,
                )
            )
            return job

    def heartbeat(self, job_id: int, holder: str) -> None:
        """Prove ``holder`` still works on the job; raise LostClaim when it does not hold it."""
        with self._sessions.begin() as session:
            done = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.claimed_by == holder)
                .where(Job.state.in_([JobState.RUNNING, JobState.SENDING]))
                .values(heartbeat_at=utcnow())
            )
            if done.rowcount != 1:
                raise LostClaim(f"job {job_id} is no longer held by {holder}")

    def record_derived(self, job_id: int, holder: str, items: list[tuple[str, str, str]]) -> None:
        """Record derived instances (sop uid, source sop uid, spool path) of a running job."""
        with self._sessions.begin() as session:
            self._require_holder(session, job_id, holder, JobState.RUNNING)
            known = set(
                session.scalars(
                    select(DerivedInstance.sop_instance_uid).where(DerivedInstance.job_id == job_id)
                )
            )
            for sop_uid, source_uid, path in items:
                if sop_uid not in known:
                    session.add(
                        DerivedInstance(
                            job_id=job_id,
                            sop_instance_uid=sop_uid,
                            source_sop_instance_uid=source_uid,
                            spool_path=path,
                        )
                    )
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(denoised_count=len(known | {item[0] for item in items}))
            )

    def finish_denoising(
        self,
        job_id: int,
        holder: str,
        output_series_uid: str,
        model_name: str,
        model_version: str,
        message: str,
    ) -> None:
        """running → sending: the derived series is complete in the spool."""
        self._transition(
            job_id,
            JobState.RUNNING,
            JobState.SENDING,
            holder,
            message,
            holder=holder,
            claimed_by=None,
            output_series_uid=output_series_uid,
            model_name=model_name,
            model_version=model_version,
            last_error=None,
        )

    def release_job(self, job_id: int, holder: str, message: str) -> None:
        """running → queued without counting an attempt (graceful shutdown)."""
        self._transition(
            job_id,
            JobState.RUNNING,
            JobState.QUEUED,
            holder,
            message,
            holder=holder,
            claimed_by=None,
            heartbeat_at=None,
            attempts=Job.attempts - 1,
        )

    def fail_job(
        self, job_id: int, holder: str, error: str, retry_in: float | None = None
    ) -> JobState:
        """A job's attempt failed: queue it again (after ``retry_in`` s) or fail it for good.

        ``retry_in=None`` means the error is permanent (bad input): no retry.
        """
        with self._sessions() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise TransitionError(f"job {job_id} does not exist")
            attempts, max_attempts = job.attempts, job.max_attempts
        if retry_in is not None and attempts < max_attempts:
            self._transition(
                job_id,
                JobState.RUNNING,
                JobState.QUEUED,
                holder,
                f"attempt {attempts} failed, retry in {retry_in:.0f} s: {error}",
                holder=holder,
                claimed_by=None,
                last_error=error,
                run_after=utcnow() + timedelta(seconds=retry_in),
            )
            return JobState.QUEUED
        self._transition(
            job_id,
            JobState.RUNNING,
            JobState.FAILED,
            holder,
            f"failed: {error}",
            holder=holder,
            claimed_by=None,
            last_error=error,
            finished_at=utcnow(),
        )
        return JobState.FAILED

    def requeue_stalled(self, stale_after: float) -> list[tuple[int, JobState]]:
        """Jobs whose holder stopped heartbeating: run again, or fail after max attempts."""
        cutoff = utcnow() - timedelta(seconds=stale_after)
        with self._sessions() as session:
            stalled = session.execute(
                select(Job.id, Job.claimed_by, Job.attempts, Job.max_attempts)
                .where(Job.state == JobState.RUNNING)
                .where(Job.heartbeat_at < cutoff)
            ).all()
        outcomes = []
        for job_id, holder, attempts, max_attempts in stalled:
            error = f"worker {holder} stopped heartbeating (silent for {stale_after:.0f} s)"
            new_state = JobState.QUEUED if attempts < max_attempts else JobState.FAILED
            fields: dict[str, Any] = {"claimed_by": None}
            if new_state is JobState.FAILED:
                fields["finished_at"] = utcnow()
                error = f"{error}; gave up after {attempts} attempts"
            fields["last_error"] = error
            try:
                self._transition(
                    job_id,
                    JobState.RUNNING,
                    new_state,
                    "stall-detector",
                    error,
                    holder=holder,
                    **fields,
                )
            except TransitionError:
                continue  # the worker came back or another detector was faster
            outcomes.append((job_id, new_state))
        return outcomes

    # -- sending -----------------------------------------------------------------------

    def derived_instances(self, job_id: int) -> list[DerivedInstance]:
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(DerivedInstance)
                    .where(DerivedInstance.job_id == job_id)
                    .order_by(DerivedInstance.id)
                )
            )

    def missing_deliveries(self, job_id: int, destination: str) -> list[DerivedInstance]:
        """Derived instances that ``destination`` has not acknowledged yet."""
        delivered = select(Delivery.sop_instance_uid).where(
            Delivery.job_id == job_id, Delivery.destination == destination
        )
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(DerivedInstance)
                    .where(DerivedInstance.job_id == job_id)
                    .where(DerivedInstance.sop_instance_uid.not_in(delivered))
                    .order_by(DerivedInstance.id)
                )
            )

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
                    actor=holder,
                    message=f"{POSTPONED} {delay:.0f} s: {error}",
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
            session.add(JobEvent(job_id=job_id, at=now, actor=holder, message=message))

    def consecutive_postponements(self, job_id: int) -> int:
        """Postponements since the job entered ``sending`` or a destination last acknowledged.

        Read from the timeline and the deliveries, so the sender's backoff survives a
        restart and starts over once a destination makes progress again.
        """
        with self._sessions() as session:
            entered = session.scalar(
                select(func.max(JobEvent.at)).where(
                    JobEvent.job_id == job_id,
                    JobEvent.to_state == JobState.SENDING,
                    or_(JobEvent.from_state.is_(None), JobEvent.from_state != JobState.SENDING),
                )
            )
            delivered = session.scalar(
                select(func.max(Delivery.sent_at)).where(Delivery.job_id == job_id)
            )
            since = max((t for t in (entered, delivered) if t is not None), default=None)
            query = select(func.count()).where(
                JobEvent.job_id == job_id, JobEvent.message.startswith(POSTPONED)
            )
            if since is not None:
                query = query.where(JobEvent.at >= since)
            return int(session.scalar(query) or 0)

    def finish_sending(self, job_id: int, holder: str, message: str) -> None:
        self._transition(
            job_id,
            JobState.SENDING,
            JobState.DONE,
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
            holder,
            f"failed: {error}",
            holder=holder,
            claimed_by=None,
            last_error=error,
            finished_at=utcnow(),
        )

    # -- administration ----------------------------------------------------------------

    def retry_job(self, job_id: int, actor: str) -> None:
        """Run a finished, failed, skipped or cancelled job again from the start."""
        job = self.get_job(job_id)
        self._transition(
            job_id,
            JobState(job.state),
            JobState.QUEUED,
            actor,
            f"retry requested by {actor}",
            attempts=0,
            claimed_by=None,
            last_error=None,
            run_after=None,
            finished_at=None,
            denoised_count=0,
            _also=lambda session: session.execute(
                delete(Delivery).where(Delivery.job_id == job_id)
            ),
        )

    def cancel_job(self, job_id: int, actor: str) -> None:
        """Stop a job that has not finished; a running worker notices at its next heartbeat."""
        job = self.get_job(job_id)
        self._transition(
            job_id,
            JobState(job.state),
            JobState.CANCELLED,
            actor,
            f"cancelled by {actor}",
            claimed_by=None,
            finished_at=utcnow(),
        )

    def resend_job(self, job_id: int, destination: str, actor: str) -> None:
        """Send a job's derived series (again) to ``destination``."""
        job = self.get_job(job_id)
        destinations = list(dict.fromkeys([*job.destinations, destination]))
        self._transition(
            job_id,
            JobState(job.state),
            JobState.SENDING,
            actor,
            f"resend to {destination} requested by {actor}",
            destinations=destinations,
            claimed_by=None,
            run_after=None,
            finished_at=None,
            _also=lambda session: session.execute(
                delete(Delivery).where(
                    Delivery.job_id == job_id, Delivery.destination == destination
                )
            ),
        )

    def add_event(self, job_id: int, actor: str, message: str) -> None:
        with self._sessions.begin() as session:
            session.add(JobEvent(job_id=job_id, at=utcnow(), actor=actor, message=message))

    def get_job(self, job_id: int) -> Job:
        with self._sessions() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise TransitionError(f"job {job_id} does not exist")
            return job

    def list_jobs(
        self,
        states: list[str] | None = None,
        since: datetime | None = None,
        calling_ae_title: str | None = None,
        study_instance_uid: str | None = None,
        limit: int = 100,
    ) -> list[Job]:
        query = select(Job).order_by(Job.id.desc()).limit(limit)
        if states:
            query = query.where(Job.state.in_(states))
        if since:
            query = query.where(Job.created_at >= since)
        if calling_ae_title:
            query = query.where(Job.calling_ae_title == calling_ae_title)
        if study_instance_uid:
            query = query.where(Job.study_instance_uid == study_instance_uid)
        with self._sessions() as session:
            return list(session.scalars(query))

    def job_events(self, job_id: int) -> list[JobEvent]:
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
                )
            )

    def delivery_counts(self, job_id: int) -> dict[str, int]:
        with self._sessions() as session:
            rows = session.execute(
                select(Delivery.destination, func.count())
                .where(Delivery.job_id == job_id)
                .group_by(Delivery.destination)
            ).all()
        return {destination: count for destination, count in rows}

    def state_counts(self) -> dict[str, int]:
        with self._sessions() as session:
            rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        return {state: count for state, count in rows}

    def oldest_queued_at(self) -> datetime | None:
        """When the job waiting longest was queued: the queue's age, for alerting."""
        with self._sessions() as session:
            return session.scalar(
                select(func.min(Job.updated_at)).where(Job.state == JobState.QUEUED)
            )

    def instance_totals(self) -> tuple[int, int, dict[str, int]]:
        """Instances received, derived, and acknowledged per destination, over all jobs."""
        with self._sessions() as session:
            received = session.scalar(select(func.count()).select_from(Instance)) or 0
            derived = session.scalar(select(func.count()).select_from(DerivedInstance)) or 0
            rows = session.execute(
                select(Delivery.destination, func.count()).group_by(Delivery.destination)
            ).all()
        return received, derived, {destination: count for destination, count in rows}

    def denoise_timings(self, limit: int = 1000) -> list[tuple[float, int]]:
        """(seconds, slices) of the last denoising of the ``limit`` newest denoised jobs.

        Read from the timeline: the claim (→ running) to the hand-over (running → sending).
        """
        recent = select(Job.id).where(Job.denoised_count > 0).order_by(Job.id.desc()).limit(limit)
        with self._sessions() as session:
            slices: dict[int, int] = {
                job_id: count
                for job_id, count in session.execute(
                    select(Job.id, Job.denoised_count).where(Job.id.in_(recent))
                )
            }
            events = session.execute(
                select(JobEvent.job_id, JobEvent.from_state, JobEvent.to_state, JobEvent.at)
                .where(JobEvent.job_id.in_(list(slices)))
                .where(JobEvent.to_state.in_([JobState.RUNNING, JobState.SENDING]))
                .order_by(JobEvent.id)
            ).all()
        started: dict[int, datetime] = {}
        seconds: dict[int, float] = {}
        for job_id, from_state, to_state, at in events:
            if to_state == JobState.RUNNING:
                started[job_id] = at
            elif from_state == JobState.RUNNING and job_id in started:
                seconds[job_id] = (at - started[job_id]).total_seconds()
        return [(seconds[job_id], slices[job_id]) for job_id in sorted(seconds)]

    def purgeable_jobs(self, finished_before: datetime) -> list[Job]:
        """Final jobs finished before ``finished_before`` whose spool was not purged since."""
        purged = select(JobEvent.id).where(
            JobEvent.job_id == Job.id,
            JobEvent.message.startswith(PURGED),
            JobEvent.at >= Job.finished_at,
        )
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(Job)
                    .where(Job.state.in_(list(FINAL_STATES)))
                    .where(Job.finished_at < finished_before)
                    .where(~purged.exists())
                    .order_by(Job.id)
                )
            )

    def series_finished_before(self, series_instance_uid: str, finished_before: datetime) -> bool:
        """True when the series is settled and every one of its jobs is final and old.

        Only then may its received instances leave the spool: no job can need them.
        """
        with self._sessions() as session:
            series = session.get(Series, series_instance_uid)
            if series is None or series.settled_through is None:
                return False
            if series.settled_through < series.last_received_at:
                return False
            pending = session.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.series_instance_uid == series_instance_uid)
                .where(
                    or_(
                        Job.state.not_in(list(FINAL_STATES)),
                        Job.finished_at.is_(None),
                        Job.finished_at >= finished_before,
                    )
                )
            )
            return pending == 0

    def record_purge(self, job_id: int, actor: str, detail: str) -> None:
        """Write the purge into the timeline; ``purgeable_jobs`` skips the job afterwards."""
        self.add_event(job_id, actor, f"{PURGED}: {detail}")

    # -- processes ---------------------------------------------------------------------

    def register_worker(
        self, name: str, roles: str, hostname: str, pid: int, provider: str | None = None
    ) -> None:
        now = utcnow()
        with self._sessions.begin() as session:
            session.merge(
                Worker(
                    name=name,
                    roles=roles,
                    hostname=hostname,
                    pid=pid,
                    provider=provider,
                    started_at=now,
                    heartbeat_at=now,
                    stopped_at=None,
                )
            )

    def worker_heartbeat(self, name: str, provider: str | None = None) -> None:
        values: dict[str, Any] = {"heartbeat_at": utcnow()}
        if provider is not None:
            values["provider"] = provider
        with self._sessions.begin() as session:
            session.execute(update(Worker).where(Worker.name == name).values(**values))

    def worker_stopped(self, name: str) -> None:
        with self._sessions.begin() as session:
            session.execute(update(Worker).where(Worker.name == name).values(stopped_at=utcnow()))

    def workers(self) -> list[Worker]:
        with self._sessions() as session:
            return list(session.scalars(select(Worker).order_by(Worker.name)))

    # -- internals ---------------------------------------------------------------------

    def _require_holder(self, session: Session, job_id: int, holder: str, state: JobState) -> None:
        held = session.scalar(
            select(Job.id).where(Job.id == job_id, Job.claimed_by == holder, Job.state == state)
        )
        if held is None:
            raise LostClaim(f"job {job_id} is no longer {state} by {holder}")

    def _transition(
        self,
        job_id: int,
        current: JobState,
        new: JobState,
        actor: str,
        message: str,
        holder: str | None = None,
        _also: Any = None,
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
            if done.rowcount != 1:
                if holder is not None:
                    raise LostClaim(f"job {job_id} is no longer {current} by {holder}")
                raise TransitionError(f"job {job_id} is no longer {current}")
            if _also is not None:
                _also(session)
            session.add(
                JobEvent(
                    job_id=job_id,
                    at=now,
                    from_state=current,
                    to_state=new,
                    actor=actor,
                    message=message,
                )
            )


def _dialect(session: Session) -> Any:
    """The dialect module whose ``insert`` has ON CONFLICT (PostgreSQL or SQLite)."""
    return postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
