"""Instance records as the receiver makes them, for tests and benchmarks that fill a job
table through the manager's verbs without a C-STORE."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydicom import dcmread

from node.jobs.manager import InstanceRecord

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def instance_record(sop_uid: str, series_uid: str = "1.2.3.4", **fields: Any) -> InstanceRecord:
    """An InstanceRecord with plausible values; ``fields`` override any of them."""
    values: dict[str, Any] = {
        "sop_instance_uid": sop_uid,
        "series_instance_uid": series_uid,
        "study_instance_uid": "1.2.3",
        "sop_class_uid": CT_IMAGE_STORAGE,
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "spool_path": f"incoming/x/{sop_uid}.dcm",
        "sha256": "a" * 64,
        "size_bytes": 100,
        "header": {"Modality": "CT"},
        "calling_ae_title": "SCANNER",
        "peer_address": "127.0.0.1",
    }
    values.update(fields)
    return InstanceRecord(**values)


def file_record(path: Path, spool_path: str, **fields: Any) -> InstanceRecord:
    """The record of a DICOM file kept at ``spool_path``: its UIDs from its header, the
    digest and size of its bytes, an empty selection header; ``fields`` override any."""
    data = path.read_bytes()
    ds = dcmread(path, stop_before_pixels=True)
    values: dict[str, Any] = {
        "study_instance_uid": ds.StudyInstanceUID,
        "sop_class_uid": ds.SOPClassUID,
        "transfer_syntax_uid": ds.file_meta.TransferSyntaxUID,
        "spool_path": spool_path,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "header": {},
    }
    values.update(fields)
    return instance_record(ds.SOPInstanceUID, ds.SeriesInstanceUID, **values)
