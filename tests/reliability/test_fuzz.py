"""Fuzzing the receiver: over 1,000 mutated instances, and the node neither falls nor loses.

Hypothesis mutates a valid phantom instance at the byte level of its encoded data set
(element values, VRs, length fields, pixel bytes, random byte flips) and at the
meaning level (odd values for the attributes the node reads).  pynetdicom sends each
file byte for byte to a running node process, a batch per association, with a valid
instance every tenth: those must all be stored.  After the batches the node must
answer C-ECHO, every instance answered with success must be in the job table and the
spool, whole, and no file may have appeared outside the spool.  ``derandomize`` keeps
CI reproducible.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import dcmwrite
from pydicom.uid import generate_uid
from sqlalchemy import select

from devtools.node_process import echo
from devtools.phantom import PhantomSpec, write_phantom_series
from node.jobs.tables import Instance
from node.receiver import HANDLER_FAILED
from node.spool import TMP_SUFFIX
from tests.reliability.checks import (
    INJECTED,
    assert_in_spool,
    assert_no_header_values_logged,
    count_instances,
    send_raw,
)

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

BATCHES = 10
MUTATED_PER_BATCH = 105
VALID_EVERY = 10
#: VRs whose explicit-VR header has 2 reserved bytes and a 4-byte length
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
ODD_TEXT = [
    "",
    "0",
    "-1",
    "65535",
    "1e309",
    "NaN",
    "a\\b\\c",
    "DERIVED",
    "../..",
    "\x00\xff",
    INJECTED,
]
ODD_KEYWORDS = [
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "SamplesPerPixel",
    "RescaleSlope",
    "RescaleIntercept",
    "ImageType",
    "Modality",
    "InstanceNumber",
    "ImagePositionPatient",
    "SliceThickness",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "SpecificCharacterSet",
    "PixelPaddingValue",
]


def files_in_cwd() -> list[Path]:
    """The working folder's entries, less hypothesis' own cache (the test runner's, not the
    node's: hypothesis creates ``.hypothesis`` on its first run in a fresh clone)."""
    return sorted(p for p in Path.cwd().iterdir() if p.name != ".hypothesis")


@dataclass(frozen=True)
class Element:
    """Where one top-level element of the encoded data set lies (explicit VR LE)."""

    tag: int
    vr_offset: int
    length_offset: int
    length_size: int
    value_offset: int
    length: int


def elements(body: bytes) -> list[Element]:
    """The top-level elements of an explicit VR little endian data set without sequences."""
    found, offset = [], 0
    while offset + 8 <= len(body):
        group, number = struct.unpack_from("<HH", body, offset)
        tag = group << 16 | number
        vr = body[offset + 4 : offset + 6]
        if vr in LONG_VRS:
            (length,) = struct.unpack_from("<I", body, offset + 8)
            found.append(Element(tag, offset + 4, offset + 8, 4, offset + 12, length))
            offset += 12 + length
        else:
            (length,) = struct.unpack_from("<H", body, offset + 6)
            found.append(Element(tag, offset + 4, offset + 6, 2, offset + 8, length))
            offset += 8 + length
    return found


def encode(ds: pydicom.Dataset) -> tuple[bytes, bytes]:
    """(preamble + file meta, data set body) of ``ds`` as pydicom writes it."""
    whole = DicomBytesIO()
    dcmwrite(whole, ds, enforce_file_format=True)
    meta = DicomBytesIO()
    meta_only = pydicom.Dataset()
    meta_only.file_meta = ds.file_meta
    dcmwrite(meta, meta_only, enforce_file_format=True)
    head = meta.getvalue()
    return head, whole.getvalue()[len(head) :]


def mutations() -> st.SearchStrategy:
    index = st.integers(min_value=0, max_value=10_000)
    return st.one_of(
        st.tuples(st.just("value"), index, st.binary(max_size=12)),
        st.tuples(st.just("vr"), index, st.sampled_from([b"US", b"OB", b"SQ", b"UN", b"ZZ"])),
        st.tuples(
            st.just("length"),
            index,
            st.sampled_from([0, 1, 3, 0xFFFF, 0xFFFFFFFF]) | st.integers(0, 1 << 20),
        ),
        st.tuples(st.just("pixels"), st.integers(-4096, 4096), st.binary(max_size=8)),
        st.tuples(st.just("flip"), st.lists(st.tuples(index, st.integers(0, 255)), max_size=4)),
        st.tuples(st.just("meaning"), st.sampled_from(ODD_KEYWORDS), st.sampled_from(ODD_TEXT)),
    )


def mutate(template: pydicom.Dataset, number: int, mutation: tuple) -> tuple[bytes, bytes]:
    """The file (head, body) of ``template`` with unique UIDs, mutated in its body."""
    ds = template.copy()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=["fuzz", str(number)]
    )
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["fuzz-series", str(number)])
    head, body = encode(ds)
    data = bytearray(body)
    parts = elements(body)
    kind = mutation[0]
    if kind in ("value", "meaning"):
        if kind == "value":
            _, at, value = mutation
            element = parts[at % len(parts)]
        else:
            _, keyword, text = mutation
            element = next(e for e in parts if e.tag == pydicom.datadict.tag_for_keyword(keyword))
            value = text.encode("latin-1")
        value += b"\0" * (len(value) % 2)
        size = "<H" if element.length_size == 2 else "<I"
        struct.pack_into(size, data, element.length_offset, len(value))
        data[element.value_offset : element.value_offset + element.length] = value
    elif kind == "vr":
        _, at, vr = mutation
        element = parts[at % len(parts)]
        data[element.vr_offset : element.vr_offset + 2] = vr
    elif kind == "length":
        _, at, length = mutation
        element = parts[at % len(parts)]
        size, bits = ("<H", 16) if element.length_size == 2 else ("<I", 32)
        struct.pack_into(size, data, element.length_offset, length % (1 << bits))
    elif kind == "pixels":  # cut the end of the pixel data, or add bytes after it
        _, cut, extra = mutation
        data = data[:cut] + extra if cut < 0 else data + extra + bytes(cut)
    elif kind == "flip":
        for at, byte in mutation[1]:
            data[at % len(data)] = byte
    return head, bytes(data)


def request_uid(path: Path) -> str:
    """The SOP Instance UID the C-STORE request carried (from the intact file meta)."""
    return str(read_file_meta_info(path).MediaStorageSOPInstanceUID)


def test_fuzzed_instances_never_stop_the_node_or_lose_a_valid_one(
    node_factory, tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    node_tmp = tmp_path / "node-tmp"
    node_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(node_tmp))  # none: the node keeps them in its spool
    cwd_before = files_in_cwd()
    node = node_factory("receive", log_level="DEBUG").start()
    (source,) = write_phantom_series(tmp_path / "template", PhantomSpec(slices=1, size=32))
    template = pydicom.dcmread(source)
    template.add_new("PixelPaddingValue", "SS", -2048)  # one more attribute the node reads
    folder = tmp_path / "fuzz"
    folder.mkdir()
    accepted: list[Path] = []
    valid: list[Path] = []
    statuses: dict[int, int] = {}
    sent = [0]

    @settings(
        max_examples=BATCHES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        st.lists(mutations(), min_size=MUTATED_PER_BATCH, max_size=MUTATED_PER_BATCH),
    )
    def one_association(batch: list[tuple]) -> None:
        paths, is_valid = [], []
        for position, mutation in enumerate(batch):
            if position % VALID_EVERY == 0:
                paths.append(write(folder, template, ("valid",)))
                is_valid.append(True)
            paths.append(write(folder, template, mutation))
            is_valid.append(False)
        answers = send_raw(node.port, paths)
        assert None not in answers, "the node aborted an association"
        assert HANDLER_FAILED not in answers, "an input the receiver did not classify (a bug)"
        for path, status, good in zip(paths, answers, is_valid, strict=True):
            statuses[status] = statuses.get(status, 0) + 1
            if good:
                assert status == 0, f"a valid instance was refused with 0x{status:04X}"
                valid.append(path)
            if status == 0:
                accepted.append(path)
        sent[0] += len(batch)
        assert echo(node.port, "DENOISE"), "the node stopped answering C-ECHO"

    def write(into: Path, template: pydicom.Dataset, mutation: tuple) -> Path:
        number = len(list(into.iterdir()))
        head, body = mutate(template, number, mutation)
        path = into / f"{number:05d}.dcm"
        path.write_bytes(head + body)
        return path

    one_association()

    print(f"fuzz: {sent[0]} mutated + {len(valid)} valid instances; statuses {statuses}")
    assert sent[0] >= 1000
    assert node.process is not None and node.process.poll() is None
    assert count_instances(node) == len(accepted)
    assert_in_spool(node, valid)
    with node.manager._sessions() as session:
        recorded = set(session.scalars(select(Instance.sop_instance_uid)))
    assert {request_uid(path) for path in accepted} == recorded
    node.stop()
    state = node.state_dir
    outside = [
        p
        for p in state.rglob("*")
        if p.is_file()
        and not p.is_relative_to(state / "spool")
        and not p.name.startswith("node.db")
    ]
    assert outside == []
    assert list(node_tmp.iterdir()) == [], "temporary files outside the spool"
    assert not list((state / "spool").rglob(f"*{TMP_SUFFIX}")), "temporary files left behind"
    assert files_in_cwd() == cwd_before
    assert_no_header_values_logged(node)
