"""A C-STORE's data set, received in memory, made the bytes of a DICOM file.

pynetdicom gathers each C-STORE's data set in memory (its default: the node's listener
bounds how large one may grow, ``max_instance_mb``); the receiver hashes, checks and
writes those bytes once into the spool.  The file meta information is encoded here
directly (explicit VR little endian, as PS3.10 requires): the same elements and values
pynetdicom's ``create_file_meta`` gives, without building and encoding a pydicom data
set for every instance.
"""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

PREAMBLE = b"\x00" * 128 + b"DICM"
_UID_LIMIT = 64


def file_bytes(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, dataset: bytes
) -> bytes:
    """Preamble, file meta information and ``dataset`` (as encoded by the sender).

    The UIDs come from the C-STORE request and are not checked yet: each is written as
    ASCII of at most 64 characters, so a malformed one can neither break the encoding
    nor pass the checks that compare the data set with the request.
    """
    elements = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", _uid(sop_class_uid)),
            _element(0x0003, b"UI", _uid(sop_instance_uid)),
            _element(0x0010, b"UI", _uid(transfer_syntax)),
            _element(0x0012, b"UI", _uid(PYNETDICOM_IMPLEMENTATION_UID)),
            _element(0x0013, b"SH", _text(PYNETDICOM_IMPLEMENTATION_VERSION)),
        )
    )
    group_length = _element(0x0000, b"UL", struct.pack("<L", len(elements)))
    return b"".join((PREAMBLE, group_length, elements, dataset))


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group-0002 element in explicit VR little endian (of the group's VRs, OB has
    2 reserved bytes and a 4-byte length; UI, UL and SH a 2-byte length)."""
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _uid(value: str) -> bytes:
    encoded = str(value).encode("ascii", "replace")[:_UID_LIMIT]
    return encoded + b"\x00" * (len(encoded) % 2)


def _text(value: str) -> bytes:
    encoded = str(value).encode("ascii", "replace")[:16]
    return encoded + b" " * (len(encoded) % 2)
