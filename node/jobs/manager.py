"""The job's lifecycle: the only code that writes job rows, with verbs as method names.

``JobManager`` joins the stages' writers (``intake``: receiving and settling,
``delivery``: sending) with the worker's and the administrator's verbs here.
Reads live in ``node.jobs.queries``, the process registry in ``node.jobs.registry``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from node.db import utcnow
from node.jobs.delivery import Deliveries
from node.jobs.forgetting import ForgottenJob, forget_job
from node.jobs.intake import InstanceRecord, Intake, NewJob, RecordOutcome, snapshot_inputs
from node.jobs.purging import held_received_files
from node.jobs.records import HousekeepingView, JobView
from node.jobs.states import DeliveryState, EventKind, JobState, TransitionError
from node.jobs.tables import (
    LAST_HOUSEKEEPING,
    Delivery,
    DerivedInstance,
    HousekeepingRun,
    Job,
    JobDestination,
    JobEvent,
    JobInstance,
)
from node.jobs.writer import PRIORITY_ORDER, LostClaim, event_row, rows_changed
from node.noise import NoiseFigure, summarise_series

__all__ = ["DerivedFile", "InstanceRecord", "JobManager", "LostClaim", "NewJob", "RecordOutcome"]

#: States of a newer job that make an older running job of the series not send.
SUPERSEDING = (JobState.QUEUED, JobState.RUNNING, JobState.SENDING, JobState.DONE)


@dataclass(frozen=True)
class DerivedFile:
    """A derived instance in the spool; ``reused_from`` names the job that computed it."""

    sop_instance_uid: str
    source_sop_instance_uid: str
    source_sha256: str | None
    spool_path: str
    reused_from: int | None = None
    #: the slice's noise figure; None where it has no flat soft tissue
    noise: NoiseFigure | None = None


class JobManager(Intake, Deliveries):
    """Verbs on the job table: record, settle, claim, heartbeat, finish, retry, cancel."""

    def claim_next_job(self, worker: str) -> JobView | None:
        """Atomically take the runnable queued job of highest priority, then oldest.

        PostgreSQL: ``FOR UPDATE SKIP LOCKED`` so workers never wait on each other.
        SQLite: the write lock taken at BEGIN serialises claims; the conditional
        UPDATE checked by its row count guards both.
        """
        now = utcnow()
        query = (
            select(Job.id)
            .where(Job.state == JobState.QUEUED)
            .where(or_(Job.run_after.is_(None), Job.run_after <= now))
            .order_by(*PRIORITY_ORDER)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        return self._claim(query, JobState.QUEUED, JobState.RUNNING, worker, now, attempt=True)

    def heartbeat(self, job_id: int, holder: str) -> None:
        """Prove ``holder`` still works on the job; raise LostClaim when it does not hold it."""
        with self._sessions.begin() as session:
            done = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.claimed_by == holder)
                .where(Job.state.in_([JobState.RUNNING, JobState.SENDING]))
                .values(heartbeat_at=utcnow())
            )
            if rows_changed(done) != 1:
                raise LostClaim(f"job {job_id} is no longer held by {holder}")

    def record_derived(self, job_id: int, holder: str, files: list[DerivedFile]) -> None:
        """Record the derived instances of a running job.

        A reused instance brings the acknowledgements the job that made it received:
        a destination that holds it already is not sent it again.
        """
        with self._sessions.begin() as session:
            self._require_holder(session, job_id, holder, JobState.RUNNING)
            known = {
                row.sop_instance_uid: row
                for row in session.scalars(
                    select(DerivedInstance).where(DerivedInstance.job_id == job_id)
                )
            }
            for file in files:
                if file.sop_instance_uid in known:  # an earlier attempt: this one's file counts
                    known[file.sop_instance_uid].spool_path = file.spool_path
                else:
                    session.add(
                        DerivedInstance(
                            job_id=job_id,
                            sop_instance_uid=file.sop_instance_uid,
                            source_sop_instance_uid=file.source_sop_instance_uid,
                            source_sha256=file.source_sha256,
                            spool_path=file.spool_path,
                            noise_before_hu=file.noise.before_hu if file.noise else None,
                            noise_after_hu=file.noise.after_hu if file.noise else None,
                        )
                    )
            _inherit_deliveries(session, job_id, [f for f in files if f.reused_from is not None])
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(denoised_count=len(set(known) | {f.sop_instance_uid for f in files}))
            )

    def finish_denoising(
        self,
        job_id: int,
        holder: str,
        output_series_uid: str,
        model_name: str,
        model_version: str,
        message: str,
        noise: list[NoiseFigure | None] | None = None,
    ) -> JobState:
        """running → sending: the derived series is complete in the spool.

        ``noise`` holds each derived slice's figure (None: no flat soft tissue); the job
        records their median and how many were measurable.  Without it: not measured.

        When a newer job of the series exists (a late instance), running → cancelled
        instead: the newer job reuses what this one made and sends the whole series.
        """
        values: dict[str, Any] = {
            "claimed_by": None,
            "output_series_uid": output_series_uid,
            "model_name": model_name,
            "model_version": model_version,
            "last_error": None,
            **_noise_columns(noise),
        }
        newer = self._newer_job(job_id)
        if newer is None:
            self._transition(
                job_id,
                JobState.RUNNING,
                JobState.SENDING,
                EventKind.DENOISED,
                holder,
                message,
                holder=holder,
                **values,
            )
            return JobState.SENDING
        reason = f"superseded by job {newer}: denoised, not sent"
        self._transition(
            job_id,
            JobState.RUNNING,
            JobState.CANCELLED,
            EventKind.SUPERSEDED,
            holder,
            f"{message}; {reason}",
            holder=holder,
            reason=reason,
            finished_at=utcnow(),
            **values,
        )
        return JobState.CANCELLED

    def _newer_job(self, job_id: int) -> int | None:
        """A newer job of the same series that will send the series, if there is one."""
        series = select(Job.series_instance_uid).where(Job.id == job_id).scalar_subquery()
        with self._sessions() as session:
            return session.scalar(
                select(func.max(Job.id)).where(
                    Job.series_instance_uid == series,
                    Job.id > job_id,
                    Job.state.in_(SUPERSEDING),
                )
            )

    def release_job(self, job_id: int, holder: str, message: str) -> None:
        """running → queued without counting an attempt (graceful shutdown)."""
        self._transition(
            job_id,
            JobState.RUNNING,
            JobState.QUEUED,
            EventKind.RELEASED,
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
                EventKind.ATTEMPT_FAILED,
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
            EventKind.FAILED,
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
                    EventKind.STALLED,
                    "stall-detector",
                    error,
                    holder=holder,
                    **fields,
                )
            except TransitionError:
                continue  # the worker came back or another detector was faster
            outcomes.append((job_id, new_state))
        return outcomes

    def retry_job(self, job_id: int, actor: str) -> None:
        """Run a finished, failed, skipped or cancelled job again from the start."""
        self._transition(
            job_id,
            self._current_state(job_id),
            JobState.QUEUED,
            EventKind.ADMIN_ACTION,
            actor,
            f"retry requested by {actor}",
            attempts=0,
            claimed_by=None,
            last_error=None,
            run_after=None,
            finished_at=None,
            denoised_count=0,
            _also=lambda session: _restart(session, job_id),
        )

    def cancel_job(self, job_id: int, actor: str) -> None:
        """Stop a job that has not finished; a running worker notices at its next heartbeat."""
        self._transition(
            job_id,
            self._current_state(job_id),
            JobState.CANCELLED,
            EventKind.ADMIN_ACTION,
            actor,
            f"cancelled by {actor}",
            claimed_by=None,
            finished_at=utcnow(),
        )

    def resend_job(self, job_id: int, destination: str, actor: str) -> None:
        """Send a job's derived series (again) to ``destination``."""
        with self._sessions() as session:
            current = session.scalar(select(Job.destinations).where(Job.id == job_id)) or []
        destinations = list(dict.fromkeys([*current, destination]))
        self._transition(
            job_id,
            self._current_state(job_id),
            JobState.SENDING,
            EventKind.ADMIN_ACTION,
            actor,
            f"resend to {destination} requested by {actor}",
            destinations=destinations,
            claimed_by=None,
            run_after=None,
            finished_at=None,
            _also=lambda session: _forget_deliveries(session, job_id, destination),
        )

    def held_received_files(
        self, series_instance_uid: str, finished_before: datetime
    ) -> AbstractContextManager[list[str]]:
        """A series' received files no job needs, locked while removed (``node.jobs.purging``)."""
        return held_received_files(self._sessions, series_instance_uid, finished_before)

    def forget_job(
        self, job_id: int, before_commit: Callable[[list[str]], None] | None = None
    ) -> ForgottenJob:
        """Drop a finished job and its series' rows (``node.jobs.forgetting``)."""
        return forget_job(self._sessions, job_id, before_commit)

    def set_priority(self, job_id: int, priority: int, actor: str) -> int:
        """Change a job's priority in any state; returns the old one.  Audited in the timeline."""
        with self._sessions.begin() as session:
            old = session.scalar(select(Job.priority).where(Job.id == job_id).with_for_update())
            if old is None:
                raise TransitionError(f"job {job_id} does not exist")
            session.execute(update(Job).where(Job.id == job_id).values(priority=priority))
            message = f"priority {old} → {priority} set by {actor}"
            session.add(event_row(job_id, actor, EventKind.ADMIN_ACTION, message))
        return old

    def record_housekeeping(self, run: HousekeepingView) -> None:
        """Keep what housekeeping did last, for ``status`` and the dashboard."""
        with self._sessions.begin() as session:
            session.merge(HousekeepingRun(name=LAST_HOUSEKEEPING, **asdict(run)))

    def record_purge(self, job_id: int, actor: str, detail: str) -> None:
        """Write the purge into the timeline; ``purgeable_jobs`` skips the job afterwards.

        Once per purge: of two housekeepers (two processes) that removed the files, the
        second finds the first's event under the job row's lock and writes none.
        """
        with self._sessions.begin() as session:
            finished = session.scalar(
                select(Job.finished_at).where(Job.id == job_id).with_for_update()
            )
            already = session.scalar(
                select(func.count())
                .select_from(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.kind == EventKind.PURGED)
                .where(JobEvent.at >= finished)
            )
            if finished is not None and not already:
                message = f"spool purged: {detail}"
                session.add(event_row(job_id, actor, EventKind.PURGED, message))


def _noise_columns(noise: list[NoiseFigure | None] | None) -> dict[str, Any]:
    """The job's noise columns for the slices' figures; all NULL when nothing was measured."""
    if noise is None:
        return {"noise_before_hu": None, "noise_after_hu": None, "noise_slices": None}
    series = summarise_series(noise)
    return {
        "noise_before_hu": series.before_hu if series else None,
        "noise_after_hu": series.after_hu if series else None,
        "noise_slices": series.support if series else 0,
    }


def _restart(session: Session, job_id: int) -> None:
    """What a retry resets: the deliveries, and the input set of a job that had none (skipped)."""
    _forget_deliveries(session, job_id)
    has_inputs = session.scalar(select(JobInstance.id).where(JobInstance.job_id == job_id).limit(1))
    if has_inputs is None:
        series = session.scalar(select(Job.series_instance_uid).where(Job.id == job_id))
        snapshot_inputs(session, job_id, str(series))


def _inherit_deliveries(session: Session, job_id: int, reused: list[DerivedFile]) -> None:
    """Copy the acknowledgements of reused instances from the jobs that made them."""
    mine = select(Delivery.destination, Delivery.sop_instance_uid).where(Delivery.job_id == job_id)
    have = {(destination, uid) for destination, uid in session.execute(mine)}
    for file in reused:
        earlier = session.scalars(
            select(Delivery).where(
                Delivery.job_id == file.reused_from,
                Delivery.sop_instance_uid == file.sop_instance_uid,
            )
        )
        for delivery in earlier:
            if (delivery.destination, file.sop_instance_uid) not in have:
                session.add(
                    Delivery(
                        job_id=job_id,
                        destination=delivery.destination,
                        sop_instance_uid=file.sop_instance_uid,
                        status=delivery.status,
                        sent_at=delivery.sent_at,
                    )
                )


def _forget_deliveries(session: Session, job_id: int, destination: str | None = None) -> None:
    """Send again: to ``destination`` (set back to ``pending``), or from scratch (None)."""
    if destination is None:
        session.execute(delete(Delivery).where(Delivery.job_id == job_id))
        session.execute(delete(JobDestination).where(JobDestination.job_id == job_id))
        return
    session.execute(
        delete(Delivery).where(Delivery.job_id == job_id, Delivery.destination == destination)
    )
    session.execute(
        update(JobDestination)
        .where(JobDestination.job_id == job_id, JobDestination.destination == destination)
        .values(
            state=DeliveryState.PENDING,
            attempts=0,
            failing_since=None,
            reason=None,
            updated_at=utcnow(),
            commitment_uid=None,
            commitment_requested_at=None,
            commitment_sent_at=None,
            commitment_resends=0,
        )
    )
