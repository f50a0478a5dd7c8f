"""The file meta information the receiver adds to a C-STORE's data set."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import create_file_meta, encode

from node.receiving import PREAMBLE, file_bytes


@pytest.mark.parametrize(
    ("sop_instance", "syntax"),
    [("1.2.3.4", ExplicitVRLittleEndian), ("1.2.826.0.1.3680043.8.498.1", ImplicitVRLittleEndian)],
)
def test_file_meta_is_the_bytes_pynetdicom_and_pydicom_write(
    sop_instance: str, syntax: str
) -> None:
    expected = BytesIO()
    write_file_meta_info(
        expected,
        create_file_meta(
            sop_class_uid=CTImageStorage, sop_instance_uid=sop_instance, transfer_syntax=syntax
        ),
    )
    assert file_bytes(CTImageStorage, sop_instance, syntax, b"") == PREAMBLE + expected.getvalue()


def test_the_file_reads_back_with_its_data_set() -> None:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.Rows = 2
    data = file_bytes(CTImageStorage, "1.2.3.4.5", ImplicitVRLittleEndian, encode(ds, True, True))
    read = dcmread(BytesIO(data))
    assert read.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    assert read.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert (read.SOPInstanceUID, read.Rows) == ("1.2.3.4.5", 2)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_malformed_request_uid_cannot_break_the_encoding() -> None:
    """An unchecked UID from the request: not ASCII, too long, odd length."""
    data = file_bytes(CTImageStorage, "Ünïcode" + "9" * 100, ExplicitVRLittleEndian, b"")
    meta = dcmread(BytesIO(data)).file_meta
    written = str(meta.MediaStorageSOPInstanceUID)
    assert len(written) <= 64 and written.isascii()
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
