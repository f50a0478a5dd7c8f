"""The series pipeline shared by the worker and ``denoise-node denoise``: pixels and stages."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, generate_uid

from devtools.phantom import PhantomSpec, phantom_hu, uniform_roi, write_phantom_series
from node.config import Settings
from node.denoise import Denoiser
from node.derive import DerivationSpec, derived_series_uid
from node.noise import NOT_MEASURABLE
from node.pipeline import BadInput, SeriesResult, denoise_folder, denoise_series
from tests.fixtures.dicom import CompressedCopy
from tests.fixtures.onnx_models import ScriptedDenoiser
from tests.test_derive import dciodvfy_errors

PROVIDERS = ["CPUExecutionProvider"]


def spec_for(denoiser: Denoiser | ScriptedDenoiser, strength: float = 1.0) -> DerivationSpec:
    return DerivationSpec(denoiser.name, denoiser.version, strength, 1000, " [denoised]", "DENOISE")


def run(
    sources: list[Path], denoiser: Denoiser | ScriptedDenoiser, strength: float = 1.0
) -> tuple[SeriesResult, list[Dataset]]:
    """Denoise into memory; returns the result and the derived datasets in source order."""
    out: dict[int, Dataset] = {}

    def write(index: int, ds: Dataset) -> None:
        out[index] = ds

    result = denoise_series(sources, write, denoiser, spec_for(denoiser, strength))  # type: ignore[arg-type]
    return result, [out[i] for i in sorted(out)]


def stored(datasets: list[Dataset]) -> np.ndarray:
    return np.stack(
        [np.frombuffer(ds.PixelData, ds.pixel_array.dtype).reshape(ds.Rows, -1) for ds in datasets]
    )


def source_stored(paths: list[Path]) -> np.ndarray:
    return np.stack([pydicom.dcmread(p).pixel_array for p in paths])


def rescaled_series(folder: Path, slope: float, intercept: float, signed: bool) -> list[Path]:
    """The phantom re-encoded with another RescaleSlope/Intercept (and pixel sign)."""
    paths = write_phantom_series(folder, PhantomSpec(slices=4, size=64, signed=signed))
    low, high = (-32768, 32767) if signed else (0, 65535)
    for path in paths:
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        values = np.clip(np.rint((hu - intercept) / slope), low, high)
        ds.PixelData = values.astype(np.int16 if signed else np.uint16).tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.save_as(path, enforce_file_format=True)
    return paths


def test_noise_is_lower_and_the_bone_edge_stays(
    phantom_series: list[Path], tiny_model: Path
) -> None:
    result, derived = run(phantom_series, Denoiser(tiny_model, PROVIDERS))
    assert result.slices == len(derived) == len(phantom_series)
    before = source_stored(phantom_series).astype(np.float32)
    after = stored(derived).astype(np.float32)
    roi = (slice(None), *uniform_roi(128))
    assert after[roi].std() < 0.6 * before[roi].std()
    # the bone disc's left edge (half-way between water and bone) stays where it was
    row = 64
    truth = phantom_hu(128)[row]
    edge = int(np.argmax(truth > 400))
    for image in (before.mean(axis=0)[row], after.mean(axis=0)[row]):
        assert abs(int(np.argmax(image[: edge + 10] > 400)) - edge) <= 1
    assert result.read_seconds > 0 and result.infer_seconds > 0 and result.write_seconds > 0
    assert result.source_series_uid == pydicom.dcmread(phantom_series[0]).SeriesInstanceUID
    assert result.series_uid == derived[0].SeriesInstanceUID
    assert [source for _, source in result.instances] == [
        pydicom.dcmread(p).SOPInstanceUID for p in phantom_series
    ]


@pytest.mark.parametrize(
    "slope,intercept,signed",
    [(1.0, 0.0, True), (1.0, -1024.0, False), (0.5, -1024.0, False), (2.0, -3.0, True)],
)
def test_strength_zero_returns_the_input_exactly(
    tmp_path: Path, tiny_model: Path, slope: float, intercept: float, signed: bool
) -> None:
    paths = rescaled_series(tmp_path / "series", slope, intercept, signed)
    _, derived = run(paths, Denoiser(tiny_model, PROVIDERS), strength=0.0)
    np.testing.assert_array_equal(stored(derived), source_stored(paths))


@pytest.mark.parametrize("slope,intercept,signed", [(1.0, -1024.0, False), (0.5, -1024.0, False)])
def test_hu_conversion_is_right_for_any_rescale(
    tmp_path: Path, slope: float, intercept: float, signed: bool
) -> None:
    """A model that adds 10 HU moves stored values by 10 / slope, whatever the encoding."""
    paths = rescaled_series(tmp_path / "series", slope, intercept, signed)
    _, derived = run(paths, ScriptedDenoiser(offset=10.0))
    source = source_stored(paths).astype(np.int64)
    fov = source * slope + intercept > -1500
    np.testing.assert_array_equal((stored(derived) - source)[fov], round(10 / slope))


def test_outside_field_of_view_passes_through_bit_identical(
    phantom_series: list[Path],
) -> None:
    _, derived = run(phantom_series, ScriptedDenoiser(offset=300.0))
    source, result = source_stored(phantom_series), stored(derived)
    outside = source == -2048
    assert outside.any()
    np.testing.assert_array_equal(result[outside], source[outside])
    assert (result[~outside] != source[~outside]).all()


def test_pixel_padding_value_passes_through_bit_identical(tmp_path: Path) -> None:
    paths = write_phantom_series(tmp_path / "s", PhantomSpec(slices=2, size=64, signed=False))
    for path in paths:  # unsigned: outside the FOV is stored 0 (-1024 HU), marked as padding
        ds = pydicom.dcmread(path)
        ds.add_new(0x00280120, "US", 0)  # PixelPaddingValue
        ds.save_as(path, enforce_file_format=True)
    _, derived = run(paths, ScriptedDenoiser(offset=-200.0))
    source, result = source_stored(paths), stored(derived)
    np.testing.assert_array_equal(result[source == 0], 0)
    assert (result[source != 0] != source[source != 0]).all()


@pytest.mark.parametrize("signed,high", [(True, 2047), (False, 4095)])
def test_values_are_clipped_to_bits_stored(tmp_path: Path, signed: bool, high: int) -> None:
    paths = rescaled_series(tmp_path / "s", 1.0, 0.0 if signed else -1024.0, signed)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.BitsStored, ds.HighBit = 12, 11
        if signed:
            ds.PixelData = np.clip(ds.pixel_array, -2048, 2047).astype(np.int16).tobytes()
        ds.save_as(path, enforce_file_format=True)
    _, derived = run(paths, ScriptedDenoiser(offset=8000.0))
    result = stored(derived)
    assert result.max() == high
    assert int(derived[0].BitsStored) == 12


@pytest.mark.parametrize(
    "kind", ["rle", "jpeg-ls", "jpeg-lossless", "jpeg-lossless-sv1", "j2k", "implicit", "deflated"]
)
def test_any_lossless_encoding_gives_the_same_series(
    phantom_series: list[Path], compressed_copy: CompressedCopy, tiny_model: Path, kind: str
) -> None:
    denoiser = Denoiser(tiny_model, PROVIDERS)
    _, plain = run(phantom_series[:3], denoiser)
    _, compressed = run(compressed_copy(phantom_series[:3], kind), denoiser)
    np.testing.assert_array_equal(stored(compressed), stored(plain))
    assert [d.SOPInstanceUID for d in compressed] == [d.SOPInstanceUID for d in plain]
    assert compressed[0].get("LossyImageCompression") != "01"
    assert compressed[0].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"


def test_lossy_input_is_marked_lossy(
    phantom_series: list[Path], compressed_copy: CompressedCopy
) -> None:
    _, derived = run(compressed_copy(phantom_series[:1], "j2k-lossy"), ScriptedDenoiser())
    assert derived[0].LossyImageCompression == "01"


def _break(path: Path, change: str) -> None:
    ds = pydicom.dcmread(path)
    if change == "truncated":
        ds.PixelData = ds.PixelData[:1000]
    elif change == "size":
        ds.PixelData = ds.pixel_array[:64, :64].tobytes()
        ds.Rows = ds.Columns = 64
    elif change == "modality":
        ds.Modality = "MR"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    elif change == "frames":
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2
    elif change == "no-rows":
        del ds.Rows
    ds.save_as(path, enforce_file_format=True)


def write_enhanced_ct(paths: list[Path], target: Path) -> Path:
    """The single-frame series ``paths`` as one Enhanced CT instance (a scanner's multi-frame)."""
    slices = [pydicom.dcmread(p) for p in paths]
    ds = slices[0].copy()
    lifted = {
        "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness"),
        "PlaneOrientationSequence": ("ImageOrientationPatient",),
        "PixelValueTransformationSequence": ("RescaleIntercept", "RescaleSlope", "RescaleType"),
        "FrameVOILUTSequence": ("WindowCenter", "WindowWidth"),
        "CTXRayDetailsSequence": ("KVP",),
    }
    shared = Dataset()
    for sequence, keywords in lifted.items():
        item = Dataset()
        for keyword in keywords:
            item[keyword] = ds[keyword]
            del ds[keyword]
        setattr(shared, sequence, Sequence([item]))
    per_frame = []
    for index, single in enumerate(slices, start=1):
        position, content, groups = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = single.ImagePositionPatient
        content.FrameAcquisitionNumber = index
        groups.PlanePositionSequence = Sequence([position])
        groups.FrameContentSequence = Sequence([content])
        per_frame.append(groups)
    for keyword in ("ImagePositionPatient", "SliceLocation", "ConvolutionKernel"):
        del ds[keyword]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = len(slices)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = b"".join(s.PixelData for s in slices)
    ds.save_as(target, enforce_file_format=True)
    return target


def test_enhanced_ct_becomes_single_frame_slices_referencing_their_frames(
    phantom_series: list[Path], tiny_model: Path, tmp_path: Path
) -> None:
    enhanced = write_enhanced_ct(phantom_series[:5], tmp_path / "enhanced.dcm")
    denoiser = Denoiser(tiny_model, PROVIDERS)
    _, from_frames = run([enhanced], denoiser)
    _, from_slices = run(phantom_series[:5], denoiser)
    np.testing.assert_array_equal(stored(from_frames), stored(from_slices))
    enhanced_uid = pydicom.dcmread(enhanced, stop_before_pixels=True).SOPInstanceUID
    for number, (derived, single) in enumerate(zip(from_frames, from_slices, strict=True), 1):
        assert derived.SOPClassUID == CTImageStorage
        (reference,) = derived.SourceImageSequence
        assert reference.ReferencedSOPClassUID == EnhancedCTImageStorage
        assert reference.ReferencedSOPInstanceUID == enhanced_uid
        assert reference.ReferencedFrameNumber == number
        assert derived.InstanceNumber == number
        for keyword in ("ImagePositionPatient", "PixelSpacing", "RescaleIntercept", "KVP"):
            assert derived[keyword].value == single[keyword].value, keyword
    assert len({d.SOPInstanceUID for d in from_frames}) == 5


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) missing")
def test_slices_from_enhanced_ct_are_valid_ct_images(
    phantom_series: list[Path], tmp_path: Path
) -> None:
    enhanced = write_enhanced_ct(phantom_series[:2], tmp_path / "enhanced.dcm")
    _, derived = run([enhanced], ScriptedDenoiser())
    derived[1].save_as(tmp_path / "derived.dcm", enforce_file_format=True)
    new = dciodvfy_errors(tmp_path / "derived.dcm") - dciodvfy_errors(phantom_series[1])
    assert not new, f"dciodvfy errors a single-frame source does not have: {sorted(new)}"


@pytest.mark.parametrize(
    "change,message",
    [
        ("truncated", "cannot be decoded"),
        ("size", "all slices of a series must match"),
        ("modality", "not a CT image"),
        ("frames", "CT Image Storage with 2 frames"),
        ("no-rows", "no Rows"),
    ],
)
def test_a_bad_slice_is_bad_input_naming_the_instance_not_the_patient(
    phantom_series: list[Path], change: str, message: str
) -> None:
    bad = pydicom.dcmread(phantom_series[5])
    _break(phantom_series[5], change)
    with pytest.raises(BadInput, match=message) as info:
        run(phantom_series, ScriptedDenoiser())
    assert bad.SOPInstanceUID in str(info.value)
    assert str(bad.PatientName) not in str(info.value) and bad.PatientID not in str(info.value)


def test_an_error_in_a_callback_stops_at_the_slice_boundary(phantom_series: list[Path]) -> None:
    written: list[int] = []

    def progress(done: int, total: int) -> None:
        if done == 5:
            raise KeyError("stop here")

    denoiser = ScriptedDenoiser()
    with pytest.raises(KeyError, match="stop here"):
        denoise_series(
            phantom_series, lambda i, ds: written.append(i), denoiser, spec_for(denoiser), progress
        )  # type: ignore[arg-type]
    assert written == [0, 1, 2, 3, 4]


def test_writing_overlaps_inference(tmp_path: Path) -> None:
    """The first batch is written while the model works on the second, not after it.

    An ordering, not a speed: each scripted inference call sleeps, and the writes of the
    first batch must all happen before the third call starts (the pace itself is
    measured by ``bench.inference``).
    """
    paths = write_phantom_series(tmp_path / "s", PhantomSpec(slices=12, size=256))
    starts: dict[int, float] = {}
    written: dict[int, float] = {}
    denoiser = ScriptedDenoiser(
        batch_size=4, delay=0.5, hook=lambda call: starts.setdefault(call, time.monotonic())
    )

    def write(index: int, ds: Dataset) -> None:
        written[index] = time.monotonic()

    result = denoise_series(paths, write, denoiser, spec_for(denoiser))  # type: ignore[arg-type]
    assert result.slices == 12 and denoiser.calls == 3
    assert max(written[i] for i in range(4)) < starts[3], result.summary()


def test_denoise_folder_writes_each_series(tmp_path: Path, tiny_model: Path) -> None:
    source = tmp_path / "in"
    write_phantom_series(source / "a", PhantomSpec(slices=3, size=64, seed=1))
    write_phantom_series(source / "b", PhantomSpec(slices=2, size=64, seed=2))
    (source / "README.txt").write_text("not DICOM")
    settings = Settings(model_path=tiny_model, providers=PROVIDERS, state_dir=tmp_path / "state")
    results = denoise_folder(source, tmp_path / "out", settings)
    assert sorted(r.slices for r in results) == [2, 3]
    for result in results:
        files = sorted((tmp_path / "out" / result.series_uid).glob("*.dcm"))
        assert [f.name for f in files] == [f"{i:04d}.dcm" for i in range(1, result.slices + 1)]
        assert pydicom.dcmread(files[0]).SeriesInstanceUID == result.series_uid

    (single,) = denoise_folder(source / "a", tmp_path / "one", settings)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "0001.dcm",
        "0002.dcm",
        "0003.dcm",
    ]
    assert single.series_uid == derived_series_uid(
        single.source_series_uid, spec_for(Denoiser(tiny_model, PROVIDERS))
    )


@pytest.mark.shared_data
def test_real_ct_outside_field_of_view_is_unchanged(shared_ct: Path, tiny_model: Path) -> None:
    paths = sorted((shared_ct / "abdomen-toshiba-aquilion").glob("*.dcm"))[20:23]
    _, derived = run(paths, Denoiser(tiny_model, PROVIDERS))
    source, result = source_stored(paths), stored(derived)
    outside = source == -2048
    assert outside.any() and "PixelPaddingValue" not in pydicom.dcmread(paths[0])
    np.testing.assert_array_equal(result[outside], source[outside])
    assert (result[~outside] != source[~outside]).any()


def test_each_slice_carries_its_own_noise_figure_in_image_comments(
    phantom_series: list[Path], tiny_model: Path
) -> None:
    result, derived = run(phantom_series, Denoiser(tiny_model, PROVIDERS))
    assert len(result.noise_slices) == len(derived)
    for figure, ds in zip(result.noise_slices, derived, strict=True):
        assert figure is not None, "the phantom's water is flat soft tissue"
        assert ds.ImageComments == figure.comment()
        assert ds.ImageComments.startswith("denoised: noise ")
        assert figure.after_hu < figure.before_hu
    series = result.noise
    assert series is not None and series.support == len(derived) and series.drop > 0.2


def test_a_slice_without_flat_soft_tissue_says_not_measurable(
    tmp_path: Path, tiny_model: Path
) -> None:
    paths = write_phantom_series(tmp_path / "air", PhantomSpec(slices=2, size=64))
    for path in paths:
        ds = pydicom.dcmread(path)
        air = np.rint((-1000.0 - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))
        ds.PixelData = np.full((ds.Rows, ds.Columns), air, ds.pixel_array.dtype).tobytes()
        ds.save_as(path, enforce_file_format=True)
    result, derived = run(paths, Denoiser(tiny_model, PROVIDERS))
    assert result.noise_slices == [None, None] and result.noise is None
    assert {ds.ImageComments for ds in derived} == {NOT_MEASURABLE}
