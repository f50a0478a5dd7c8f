"""The receiver over real sockets: DCMTK's echoscu/storescu against a running Receiver."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import EnhancedCTImageStorage, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from devtools.phantom import PhantomSpec, write_phantom_series
from devtools.tools import DCMTK_ENV, dcmtk_tool, free_port
from node.config import Settings
from node.context import NodeContext
from node.housekeeping import purge_spool
from node.idle_polling import IDLE_POLL_SECONDS, PacedDIMSE
from node.instance_checks import made_by_node, selection_header
from node.jobs.manager import NewJob
from node.listener import GuardedSocket
from node.receiver import (
    CANNOT_UNDERSTAND,
    DATABASE_UNAVAILABLE,
    DEFAULT_POLL_SECONDS,
    QUICK_POLL_SECONDS,
    SPOOL_FULL,
    Receiver,
)
from node.spool import TMP_SUFFIX
from tests.fixtures.dicom import COMPRESSORS, CompressedCopy, storescu

PATIENT_KEYS = {"PatientName", "PatientID", "PatientBirthDate"}


def make_context(db_url: str, tmp_path: Path, **overrides: object) -> NodeContext:
    settings = Settings(
        state_dir=tmp_path / "state",
        database_url=db_url,
        bind_address="127.0.0.1",
        port=free_port(),
        **{"spool_min_free_mb": 0, **overrides},
    )
    return NodeContext.open(settings)


@pytest.fixture
def ctx(db_url: str, tmp_path: Path) -> Iterator[NodeContext]:
    context = make_context(db_url, tmp_path)
    yield context
    context.close()


@pytest.fixture
def receiver(ctx: NodeContext) -> Iterator[Receiver]:
    running = Receiver(ctx)
    running.start()
    yield running
    running.stop()


def spooled(ctx: NodeContext) -> list[Path]:
    return sorted(ctx.spool.root.rglob("*.dcm"))


def series_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def test_echo_succeeds(receiver: Receiver) -> None:
    done = subprocess.run(
        [dcmtk_tool("echoscu"), "127.0.0.1", str(receiver.port)], env=DCMTK_ENV, capture_output=True
    )
    assert done.returncode == 0, done.stderr


def test_series_is_spooled_and_recorded(
    receiver: Receiver, ctx: NodeContext, phantom_series: list[Path]
) -> None:
    assert storescu(receiver.port, phantom_series) == [0x0000] * len(phantom_series)

    instances = ctx.queries.series_instances(series_uid(phantom_series[0]))
    assert len(instances) == len(phantom_series) == len(spooled(ctx))
    sent = {str(dcmread(p).SOPInstanceUID): p for p in phantom_series}
    for instance in instances:
        path = ctx.spool.path(instance.spool_path)
        assert path.parent.parent == ctx.spool.root / "incoming"
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == instance.sha256
        assert len(data) == instance.size_bytes
        received = dcmread(path)
        assert received.SOPInstanceUID == instance.sop_instance_uid
        original = dcmread(sent[instance.sop_instance_uid])
        assert np.array_equal(received.pixel_array, original.pixel_array)
        assert instance.calling_ae_title == "SCANNER"
        header = instance.header
        assert not PATIENT_KEYS & set(header)
        assert header["Modality"] == "CT"
        assert header["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert header["Rows"] == header["Columns"] == 128
        assert header["ImagePositionPatientZ"] == float(original.ImagePositionPatient[2])
        assert header["NodeOutput"] is False


def test_full_size_slices_are_received(
    receiver: Receiver, ctx: NodeContext, tmp_path: Path
) -> None:
    """512 x 512 PixelData is larger than the header reader's defer size: it stays on disk
    and is still checked (it was once read while checked, and every such slice refused)."""
    series = write_phantom_series(tmp_path / "full", PhantomSpec(slices=2, size=512))
    assert storescu(receiver.port, series) == [0x0000] * 2
    instances = ctx.queries.series_instances(series_uid(series[0]))
    assert len(instances) == 2
    for instance in instances:
        received = dcmread(ctx.spool.path(instance.spool_path))
        original = next(p for p in series if dcmread(p).SOPInstanceUID == received.SOPInstanceUID)
        assert np.array_equal(received.pixel_array, dcmread(original).pixel_array)


def test_every_transfer_syntax_is_received(
    receiver: Receiver,
    ctx: NodeContext,
    phantom_series: list[Path],
    compressed_copy: CompressedCopy,
) -> None:
    # One slice per kind, so that each is a new instance, all in one association.
    kinds = sorted(set(COMPRESSORS) - {"jpeg-ls-near"})
    sources = phantom_series[: len(kinds)]
    copies = [compressed_copy([path], kind)[0] for path, kind in zip(sources, kinds, strict=True)]
    assert storescu(receiver.port, copies) == [0x0000] * len(kinds)

    instances = ctx.queries.series_instances(series_uid(copies[0]))
    expected = {
        str(dcmread(path).SOPInstanceUID): kind for path, kind in zip(copies, kinds, strict=True)
    }
    assert len(instances) == len(kinds)
    for instance in instances:
        kind = expected[instance.sop_instance_uid]
        assert instance.transfer_syntax_uid == COMPRESSORS[kind][1], kind
        # The worker decodes what was received: prove that the installed plugins can.
        assert dcmread(ctx.spool.path(instance.spool_path)).pixel_array.shape == (128, 128)


def test_near_lossless_jpeg_ls_is_received(
    receiver: Receiver, ctx: NodeContext, tmp_path: Path, compressed_copy: CompressedCopy
) -> None:
    # DCMTK encodes near-lossless JPEG-LS only for unsigned pixels.
    unsigned = write_phantom_series(tmp_path / "unsigned", PhantomSpec(slices=2, signed=False))
    copies = compressed_copy(unsigned, "jpeg-ls-near")
    assert storescu(receiver.port, copies) == [0x0000] * 2
    assert len(ctx.queries.series_instances(series_uid(copies[0]))) == 2


def test_enhanced_ct_is_received(receiver: Receiver, ctx: NodeContext, tmp_path: Path) -> None:
    path = tmp_path / "enhanced.dcm"
    enhanced_ct(tmp_path / "source", frames=3).save_as(path, enforce_file_format=True)
    assert storescu(receiver.port, [path]) == [0x0000]

    [instance] = ctx.queries.series_instances(series_uid(path))
    assert instance.sop_class_uid == EnhancedCTImageStorage
    assert instance.header["NumberOfFrames"] == 3
    assert instance.header["SliceThickness"] == 2.5
    assert instance.header["ConvolutionKernel"] == "SOFT"
    assert instance.header["ImagePositionPatientZ"] == -10.0


def test_resent_series_is_stored_once(
    receiver: Receiver,
    ctx: NodeContext,
    phantom_series: list[Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert storescu(receiver.port, phantom_series[:4]) == [0x0000] * 4
    with caplog.at_level(logging.INFO, logger="node.receiver"):
        assert storescu(receiver.port, phantom_series[:4]) == [0x0000] * 4
        # The first association's own "closed" line may come late, under load, beside it.
        deadline = time.monotonic() + 5
        while "already stored" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "association from SCANNER closed: 4 already stored" in caplog.text
    assert len(ctx.queries.series_instances(series_uid(phantom_series[0]))) == 4
    assert len(spooled(ctx)) == 4


def test_different_content_keeps_first_copy_and_warns(
    receiver: Receiver,
    ctx: NodeContext,
    phantom_series: list[Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = phantom_series[0]
    assert storescu(receiver.port, [first]) == [0x0000]
    uid = series_uid(first)
    [instance] = ctx.queries.series_instances(uid)
    job_id = ctx.manager.create_job(
        NewJob(uid, instance.study_instance_uid, "SCANNER", instance.received_at, 1, "t", 1.0, [])
    )
    assert job_id is not None
    changed = dcmread(first)
    changed.SeriesDescription = "changed"
    changed.save_as(tmp_path / "changed.dcm")

    with caplog.at_level(logging.WARNING, logger="node.receiver"):
        assert storescu(receiver.port, [tmp_path / "changed.dcm"]) == [0x0000]

    [kept] = ctx.queries.series_instances(uid)
    assert kept.spool_path == instance.spool_path
    assert dcmread(ctx.spool.path(kept.spool_path)).SeriesDescription == "Phantom low dose"
    assert spooled(ctx) == [ctx.spool.path(kept.spool_path)]
    assert any("DIFFERENT content" in r.getMessage() for r in caplog.records)
    assert any("different content" in e.message for e in ctx.queries.job_events(job_id))


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_invalid_uids_are_refused_and_never_a_path(
    receiver: Receiver, ctx: NodeContext, phantom_series: list[Path], tmp_path: Path
) -> None:
    evil = "../../../../escaped"
    paths = []
    for path, keyword in zip(
        phantom_series, ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"], strict=False
    ):
        ds = dcmread(path)
        setattr(ds, keyword, evil)
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = evil
        paths.append(tmp_path / f"evil-{keyword}.dcm")
        ds.save_as(paths[-1])

    missing = dcmread(phantom_series[3])
    del missing.SeriesInstanceUID
    paths.append(tmp_path / "no-series-uid.dcm")
    missing.save_as(paths[-1])

    assert storescu(receiver.port, paths) == [CANNOT_UNDERSTAND] * 4
    assert spooled(ctx) == []
    assert not list(tmp_path.rglob("escaped*"))
    assert not list(ctx.spool.root.parent.rglob("escaped*"))
    assert ctx.queries.series_instances(series_uid(phantom_series[0])) == []
    assert ctx.queries.series_instances(evil) == []


def test_other_sop_classes_are_rejected_at_negotiation(
    receiver: Receiver, ctx: NodeContext, phantom_series: list[Path], tmp_path: Path
) -> None:
    ds = dcmread(phantom_series[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.Modality = "MR"
    path = tmp_path / "mr.dcm"
    ds.save_as(path)

    assert storescu(receiver.port, [path], profile=False) == []
    assert spooled(ctx) == []
    assert ctx.queries.series_instances(str(ds.SeriesInstanceUID)) == []


def test_spool_below_watermark_is_out_of_resources(
    db_url: str, tmp_path: Path, phantom_series: list[Path]
) -> None:
    context = make_context(db_url, tmp_path, spool_min_free_mb=2**40)
    running = Receiver(context)
    running.start()
    try:
        assert storescu(running.port, phantom_series[:2]) == [SPOOL_FULL] * 2
        assert spooled(context) == []
        assert context.queries.series_instances(series_uid(phantom_series[0])) == []
    finally:
        running.stop()
        context.close()


def test_an_idle_association_polls_slowly_and_answers_at_once(receiver: Receiver) -> None:
    """An open association that receives nothing: its reader sleeps the idle step and its
    reactor waits on its queue; a C-ECHO is answered, and wakes the association up."""
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="DENOISE")
    deadline = time.monotonic() + 10
    while not receiver._ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.01)
    (running,) = receiver._ae.active_associations
    pace = cast(GuardedSocket, running.dul.socket).pace
    while running.dul._run_loop_delay != IDLE_POLL_SECONDS and time.monotonic() < deadline:
        time.sleep(0.01)
    assert running.dul._run_loop_delay == IDLE_POLL_SECONDS, "the idle reader kept its step"
    assert isinstance(running.dimse, PacedDIMSE) and pace.idle
    asked = time.monotonic()
    assert assoc.send_c_echo().Status == 0x0000
    assert pace.heard_at >= asked, "the C-ECHO did not count as data"
    assoc.release()


def test_few_associations_poll_quickly_and_many_at_the_default_step(receiver: Receiver) -> None:
    """pynetdicom's reader step: short while one or two associations are open, the
    default for all of them once a third opens, short again when it closes."""
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)

    def steps(expected: int) -> list[float]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            running = receiver._ae.active_associations
            if len(running) == expected and receiver.slots.open_total() == expected:
                return sorted(cast(GuardedSocket, a.dul.socket).pace.busy_seconds for a in running)
            time.sleep(0.01)
        raise AssertionError(f"{expected} associations did not open or close")

    first = ae.associate("127.0.0.1", receiver.port, ae_title="DENOISE")
    second = ae.associate("127.0.0.1", receiver.port, ae_title="DENOISE")
    assert steps(2) == [QUICK_POLL_SECONDS] * 2
    third = ae.associate("127.0.0.1", receiver.port, ae_title="DENOISE")
    assert steps(3) == [DEFAULT_POLL_SECONDS] * 3
    third.release()
    assert steps(2) == [QUICK_POLL_SECONDS] * 2
    first.release()
    second.release()


def copies_a_failed_row_leaves(db_url: str) -> int:
    """Spool copies an instance refused for a database error leaves (``Intake.record_instance``):
    SQLite's copy is in place before the row is written, and whether a row names it is
    unknown to the receiver, so it stays for the sweep; PostgreSQL's statements run before
    the copy is put in place, and a statement that fails leaves none."""
    return 1 if make_url(db_url).get_backend_name() == "sqlite" else 0


def test_database_failure_is_a_failure_status(
    db_url: str, receiver: Receiver, ctx: NodeContext, phantom_series: list[Path]
) -> None:
    engine = create_engine(db_url)
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE instances RENAME TO instances_gone"))
    engine.dispose()

    assert storescu(receiver.port, phantom_series[:2]) == [DATABASE_UNAVAILABLE] * 2
    assert not list(ctx.spool.root.rglob(f"*{TMP_SUFFIX}"))
    copies = copies_a_failed_row_leaves(db_url) * 2
    assert len(spooled(ctx)) == copies
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE instances_gone RENAME TO instances"))
    engine.dispose()
    ctx.settings = ctx.settings.model_copy(update={"orphan_grace_seconds": 1e-3})
    assert purge_spool(ctx, ctx.settings.retention_days, "test").orphan_files == copies
    assert spooled(ctx) == []


def test_copies_kept_after_database_errors_go_soon_unless_a_row_names_them(
    db_url: str, tmp_path: Path, phantom_series: list[Path]
) -> None:
    context = make_context(db_url, tmp_path, unrecorded_grace_seconds=3600.0)
    running = Receiver(context)
    running.start()
    engine = create_engine(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE instances RENAME TO instances_gone"))
        for _ in range(3):  # the modality retries while the job table is down
            assert storescu(running.port, phantom_series[:2]) == [DATABASE_UNAVAILABLE] * 2
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE instances_gone RENAME TO instances"))
        assert storescu(running.port, phantom_series[:2]) == [0, 0]
        refused_copies = copies_a_failed_row_leaves(db_url) * 6
        assert len(spooled(context)) == 2 + refused_copies
        running.stop()
        running = Receiver(context)
        running.start()  # its recovery leaves the marked copies: they were answered failed
        assert len(context.queries.series_instances(series_uid(phantom_series[0]))) == 2

        assert purge_spool(context, context.settings.retention_days, "test").orphan_files == 0
        context.settings = context.settings.model_copy(update={"unrecorded_grace_seconds": 1e-3})
        orphans = purge_spool(context, context.settings.retention_days, "test").orphan_files
        assert orphans == refused_copies
        named = context.queries.series_instances(series_uid(phantom_series[0]))
        assert spooled(context) == sorted(context.spool.path(i.spool_path) for i in named)
        assert not list(context.spool.root.rglob("*.unrecorded")), "the marks go too"
    finally:
        engine.dispose()
        running.stop()
        context.close()


class CommitAnswerLost:
    """A TCP proxy to PostgreSQL that, once armed, lets one COMMIT reach the server and
    cuts the connection instead of passing its answer back: the row is committed, and
    the node cannot know it."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.armed, self.cut = threading.Event(), threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.upstream)
                for source, sink, answers in ((client, server, False), (server, client, True)):
                    args = (source, sink, answers, (client, server))
                    threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(
        self, source: socket.socket, sink: socket.socket, answers: bool, both: tuple[Any, ...]
    ) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                # CommandComplete "COMMIT" from the server: swallowed, and the line cut.
                if answers and self.armed.is_set() and b"COMMIT\x00" in data:
                    self.armed.clear()
                    self.cut.set()
                    for end in both:
                        end.shutdown(socket.SHUT_RDWR)  # wakes the other pump's recv too
                        end.close()
                    return
                sink.sendall(data)

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize(
    "db_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_a_lost_commit_answer_keeps_the_file_and_the_resend_is_stored_once(
    db_url: str, tmp_path: Path, phantom_series: list[Path]
) -> None:
    url = make_url(db_url)
    proxy = CommitAnswerLost(url.host or "127.0.0.1", url.port or 5432)
    through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    context = make_context(through, tmp_path)
    running = Receiver(context)
    running.start()
    try:
        proxy.armed.set()
        assert storescu(running.port, phantom_series[:1]) == [DATABASE_UNAVAILABLE]
        assert proxy.cut.is_set()
        (row,) = context.queries.series_instances(series_uid(phantom_series[0]))
        assert context.spool.path(row.spool_path).is_file(), "a row names a removed file"
        context.settings = context.settings.model_copy(update={"unrecorded_grace_seconds": 1e-3})
        assert purge_spool(context, context.settings.retention_days, "test").orphan_files == 0
        assert context.spool.path(row.spool_path).is_file(), "the sweep removed a named copy"

        assert storescu(running.port, phantom_series[:1]) == [0], "the resend is a success"
        (again,) = context.queries.series_instances(series_uid(phantom_series[0]))
        assert again.spool_path == row.spool_path and spooled(context) == [
            context.spool.path(row.spool_path)
        ]
    finally:
        running.stop()
        context.close()
        proxy.close()


def test_start_removes_stale_partial_files_but_not_a_live_writers(ctx: NodeContext) -> None:
    stale = ctx.spool.root / "incoming" / "20260101" / f"abc.dcm.1{TMP_SUFFIX}"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half an instance")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    fresh = ctx.spool.root / "derived" / "7" / f"00001.dcm.2{TMP_SUFFIX}"
    fresh.parent.mkdir(parents=True)
    fresh.write_bytes(b"a worker is writing this right now")
    running = Receiver(ctx)
    running.start()
    running.stop()
    assert not stale.exists()
    assert fresh.exists()


def test_own_output_is_flagged_but_a_phantom_maker_is_not(phantom_series: list[Path]) -> None:
    ds = dcmread(phantom_series[0], stop_before_pixels=True)
    assert "ct-denoise-node" in ds.Manufacturer
    assert made_by_node(ds) is False
    equipment = Dataset()
    equipment.Manufacturer = "ct-denoise-node"
    ds.ContributingEquipmentSequence = [equipment]
    assert made_by_node(ds) is True
    assert selection_header(ds)["NodeOutput"] is True


def enhanced_ct(folder: Path, frames: int) -> Dataset:
    """A minimal Enhanced CT instance: what selection reads lives in functional groups."""
    [source] = write_phantom_series(folder, PhantomSpec(slices=1, size=32))
    ds = dcmread(source)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    for keyword in ("SliceThickness", "ConvolutionKernel", "ImagePositionPatient"):
        delattr(ds, keyword)
    ds.NumberOfFrames = frames
    measures, reconstruction, shared = Dataset(), Dataset(), Dataset()
    measures.SliceThickness = 2.5
    measures.PixelSpacing = [0.8, 0.8]
    reconstruction.ConvolutionKernel = "SOFT"
    shared.PixelMeasuresSequence = [measures]
    shared.CTReconstructionSequence = [reconstruction]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for index in range(frames):
        position, group = Dataset(), Dataset()
        position.ImagePositionPatient = [0.0, 0.0, -10.0 - 2.5 * index]
        group.PlanePositionSequence = [position]
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = np.zeros((frames, ds.Rows, ds.Columns), np.int16).tobytes()
    return ds
