"""Receiving and settling: the writes that turn instances into series and series into jobs."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Engine, insert, literal, select, update
from sqlalchemy.orm import Session

from node.db import DriverStatement, utcnow
from node.instance_checks import Inspected
from node.jobs.states import EventKind, JobState
from node.jobs.tables import Instance, Job, JobInstance, Series
from node.jobs.writer import JobWriter, dialect_of, event_row, rows_changed


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


def instance_record(
    inspected: Inspected, spool_path: str, content: tuple[str, int], sender: tuple[str, str]
) -> InstanceRecord:
    """The row of a checked instance at ``spool_path``: ``content`` is its (SHA-256, size),
    ``sender`` the (calling AE title, peer address) it came from."""
    uids = inspected.uids
    return InstanceRecord(
        sop_instance_uid=uids["SOPInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        transfer_syntax_uid=inspected.transfer_syntax_uid,
        spool_path=spool_path,
        sha256=content[0],
        size_bytes=content[1],
        header=inspected.header,
        calling_ae_title=sender[0],
        peer_address=sender[1],
    )


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
    priority: int = 0


class Intake(JobWriter):
    """What the receiver and the settler write."""

    def record_instance(
        self, record: InstanceRecord, make_durable: Callable[[], object] | None = None
    ) -> tuple[RecordOutcome, str]:
        """Record a spooled instance; returns the outcome and the spool path that holds it.

        A SOP Instance UID seen before is never overwritten: identical content is a
        harmless resend, different content keeps the first copy and is reported.  A new
        instance (the common case, once per received instance) takes two plain
        statements on a connection, committed before this returns, without the ORM's
        unit of work.

        ``make_durable``, when given, puts the instance's file in place in the spool and
        fsyncs it; the row is never committed before it has returned.  PostgreSQL locks
        only the rows written, so there it runs inside the transaction after the two
        statements (their round trips overlap the file's write), and not at all for a
        UID already recorded; SQLite's one write lock, taken at BEGIN, would wait for the
        disk, so there it runs first.
        """
        now = utcnow()
        engine: Engine = self._sessions.kw["bind"]
        within = make_durable is not None and engine.dialect.name == "postgresql"
        if make_durable is not None and not within:
            make_durable()
        with engine.begin() as connection:
            if insert_new_instance(connection, record, now):
                if make_durable is not None and within:
                    make_durable()
                return RecordOutcome.NEW, record.spool_path
        with self._sessions.begin() as session:
            existing = session.scalars(
                select(Instance).where(Instance.sop_instance_uid == record.sop_instance_uid)
            ).one()
            return self._duplicate(session, existing, record, now)

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
            message = (
                f"instance {record.sop_instance_uid} received again from "
                f"{record.calling_ae_title} with different content; first copy kept"
            )
            session.add(event_row(job_id, "receiver", EventKind.WARNING, message, at=now))
        return RecordOutcome.CONFLICT, existing.spool_path

    def create_job(self, new: NewJob) -> int | None:
        """Turn a settled series into a queued (or skipped) job, once.

        The job's input is the series' instances now, in the same transaction that
        checks no instance arrived meanwhile (else returns None: the series settles
        again later).  A queued job becomes the series' only queued one: older
        queued jobs of the series are superseded.
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
            if rows_changed(marked) != 1:
                return None
            job = Job(
                series_instance_uid=new.series_instance_uid,
                study_instance_uid=new.study_instance_uid,
                calling_ae_title=new.calling_ae_title,
                state=state,
                priority=new.priority,
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
            kind = EventKind.SKIPPED if new.skip_reason else EventKind.SETTLED
            session.add(event_row(job.id, "settler", kind, message, to_state=state, at=now))
            if state is JobState.QUEUED:
                snapshot_inputs(session, job.id, new.series_instance_uid)
                _supersede_queued(session, job.id, new.series_instance_uid, now)
            return job.id


def insert_new_instance(connection: Connection, record: InstanceRecord, now: datetime) -> bool:
    """The instance's row and its series' count, in the caller's transaction; False (and
    nothing written) when its SOP Instance UID has a row already."""
    new_instance, count_in_series = _recording_statements(connection.engine)
    # One INSERT that yields to an existing row, so a concurrent association that stored
    # the same UID a moment earlier leads to the same path as any resend.
    row = {**record.__dict__, "received_at": now}
    if new_instance.execute(connection, row) is None:
        return False
    count_in_series.execute(
        connection,
        {
            "series_instance_uid": record.series_instance_uid,
            "study_instance_uid": record.study_instance_uid,
            "calling_ae_title": record.calling_ae_title,
            "instance_count": 1,
            "first_received_at": now,
            "last_received_at": now,
            "generation": now.isoformat(),
        },
    )
    return True


@functools.cache
def _recording_statements(engine: Engine) -> tuple[DriverStatement, DriverStatement]:
    """The receiver's two statements, compiled once per engine (their values are bound at
    each execution): the instance's INSERT that yields to an existing row, and the
    series' upsert that counts it."""
    dialect = dialect_of(engine)
    new_instance = (
        dialect.insert(Instance)
        .on_conflict_do_nothing(index_elements=[Instance.sop_instance_uid])
        .returning(Instance.id)
    )
    series = dialect.insert(Series)
    count_in_series = series.on_conflict_do_update(
        index_elements=[Series.series_instance_uid],
        set_={
            "instance_count": Series.instance_count + 1,
            "last_received_at": series.excluded.last_received_at,
            "calling_ae_title": series.excluded.calling_ae_title,
        },
    )
    instance_keys = [*(field.name for field in fields(InstanceRecord)), "received_at"]
    series_keys = [
        "series_instance_uid",
        "study_instance_uid",
        "calling_ae_title",
        "instance_count",
        "first_received_at",
        "last_received_at",
        "generation",
    ]
    return (
        DriverStatement(new_instance, engine, instance_keys),
        DriverStatement(count_in_series, engine, series_keys),
    )


def snapshot_inputs(session: Session, job_id: int, series_instance_uid: str) -> None:
    """Copy the series' instances into ``job_instances``: what the worker will denoise.

    Written when a job is queued; a skipped job has none until an admin retries it.
    """
    session.execute(
        insert(JobInstance).from_select(
            ["job_id", "sop_instance_uid", "sha256", "spool_path"],
            select(
                literal(job_id), Instance.sop_instance_uid, Instance.sha256, Instance.spool_path
            ).where(Instance.series_instance_uid == series_instance_uid),
        )
    )


def _supersede_queued(
    session: Session, job_id: int, series_instance_uid: str, now: datetime
) -> None:
    """Cancel the series' older queued jobs: the new one covers their instances and more."""
    older = session.scalars(
        select(Job.id).where(
            Job.series_instance_uid == series_instance_uid,
            Job.state == JobState.QUEUED,
            Job.id != job_id,
        )
    ).all()
    reason = f"superseded by job {job_id}: the series received more instances"
    for old_id in older:
        done = session.execute(
            update(Job)
            .where(Job.id == old_id, Job.state == JobState.QUEUED)
            .values(state=JobState.CANCELLED, reason=reason, finished_at=now, updated_at=now)
        )
        if rows_changed(done) == 1:
            session.add(
                event_row(
                    old_id,
                    "settler",
                    EventKind.SUPERSEDED,
                    reason,
                    from_state=JobState.QUEUED,
                    to_state=JobState.CANCELLED,
                    at=now,
                )
            )
