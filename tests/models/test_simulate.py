"""The low-dose simulation obeys CT noise physics and leaves untouchable pixels alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from models import metrics
from models.data import load_series
from models.simulate import (
    calibrate,
    default_noise_filter,
    simulate_low_dose,
    write_low_dose_series,
)

SIZE = 256
PHOTONS = 2e5


def _phantom(size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Water disc with fat, bone and contrast inserts; -2048 outside the scan circle."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32) - (size - 1) / 2
    r = np.hypot(yy, xx)
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    hu[r < size * 0.42] = 20.0
    for (cy, cx), value in {(-0.2, 0.0): -100.0, (0.2, 0.0): 400.0, (0.0, -0.22): 60.0}.items():
        hu[np.hypot(yy - cy * size, xx - cx * size) < size * 0.05] = value
    hu[r > size * 0.49] = -2048.0
    return hu, hu <= -1500


def _uniform_rois(size: int = SIZE) -> list[tuple[slice, slice]]:
    c, half, off = size // 2, size // 16, int(size * 0.2)
    centres = [(c, c + off), (c + off // 2, c - off // 2), (c - off // 2, c - off // 2 - 8)]
    return [(slice(y - half, y + half), slice(x - half, x + half)) for y, x in centres]


def test_noise_doubles_at_quarter_dose_and_mean_is_kept() -> None:
    clean, keep = _phantom()
    rng = np.random.default_rng(0)
    # A "full-dose scan" of PHOTONS: from a noiseless image, the extra noise at 50 % dose of
    # PHOTONS has variance (1/0.5 - 1)/PHOTONS = that of a PHOTONS scan.
    full_std, low_std, shifts = [], [], []
    for _ in range(3):
        full = simulate_low_dose(clean, keep, 0.5, PHOTONS, rng)
        low = simulate_low_dose(full, keep, 0.25, PHOTONS, rng)
        for roi in _uniform_rois():
            full_std.append(full[roi].std())
            low_std.append(low[roi].std())
            shifts.append(low[roi].mean() - full[roi].mean())
            assert abs(full[roi].mean() - 20.0) < 2.0
        assert np.array_equal(low[keep], clean[keep])  # outside the FOV: bit for bit
    ratio = np.sqrt(np.mean(np.square(low_std)) / np.mean(np.square(full_std)))
    assert 2.0 * 0.85 < ratio < 2.0 * 1.15, ratio
    assert abs(np.mean(shifts)) < 2.0, shifts
    assert np.mean(full_std) > 3.0  # the phantom really is noisy


def test_a_calibration_reproduces_the_series_own_noise_at_every_use() -> None:
    """The photons are calibrated on a 16 cm phantom, smaller than the 20 cm water path they
    are quoted for: a simulation that ignored how they were calibrated adds half the
    variance it should (the evaluation once did)."""
    clean, keep = _phantom()
    rng = np.random.default_rng(4)
    scans = np.stack([simulate_low_dose(clean, keep, 0.5, PHOTONS, rng) for _ in range(3)])
    keeps = np.stack([keep] * 3)
    cal = calibrate(scans, keeps, pixel_mm=0.75)
    full_var, added_var = [], []
    for scan in scans:
        added = cal.simulate(scan, keep, 0.25, rng, 0.75) - scan
        for roi in _uniform_rois():
            full_var.append(scan[roi].var())
            added_var.append(added[roi].var())
    ratio = np.sqrt(np.mean(added_var) / np.mean(full_var))
    assert np.sqrt(3.0) * 0.85 < ratio < np.sqrt(3.0) * 1.15, ratio


def test_a_calibration_reproduces_a_smooth_kernels_noise_texture() -> None:
    """The "scanner" reconstructs with a smooth kernel (Hann cubed): the calibrated filter
    must put the injected noise's NPS peak within 15 % of the scanner's own."""
    clean, keep = _phantom()
    rng = np.random.default_rng(4)
    smooth = default_noise_filter() ** 3
    scans = [
        simulate_low_dose(clean, keep, 0.5, PHOTONS, rng, noise_filter=smooth) for _ in range(3)
    ]
    cal = calibrate(np.stack(scans), np.stack([keep] * 3), pixel_mm=0.75)
    c = SIZE // 2
    corners = [(y, x) for y in range(c - 64, c + 64, 32) for x in range(c - 64, c + 64, 32)]
    native, injected, uncalibrated = [], [], []
    for scan in scans:
        added = cal.simulate(scan, keep, 0.25, rng, 0.75) - scan
        plain = simulate_low_dose(scan, keep, 0.25, PHOTONS, rng) - scan  # the default filter
        for y, x in corners:
            native.append((scan - clean)[y : y + 32, x : x + 32])
            injected.append(added[y : y + 32, x : x + 32])
            uncalibrated.append(plain[y : y + 32, x : x + 32])
    peaks = []
    for tiles in (native, injected, uncalibrated):
        freqs, nps = metrics.radial_nps(metrics.nps_2d(np.array(tiles, np.float64), 0.75), 0.75)
        peaks.append(metrics.nps_peak_frequency(freqs, nps))
    assert peaks[1] == pytest.approx(peaks[0], rel=0.15), peaks
    assert peaks[2] > 1.4 * peaks[0], peaks  # without the calibration it would be far off


def test_full_dose_is_identity_and_dose_is_checked() -> None:
    clean, keep = _phantom(64)
    rng = np.random.default_rng(1)
    assert np.array_equal(simulate_low_dose(clean, keep, 1.0, PHOTONS, rng), clean)
    with pytest.raises(ValueError):
        simulate_low_dose(clean, keep, 0.0, PHOTONS, rng)


def test_odd_sizes_keep_shape_and_outside_pixels() -> None:
    clean, keep = _phantom(96)
    clean, keep = clean[:95, :91], keep[:95, :91]
    out = simulate_low_dose(clean, keep, 0.25, PHOTONS, np.random.default_rng(2))
    assert out.shape == clean.shape and out.dtype == np.float32
    assert np.array_equal(out[keep], clean[keep])
    assert np.abs(out - clean)[~keep].max() > 0


def _write_series(folder: Path, n: int = 3, size: int = 128) -> list[Path]:
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    hu, _ = _phantom(size)
    rng = np.random.default_rng(3)
    paths = []
    for i in range(n):
        noisy = np.where(hu > -1500, hu + rng.normal(0, 12, hu.shape), hu)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{i}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.ImageType = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesDescription = "Test abdomen"
        ds.PatientID, ds.PatientName = "PHANTOM", "Phantom^Test"
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(10 - 3 * i)]  # written head to feet
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 3.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.rint(noisy).astype(np.int16).tobytes()
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_write_low_dose_series_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DENOISE_NODE_CACHE_DIR", str(tmp_path / "cache"))
    src = _write_series(tmp_path / "src")
    written = write_low_dose_series(tmp_path / "src", tmp_path / "dst", dose=0.25, seed=0)
    assert len(written) == len(src)
    originals = load_series(tmp_path / "src")
    copies = load_series(tmp_path / "dst")
    before = [pydicom.dcmread(p) for p in originals.paths]
    after = [pydicom.dcmread(p) for p in copies.paths]
    assert {d.StudyInstanceUID for d in after} == {before[0].StudyInstanceUID}
    assert len({d.SeriesInstanceUID for d in after}) == 1
    assert after[0].SeriesInstanceUID != before[0].SeriesInstanceUID
    assert not {d.SOPInstanceUID for d in after} & {d.SOPInstanceUID for d in before}
    for d in after:
        assert d.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID
        assert d.SeriesDescription == "Test abdomen [simulated 25% dose]"
        assert list(d.ImageType)[0] == "ORIGINAL"
    assert np.array_equal(copies.keep, originals.keep)
    assert np.array_equal(copies.hu[copies.keep], originals.hu[originals.keep])
    body = ~originals.keep & (originals.hu > -500)
    assert copies.hu[body].std() > originals.hu[body].std()  # noisier
    assert abs(copies.hu[body].mean() - originals.hu[body].mean()) < 3.0
    # deterministic: the same call gives the same UIDs and pixels (from the cache)
    again = write_low_dose_series(tmp_path / "src", tmp_path / "dst2", dose=0.25, seed=0)
    for a, b in zip(written, again, strict=True):
        da, db = pydicom.dcmread(a), pydicom.dcmread(b)
        assert da.SOPInstanceUID == db.SOPInstanceUID
        assert da.PixelData == db.PixelData
