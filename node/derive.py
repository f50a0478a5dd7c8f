"""The derived (denoised) CT instance, built explicitly from its source, highdicom style.

What the new instance keeps is listed module by module
(``node.derive_attributes.COPIED_ATTRIBUTES``): patient, study,
frame of reference, equipment, acquisition, geometry and CT acquisition parameters
are those of the source; everything else (private tags, icons, overlays, pixel
statistics, the source's identity) is left behind, so nothing in the header lies about
the new pixels.  What it adds says what it is: ``DERIVED\\SECONDARY\\AXIAL``, a
derivation description and code, a reference to each source slice, and the node as
contributing processing equipment.  A frame of an Enhanced CT instance becomes a
single-frame CT instance too (``frame_view``), referencing its frame by number.

Where the strength is recorded: the CT Image IOD has no Algorithm Identification
Sequence (it belongs to Segmentation and similar IODs), and a private tag would be
invisible to most viewers.  So model name, version and strength are written in
standard text a viewer shows: DerivationDescription, and the node's
ContributingEquipmentSequence item (SoftwareVersions lists the node and the model,
ContributionDescription states the model and the strength).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

import node
from node.derive_attributes import COPIED_ATTRIBUTES

MANUFACTURER = "ct-denoise-node project"
MODEL_NAME = "ct-denoise-node"
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root, as generate_uid uses by default
LO_MAX = 64
ST_MAX = 1024
LT_MAX = 10240

#: Transfer syntaxes whose decoded pixels are exactly what the scanner produced.
_LOSSLESS = {
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    UID("1.2.840.10008.1.2.5"),  # RLE Lossless
    UID("1.2.840.10008.1.2.4.57"),  # JPEG Lossless
    UID("1.2.840.10008.1.2.4.70"),  # JPEG Lossless SV1
    UID("1.2.840.10008.1.2.4.80"),  # JPEG-LS Lossless
    UID("1.2.840.10008.1.2.4.90"),  # JPEG 2000 Lossless
    UID("1.2.840.10008.1.2.4.201"),  # HTJ2K Lossless
    UID("1.2.840.10008.1.2.4.202"),  # HTJ2K Lossless RPCL
}
_LOSSY_METHOD = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",
}


@dataclass(frozen=True)
class DerivationSpec:
    """Everything about a derived series that is not in its source."""

    model_name: str
    model_version: str
    strength: float
    series_number_offset: int
    description_suffix: str
    node_ae_title: str
    software_version: str = node.__version__
    #: which reception of the source series this is (when its first instance arrived, as
    #: the job table has it; empty offline and for a series first received before the job
    #: table kept it): ``jobs forget`` ends a reception, so the scanner's corrected resend,
    #: with the same source UIDs, gets new derived UIDs
    source_generation: str = ""
    #: the series' slices went through the model resampled by this factor (``node.grain``):
    #: a measure of the whole series, so it is part of the derived UIDs
    grain_zoom: float = 1.0

    def __post_init__(self) -> None:
        if not self.model_name.strip():
            raise ValueError("model_name must not be empty: it names the model in the header")
        if not self.model_version.strip():
            raise ValueError("model_version must not be empty: it is part of the output UIDs")
        if not (isinstance(self.strength, int | float) and math.isfinite(self.strength)):
            raise ValueError(f"strength must be a number, not {self.strength!r}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, not {self.strength}")
        if not 0.1 <= self.grain_zoom <= 10:
            raise ValueError(f"grain_zoom {self.grain_zoom!r} is not a resampling factor")
        if not 0 <= self.series_number_offset < 2**31 - 1:
            raise ValueError(f"series_number_offset {self.series_number_offset} is out of range")
        if not self.description_suffix.strip():
            raise ValueError(
                "description_suffix must not be blank: the derived series must be "
                "recognisable as denoised in every viewer"
            )
        if len(self.description_suffix) >= LO_MAX:
            raise ValueError(f"description_suffix must be shorter than {LO_MAX} characters")
        if not 0 < len(self.node_ae_title.strip()) <= 16 or "\\" in self.node_ae_title:
            raise ValueError(f"node_ae_title {self.node_ae_title!r} is not a valid AE title")

    @property
    def _entropy(self) -> list[str]:
        generation = [f"received {self.source_generation}"] if self.source_generation else []
        zoom = [f"grain zoom {self.grain_zoom:.2f}"] if self.grain_zoom != 1.0 else []
        return [self.model_name, self.model_version, repr(float(self.strength)), *generation, *zoom]

    @property
    def description(self) -> str:
        """What a radiologist reads: which model, which version, how strong."""
        return (
            f"Denoised by {self.model_name} version {self.model_version} at strength "
            f"{self.strength:g} (output = original + {self.strength:g} x (model - original))"
            + (
                f", slices resampled x{self.grain_zoom:.2f} to the model's noise grain"
                if self.grain_zoom != 1.0
                else ""
            )
            + f"; {MODEL_NAME} {self.software_version}"
        )


def derived_series_uid(source_series_uid: str, spec: DerivationSpec) -> str:
    """The derived series' UID: the same source, model version, strength and reception of
    the source series give the same UID.

    UIDs follow the pixels: a derived UID is made from everything its pixels depend on, so
    the same UID never carries different pixels.  A slice's output depends on that slice,
    the model (name and version), the strength and the series' noise grain (the resampling
    factor ``DerivationSpec.grain_zoom``, measured on the series; 1, and then left out, for
    a model without a grain); the reception (``DerivationSpec.source_generation``) tells a
    source slice apart from its corrected copy under the same UID, sent again after
    ``jobs forget``.  Whatever else comes to reach the pixels (neighbouring slices) must be
    added to ``DerivationSpec._entropy`` or to the names below.
    """
    return generate_uid(UID_PREFIX, ["series", source_series_uid, *spec._entropy])


def derived_sop_uid(source_sop_uid: str, spec: DerivationSpec, frame: int | None = None) -> str:
    """A derived instance's UID: a resend is the same object, not a duplicate.

    The same rule as ``derived_series_uid``: source slice (and its reception), model,
    strength and grain zoom, nothing more, because nothing more reaches the slice's pixels.

    ``frame`` (1-based) tells the slices derived from one multi-frame instance apart.
    """
    frame_entropy = [] if frame is None else [f"frame {frame}"]
    return generate_uid(UID_PREFIX, ["instance", source_sop_uid, *frame_entropy, *spec._entropy])


def frame_view(source: Dataset, frame: int) -> Dataset:
    """Frame ``frame`` (1-based) of an Enhanced CT instance as single-frame CT attributes.

    The shared, then the frame's own functional groups are lifted to the top level
    (pixel measures, plane position and orientation, rescale, window, X-ray details),
    which is where a single-frame CT header holds them.  No pixel data.
    """
    frames = int(source.get("NumberOfFrames") or 1)
    per_frame = source.get("PerFrameFunctionalGroupsSequence") or []
    if not 1 <= frame <= frames or len(per_frame) != frames:
        raise ValueError(
            f"frame {frame} of {frames} with {len(per_frame)} per-frame functional groups"
        )
    view = Dataset()
    view.file_meta = getattr(source, "file_meta", FileMetaDataset())
    skipped = {"PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence", "PixelData"}
    for element in source:
        if element.keyword not in skipped and element.keyword != "NumberOfFrames":
            view.add(element)
    for groups in (*source.get("SharedFunctionalGroupsSequence", []), per_frame[frame - 1]):
        for macro in groups:
            if macro.VR == "SQ" and len(macro.value) == 1:
                for element in macro.value[0]:
                    view.add(element)
    view.add_new("InstanceNumber", "IS", frame)  # a new element: the source keeps its own
    return view


def derive_instance(
    source: Dataset,
    pixels: np.ndarray,
    spec: DerivationSpec,
    now: datetime | None = None,
    frame: int | None = None,
    comment: str | None = None,
) -> Dataset:
    """The denoised single-frame CT instance of ``source`` with stored values ``pixels``.

    ``source`` is a single-frame CT instance, or ``frame_view(enhanced, frame)`` of one
    frame of an Enhanced CT instance with ``frame`` its number, which the derived
    instance then references.  ``pixels`` has the source's stored dtype and shape
    (Rows, Columns).  ``now`` is the instance creation time (default: now, local).
    ``comment`` becomes ImageComments (the slice's noise figure), which every viewer shows.
    """
    rows, columns = int(source.Rows), int(source.Columns)
    if pixels.shape != (rows, columns):
        raise ValueError(f"pixels have shape {pixels.shape}, the source is {rows} x {columns}")
    if int(source.get("NumberOfFrames") or 1) != 1:
        raise ValueError("pass one frame of a multi-frame source: frame_view(source, frame)")
    now = now or datetime.now()
    sop_uid = derived_sop_uid(source.SOPInstanceUID, spec, frame)

    ds = Dataset()
    _copy_source_attributes(source, ds)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.ContentDate = ds.InstanceCreationDate
    ds.ContentTime = ds.InstanceCreationTime
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SeriesInstanceUID = derived_series_uid(source.SeriesInstanceUID, spec)
    ds.SeriesNumber = int(source.get("SeriesNumber") or 0) + spec.series_number_offset
    ds.SeriesDescription = _with_suffix(str(source.get("SeriesDescription", "")), spec)
    ds.DerivationDescription = spec.description[:ST_MAX]
    if comment:
        ds.ImageComments = comment[:LT_MAX]
    ds.DerivationCodeSequence = Sequence([_code_item(codes.DCM.Smoothing)])
    ds.SourceImageSequence = Sequence([_source_reference(source, frame)])
    ds.ContributingEquipmentSequence = Sequence(
        [
            *copy.deepcopy(source.get("ContributingEquipmentSequence", [])),
            _node_equipment(spec, now),
        ]
    )
    _set_lossy_compression(source, ds)
    ds.PixelData = np.ascontiguousarray(pixels, pixels.dtype.newbyteorder("<")).tobytes()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"CTDN_{spec.software_version}"[:16]
    ds.file_meta = meta
    return ds


def _copy_source_attributes(source: Dataset, target: Dataset) -> None:
    """Patient, study, series, geometry and acquisition attributes, as the source has them."""
    for keywords in COPIED_ATTRIBUTES.values():
        for keyword in keywords:
            if keyword in source:
                target.add(copy.copy(source[keyword]))  # setting a value never reaches back


def _with_suffix(description: str, spec: DerivationSpec) -> str:
    """The source description with the suffix, cut so the suffix always fits in 64."""
    return description[: LO_MAX - len(spec.description_suffix)] + spec.description_suffix


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _source_reference(source: Dataset, frame: int | None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame
    item.PurposeOfReferenceCodeSequence = Sequence(
        [_code_item(codes.DCM.SourceImageForImageProcessingOperation)]
    )
    return item


def _node_equipment(spec: DerivationSpec, now: datetime) -> Dataset:
    item = Dataset()
    item.Manufacturer = MANUFACTURER
    item.ManufacturerModelName = MODEL_NAME
    item.StationName = spec.node_ae_title.strip()
    item.SoftwareVersions = [
        f"{MODEL_NAME} {spec.software_version}"[:LO_MAX],
        f"{spec.model_name} {spec.model_version}"[:LO_MAX],
    ]
    item.PurposeOfReferenceCodeSequence = Sequence([_code_item(codes.DCM.ProcessingEquipment)])
    item.ContributionDateTime = now.strftime("%Y%m%d%H%M%S")
    item.ContributionDescription = spec.description[:ST_MAX]
    return item


def _set_lossy_compression(source: Dataset, target: Dataset) -> None:
    """Once lossy, always lossy: a denoised copy of lossy pixels says so too."""
    meta = getattr(source, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if source.get("LossyImageCompression") == "01":
        target.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in source:
                target.add(copy.copy(source[keyword]))  # setting a value never reaches back
    elif syntax is not None and UID(syntax) not in _LOSSLESS:
        target.LossyImageCompression = "01"
        if syntax in _LOSSY_METHOD:
            target.LossyImageCompressionMethod = _LOSSY_METHOD[syntax]
    elif "LossyImageCompression" in source:
        target.LossyImageCompression = "00"
