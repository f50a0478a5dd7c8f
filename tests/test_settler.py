"""Series settling: quiet series become jobs; late instances make a new job for the series."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from devtools.records import instance_record
from devtools.tools import free_port
from node.config import Settings
from node.context import NodeContext
from node.derive import DerivationSpec, derive_instance
from node.jobs import JobState
from node.receiver import Receiver
from node.service import run_settler
from node.settler import SeriesSettler
from tests.fixtures.dicom import storescu

SETTLE = 0.5


@pytest.fixture
def ctx(db_url: str, tmp_path: Path) -> Iterator[NodeContext]:
    settings = Settings(
        state_dir=tmp_path / "state",
        database_url=db_url,
        bind_address="127.0.0.1",
        port=free_port(),
        spool_min_free_mb=0,
        settle_seconds=SETTLE,
        poll_seconds=0.05,
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}},
    )
    context = NodeContext.open(settings)
    yield context
    context.close()


def record(ctx: NodeContext, series_uid: str, count: int, **header: Any) -> None:
    """Record ``count`` new instances of a series as the receiver would."""
    for index in range(count):
        sop_uid = generate_uid()
        ctx.manager.record_instance(
            instance_record(
                sop_uid,
                series_uid,
                study_instance_uid="1.2.3.4",
                spool_path=f"incoming/20260101/{sop_uid}.dcm",
                sha256="0" * 64,
                size_bytes=1,
                header={
                    "Modality": "CT",
                    "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
                    "InstanceNumber": index + 1,
                    **header,
                },
            )
        )


def settle(settler: SeriesSettler, timeout: float = 10 * SETTLE) -> list[int]:
    """Poll until a job is created (the series has been quiet for ``settle_seconds``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        created = settler.run_once()
        if created:
            return created
        time.sleep(0.05)
    return []


def test_received_series_settles_into_one_queued_job(
    ctx: NodeContext, phantom_series: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    receiver = Receiver(ctx)
    receiver.start()
    try:
        assert storescu(receiver.port, phantom_series) == [0] * len(phantom_series)
    finally:
        receiver.stop()
    settler = SeriesSettler(ctx)
    with caplog.at_level(logging.INFO, logger="node.settler"):
        [job_id] = settle(settler)

    job = ctx.queries.get_job(job_id)
    last = max(i.received_at for i in ctx.queries.series_instances(job.series_instance_uid))
    assert (job.created_at - last).total_seconds() >= SETTLE  # only once the series was quiet
    assert job.state == JobState.QUEUED
    assert job.instance_count == len(phantom_series)
    assert job.calling_ae_title == "SCANNER"
    assert (job.rule, job.strength, job.destinations) == ("default", 1.0, ["pacs"])
    assert settler.run_once() == []  # one job per settled series
    [line] = [r for r in caplog.records if getattr(r, "job_id", None) == job_id]
    assert line.series_uid == job.series_instance_uid


def test_series_is_not_settled_while_instances_keep_arriving(ctx: NodeContext) -> None:
    settler = SeriesSettler(ctx)
    for _ in range(4):
        record(ctx, "1.2.3.100", 3)
        assert settler.run_once() == []
        time.sleep(SETTLE / 3)
    assert len(settle(settler)) == 1


def test_three_slices_become_a_skipped_job_with_the_reason(ctx: NodeContext) -> None:
    record(ctx, "1.2.3.200", 3)
    [job_id] = settle(SeriesSettler(ctx))
    job = ctx.queries.get_job(job_id)
    assert job.state == JobState.SKIPPED
    assert job.reason == "only 3 slices; the minimum is 10 (min_slices)"
    assert job.destinations == []


def test_derived_series_is_skipped(ctx: NodeContext) -> None:
    record(ctx, "1.2.3.300", 12, ImageType=["DERIVED", "SECONDARY", "AXIAL"], NodeOutput=True)
    [job_id] = settle(SeriesSettler(ctx))
    job = ctx.queries.get_job(job_id)
    assert job.state == JobState.SKIPPED
    assert "never processes its own output" in (job.reason or "")


def test_own_derived_series_routed_back_is_skipped(
    ctx: NodeContext, phantom_series: list[Path], tmp_path: Path
) -> None:
    spec = DerivationSpec("test-model", "1", 1.0, 1000, " [denoised]", "DENOISE")
    derived = []
    for path in phantom_series:
        source = dcmread(path)
        target = tmp_path / "derived" / path.name
        target.parent.mkdir(exist_ok=True)
        derive_instance(source, source.pixel_array, spec).save_as(target, enforce_file_format=True)
        derived.append(target)
    receiver = Receiver(ctx)
    receiver.start()
    try:
        assert storescu(receiver.port, derived) == [0] * len(derived)
    finally:
        receiver.stop()

    [job_id] = settle(SeriesSettler(ctx))
    job = ctx.queries.get_job(job_id)
    assert job.series_instance_uid == str(dcmread(derived[0]).SeriesInstanceUID)
    assert job.state == JobState.SKIPPED
    assert job.reason is not None and "never processes its own output" in job.reason


def test_late_instance_makes_a_second_job_for_the_whole_series(ctx: NodeContext) -> None:
    settler = SeriesSettler(ctx)
    record(ctx, "1.2.3.400", 12)
    [first] = settle(settler)
    record(ctx, "1.2.3.400", 1)
    assert settler.run_once() == []  # the late instance restarts the quiet period
    [second] = settle(settler)

    assert second != first
    assert ctx.queries.get_job(first).instance_count == 12
    late = ctx.queries.get_job(second)
    assert (late.state, late.instance_count) == (JobState.QUEUED, 13)


def test_run_polls_until_stopped(ctx: NodeContext) -> None:
    record(ctx, "1.2.3.500", 12)
    stop = threading.Event()
    thread = threading.Thread(target=run_settler, args=(SeriesSettler(ctx), stop))
    thread.start()
    try:
        deadline = time.monotonic() + 10 * SETTLE
        while not ctx.queries.list_jobs() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()
    [job] = ctx.queries.list_jobs()
    assert job.series_instance_uid == "1.2.3.500"
