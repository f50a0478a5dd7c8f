"""Bad input never stops the node: a clear status or a failed/skipped job, then business as usual.

Every test sends something broken to a running node process, checks the answer (the
C-STORE status, or the job's state and its readable error), and ends by sending a
good series that must come out ``done``.  Malformed files go out with pynetdicom,
which streams a file as it is on disk; DCMTK's storescu would refuse most of them.
These run on SQLite: the input is bad, not the database.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from devtools.phantom import PhantomSpec, write_phantom_series
from node.jobs import JobState
from node.receiver import CANNOT_UNDERSTAND, DATASET_MISMATCH, DECODE_FAILED, PIXEL_DATA_INVALID
from tests.fixtures.dicom import storescu
from tests.reliability.checks import (
    INJECTED,
    count_instances,
    good_series_goes_through,
    send_raw,
    series_jobs,
    series_uid,
    sop_uid,
    wait_series_done,
)

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

REFUSED = {CANNOT_UNDERSTAND, DECODE_FAILED, DATASET_MISMATCH, PIXEL_DATA_INVALID}


@pytest.fixture
def node_factory(node_factory):
    """Every node here logs at DEBUG: the closing check reads all its lines for header values."""
    return functools.partial(node_factory, log_level="DEBUG")


def phantom(folder: Path, seed: int, slices: int = 6, size: int = 64, **spec) -> list[Path]:
    return write_phantom_series(
        folder / f"input-{seed}-{size}",
        PhantomSpec(slices=slices, size=size, seed=seed, series_description=f"Bad {seed}", **spec),
    )


def rewrite(paths: list[Path], change) -> list[Path]:
    """Apply ``change(dataset)`` to each file in place (pydicom writes what it is given)."""
    for path in paths:
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path, enforce_file_format=False)
    return paths


def failed_with(node, paths: list[Path], *words: str) -> None:
    """The series' job failed for good, and its error names the problem in words."""
    job = wait_series_done(node, series_uid(paths[0]), len(paths))
    assert job.state == JobState.FAILED, (job.state, job.last_error)
    assert job.attempts == 1, "bad input is not retried"
    for word in words:
        assert word in job.last_error, job.last_error
    assert "bad input" in job.last_error


def test_truncated_files(node_factory, tmp_path: Path, db_url: str) -> None:
    """A slice cut short is refused and nothing recorded; sent whole afterwards, it is denoised."""
    node = node_factory().start()
    whole = phantom(tmp_path, 1)
    in_pixels = []
    for path in whole:  # cut in the middle of the pixel data
        cut = tmp_path / "cut" / path.name
        cut.parent.mkdir(exist_ok=True)
        cut.write_bytes(path.read_bytes()[: path.stat().st_size - 3000])
        in_pixels.append(cut)
    in_header = phantom(tmp_path, 2, slices=2)
    for path in in_header:  # cut in the middle of the header
        path.write_bytes(path.read_bytes()[:700])

    assert send_raw(node.port, in_pixels) == [PIXEL_DATA_INVALID] * len(in_pixels)
    statuses = send_raw(node.port, in_header)
    assert all(status in REFUSED for status in statuses), statuses
    assert count_instances(node) == 0
    assert storescu(node.port, whole) == [0] * len(whole)
    job = wait_series_done(node, series_uid(whole[0]), len(whole))
    assert job.state == JobState.DONE, job.last_error
    good_series_goes_through(node, tmp_path)


#: case → change to every slice of a 6-slice series whose pixel data is then not whole
NOT_WHOLE = {
    "short-pixels": lambda ds: setattr(ds, "PixelData", b"\0" * 100),
    "two-frames-of-pixels": lambda ds: setattr(ds, "PixelData", ds.PixelData * 2),
    "no-rows": lambda ds: delattr(ds, "Rows"),
    "no-columns": lambda ds: delattr(ds, "Columns"),
    "huge-dimensions": lambda ds: (setattr(ds, "Rows", 65535), setattr(ds, "Columns", 65535)),
    "no-pixel-data": lambda ds: delattr(ds, "PixelData"),
}


def test_pixel_data_that_is_not_whole_is_refused(node_factory, tmp_path: Path, db_url: str) -> None:
    node = node_factory().start()
    for seed, (case, change) in enumerate(NOT_WHOLE.items(), start=100):
        paths = rewrite(phantom(tmp_path, seed), change)
        assert send_raw(node.port, paths) == [PIXEL_DATA_INVALID] * len(paths), case
    assert count_instances(node) == 0
    assert "C-STORE refused: PixelData has 100 bytes where the image attributes imply" in (
        node.log_text()
    )
    good_series_goes_through(node, tmp_path)


def test_encapsulated_pixel_data_missing_its_fragments_is_refused(
    node_factory, tmp_path: Path, db_url: str, compressed_copy
) -> None:
    node = node_factory().start()
    whole = compressed_copy(phantom(tmp_path, 3, slices=2), "rle")
    cut = []
    for path in whole:
        ds = pydicom.dcmread(path)
        ds.PixelData = ds.PixelData[:16]  # the offset table item and no fragment
        ds.save_as(tmp_path / f"cut-{path.name}", enforce_file_format=False)
        cut.append(tmp_path / f"cut-{path.name}")
    contexts = [(CTImageStorage, [RLELossless])]
    assert send_raw(node.port, cut, contexts=contexts) == [PIXEL_DATA_INVALID] * 2
    assert send_raw(node.port, whole, contexts=contexts) == [0] * 2
    assert count_instances(node) == 2
    good_series_goes_through(node, tmp_path)


#: case → (change to every slice of a 6-slice series, words the job's error must hold)
CANNOT_DENOISE = {
    "no-bits-stored": (lambda ds: delattr(ds, "BitsStored"), ["BitsStored"]),
    "zero-slope": (lambda ds: setattr(ds, "RescaleSlope", 0), ["rescale"]),
}


def test_series_that_cannot_be_denoised_fail_with_a_readable_error(
    node_factory, tmp_path: Path, db_url: str
) -> None:
    node = node_factory().start()
    sent = {}
    for seed, (case, (change, _)) in enumerate(CANNOT_DENOISE.items(), start=100):
        paths = rewrite(phantom(tmp_path, seed), change)
        assert send_raw(node.port, paths) == [0] * len(paths), case
        sent[case] = paths
    for case, paths in sent.items():
        words = CANNOT_DENOISE[case][1]
        failed_with(node, paths, f"instance {sop_uid(paths[0])}", *words)
    good_series_goes_through(node, tmp_path)


def test_missing_rescale_is_the_identity(node_factory, tmp_path: Path, db_url: str) -> None:
    """No RescaleSlope/Intercept: stored values are taken as HU (slope 1, intercept 0)."""
    node = node_factory().start()

    def drop(ds: pydicom.Dataset) -> None:
        del ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType

    paths = rewrite(phantom(tmp_path, 4), drop)
    assert storescu(node.port, paths) == [0] * len(paths)
    job = wait_series_done(node, series_uid(paths[0]), len(paths))
    assert job.state == JobState.DONE, job.last_error
    good_series_goes_through(node, tmp_path)


def test_mixed_image_sizes_in_one_series(node_factory, tmp_path: Path, db_url: str) -> None:
    node = node_factory().start()
    large = phantom(tmp_path, 5, slices=3, size=64)
    small = phantom(tmp_path, 5, slices=6, size=32)[3:]  # same UIDs for slices 4-6, other size
    paths = large + small
    assert len({series_uid(p) for p in paths}) == 1 and len({sop_uid(p) for p in paths}) == 6
    assert storescu(node.port, paths) == [0] * len(paths)
    failed_with(node, paths, "32 x 32", "64 x 64", "must match")
    good_series_goes_through(node, tmp_path)


def test_unsupported_transfer_syntax_and_sop_class_are_refused_at_negotiation(
    node_factory, tmp_path: Path, db_url: str
) -> None:
    node = node_factory().start()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, [ExplicitVRBigEndian, JPEGBaseline8Bit])
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)  # so the association opens and can be looked at
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DENOISE")
    assert assoc.is_established
    try:
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [Verification]
        refused = {cx.abstract_syntax for cx in assoc.rejected_contexts}
        assert refused == {CTImageStorage, MRImageStorage}
        mr = phantom(tmp_path, 6, slices=1)[0]
        ds = pydicom.dcmread(mr)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        with pytest.raises(ValueError, match="presentation context"):
            assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert count_instances(node) == 0
    good_series_goes_through(node, tmp_path)


def test_ct_objects_of_another_modality_are_skipped(
    node_factory, tmp_path: Path, db_url: str
) -> None:
    node = node_factory().start()
    paths = phantom(tmp_path, 7, modality="MR")
    assert storescu(node.port, paths) == [0] * len(paths)
    job = wait_series_done(node, series_uid(paths[0]), len(paths))
    assert job.state == JobState.SKIPPED and "Modality is MR, not CT" in job.reason
    good_series_goes_through(node, tmp_path)


BAD_UIDS = [
    INJECTED,
    "../../../../tmp/denoise-escape",
    "1.2.3.x",
    "1.2.03.4",
    "9" * 65,
    "/etc/passwd",
]


def test_invalid_and_path_traversal_uids_are_refused(
    node_factory, tmp_path: Path, db_url: str
) -> None:
    node = node_factory().start()
    (template,) = phantom(tmp_path, 8, slices=1)
    paths = []
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID"):
        for index, bad_uid in enumerate(BAD_UIDS):
            ds = pydicom.dcmread(template)
            setattr(ds, keyword, bad_uid)
            if keyword == "SOPInstanceUID":
                ds.file_meta.MediaStorageSOPInstanceUID = bad_uid[:64]
            path = tmp_path / f"bad-{keyword}-{index}.dcm"
            ds.save_as(path, enforce_file_format=False)
            paths.append(path)
    statuses = send_raw(node.port, paths)
    assert all(status in REFUSED for status in statuses), [hex(s or 0) for s in statuses]
    assert count_instances(node) == 0
    assert not Path("/tmp/denoise-escape").exists()
    spool = node.state_dir / "spool"
    stray = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(spool)]
    assert not [p for p in stray if "escape" in p.name or p.name == "passwd"]
    good_series_goes_through(node, tmp_path)


def test_same_sop_instance_uid_with_other_content_keeps_the_first(
    node_factory, tmp_path: Path, db_url: str
) -> None:
    node = node_factory().start()
    paths = phantom(tmp_path, 9)
    assert storescu(node.port, paths) == [0] * len(paths)
    first = wait_series_done(node, series_uid(paths[0]), len(paths))
    assert first.state == JobState.DONE, first.last_error
    (sha_before,) = [i.sha256 for i in node.queries.series_instances(first.series_instance_uid)][:1]

    other = tmp_path / "other.dcm"
    ds = pydicom.dcmread(paths[0])
    ds.PixelData = bytes(len(ds.PixelData))
    ds.save_as(other, enforce_file_format=True)
    assert storescu(node.port, [other]) == [0]  # success: the sender must not resend forever
    assert storescu(node.port, [paths[0]]) == [0]  # identical content: stored once
    instances = node.queries.series_instances(first.series_instance_uid)
    assert len(instances) == len(paths) and instances[0].sha256 == sha_before
    messages = [event.message for event in node.queries.job_events(first.id)]
    assert any("different content; first copy kept" in m for m in messages), messages
    assert "DIFFERENT content" in node.log_text()
    good_series_goes_through(node, tmp_path)
    assert len(series_jobs(node, first.series_instance_uid)) == 1, "a conflict is not a new job"


def test_hundreds_of_one_instance_series(node_factory, tmp_path: Path, db_url: str) -> None:
    count = 500
    node = node_factory().start()
    (template,) = phantom(tmp_path, 10, slices=1, size=16)
    folder = tmp_path / "tiny"
    folder.mkdir()
    ds = pydicom.dcmread(template)
    paths = []
    for index in range(count):
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=["tiny-series", str(index)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
            entropy_srcs=["tiny-instance", str(index)]
        )
        path = folder / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    assert send_raw(node.port, paths, calling_ae="SCANNER") == [0] * count
    jobs = node.wait_jobs_final(count, timeout=300)
    assert len(jobs) == count
    assert all(job.state == JobState.SKIPPED and "only 1 slices" in job.reason for job in jobs)
    good_series_goes_through(node, tmp_path)
