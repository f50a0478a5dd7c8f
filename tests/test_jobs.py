"""The job table: states, transitions, events, claims, stalls, duplicates (both databases)."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, text

from node import db
from node.db import SchemaOutOfDate, utcnow
from node.jobs import JobManager, JobQueries, JobState, TransitionError
from node.jobs.manager import DerivedFile, InstanceRecord, LostClaim, NewJob, RecordOutcome
from node.jobs.states import EventKind
from tests.fixtures.jobs import instance_record, settle_series


def record(sop: str, series: str = "1.2.3.4", sha: str = "a" * 64) -> InstanceRecord:
    return instance_record(sop, series, sha256=sha)


def settle(
    manager: JobManager, queries: JobQueries, series: str = "1.2.3.4", skip: str | None = None
) -> int:
    return settle_series(manager, queries, series, skip)


def states(queries: JobQueries, job_id: int) -> list[tuple[str | None, str | None]]:
    return [(e.from_state, e.to_state) for e in queries.job_events(job_id) if e.to_state]


def test_duplicate_instances_are_stored_once(manager: JobManager, queries: JobQueries) -> None:
    assert manager.record_instance(record("1.1")) == (RecordOutcome.NEW, "incoming/x/1.1.dcm")
    again = record("1.1")
    assert manager.record_instance(again)[0] is RecordOutcome.IDENTICAL
    changed = InstanceRecord(**{**again.__dict__, "sha256": "b" * 64, "spool_path": "other"})
    outcome, kept = manager.record_instance(changed)
    assert outcome is RecordOutcome.CONFLICT and kept == "incoming/x/1.1.dcm"
    assert len(queries.series_instances("1.2.3.4")) == 1
    (series,) = queries.settled_series(utcnow())
    assert series.instance_count == 1


def test_a_recorded_instance_reads_back_as_it_was_given(
    manager: JobManager, queries: JobQueries
) -> None:
    """The receiver's two statements run below the ORM (``node.db.DriverStatement``):
    the ORM must read back what was given (JSON header, sizes, datetimes it compares)."""
    header = {
        "Modality": "CT",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "SeriesDescription": "Thorax 1.0 Br40 \u00fc",
        "Rows": 512,
        "ImagePositionPatientZ": -12.5,
        "NodeOutput": False,
    }
    given = InstanceRecord(**{**record("1.1").__dict__, "header": header, "size_bytes": 525650})
    before = utcnow()
    assert manager.record_instance(given)[0] is RecordOutcome.NEW
    assert manager.record_instance(record("1.2"))[0] is RecordOutcome.NEW
    after = utcnow()
    first = next(i for i in queries.series_instances("1.2.3.4") if i.sop_instance_uid == "1.1")
    assert first.header == header and first.size_bytes == 525650
    assert first.sha256 == given.sha256 and first.spool_path == given.spool_path
    assert before <= first.received_at <= after
    assert queries.settled_series(before - timedelta(microseconds=1)) == []
    (series,) = queries.settled_series(after)
    assert series.instance_count == 2 and before <= series.last_received_at <= after


def test_full_lifecycle_writes_a_timeline(manager: JobManager, queries: JobQueries) -> None:
    for i in range(3):
        manager.record_instance(record(f"1.{i}"))
    job_id = settle(manager, queries)
    job = manager.claim_next_job("w1")
    assert job is not None and job.id == job_id and job.state == JobState.RUNNING
    assert job.attempts == 1 and job.claimed_by == "w1"
    manager.heartbeat(job_id, "w1")
    manager.record_derived(
        job_id, "w1", [DerivedFile("9.1", "1.0", "a" * 64, "derived/1/00000.dcm")]
    )
    manager.finish_denoising(job_id, "w1", "9.9", "m", "1.0", "denoised 3 slices")
    assert manager.claim_next_job("w2") is None
    sending = manager.claim_sending_job("s1", stale_after=60)
    assert sending is not None and sending.id == job_id
    assert [d.sop_instance_uid for d in queries.missing_deliveries(job_id, "pacs")] == ["9.1"]
    manager.record_deliveries(job_id, "pacs", [("9.1", 0)])
    assert queries.missing_deliveries(job_id, "pacs") == []
    manager.finish_sending(job_id, "s1", "1 instance acknowledged")
    assert queries.get_job(job_id).state == JobState.DONE
    assert states(queries, job_id) == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "sending"),
        ("sending", "sending"),
        ("sending", "done"),
    ]
    assert [e.kind for e in queries.job_events(job_id)] == [
        EventKind.SETTLED,
        EventKind.CLAIMED,
        EventKind.DENOISED,
        EventKind.CLAIMED,
        EventKind.DELIVERED,
    ]


def test_a_settled_series_becomes_one_job_and_a_late_instance_another(
    manager: JobManager, queries: JobQueries
) -> None:
    manager.record_instance(record("1.1"))
    first = settle(manager, queries)
    assert queries.settled_series(utcnow()) == []
    manager.record_instance(record("1.2"))
    second = settle(manager, queries)
    assert second != first
    assert queries.get_job(second).instance_count == 2
    assert [i.sop_instance_uid for i in queries.job_inputs(first)] == ["1.1"]
    assert [i.sop_instance_uid for i in queries.job_inputs(second)] == ["1.1", "1.2"]
    superseded = queries.get_job(first)
    assert superseded.state == JobState.CANCELLED and f"job {second}" in superseded.reason
    event = queries.job_events(first)[-1]
    assert (event.kind, event.from_state, event.to_state) == (
        EventKind.SUPERSEDED,
        "queued",
        "cancelled",
    )


def test_create_job_loses_the_race_against_a_new_instance(
    manager: JobManager, queries: JobQueries
) -> None:
    manager.record_instance(record("1.1"))
    (row,) = queries.settled_series(utcnow())
    time.sleep(0.01)
    manager.record_instance(record("1.2"))
    new = NewJob(
        series_instance_uid=row.series_instance_uid,
        study_instance_uid=row.study_instance_uid,
        calling_ae_title="SCANNER",
        settled_through=row.last_received_at,
        instance_count=1,
        rule="default",
        strength=1.0,
        destinations=[],
    )
    assert manager.create_job(new) is None


def test_skipped_job_is_final_with_reason(manager: JobManager, queries: JobQueries) -> None:
    manager.record_instance(record("1.1"))
    job_id = settle(manager, queries, skip="only 1 slice; the minimum is 10 (min_slices)")
    job = queries.get_job(job_id)
    assert job.state == JobState.SKIPPED and "min_slices" in job.reason
    assert manager.claim_next_job("w1") is None


def test_a_retried_skipped_job_gets_its_series_as_input(
    manager: JobManager, queries: JobQueries
) -> None:
    for uid in ("1.1", "1.2"):
        manager.record_instance(record(uid))
    job_id = settle(manager, queries, skip="only 2 slices; the minimum is 10 (min_slices)")
    assert queries.job_inputs(job_id) == []
    manager.retry_job(job_id, "admin")
    assert sorted(i.sop_instance_uid for i in queries.job_inputs(job_id)) == ["1.1", "1.2"]
    claimed = manager.claim_next_job("w1")
    assert claimed is not None and claimed.id == job_id


def test_failures_retry_until_max_attempts(manager: JobManager, queries: JobQueries) -> None:
    manager.record_instance(record("1.1"))
    job_id = settle(manager, queries)
    for attempt in (1, 2):
        assert manager.claim_next_job("w1").attempts == attempt
        assert manager.fail_job(job_id, "w1", "boom", retry_in=0) is JobState.QUEUED
    manager.claim_next_job("w1")
    assert manager.fail_job(job_id, "w1", "boom", retry_in=0) is JobState.FAILED
    job = queries.get_job(job_id)
    assert job.state == JobState.FAILED and job.last_error == "boom"


def test_permanent_failure_does_not_retry(manager: JobManager, queries: JobQueries) -> None:
    manager.record_instance(record("1.1"))
    job_id = settle(manager, queries)
    manager.claim_next_job("w1")
    assert manager.fail_job(job_id, "w1", "pixel data too short") is JobState.FAILED


def test_retry_in_the_future_is_not_claimed_yet(manager: JobManager, queries: JobQueries) -> None:
    manager.record_instance(record("1.1"))
    job_id = settle(manager, queries)
    manager.claim_next_job("w1")
    manager.fail_job(job_id, "w1", "transient", retry_in=3600)
    assert manager.claim_next_job("w2") is None


def test_stalled_job_is_requeued_then_failed(
    manager: JobManager, db_url: str, queries: JobQueries
) -> None:
    manager.record_instance(record("1.1"))
    job_id = settle(manager, queries)
    engine = create_engine(db_url)
    for attempt in range(1, 4):
        assert manager.claim_next_job(f"w{attempt}") is not None
        with engine.begin() as connection:
            connection.execute(
                text("UPDATE jobs SET heartbeat_at = :t WHERE id = :id"),
                {"t": utcnow() - timedelta(minutes=5), "id": job_id},
            )
        expected = JobState.QUEUED if attempt < 3 else JobState.FAILED
        assert manager.requeue_stalled(stale_after=60) == [(job_id, expected)]
    engine.dispose()
    job = queries.get_job(job_id)
    assert "stopped heartbeating" in job.last_error and "3 attempts" in job.last_error
    with pytest.raises(LostClaim):
        manager.heartbeat(job_id, "w3")


def test_release_returns_the_job_without_spending_an_attempt(
    manager: JobManager, queries: JobQueries
) -> None:
    manager.record_instance(record("1.1"))
    job_id = settle(manager, queries)
    manager.claim_next_job("w1")
    manager.release_job(job_id, "w1", "worker stopping")
    job = manager.claim_next_job("w2")
    assert job is not None and job.attempts == 1


def test_cancel_is_noticed_by_the_holder(manager: JobManager, queries: JobQueries) -> None:
    manager.record_instance(record("1.1"))
    job_id = settle(manager, queries)
    manager.claim_next_job("w1")
    manager.cancel_job(job_id, "admin")
    with pytest.raises(LostClaim):
        manager.heartbeat(job_id, "w1")
    with pytest.raises(TransitionError):
        manager.finish_denoising(job_id, "w1", "9", "m", "1", "late")
    with pytest.raises(TransitionError):
        manager.cancel_job(job_id, "admin")
    manager.retry_job(job_id, "admin")
    assert queries.get_job(job_id).state == JobState.QUEUED


def test_resend_adds_the_destination_and_sends_only_to_it_again(
    manager: JobManager, queries: JobQueries
) -> None:
    manager.record_instance(record("1.1"))
    job_id = settle(manager, queries)
    manager.claim_next_job("w1")
    manager.record_derived(
        job_id, "w1", [DerivedFile("9.1", "1.1", "a" * 64, "derived/1/00000.dcm")]
    )
    manager.finish_denoising(job_id, "w1", "9", "m", "1", "done")
    manager.claim_sending_job("s1", 60)
    manager.record_deliveries(job_id, "pacs", [("9.1", 0)])
    manager.finish_sending(job_id, "s1", "ok")
    manager.resend_job(job_id, "archive", "admin")
    job = queries.get_job(job_id)
    assert job.state == JobState.SENDING and job.destinations == ["pacs", "archive"]
    assert queries.missing_deliveries(job_id, "pacs") == []
    assert len(queries.missing_deliveries(job_id, "archive")) == 1


def test_out_of_date_schema_is_refused_with_the_command_to_run(tmp_path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    with pytest.raises(SchemaOutOfDate, match="denoise-node db upgrade"):
        db.check_schema(engine)
    db.upgrade(str(engine.url))
    db.check_schema(engine)
    engine.dispose()
