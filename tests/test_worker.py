"""The worker on a real job table (SQLite and PostgreSQL): claim, denoise, fail, stall, stop."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import update

from devtools.onnx_models import write_mean_filter_model
from devtools.phantom import PhantomSpec, write_phantom_series
from devtools.records import file_record, instance_record
from node import db
from node.config import Settings
from node.context import NodeContext
from node.db import utcnow
from node.denoise import Denoiser
from node.derive import DerivationSpec, derived_series_uid, derived_sop_uid
from node.jobs import JobManager, JobQueries, JobState
from node.jobs.manager import NewJob
from node.jobs.states import EventKind
from node.jobs.tables import Series
from node.pipeline import series_grain_zoom
from node.service import run_worker
from node.worker import Worker
from tests.fixtures.onnx_models import ScriptedDenoiser

PROVIDERS = ["CPUExecutionProvider"]


@pytest.fixture
def context(db_url: str, tmp_path: Path, tiny_model: Path) -> Iterator[NodeContext]:
    """A node context on the test database whose worker uses the tiny model."""
    settings = Settings(
        state_dir=tmp_path / "state",
        database_url=db_url,
        model_path=tiny_model,
        providers=PROVIDERS,
        heartbeat_seconds=0.05,
        poll_seconds=0.05,
        retry_seconds=0.01,
    )
    ctx = NodeContext.open(settings)
    yield ctx
    ctx.close()


def queue_series(ctx: NodeContext, paths: list[Path], strength: float = 1.0) -> int:
    """Spool and record ``paths`` as the receiver would, then settle them into a queued job."""
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    for path in paths:
        data = path.read_bytes()
        relative = ctx.spool.new_incoming()
        ctx.spool.write_atomic(relative, lambda handle, data=data: handle.write(data))
        ctx.manager.record_instance(file_record(path, relative))
    return settle(
        ctx.manager, ctx.queries, first.SeriesInstanceUID, first.StudyInstanceUID, strength
    )


def settle(
    manager: JobManager,
    queries: JobQueries,
    series_uid: str,
    study_uid: str,
    strength: float = 1.0,
) -> int:
    (series,) = [s for s in queries.settled_series(utcnow()) if s.series_instance_uid == series_uid]
    job_id = manager.create_job(
        NewJob(
            series_instance_uid=series_uid,
            study_instance_uid=study_uid,
            calling_ae_title="SCANNER",
            settled_through=series.last_received_at,
            instance_count=series.instance_count,
            rule="default",
            strength=strength,
            destinations=["pacs"],
        )
    )
    assert job_id is not None
    return job_id


def empty_job(manager: JobManager, queries: JobQueries, index: int) -> int:
    """A queued job whose series has one (unspooled) instance: enough to race claims on."""
    series_uid, study_uid = generate_uid(), generate_uid()
    manager.record_instance(
        instance_record(
            generate_uid(),
            series_uid,
            study_instance_uid=study_uid,
            spool_path=f"incoming/none/{index}.dcm",
            sha256=f"{index:064d}",
            size_bytes=0,
            header={},
        )
    )
    return settle(manager, queries, series_uid, study_uid)


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    return write_phantom_series(tmp_path / "phantom", PhantomSpec(slices=8, size=64))


def test_worker_denoises_a_queued_job_into_sending(
    context: NodeContext, series: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    job_id = queue_series(context, series, strength=0.8)
    worker = Worker(context)
    with caplog.at_level(logging.INFO, logger="node.worker"):
        assert worker.run_once() is True
    assert worker.run_once() is False  # nothing left
    job = context.queries.get_job(job_id)
    assert job.state == JobState.SENDING, job.last_error
    assert (job.model_name, job.model_version, job.denoised_count) == ("tiny-mean", "0.0.1", 8)
    derived = context.queries.derived_instances(job_id)
    sources = {pydicom.dcmread(p).SOPInstanceUID for p in series}
    assert {d.source_sop_instance_uid for d in derived} == sources
    for item in derived:
        ds = pydicom.dcmread(context.spool.path(item.spool_path))
        assert ds.SOPInstanceUID == item.sop_instance_uid
        assert ds.SeriesInstanceUID == job.output_series_uid
        assert "0.8" in ds.DerivationDescription
    (outcome,) = [r for r in caplog.records if getattr(r, "job_id", None) == job_id]
    assert outcome.levelno == logging.INFO and outcome.slices == 8
    assert outcome.provider == "CPUExecutionProvider" and outcome.seconds >= 0


def test_corrupt_model_fails_the_job_clearly_and_the_worker_goes_on(
    context: NodeContext, series: list[Path], broken_model: Path, tiny_model: Path
) -> None:
    context.settings.model_path = broken_model
    context.manager.max_attempts = 1
    first = queue_series(context, series[:4])
    worker = Worker(context)
    assert worker.run_once() is True
    job = context.queries.get_job(first)
    assert job.state == JobState.FAILED
    assert "not a usable ONNX model" in job.last_error and str(broken_model) in job.last_error
    # the model is loaded again for the next job: a repaired model_path works at once
    context.settings.model_path = tiny_model
    second = queue_series(context, series[4:])
    assert worker.run_once() is True
    assert context.queries.get_job(second).state == JobState.SENDING


def test_bad_input_fails_for_good_without_retry(
    context: NodeContext, series: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    ds = pydicom.dcmread(series[3])
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(series[3], enforce_file_format=True)
    job_id = queue_series(context, series)
    with caplog.at_level(logging.INFO, logger="node.worker"):
        assert Worker(context, Denoiser(context.settings.model_file, PROVIDERS)).run_once()
    job = context.queries.get_job(job_id)
    assert (job.state, job.attempts) == (JobState.FAILED, 1)
    assert ds.SOPInstanceUID in job.last_error and "bad input" in job.last_error
    assert [r.levelno for r in caplog.records if getattr(r, "job_id", None)] == [logging.ERROR]


def test_other_errors_are_retried_until_max_attempts(
    context: NodeContext, series: list[Path]
) -> None:
    def explode(call: int) -> None:
        raise RuntimeError("GPU fell off the bus")

    job_id = queue_series(context, series[:2])
    worker = Worker(context, ScriptedDenoiser(hook=explode))  # type: ignore[arg-type]
    states = []
    for _ in range(3):
        while not worker.run_once():  # the retry waits retry_seconds x attempts
            threading.Event().wait(0.01)
        states.append(context.queries.get_job(job_id).state)
    assert states == [JobState.QUEUED, JobState.QUEUED, JobState.FAILED]
    assert "GPU fell off the bus" in context.queries.get_job(job_id).last_error


def test_stop_mid_job_releases_it_to_the_queue(context: NodeContext, series: list[Path]) -> None:
    job_id = queue_series(context, series)
    denoiser = ScriptedDenoiser(batch_size=2)
    worker = Worker(context, denoiser)  # type: ignore[arg-type]
    denoiser.hook = lambda call: worker.stop.set()  # SIGTERM arrives during inference
    assert worker.run_once() is True
    job = context.queries.get_job(job_id)
    assert (job.state, job.attempts, job.claimed_by) == (JobState.QUEUED, 0, None)
    assert "released" in context.queries.job_events(job_id)[-1].message
    assert context.queries.derived_instances(job_id) == []


def test_a_cancelled_job_is_abandoned(context: NodeContext, series: list[Path]) -> None:
    job_id = queue_series(context, series)

    def cancel(call: int) -> None:
        if call == 1:
            context.manager.cancel_job(job_id, "admin")

    worker = Worker(context, ScriptedDenoiser(batch_size=2, delay=0.2, hook=cancel))  # type: ignore[arg-type]
    assert worker.run_once() is True
    assert context.queries.get_job(job_id).state == JobState.CANCELLED
    assert context.queries.derived_instances(job_id) == []


def test_worker_loop_requeues_a_stalled_job_and_finishes_it(
    context: NodeContext, series: list[Path]
) -> None:
    context.settings.stale_after_seconds = 0.3
    job_id = queue_series(context, series)
    assert context.manager.claim_next_job("ghost:1/work").id == job_id  # then never heartbeats
    stop = threading.Event()
    worker = Worker(context, stop=stop)
    thread = threading.Thread(target=run_worker, args=(worker, stop))
    thread.start()
    try:
        for _ in range(200):
            if context.queries.get_job(job_id).state == JobState.SENDING:
                break
            threading.Event().wait(0.05)
    finally:
        stop.set()
        thread.join(timeout=30)
    job = context.queries.get_job(job_id)
    assert (job.state, job.attempts) == (JobState.SENDING, 2)
    messages = [e.message for e in context.queries.job_events(job_id)]
    assert any("stopped heartbeating" in m for m in messages)
    (row,) = [w for w in context.registry.workers() if w.name == worker.name]
    assert row.provider == "CPUExecutionProvider" and row.stopped_at is not None


def test_a_job_that_keeps_stalling_fails_after_max_attempts(
    manager: JobManager, queries: JobQueries
) -> None:
    job_id = empty_job(manager, queries, 0)
    outcomes = []
    for attempt in range(manager.max_attempts):
        assert manager.claim_next_job(f"ghost:{attempt}").id == job_id
        threading.Event().wait(0.01)
        outcomes += manager.requeue_stalled(stale_after=0.0)
    assert outcomes == [(job_id, JobState.QUEUED)] * 2 + [(job_id, JobState.FAILED)]
    job = queries.get_job(job_id)
    assert job.state == JobState.FAILED and "gave up after 3 attempts" in job.last_error


def test_two_workers_never_take_the_same_job(
    manager: JobManager, db_url: str, queries: JobQueries
) -> None:
    jobs = {empty_job(manager, queries, index) for index in range(24)}
    engine = db.make_engine(db_url)  # the second worker has its own connection pool
    managers = [manager, JobManager(db.session_factory(engine))]
    claimed: dict[str, list[int]] = {"a": [], "b": []}
    start = threading.Barrier(2)

    def claim_all(name: str, own: JobManager) -> None:
        start.wait()
        while (job := own.claim_next_job(name)) is not None:
            claimed[name].append(job.id)

    threads = [
        threading.Thread(target=claim_all, args=(name, own))
        for name, own in zip(claimed, managers, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    engine.dispose()
    taken = claimed["a"] + claimed["b"]
    assert sorted(taken) == sorted(jobs), "every job claimed exactly once"
    for job_id in jobs:
        job = queries.get_job(job_id)
        assert job.state == JobState.RUNNING and job.attempts == 1
        assert job.claimed_by == ("a" if job_id in claimed["a"] else "b")


def test_a_late_instance_costs_its_own_denoising_and_the_rest_is_reused(
    context: NodeContext, series: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    first = queue_series(context, series[:6])
    worker = Worker(context)
    assert worker.run_once() is True
    assert context.queries.get_job(first).state == JobState.SENDING
    acknowledged = context.queries.derived_instances(first)[0].sop_instance_uid
    context.manager.record_deliveries(first, "pacs", [(acknowledged, 0)])
    second = queue_series(context, series[6:])  # the series settles again: all 8 slices
    assert [i.sop_instance_uid for i in context.queries.job_inputs(second)] == [
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series
    ]
    with caplog.at_level(logging.INFO, logger="node.worker"):
        assert worker.run_once() is True
    job = context.queries.get_job(second)
    assert job.state == JobState.SENDING and job.denoised_count == 8
    (outcome,) = [r for r in caplog.records if getattr(r, "job_id", None) == second]
    assert outcome.slices == 2, "only the two late slices are denoised"
    earlier = {d.sop_instance_uid: d for d in context.queries.derived_instances(first)}
    for item in context.queries.derived_instances(second):
        assert item.spool_path.startswith(f"derived/{second}/")
        ds = pydicom.dcmread(context.spool.path(item.spool_path))
        assert ds.SOPInstanceUID == item.sop_instance_uid
        if item.sop_instance_uid in earlier:
            same = context.spool.path(earlier[item.sop_instance_uid].spool_path).read_bytes()
            assert context.spool.path(item.spool_path).read_bytes() == same
    assert context.queries.delivery_counts(second) == {"pacs": 1}, "acknowledgement inherited"


def test_a_running_job_with_a_newer_one_denoises_but_does_not_send(
    context: NodeContext, series: list[Path]
) -> None:
    first = queue_series(context, series[:6])
    assert context.manager.claim_next_job("w1") is not None
    second = queue_series(context, series[6:])
    context.manager.record_derived(first, "w1", [])
    assert context.manager.finish_denoising(first, "w1", "9.9", "m", "1", "6 slices") is (
        JobState.CANCELLED
    )
    job = context.queries.get_job(first)
    assert job.state == JobState.CANCELLED and job.reason.startswith(f"superseded by job {second}")
    assert context.queries.job_events(first)[-1].kind == EventKind.SUPERSEDED
    assert context.queries.get_job(second).state == JobState.QUEUED


@pytest.fixture
def measurable_series(tmp_path: Path) -> list[Path]:
    """A phantom big enough to hold flat soft tissue (its water) on every slice."""
    return write_phantom_series(tmp_path / "measurable", PhantomSpec(slices=4, size=128))


def warnings_of(ctx: NodeContext, job_id: int) -> list[str]:
    return [e.message for e in ctx.queries.job_events(job_id) if e.kind == EventKind.WARNING]


def test_the_job_records_the_series_noise_and_each_slice_s(
    context: NodeContext, measurable_series: list[Path]
) -> None:
    job_id = queue_series(context, measurable_series)
    assert Worker(context).run_once() is True
    job = context.queries.get_job(job_id)
    assert job.state == JobState.SENDING, job.last_error
    figure = job.noise
    assert figure is not None and job.noise_slices == 4 and figure.support == 4
    assert figure.before_hu > 20 and figure.drop > 0.2
    assert "4 of 4 slices measurable" in job.noise_report
    assert warnings_of(context, job_id) == []
    (denoised,) = [e for e in context.queries.job_events(job_id) if e.kind == EventKind.DENOISED]
    assert figure.comment() in denoised.message
    for item in context.queries.derived_instances(job_id):
        ds = pydicom.dcmread(context.spool.path(item.spool_path))
        assert item.noise is not None and ds.ImageComments == item.noise.comment()


def test_a_weak_drop_and_untrained_input_noise_warn_but_the_series_is_sent(
    context: NodeContext, measurable_series: list[Path]
) -> None:
    model = ScriptedDenoiser()  # returns its input: nothing removed
    model.trained_noise_hu = (3.0, 10.0)  # the phantom's 40 HU lies outside
    job_id = queue_series(context, measurable_series)
    assert Worker(context, denoiser=model).run_once() is True  # type: ignore[arg-type]
    job = context.queries.get_job(job_id)
    assert job.state == JobState.SENDING, "a warning never holds the series back"
    assert job.noise is not None and job.noise.drop < 0.05
    drop, untrained = warnings_of(context, job_id)
    assert "less than the expected 20%" in drop
    assert "outside what the model was trained on (3-10 HU)" in untrained


def test_a_series_without_flat_soft_tissue_is_not_measurable_and_not_warned_about(
    context: NodeContext, series: list[Path]
) -> None:
    job_id = queue_series(context, series)  # 64 x 64: too little water for a figure
    assert Worker(context, denoiser=ScriptedDenoiser()).run_once() is True  # type: ignore[arg-type]
    job = context.queries.get_job(job_id)
    assert job.state == JobState.SENDING
    assert (job.noise_slices, job.noise) == (0, None)
    assert job.noise_report.startswith("not measurable")
    assert warnings_of(context, job_id) == []


def test_reused_slices_keep_the_noise_their_job_measured(
    context: NodeContext, measurable_series: list[Path]
) -> None:
    first = queue_series(context, measurable_series[:3])
    worker = Worker(context)
    assert worker.run_once() is True
    second = queue_series(context, measurable_series[3:])
    assert worker.run_once() is True
    earlier = {d.sop_instance_uid: d.noise for d in context.queries.derived_instances(first)}
    later = context.queries.derived_instances(second)
    assert all(
        d.noise == earlier[d.sop_instance_uid] for d in later if d.sop_instance_uid in earlier
    )
    assert context.queries.get_job(second).noise_slices == 4


def test_a_corrected_resend_after_forget_gets_new_derived_uids_and_a_retry_the_same(
    context: NodeContext, series: list[Path]
) -> None:
    worker, manager, queries = Worker(context), context.manager, context.queries

    def denoised(job_id: int) -> tuple[str | None, set[str]]:
        assert worker.run_once() is True
        assert queries.get_job(job_id).state == JobState.SENDING
        derived = {d.sop_instance_uid for d in queries.derived_instances(job_id)}
        return queries.get_job(job_id).output_series_uid, derived

    first = queue_series(context, series[:4])
    made = denoised(first)
    manager.cancel_job(first, "admin")
    manager.retry_job(first, "admin")
    assert denoised(first) == made, "a retry of the same input makes the same UIDs"

    manager.cancel_job(first, "admin")
    manager.forget_job(first)
    corrected = pydicom.dcmread(series[3])  # the same UIDs, other pixels, in one slice
    corrected.PixelData = (corrected.pixel_array + 1).astype(corrected.pixel_array.dtype).tobytes()
    corrected.save_as(series[3], enforce_file_format=True)
    series_uid, sop_uids = denoised(queue_series(context, series[:4]))
    assert series_uid != made[0], "the corrected series is a new derived series"
    assert not sop_uids & made[1], "no derived instance of the first series is reused"


def test_a_series_received_before_the_upgrade_keeps_its_derived_uids(
    context: NodeContext, series: list[Path]
) -> None:
    """Its row has no generation (migration 0010 leaves it NULL): its derived UIDs are
    those the node made before, and a late instance adds no second derived series."""
    worker = Worker(context)
    first = queue_series(context, series[:6])
    with context.engine.begin() as connection:
        connection.execute(update(Series).values(generation=None))
    assert worker.run_once() is True
    job = context.queries.get_job(first)
    spec = DerivationSpec(
        model_name=str(job.model_name),
        model_version=str(job.model_version),
        strength=job.strength,
        series_number_offset=context.settings.series_number_offset,
        description_suffix=context.settings.series_description_suffix,
        node_ae_title=context.settings.ae_title,
    )
    before_upgrade = derived_series_uid(job.series_instance_uid, spec)
    assert job.output_series_uid == before_upgrade
    later = queue_series(context, series[6:])  # a late instance: the whole series again
    assert worker.run_once() is True
    assert context.queries.get_job(later).output_series_uid == before_upgrade
    sources = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series]
    made = {d.sop_instance_uid for d in context.queries.derived_instances(later)}
    assert made == {derived_sop_uid(uid, spec) for uid in sources}


@pytest.fixture
def white_noise_series(tmp_path: Path) -> list[Path]:
    """Water with white noise: a grain finer than any CT kernel's, in enough flat tissue."""
    return write_phantom_series(tmp_path / "white", PhantomSpec(slices=4, size=256))


def grained(folder: Path, grain: str) -> Denoiser:
    path = write_mean_filter_model(folder / f"grain-{grain}.onnx", metadata={"noise_grain": grain})
    return Denoiser(path, PROVIDERS)


def test_a_series_finer_than_the_model_s_grain_is_resampled_and_its_uids_say_so(
    context: NodeContext, white_noise_series: list[Path], tmp_path: Path
) -> None:
    model = grained(tmp_path, "0.205")
    zoom = series_grain_zoom(white_noise_series, model)
    assert zoom > 1.3
    job_id = queue_series(context, white_noise_series)
    assert Worker(context, denoiser=model).run_once() is True
    job = context.queries.get_job(job_id)
    assert job.state == JobState.SENDING, job.last_error
    (denoised,) = [e for e in context.queries.job_events(job_id) if e.kind == EventKind.DENOISED]
    assert f"resampled x{zoom:.2f} to the model's noise grain" in denoised.message
    assert warnings_of(context, job_id) == []
    spec = DerivationSpec(
        "tiny-mean",
        "0.0.1",
        1.0,
        context.settings.series_number_offset,
        context.settings.series_description_suffix,
        context.settings.ae_title,
        source_generation=context.queries.series_generation(job.series_instance_uid),
        grain_zoom=zoom,
    )
    assert job.output_series_uid == derived_series_uid(job.series_instance_uid, spec)
    for item in context.queries.derived_instances(job_id):
        assert item.sop_instance_uid == derived_sop_uid(item.source_sop_instance_uid, spec)


def test_a_grain_beyond_what_resampling_reaches_warns(
    context: NodeContext, white_noise_series: list[Path], tmp_path: Path
) -> None:
    job_id = queue_series(context, white_noise_series)
    assert Worker(context, denoiser=grained(tmp_path, "0.05")).run_once() is True
    assert context.queries.get_job(job_id).state == JobState.SENDING
    (warning,) = warnings_of(context, job_id)
    assert "noise grain outside what resampling brings to the model's" in warning
    assert "x2.50" in warning
