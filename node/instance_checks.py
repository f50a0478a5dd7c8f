"""What a received instance must be before it is acknowledged, and what the node reads from it.

A data set is refused (with a failure status and a short comment for the sender) when
it cannot be parsed, its UIDs are not UIDs or disagree with the request, or its pixel
data is not whole: native PixelData must have the length its Rows, Columns,
BitsAllocated, SamplesPerPixel and NumberOfFrames imply, encapsulated PixelData an item
per fragment up to its delimiter, at least one per frame.  The pixel data itself is never
read into memory: only its length and item headers.
"""

from __future__ import annotations

import logging
import math
import re
import struct
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID

from node.rules import NODE_EQUIPMENT

log = logging.getLogger(__name__)

DATASET_MISMATCH = 0xA900  # Error: data set does not match the request's SOP class/instance
CANNOT_UNDERSTAND = 0xC000  # Error: missing or invalid UIDs
DECODE_FAILED = 0xC210  # Error: the data set cannot be parsed
PIXEL_DATA_INVALID = 0xC212  # Error: PixelData is not whole for the image it describes

#: DICOM's CS value representation: upper-case letters, digits, space and underscore.
CODE_STRING = re.compile(r"[A-Z0-9 _]{0,16}(\\[A-Z0-9 _]{0,16})*")
ITEM = 0xFFFEE000
SEQUENCE_DELIMITER = 0xFFFEE0DD

#: A received data set: a DICOM file on disk, or a DICOM file's bytes in memory (C-STORE).
Source = Path | bytes


class Refused(Exception):
    """An instance cannot be accepted; carries the status and a short comment for the peer,
    and its (SOP class, SOP instance) UIDs once they were found valid (STOW-RS lists them)."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment
        self.uids: tuple[str, str] | None = None


def selection_header(ds: Dataset) -> dict[str, Any]:
    """What the settler's rules and the worker need from a header: no patient identity."""
    header: dict[str, Any] = {
        "SOPClassUID": _text(ds.get("SOPClassUID")),
        "Modality": _code_string(ds.get("Modality")),
        "ImageType": [_code_string(v) or "" for v in _values(ds.get("ImageType"))],
        "SeriesDescription": _text(ds.get("SeriesDescription")),
        "ConvolutionKernel": _text(
            _functional(ds, "CTReconstructionSequence", "ConvolutionKernel")
        ),
        "SliceThickness": _number(_functional(ds, "PixelMeasuresSequence", "SliceThickness")),
        "CTDIvol": _number(_functional(ds, "CTExposureSequence", "CTDIvol")),
        "Rows": _integer(ds.get("Rows")),
        "Columns": _integer(ds.get("Columns")),
        "InstanceNumber": _integer(ds.get("InstanceNumber")),
        "ImagePositionPatientZ": _position_z(ds),
        "NumberOfFrames": _integer(ds.get("NumberOfFrames")) or 1,
        "NodeOutput": made_by_node(ds),
    }
    return {key: value for key, value in header.items() if value is not None}


def made_by_node(ds: Dataset) -> bool:
    """True when this node's equipment or derivation is named in the header."""
    equipment = ds.get("ContributingEquipmentSequence") or []
    names = [
        _text(item.get(keyword)) or ""
        for item in equipment
        for keyword in ("Manufacturer", "ManufacturerModelName")
    ]
    names.append(_text(ds.get("DerivationDescription")) or "")
    return any(NODE_EQUIPMENT in name for name in names)


@dataclass(frozen=True)
class Inspected:
    """What the node keeps of an instance that passed every check."""

    uids: dict[str, str]
    header: dict[str, Any]
    transfer_syntax_uid: str


def inspect(path: Path, request: tuple[str, str] | None, extra: dict[str, Any]) -> Inspected:
    """Parse the header once and check UIDs and pixel data, or Refused.

    ``request`` is the C-STORE's (SOP class, SOP instance); None takes them from the
    file meta, which the receiver wrote from the request (a file already in the spool).
    ``extra`` gains the instance's SOP and series UIDs for the log.
    """
    ds, header = read_header(path, extra)
    meta = ds.file_meta
    if request is None:
        request = (
            str(meta.get("MediaStorageSOPClassUID", "")),
            str(meta.get("MediaStorageSOPInstanceUID", "")),
        )
    uids = checked_uids(ds, request, extra)
    extra.update(sop_uid=uids["SOPInstanceUID"], series_uid=uids["SeriesInstanceUID"])
    check_pixel_data(ds, path, extra)
    return Inspected(uids, header, str(meta.get("TransferSyntaxUID", "")))


def read_header(source: Source, extra: dict[str, Any]) -> tuple[Dataset, dict[str, Any]]:
    """The data set (large values left unread) and its selection header, or Refused."""
    try:
        with _opened(source) as handle:
            ds = dcmread(handle, defer_size="64 KB")
        # pydicom parses lazily: touch what we need so a broken data set fails here.
        for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
            ds.get(keyword)
        return ds, selection_header(ds)
    except Exception as exc:
        # The exception's text may quote a header value: only its kind is logged.
        log.warning(
            "%s refused: cannot decode the data set (%s)",
            service(extra),
            exc.__class__.__name__,
            extra=extra,
        )
        raise Refused(DECODE_FAILED, "data set cannot be decoded") from exc


def checked_uids(
    ds: Dataset, request: tuple[str, str] | None, extra: dict[str, Any]
) -> dict[str, str]:
    """The four UIDs, valid and agreeing with the request's (SOP class, instance) where
    the transport names them (C-STORE does, STOW-RS does not), or Refused."""
    uids = {}
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        value = str(ds.get(keyword) or "")
        if not valid_uid(value):
            log.warning(
                "%s refused: %s %s is missing or not a valid UID",
                service(extra),
                keyword,
                shown_uid(value),
                extra=extra,
            )
            raise Refused(CANNOT_UNDERSTAND, f"invalid or missing {keyword}")
        uids[keyword] = value
    if request is None:
        return uids
    request_class, request_instance = request
    if uids["SOPInstanceUID"] != request_instance:
        log.warning(
            "%s refused: SOPInstanceUID differs from the request's", service(extra), extra=extra
        )
        raise Refused(DATASET_MISMATCH, "SOPInstanceUID differs from the request")
    if uids["SOPClassUID"] != request_class:
        log.warning(
            "%s refused: SOPClassUID differs from the request's", service(extra), extra=extra
        )
        raise Refused(DATASET_MISMATCH, "SOPClassUID differs from the request")
    return uids


def valid_uid(value: str) -> bool:
    """A DICOM UID: dotted digits without leading zeros, at most 64 characters."""
    return 0 < len(value) <= 64 and UID(value).is_valid


def check_pixel_data(ds: Dataset, source: Source, extra: dict[str, Any]) -> None:
    """Refused unless the pixel data is whole for the image the header describes."""
    try:
        problem = _pixel_data_problem(ds, source)
    except Exception as exc:
        problem = f"PixelData cannot be checked ({exc.__class__.__name__})"
    if problem is not None:
        log.warning("%s refused: %s", service(extra), problem, extra=extra)
        raise Refused(PIXEL_DATA_INVALID, "PixelData is not whole for its Rows, Columns, frames")


def _pixel_data_problem(ds: Dataset, source: Source) -> str | None:
    if "PixelData" not in ds:
        return "the data set has no PixelData"
    # keep_deferred: a value larger than read_header's defer size stays on disk, unread.
    element = ds.get_item("PixelData", keep_deferred=True)
    if not isinstance(element, RawDataElement):
        return "PixelData was decoded before its length could be checked"
    frames = _integer(ds.get("NumberOfFrames")) or 1
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    if syntax.is_encapsulated:
        return _fragments_problem(source, int(element.value_tell), frames)
    sizes = [_integer(ds.get(k)) for k in ("Rows", "Columns", "BitsAllocated")]
    samples = _integer(ds.get("SamplesPerPixel")) or 1
    if any(size is None or size <= 0 for size in sizes) or frames <= 0 or samples <= 0:
        return "Rows, Columns or BitsAllocated is missing or not positive"
    rows, columns, bits = (int(size or 0) for size in sizes)
    expected = (rows * columns * samples * frames * bits + 7) // 8
    length = int(element.length)
    if length not in (expected, expected + expected % 2):
        return f"PixelData has {length} bytes where the image attributes imply {expected}"
    if not syntax.is_deflated and element.value_tell + length > _size(source):
        return f"PixelData has {length} bytes but the data set ends before them"
    return None


def _fragments_problem(source: Source, offset: int, frames: int) -> str | None:
    """Walk the item headers (offset table, then fragments) up to the sequence delimiter."""
    size = _size(source)
    items = 0
    with _opened(source) as handle:
        handle.seek(offset)
        while True:
            head = handle.read(8)
            if len(head) < 8:
                return "encapsulated PixelData ends before its sequence delimiter"
            group, element, length = struct.unpack("<HHL", head)
            tag = group << 16 | element
            if tag == SEQUENCE_DELIMITER:
                break
            if tag != ITEM or handle.tell() + length > size:
                return f"encapsulated PixelData has a damaged item after {items} items"
            handle.seek(length, 1)
            items += 1
    fragments = items - 1  # the first item is the Basic Offset Table
    if fragments < frames:
        return f"encapsulated PixelData has {fragments} fragments for {frames} frame(s)"
    return None


def _opened(source: Source) -> BinaryIO:
    return BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115


def _size(source: Source) -> int:
    return len(source) if isinstance(source, bytes) else source.stat().st_size


def service(extra: dict[str, Any]) -> str:
    """What brought the instance, for log lines: ``C-STORE`` unless ``extra`` says."""
    return str(extra.get("service", "C-STORE"))


def shown_uid(value: object) -> str:
    """A received UID made safe to log: an invalid one may hold anything, a name included."""
    text = str(value or "")
    return text if valid_uid(text) else f"({len(text)} characters, not a UID)"


def shown(value: object) -> str:
    """A received value made safe to log: printable, bounded."""
    return repr(str(value or ""))[1:-1][:80]


def _functional(ds: Dataset, sequence: str, keyword: str) -> Any:
    """A top-level value, else Enhanced CT's shared, else first per-frame functional group."""
    if keyword in ds:
        return ds.get(keyword)
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in (ds.get(groups) or [])[:1]:
            for item in (group.get(sequence) or [])[:1]:
                if keyword in item:
                    return item.get(keyword)
    return None


def _position_z(ds: Dataset) -> float | None:
    position = _functional(ds, "PlanePositionSequence", "ImagePositionPatient")
    values = _values(position)
    return _number(values[2]) if len(values) == 3 else None


def _values(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def _text(value: Any) -> str | None:
    values = _values(value)
    return "\\".join(str(v) for v in values) if values else None


def _code_string(value: Any) -> str | None:
    """A CS value as received, or a placeholder: the rules quote these in job reasons and
    the log, so an invalid one (a name sent as a Modality) is not kept."""
    text = _text(value)
    if text is None or CODE_STRING.fullmatch(text):
        return text
    return "(not a code string)"


def _number(value: Any) -> float | None:
    values = _values(value)
    try:
        number = float(values[0]) if values else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None


def _integer(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None else None
