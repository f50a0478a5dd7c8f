"""A generated CT phantom series: the demo's fallback input and the tests' data.

A water cylinder with inserts (bone, fat, contrast, a low-contrast disc), air inside
the field of view and -2048 HU padding outside it, with Gaussian noise of a chosen
size, written as ordinary single-frame CT Image Storage files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

OUTSIDE_FOV = -2048.0


@dataclass(frozen=True)
class PhantomSpec:
    """What to generate; every UID is derived from ``seed`` so a spec is reproducible."""

    slices: int = 12
    size: int = 128
    noise_hu: float = 40.0
    seed: int = 0
    signed: bool = True
    pixel_spacing_mm: float = 0.8
    slice_thickness_mm: float = 3.0
    patient_name: str = "PHANTOM^CT"
    patient_id: str = "PHANTOM-0001"
    study_uid: str | None = None
    series_description: str = "Phantom low dose"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    modality: str = "CT"


def phantom_hu(size: int) -> np.ndarray:
    """The noiseless phantom slice in HU (float32)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2.0
    r = np.hypot(x - c, y - c) / (size / 2.0)
    image = np.full((size, size), OUTSIDE_FOV, dtype=np.float32)
    image[r <= 0.98] = -1000.0
    image[r <= 0.80] = 0.0

    def disc(cx: float, cy: float, radius: float, value: float) -> None:
        mask = np.hypot(x - (c + cx * size), y - (c + cy * size)) <= radius * size
        image[mask] = value

    disc(-0.22, 0.0, 0.08, 800.0)  # bone: the bright edge
    disc(0.22, 0.0, 0.08, -100.0)  # fat
    disc(0.0, -0.22, 0.08, 120.0)  # contrast
    disc(0.0, 0.25, 0.05, 15.0)  # low contrast
    return image


def uniform_roi(size: int) -> tuple[slice, slice]:
    """A region of uniform water at the centre, clear of every insert, to measure noise."""
    c = size // 2
    half = max(2, size // 16)
    return slice(c - half, c + half), slice(c - half, c + half)


def write_phantom_series(folder: Path, spec: PhantomSpec = PhantomSpec()) -> list[Path]:
    """Write the series to ``folder`` as ``0001.dcm``...; returns the paths in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    base = phantom_hu(spec.size)
    fov = base > OUTSIDE_FOV
    study_uid = spec.study_uid or generate_uid(entropy_srcs=["study", str(spec.seed)])
    series_uid = generate_uid(entropy_srcs=["series", str(spec.seed), spec.series_description])
    frame_uid = generate_uid(entropy_srcs=["frame", study_uid])
    intercept = 0.0 if spec.signed else -1024.0
    paths = []
    for index in range(spec.slices):
        hu = base + np.where(fov, rng.normal(0.0, spec.noise_hu, base.shape), 0.0)
        stored = np.rint(hu - intercept)
        stored = np.clip(stored, -32768 if spec.signed else 0, 32767 if spec.signed else 65535)
        pixels = stored.astype(np.int16 if spec.signed else np.uint16)
        sop_uid = generate_uid(entropy_srcs=[series_uid, str(index)])
        ds = _slice_dataset(spec, study_uid, series_uid, frame_uid, sop_uid, index, intercept)
        ds.PixelData = pixels.tobytes()
        path = folder / f"{index + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _slice_dataset(
    spec: PhantomSpec,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    sop_uid: str,
    index: int,
    intercept: float,
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(spec.image_type)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "120000"
    ds.AccessionNumber = "PH0001"
    ds.Modality = spec.modality
    ds.Manufacturer = "ct-denoise-node phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Phantom study"
    ds.SeriesDescription = spec.series_description
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.PatientPosition = "HFS"
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    z = -index * spec.slice_thickness_mm
    offset = -spec.size * spec.pixel_spacing_mm / 2
    ds.ImagePositionPatient = [offset, offset, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = z
    ds.SliceThickness = spec.slice_thickness_mm
    ds.PixelSpacing = [spec.pixel_spacing_mm, spec.pixel_spacing_mm]
    ds.KVP = 120
    ds.ConvolutionKernel = "STANDARD"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = spec.size
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if spec.signed else 0
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    return ds
