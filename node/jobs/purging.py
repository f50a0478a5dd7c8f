"""Which received files of a series housekeeping may remove: decided and held under lock.

The decision and the removal must see the same job table: an instance that arrives, or a
retry that makes a job unfinished, between the two would otherwise lose its input.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.jobs.states import FINAL_STATES
from node.jobs.tables import Instance, Job, Series


@contextmanager
def held_received_files(
    sessions: sessionmaker[Session], series_instance_uid: str, finished_before: datetime
) -> Iterator[list[str]]:
    """The series' received files that no job can need, held while the caller removes them.

    The series row is locked first (the receiver counts every new instance on it, so
    none is recorded meanwhile), then its jobs' rows (a retry waits); plain UPDATEs take
    the locks, which on SQLite are its one write lock.  The files are listed only when
    the series is settled through its last instance and every job of it is final and
    finished before ``finished_before``, and only of instances received by then.
    """
    uid = series_instance_uid
    with sessions.begin() as session:
        session.execute(
            update(Series)
            .where(Series.series_instance_uid == uid)
            .values(settled_through=Series.settled_through)
        )
        session.execute(
            update(Job).where(Job.series_instance_uid == uid).values(updated_at=Job.updated_at)
        )
        series = session.scalars(select(Series).where(Series.series_instance_uid == uid)).first()
        settled = series.settled_through if series is not None else None
        needed = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.series_instance_uid == uid)
            .where(
                or_(
                    Job.state.not_in(list(FINAL_STATES)),
                    Job.finished_at.is_(None),
                    Job.finished_at >= finished_before,
                )
            )
        )
        if series is None or settled is None or settled < series.last_received_at or needed:
            yield []
            return
        yield list(
            session.scalars(
                select(Instance.spool_path)
                .where(Instance.series_instance_uid == uid)
                .where(Instance.received_at <= settled)
            )
        )
