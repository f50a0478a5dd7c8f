"""Read models of the job table for the roles, the dashboard, the API and the CLI.

Every method reads in its own session and returns frozen records (``node.jobs.records``),
never ORM rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, func, or_, select, union
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from node.db import utcnow
from node.jobs.records import (
    DerivedView,
    DestinationView,
    EventView,
    HousekeepingView,
    InstanceView,
    JobInputView,
    JobView,
    Record,
    SeriesView,
    from_row,
)
from node.jobs.states import FINAL_STATES, DeliveryState, EventKind, JobState, TransitionError
from node.jobs.tables import (
    LAST_HOUSEKEEPING,
    Delivery,
    DerivedInstance,
    HousekeepingRun,
    Instance,
    Job,
    JobDestination,
    JobEvent,
    JobInstance,
    Series,
)


class JobQueries:
    """Questions about jobs, series and deliveries; answers are frozen records."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def _all(self, view: type[Record], query: Select[Any]) -> list[Record]:
        with self._sessions() as session:
            return [from_row(view, row) for row in session.scalars(query)]

    def series_generation(self, series_instance_uid: str) -> str:
        """The series' current reception as its derived UIDs name it (a new one after
        ``jobs forget``); empty for a series received before there was one, or no row."""
        with self._sessions() as session:
            generation = session.scalar(
                select(Series.generation).where(Series.series_instance_uid == series_instance_uid)
            )
        return generation or ""

    def settled_series(self, quiet_since: datetime) -> list[SeriesView]:
        """Series with no new instance since ``quiet_since`` and not yet turned into a job."""
        return self._all(
            SeriesView,
            select(Series)
            .where(Series.last_received_at <= quiet_since)
            .where(
                or_(
                    Series.settled_through.is_(None),
                    Series.settled_through < Series.last_received_at,
                )
            )
            .order_by(Series.last_received_at),
        )

    def series_instances(self, series_instance_uid: str) -> list[InstanceView]:
        return self._all(
            InstanceView,
            select(Instance)
            .where(Instance.series_instance_uid == series_instance_uid)
            .order_by(Instance.id),
        )

    def job_inputs(self, job_id: int) -> list[JobInputView]:
        """The instances the job denoises: its series as it settled."""
        return self._all(
            JobInputView,
            select(JobInstance).where(JobInstance.job_id == job_id).order_by(JobInstance.id),
        )

    def reusable_derived(self, job_id: int, wanted: dict[str, str]) -> dict[str, DerivedView]:
        """Derived instances other jobs made, by SOP UID, for ``wanted`` (UID → source sha256).

        Derived UIDs are deterministic in source, model, version and strength; the
        source's content must match too.  The newest job's copy wins.
        """
        query = (
            select(DerivedInstance)
            .where(DerivedInstance.sop_instance_uid.in_(list(wanted)))
            .where(DerivedInstance.job_id != job_id)
            .order_by(DerivedInstance.job_id)
        )
        return {
            derived.sop_instance_uid: derived
            for derived in self._all(DerivedView, query)
            if derived.source_sha256 == wanted[derived.sop_instance_uid]
        }

    def derived_instances(self, job_id: int) -> list[DerivedView]:
        return self._all(
            DerivedView,
            select(DerivedInstance)
            .where(DerivedInstance.job_id == job_id)
            .order_by(DerivedInstance.id),
        )

    def missing_deliveries(self, job_id: int, destination: str) -> list[DerivedView]:
        """Derived instances that ``destination`` has not acknowledged yet."""
        delivered = select(Delivery.sop_instance_uid).where(
            Delivery.job_id == job_id, Delivery.destination == destination
        )
        return self._all(
            DerivedView,
            select(DerivedInstance)
            .where(DerivedInstance.job_id == job_id)
            .where(DerivedInstance.sop_instance_uid.not_in(delivered))
            .order_by(DerivedInstance.id),
        )

    def consecutive_postponements(self, job_id: int) -> int:
        """Postponements since the job entered ``sending`` or a destination last acknowledged.

        Read from the timeline and the deliveries, so the sender's backoff survives a
        restart and starts over once a destination makes progress again.
        """
        with self._sessions() as session:
            entered = session.scalar(
                select(func.max(JobEvent.at)).where(
                    JobEvent.job_id == job_id,
                    JobEvent.kind.in_([EventKind.DENOISED, EventKind.ADMIN_ACTION]),
                    JobEvent.to_state == JobState.SENDING,
                )
            )
            delivered = session.scalar(
                select(func.max(Delivery.sent_at)).where(Delivery.job_id == job_id)
            )
            since = max((t for t in (entered, delivered) if t is not None), default=None)
            query = select(func.count()).where(
                JobEvent.job_id == job_id, JobEvent.kind == EventKind.POSTPONED
            )
            if since is not None:
                query = query.where(JobEvent.at >= since)
            return int(session.scalar(query) or 0)

    def get_job(self, job_id: int) -> JobView:
        with self._sessions() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise TransitionError(f"job {job_id} does not exist")
            return from_row(JobView, job)

    def list_jobs(
        self,
        states: list[str] | None = None,
        since: datetime | None = None,
        calling_ae_title: str | None = None,
        study_instance_uid: str | None = None,
        limit: int = 100,
    ) -> list[JobView]:
        query = select(Job).order_by(Job.id.desc()).limit(limit)
        if states:
            query = query.where(Job.state.in_(states))
        if since:
            query = query.where(Job.created_at >= since)
        if calling_ae_title:
            query = query.where(Job.calling_ae_title == calling_ae_title)
        if study_instance_uid:
            query = query.where(Job.study_instance_uid == study_instance_uid)
        return self._all(JobView, query)

    def job_events(self, job_id: int) -> list[EventView]:
        return self._all(
            EventView,
            select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id),
        )

    def destinations(self, job_id: int) -> list[DestinationView]:
        """The job's delivery state per destination (none before the sender first took it)."""
        return self._all(
            DestinationView,
            select(JobDestination)
            .where(JobDestination.job_id == job_id)
            .order_by(JobDestination.destination),
        )

    def destination_state_counts(self) -> dict[tuple[str, str], int]:
        """Job destinations by (destination, delivery state), over all jobs."""
        with self._sessions() as session:
            rows = session.execute(
                select(JobDestination.destination, JobDestination.state, func.count()).group_by(
                    JobDestination.destination, JobDestination.state
                )
            ).all()
        return {(destination, state): count for destination, state, count in rows}

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

    def noise_drops(self, limit: int = 1000) -> list[float]:
        """Relative noise drops of the ``limit`` newest measured jobs (cancelled ones left out:
        a superseded job's series is counted by the job that replaced it)."""
        query = (
            select(Job.noise_before_hu, Job.noise_after_hu)
            .where(Job.noise_before_hu > 0, Job.noise_after_hu.is_not(None))
            .where(Job.state != JobState.CANCELLED)
            .order_by(Job.id.desc())
            .limit(limit)
        )
        with self._sessions() as session:
            rows = session.execute(query).all()
        return [1.0 - (after or 0.0) / (before or 1.0) for before, after in rows]

    def denoise_timings(self, limit: int = 1000) -> list[tuple[float, int]]:
        """(seconds, slices) of the last denoising of the ``limit`` newest denoised jobs.

        Read from the timeline: the claim (→ running) to the hand-over (running → sending).
        """
        claimed = and_(JobEvent.kind == EventKind.CLAIMED, JobEvent.to_state == JobState.RUNNING)
        recent = select(Job.id).where(Job.denoised_count > 0).order_by(Job.id.desc()).limit(limit)
        with self._sessions() as session:
            slices: dict[int, int] = {
                job_id: count
                for job_id, count in session.execute(
                    select(Job.id, Job.denoised_count).where(Job.id.in_(recent))
                )
            }
            events = session.execute(
                select(JobEvent.job_id, JobEvent.kind, JobEvent.at)
                .where(JobEvent.job_id.in_(list(slices)))
                .where(or_(claimed, JobEvent.kind == EventKind.DENOISED))
                .order_by(JobEvent.id)
            ).all()
        started: dict[int, datetime] = {}
        seconds: dict[int, float] = {}
        for job_id, kind, at in events:
            if kind == EventKind.CLAIMED:
                started[job_id] = at
            elif job_id in started:
                seconds[job_id] = (at - started[job_id]).total_seconds()
        return [(seconds[job_id], slices[job_id]) for job_id in sorted(seconds)]

    def purgeable_jobs(
        self, finished_before: datetime, committing: Mapping[str, float] | None = None
    ) -> list[JobView]:
        """Final jobs finished before ``finished_before`` whose spool was not purged since,
        oldest first.

        ``committing`` maps each destination that asks for storage commitment to its
        commitment timeout (s).  A job stays while such a destination still owes the report
        of a request made for it: acknowledged, asked less than the timeout ago (a job
        cancelled while it waited).  Deliveries made before commitment was turned on were
        never asked about, and no report can come for them: they do not hold the job.
        """
        purged = select(JobEvent.id).where(
            JobEvent.job_id == Job.id,
            JobEvent.kind == EventKind.PURGED,
            JobEvent.at >= Job.finished_at,
        )
        query = (
            select(Job)
            .where(Job.state.in_(list(FINAL_STATES)))
            .where(Job.finished_at < finished_before)
            .where(~purged.exists())
            .order_by(Job.finished_at, Job.id)
        )
        now = utcnow()
        awaited = [
            and_(
                JobDestination.destination == name,
                JobDestination.commitment_requested_at > now - timedelta(seconds=timeout),
            )
            for name, timeout in (committing or {}).items()
        ]
        if awaited:
            awaiting = select(JobDestination.id).where(
                JobDestination.job_id == Job.id,
                JobDestination.state == DeliveryState.ACKNOWLEDGED,
                or_(*awaited),
            )
            query = query.where(~awaiting.exists())
        return self._all(JobView, query)

    def spool_paths_in_use(self, folder: str | None = None) -> set[str]:
        """Every spool path a row names: received instances, job inputs, derived instances;
        only those under ``folder`` (a relative folder such as ``incoming/20261207``) if given."""

        def named(column: InstrumentedAttribute[str]) -> Select[Any]:
            query = select(column)
            return query if folder is None else query.where(column.like(f"{folder}/%"))

        columns = (Instance.spool_path, JobInstance.spool_path, DerivedInstance.spool_path)
        with self._sessions() as session:
            return set(session.scalars(union(*map(named, columns))))

    def unfinished_job_ids(self) -> set[int]:
        """Jobs whose folder of derived files may still grow."""
        with self._sessions() as session:
            return set(session.scalars(select(Job.id).where(Job.state.not_in(list(FINAL_STATES)))))

    def last_housekeeping(self) -> HousekeepingView | None:
        with self._sessions() as session:
            row = session.get(HousekeepingRun, LAST_HOUSEKEEPING)
            return None if row is None else from_row(HousekeepingView, row)
