"""The Alembic migrations build exactly the tables the models describe (both databases)."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, text

from node import db
from node.jobs import JobManager, JobQueries
from node.jobs.states import EventKind
from node.jobs.tables import Base
from tests.fixtures.jobs import instance_record, settle_series


def test_the_migrated_schema_matches_the_models(db_url: str) -> None:
    engine = create_engine(db_url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert differences == []


#: (actor, from_state, to_state, message) as 0001's writers worded them, and their kind.
OLD_EVENTS = [
    ("settler", None, "queued", "12 instances settled; rule 'default'", EventKind.SETTLED),
    ("settler", None, "skipped", "skipped: only 1 slice", EventKind.SKIPPED),
    ("w1", "queued", "running", "claimed by w1 (attempt 1 of 3)", EventKind.CLAIMED),
    ("w1", "running", "queued", "attempt 1 failed, retry in 5 s: boom", EventKind.ATTEMPT_FAILED),
    ("w1", "running", "queued", "released: worker stopping", EventKind.RELEASED),
    ("stall-detector", "running", "queued", "worker w1 stopped heartbeating", EventKind.STALLED),
    ("w1", "running", "sending", "denoised 12 slices", EventKind.DENOISED),
    ("s1", "sending", "sending", "sending by s1", EventKind.CLAIMED),
    ("s1", None, None, "send postponed 5 s: connection refused", EventKind.POSTPONED),
    ("s1", None, None, "sender stopping: released", EventKind.RELEASED),
    ("s1", "sending", "done", "12 instances acknowledged by pacs", EventKind.DELIVERED),
    ("s1", "sending", "failed", "failed: unknown destination", EventKind.FAILED),
    ("cli:root", "failed", "queued", "retry requested by cli:root", EventKind.ADMIN_ACTION),
    ("cli:root", "queued", "cancelled", "cancelled by cli:root", EventKind.ADMIN_ACTION),
    ("web:a", "done", "sending", "resend to pacs requested by web:a", EventKind.ADMIN_ACTION),
    ("cli:root", None, None, "spool purged: 3 derived files", EventKind.PURGED),
    ("receiver", None, None, "instance 1.2 received again from CT1 with", EventKind.WARNING),
]


def test_upgrade_types_the_events_of_earlier_versions(db_url: str) -> None:
    command.downgrade(db.alembic_config(db_url), "0001")
    engine = create_engine(db_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO jobs (id, series_instance_uid, study_instance_uid, calling_ae_title,"
                " state, rule, strength, destinations, instance_count, denoised_count, attempts,"
                " max_attempts, created_at, updated_at) VALUES (1, '1.2', '1', 'CT1', 'done',"
                " 'default', 1.0, '[]', 12, 12, 1, 3, :now, :now)"
            ),
            {"now": db.utcnow()},
        )
        for actor, from_state, to_state, message, _ in OLD_EVENTS:
            connection.execute(
                text(
                    "INSERT INTO job_events (job_id, at, from_state, to_state, actor, message)"
                    " VALUES (1, :at, :from_state, :to_state, :actor, :message)"
                ),
                {"at": db.utcnow(), "from_state": from_state, "to_state": to_state}
                | {"actor": actor, "message": message},
            )
    db.upgrade(db_url)
    with engine.connect() as connection:
        kinds = connection.execute(text("SELECT kind FROM job_events ORDER BY id")).scalars()
        assert list(kinds) == [kind.value for *_, kind in OLD_EVENTS]
    engine.dispose()


def test_every_event_kind_fits_the_migrated_column(
    manager: JobManager, queries: JobQueries
) -> None:
    manager.record_instance(instance_record("1.1"))
    job_id = settle_series(manager, queries, "1.2.3.4")
    for kind in EventKind:
        manager.add_event(job_id, "test", kind, f"a {kind} event")
    assert [e.kind for e in queries.job_events(job_id)][1:] == list(EventKind)


def test_series_received_before_0010_have_no_generation_and_new_ones_do(db_url: str) -> None:
    command.downgrade(db.alembic_config(db_url), "0009")
    engine = create_engine(db_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO series (series_instance_uid, study_instance_uid, calling_ae_title,"
                " instance_count, first_received_at, last_received_at)"
                " VALUES ('1.2.3.4', '1.2', 'CT1', 1, :now, :now)"
            ),
            {"now": db.utcnow()},
        )
    engine.dispose()
    db.upgrade(db_url)
    engine = db.make_engine(db_url)
    sessions = db.session_factory(engine)
    manager, queries = JobManager(sessions), JobQueries(sessions)
    assert queries.series_generation("1.2.3.4") == ""
    manager.record_instance(instance_record("1.1", "1.2.3.4"))
    assert queries.series_generation("1.2.3.4") == "", "a late instance keeps it unmarked"
    manager.record_instance(instance_record("2.1", "2.2.3.4"))
    assert queries.series_generation("2.2.3.4") != ""
    engine.dispose()
