"""Forget a finished job and its series' rows, so a corrected resend starts clean.

A different copy of an already-received instance keeps the first copy (by design), so a
series that failed on bad input could never be fixed by the scanner; forgetting drops
the series, its instances and the job (events, inputs, derived files, deliveries).
Files are only named here: the caller removes them after the rows are gone, and
marks them before (``before_commit``), so that a crash in between leaves them to
housekeeping, not to the start-up recovery that records unnamed files again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from node.jobs.states import FINAL_STATES, TransitionError
from node.jobs.tables import (
    Delivery,
    DerivedInstance,
    Instance,
    Job,
    JobDestination,
    JobEvent,
    JobInstance,
    Series,
)


@dataclass(frozen=True)
class ForgottenJob:
    job_id: int
    series_instance_uid: str
    #: spool files no remaining row refers to: the series' instances, the job's derived files
    spool_paths: list[str]


def forget_job(
    sessions: sessionmaker[Session],
    job_id: int,
    before_commit: Callable[[list[str]], None] | None = None,
) -> ForgottenJob:
    """Delete the rows; TransitionError when the job is missing, unfinished or not alone.
    ``before_commit`` gets the files that no row will name, before the deletion commits.

    The series row is locked first: the receiver counts each new instance on it in the
    instance's own transaction, so an instance is either committed before and forgotten
    here with its file named, or waits and is recorded afterwards in a new series row.
    Instances are deleted by the ids read under that lock, never by a series condition
    that could match a row committed meanwhile.
    """
    with sessions.begin() as session:
        series_uid = session.scalar(select(Job.series_instance_uid).where(Job.id == job_id))
        if series_uid is None:
            raise TransitionError(f"job {job_id} does not exist")
        # The series' row before its jobs', in the order every writer takes them.
        session.get(Series, series_uid, with_for_update=True, populate_existing=True)
        job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
        if job is None:
            raise TransitionError(f"job {job_id} does not exist")
        if job.state not in FINAL_STATES:
            raise TransitionError(f"job {job_id} is {job.state}: cancel it or let it finish first")
        busy = session.scalar(
            select(Job.id).where(
                Job.series_instance_uid == series_uid,
                Job.id != job_id,
                Job.state.not_in([state.value for state in FINAL_STATES]),
            )
        )
        if busy is not None:
            raise TransitionError(f"job {busy} of the same series has not finished")
        received = session.execute(
            select(Instance.id, Instance.spool_path).where(
                Instance.series_instance_uid == series_uid
            )
        ).all()
        derived = session.scalars(
            select(DerivedInstance.spool_path).where(DerivedInstance.job_id == job_id)
        ).all()
        for table in (JobEvent, JobInstance, DerivedInstance, Delivery, JobDestination):
            session.execute(delete(table).where(table.job_id == job_id))
        session.execute(delete(Job).where(Job.id == job_id))
        session.execute(delete(Instance).where(Instance.id.in_([row.id for row in received])))
        session.execute(delete(Series).where(Series.series_instance_uid == series_uid))
        candidates = list(dict.fromkeys([*(row.spool_path for row in received), *derived]))
        still_used = {
            path
            for table in (DerivedInstance, JobInstance)
            for path in session.scalars(
                select(table.spool_path).where(table.spool_path.in_(candidates))
            )
        }
        unnamed = [path for path in candidates if path not in still_used]
        if before_commit is not None:
            before_commit(unnamed)
    return ForgottenJob(job_id, series_uid, unnamed)
