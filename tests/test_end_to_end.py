"""The backbone end to end: storescu (scanner) → node process → Orthanc (PACS).

Everything is real: DCMTK's storescu over 127.0.0.1, the node as a `denoise-node serve`
process, Orthanc from the Debian package, and the job table on SQLite and PostgreSQL.
A tiny mean-filter ONNX model stands in for the CNN so that the test measures the node.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest

from devtools.node_process import NodeProcess
from devtools.onnx_models import write_mean_filter_model
from devtools.orthanc import OrthancServer
from devtools.phantom import PhantomSpec, phantom_hu, uniform_roi, write_phantom_series
from node.jobs import JobState
from tests.fixtures.dicom import storescu


def pacs(orthanc: OrthancServer) -> dict:
    return {"pacs": {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}}


def derived_datasets(orthanc: OrthancServer, series_uid: str) -> list[pydicom.Dataset]:
    records = orthanc.series_instances(series_uid)
    datasets = [
        pydicom.dcmread(io.BytesIO(orthanc.instance_file(record["ID"]))) for record in records
    ]
    return sorted(datasets, key=lambda ds: int(ds.InstanceNumber))


def bone_edge_position(image_hu: np.ndarray) -> float:
    """Sub-pixel column where the bone insert's left edge crosses 400 HU (half its step).

    Averaged over the seven middle rows; the search starts inside the water cylinder so
    the air/water edge is not found.
    """
    size = image_hu.shape[1]
    start = size // 2 - int(0.35 * size)
    middle = image_hu.shape[0] // 2
    profile = image_hu[middle - 3 : middle + 4, start : size // 2].mean(axis=0)
    index = int(np.argmax(profile >= 400.0))
    low, high = profile[index - 1], profile[index]
    return start + index - 1 + (400.0 - low) / (high - low)


def test_scanner_series_comes_back_denoised_in_the_pacs(
    node_factory, orthanc: OrthancServer, phantom_series: list[Path]
) -> None:
    node: NodeProcess = node_factory(destinations=pacs(orthanc)).start()
    assert storescu(node.port, phantom_series) == [0] * len(phantom_series)

    (job,) = node.wait_jobs_final(1)
    assert job.state == JobState.DONE, job.last_error
    assert job.instance_count == len(phantom_series)
    derived = derived_datasets(orthanc, job.output_series_uid)
    assert len(derived) == len(phantom_series)

    sources = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(path) for path in phantom_series)}
    for ds in derived:
        source = sources[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.ImagePositionPatient == source.ImagePositionPatient
        assert ds.PatientID == source.PatientID
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.SeriesNumber == source.SeriesNumber + 1000
        assert ds.SeriesDescription == source.SeriesDescription + " [denoised]"
        assert ds.DerivationCodeSequence[0].CodeValue == "113087"
        purpose = ds.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0]
        assert purpose.CodeValue == "121322"
        equipment = ds.ContributingEquipmentSequence[0]
        assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"

    rows, cols = uniform_roi(PhantomSpec().size)
    middle = derived[len(derived) // 2]
    source = sources[middle.SourceImageSequence[0].ReferencedSOPInstanceUID]
    before, after = source.pixel_array.astype(float), middle.pixel_array.astype(float)
    assert after[rows, cols].std() < 0.6 * before[rows, cols].std()
    assert abs(after[rows, cols].mean() - before[rows, cols].mean()) < 5
    noiseless_edge = bone_edge_position(phantom_hu(PhantomSpec().size))
    assert abs(bone_edge_position(after) - noiseless_edge) <= 1.0
    outside = before == -2048
    assert outside.any() and (after[outside] == -2048).all()

    # The job's noise figure and each slice's own, as a viewer shows it in the PACS.
    figure = job.noise
    assert figure is not None and job.noise_slices == len(phantom_series)
    assert figure.before_hu > 20 and figure.drop > 0.3, job.noise_report
    comment = re.compile(r"^denoised: noise (\d+) -> (\d+) HU in flat soft tissue \((\d+)% less\)$")
    drops = []
    for ds in derived:
        match = comment.match(ds.ImageComments)
        assert match, ds.ImageComments
        drops.append(int(match.group(3)))
    assert abs(float(np.median(drops)) - 100 * figure.drop) <= 5, (drops, figure)


def test_compressed_input_is_received_and_denoised(
    node_factory, orthanc: OrthancServer, phantom_series: list[Path], compressed_copy
) -> None:
    node = node_factory(destinations=pacs(orthanc)).start()
    jpeg_ls = compressed_copy(phantom_series, "jpeg-ls")
    assert pydicom.dcmread(jpeg_ls[0]).file_meta.TransferSyntaxUID.is_compressed
    assert storescu(node.port, jpeg_ls) == [0] * len(jpeg_ls)
    (job,) = node.wait_jobs_final(1)
    assert job.state == JobState.DONE, job.last_error
    assert len(orthanc.series_instances(job.output_series_uid)) == len(jpeg_ls)


def test_non_matching_series_is_skipped_and_own_output_is_never_processed_again(
    node_factory, orthanc: OrthancServer, phantom_series: list[Path], tmp_path: Path
) -> None:
    node = node_factory(destinations=pacs(orthanc)).start()
    short = write_phantom_series(
        tmp_path / "short", PhantomSpec(slices=3, seed=7, series_description="Short")
    )
    assert storescu(node.port, short) == [0] * len(short)
    assert storescu(node.port, phantom_series) == [0] * len(phantom_series)
    jobs = {job.series_instance_uid: job for job in node.wait_jobs_final(2)}
    skipped = jobs[pydicom.dcmread(short[0]).SeriesInstanceUID]
    assert skipped.state == JobState.SKIPPED and "min_slices" in skipped.reason
    done = jobs[pydicom.dcmread(phantom_series[0]).SeriesInstanceUID]
    assert done.state == JobState.DONE, done.last_error

    # The PACS routes the derived series back to the node: it must not be denoised again.
    routed_back = tmp_path / "routed-back"
    routed_back.mkdir()
    for index, record in enumerate(orthanc.series_instances(done.output_series_uid)):
        (routed_back / f"{index:04d}.dcm").write_bytes(orthanc.instance_file(record["ID"]))
    routed = sorted(routed_back.iterdir())
    assert storescu(node.port, routed) == [0] * len(routed)
    jobs = {job.series_instance_uid: job for job in node.wait_jobs_final(3)}
    again = jobs[done.output_series_uid]
    assert again.state == JobState.SKIPPED
    assert "DERIVED" in again.reason or "ct-denoise-node" in again.reason


@pytest.mark.parametrize("patient_name", ["DOE^JANE^SECRETNAME"])
def test_logs_carry_no_patient_data(
    node_factory, orthanc: OrthancServer, tmp_path: Path, patient_name: str
) -> None:
    spec = PhantomSpec(slices=6, patient_name=patient_name, patient_id="PID-7734-SECRET", seed=3)
    series = write_phantom_series(tmp_path / "named", spec)
    node = node_factory(destinations=pacs(orthanc), log_level="DEBUG").start()
    assert storescu(node.port, series) == [0] * len(series)
    (job,) = node.wait_jobs_final(1)
    assert job.state == JobState.DONE, job.last_error
    node.stop()
    text = node.log_text()
    assert job.series_instance_uid in text
    for secret in ("SECRETNAME", "PID-7734-SECRET", "19700101"):
        assert secret not in text


def test_a_series_resampled_to_the_model_s_grain_reaches_the_pacs_saying_so(
    node_factory, orthanc: OrthancServer, tmp_path: Path
) -> None:
    """A model with a noise grain: the white-noise phantom goes through it enlarged, and the
    derived series in the PACS says by how much, keeps the untouchable pixels and is less
    noisy, all over real sockets."""
    model = write_mean_filter_model(tmp_path / "grained.onnx", metadata={"noise_grain": "0.205"})
    paths = write_phantom_series(tmp_path / "white", PhantomSpec(slices=6, size=256, seed=7))
    node = node_factory(destinations=pacs(orthanc), model_path=str(model)).start()
    assert storescu(node.port, paths) == [0] * len(paths)

    (job,) = node.wait_jobs_final(1)
    assert job.state == JobState.DONE, job.last_error
    derived = derived_datasets(orthanc, job.output_series_uid)
    assert len(derived) == len(paths)
    factors = {re.search(r"resampled x([0-9.]+)", ds.DerivationDescription) for ds in derived}
    assert None not in factors
    (factor,) = {float(match.group(1)) for match in factors if match}
    assert 1.3 <= factor <= 2.0
    rows, cols = uniform_roi(256)
    source = pydicom.dcmread(paths[3])
    (middle,) = [
        d
        for d in derived
        if d.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    ]
    before, after = source.pixel_array.astype(float), middle.pixel_array.astype(float)
    assert after[rows, cols].std() < 0.6 * before[rows, cols].std()
    outside = before == -2048
    assert outside.any() and (after[outside] == -2048).all()
