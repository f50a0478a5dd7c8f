"""The derived instance: what it keeps, what it says it is, what it must not claim."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from node.derive import DerivationSpec, derive_instance, derived_series_uid, derived_sop_uid
from node.noise import NoiseFigure

SPEC = DerivationSpec(
    model_name="ct-denoise",
    model_version="1.2.0",
    strength=0.75,
    series_number_offset=1000,
    description_suffix=" [denoised]",
    node_ae_title="DENOISE",
)
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@pytest.fixture
def source(phantom_series: list[Path]) -> Dataset:
    return pydicom.dcmread(phantom_series[0])


def derive(source: Dataset, spec: DerivationSpec = SPEC) -> Dataset:
    return derive_instance(source, source.pixel_array, spec)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"strength": 1.5}, "strength"),
        ({"strength": float("nan")}, "strength"),
        ({"model_name": " "}, "model_name"),
        ({"model_version": ""}, "model_version"),
        ({"description_suffix": "  "}, "description_suffix"),
        ({"series_number_offset": -1}, "series_number_offset"),
        ({"node_ae_title": "A\\B"}, "AE title"),
    ],
)
def test_spec_is_validated_early(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(SPEC, **change)


def test_uids_are_deterministic_and_depend_on_model_version_and_strength() -> None:
    """UIDs follow the pixels: same source, model and strength, same UID; any change, a new one."""
    series, sop = "1.2.3.4", "1.2.3.4.5"
    assert derived_series_uid(series, SPEC) == derived_series_uid(series, SPEC)
    assert derived_sop_uid(sop, SPEC) == derived_sop_uid(sop, SPEC)
    same = replace(SPEC, series_number_offset=7, description_suffix=" [dn]", node_ae_title="X")
    assert derived_sop_uid(sop, same) == derived_sop_uid(sop, SPEC), "labels do not change pixels"
    others = [
        replace(SPEC, strength=0.5),
        replace(SPEC, model_version="1.3.0"),
        replace(SPEC, model_name="other-model"),
    ]
    for other in others:
        assert derived_series_uid(series, other) != derived_series_uid(series, SPEC)
        assert derived_sop_uid(sop, other) != derived_sop_uid(sop, SPEC)
    assert derived_sop_uid("1.2.3.4.6", SPEC) != derived_sop_uid(sop, SPEC)
    assert derived_series_uid(series, SPEC) != derived_sop_uid(series, SPEC)
    for uid in (derived_series_uid(series, SPEC), derived_sop_uid(sop, SPEC)):
        assert len(uid) <= 64 and UID_PATTERN.match(uid)


def test_another_reception_of_the_source_series_gets_new_derived_uids() -> None:
    """A resend after ``jobs forget`` may carry other pixels under the same source UIDs:
    its derived UIDs differ; the same reception (a retry) keeps them."""
    series, sop = "1.2.3.4", "1.2.3.4.5"
    first = replace(SPEC, source_generation="2026-12-07T06:00:00.000001")
    assert derived_series_uid(series, first) == derived_series_uid(series, first)
    assert derived_sop_uid(sop, first) == derived_sop_uid(sop, first)
    again = replace(first, source_generation="2026-12-07T07:00:00.000002")
    assert derived_series_uid(series, again) != derived_series_uid(series, first)
    assert derived_sop_uid(sop, again) != derived_sop_uid(sop, first)


def test_keeps_patient_study_frame_of_reference_and_geometry(source: Dataset) -> None:
    derived = derive(source)
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyID",
        "AccessionNumber",
        "FrameOfReferenceUID",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "SliceLocation",
        "Rows",
        "Columns",
        "RescaleSlope",
        "RescaleIntercept",
        "InstanceNumber",
        "KVP",
        "ConvolutionKernel",
    ):
        assert derived[keyword].value == source[keyword].value, keyword


def test_says_what_it_is(source: Dataset) -> None:
    derived = derive(source)
    assert derived.SOPClassUID == CTImageStorage
    assert derived.SOPInstanceUID == derived_sop_uid(source.SOPInstanceUID, SPEC)
    assert derived.SeriesInstanceUID == derived_series_uid(source.SeriesInstanceUID, SPEC)
    assert derived.SeriesNumber == source.SeriesNumber + 1000
    assert derived.SeriesDescription == source.SeriesDescription + " [denoised]"
    assert list(derived.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    for text in ("ct-denoise", "1.2.0", "0.75"):
        assert text in derived.DerivationDescription
    (code,) = derived.DerivationCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("113087", "DCM")
    (reference,) = derived.SourceImageSequence
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    (purpose,) = reference.PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("121322", "DCM")
    (equipment,) = derived.ContributingEquipmentSequence
    assert equipment.ManufacturerModelName == "ct-denoise-node"
    assert "ct-denoise 1.2.0" in equipment.SoftwareVersions
    assert "0.75" in equipment.ContributionDescription
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert equipment.ContributionDateTime
    assert derived.InstanceCreationDate and derived.ContentDate
    assert "ReferencedSeriesSequence" not in derived  # not part of the CT Image IOD


def test_description_is_capped_and_keeps_the_suffix(source: Dataset) -> None:
    source.SeriesDescription = "X" * 64
    description = derive(source).SeriesDescription
    assert len(description) == 64 and description.endswith(" [denoised]")


def test_drops_what_would_lie_about_the_new_pixels(source: Dataset) -> None:
    source.LargestImagePixelValue = 4000
    source.SmallestImagePixelValue = 0
    icon = Dataset()
    icon.Rows = icon.Columns = 8
    source.IconImageSequence = Sequence([icon])
    source.add_new(0x00291010, "OB", b"vendor secret")
    source.ImageComments = "original reconstruction"
    derived = derive(source)
    for keyword in (
        "LargestImagePixelValue",
        "SmallestImagePixelValue",
        "IconImageSequence",
        "ImageComments",
    ):
        assert keyword not in derived
    assert not any(element.tag.is_private for element in derived)


def test_the_noise_comment_is_what_a_viewer_shows(source: Dataset) -> None:
    comment = NoiseFigure(before_hu=21.0, after_hu=10.0, support=4000).comment()
    derived = derive_instance(source, source.pixel_array, SPEC, comment=comment)
    assert derived.ImageComments == "denoised: noise 21 -> 10 HU in flat soft tissue (52% less)"
    assert "ImageComments" not in derive(source), "no comment given, none written"


def test_lossy_history_is_kept(source: Dataset) -> None:
    assert "LossyImageCompression" not in derive(source)
    source.LossyImageCompression = "00"
    assert derive(source).LossyImageCompression == "00"
    source.LossyImageCompression = "01"
    source.LossyImageCompressionMethod = "ISO_10918_1"
    derived = derive(source)
    assert derived.LossyImageCompression == "01"
    assert derived.LossyImageCompressionMethod == "ISO_10918_1"
    del source.LossyImageCompression
    source.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.91"  # JPEG 2000, maybe lossy
    assert derive(source).LossyImageCompression == "01"


def test_writes_explicit_vr_little_endian_with_the_given_pixels(
    source: Dataset, tmp_path: Path
) -> None:
    pixels = (source.pixel_array // 2).astype(source.pixel_array.dtype)
    path = tmp_path / "derived.dcm"
    derive_instance(source, pixels, SPEC).save_as(path, enforce_file_format=True)
    written = pydicom.dcmread(path)
    assert written.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert written.file_meta.MediaStorageSOPInstanceUID == written.SOPInstanceUID
    np.testing.assert_array_equal(written.pixel_array, pixels)


def test_refuses_pixels_of_another_shape(source: Dataset) -> None:
    with pytest.raises(ValueError, match="shape"):
        derive_instance(source, source.pixel_array[:10], SPEC)


def dciodvfy_errors(path: Path) -> set[str]:
    """The error lines dciodvfy prints for ``path``."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return {line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")}


def _assert_no_new_dciodvfy_errors(source_path: Path, tmp_path: Path) -> None:
    source = pydicom.dcmread(source_path)
    derived_path = tmp_path / "derived.dcm"
    comment = NoiseFigure(before_hu=21.0, after_hu=10.0, support=4000).comment()
    derived = derive_instance(source, source.pixel_array, SPEC, comment=comment)
    derived.save_as(derived_path, enforce_file_format=True)
    new = dciodvfy_errors(derived_path) - dciodvfy_errors(source_path)
    assert not new, f"dciodvfy errors not on the source: {sorted(new)}"


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) missing")
def test_dciodvfy_finds_no_new_error_on_the_phantom(
    phantom_series: list[Path], tmp_path: Path
) -> None:
    _assert_no_new_dciodvfy_errors(phantom_series[0], tmp_path)


@pytest.mark.shared_data
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) missing")
@pytest.mark.parametrize(
    "series", ["abdomen-toshiba-aquilion", "chest-siemens-sensation64", "neck-philips-brilliance16"]
)
def test_dciodvfy_finds_no_new_error_on_real_ct(
    shared_ct: Path, series: str, tmp_path: Path
) -> None:
    _assert_no_new_dciodvfy_errors(sorted((shared_ct / series).glob("*.dcm"))[0], tmp_path)
