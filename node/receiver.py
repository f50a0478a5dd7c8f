"""The DICOM receiver: C-ECHO and C-STORE of CT images into the spool and the job table.

An instance is answered with success only once it is fsynced in the spool under a
generated name and recorded in the job table; every other outcome is a specific
failure status so that the sender keeps its copy and retries.  Received data is
streamed to a file by pynetdicom (``STORE_RECV_CHUNKED_DATASET``) and never decoded
here: the header is read without pixel data, which keeps the receiver fast and its
memory flat however large the instance.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from node.context import NodeContext
from node.dicom_tls import server_context
from node.jobs.manager import InstanceRecord, RecordOutcome
from node.rules import NODE_EQUIPMENT
from node.spool import SpoolFull

log = logging.getLogger(__name__)

#: Only CT is accepted; anything else is rejected at presentation-context negotiation.
STORAGE_CLASSES = (CTImageStorage, EnhancedCTImageStorage)
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

SUCCESS = 0x0000
SPOOL_FULL = 0xA700  # Refused: out of resources (free space below the watermark)
SPOOL_WRITE_FAILED = 0xA701  # Refused: out of resources (the file could not be written)
DATABASE_UNAVAILABLE = 0xA702  # Refused: out of resources (the job table did not record it)
DATASET_MISMATCH = 0xA900  # Error: data set does not match the request's SOP class/instance
CANNOT_UNDERSTAND = 0xC000  # Error: missing or invalid UIDs
DECODE_FAILED = 0xC210  # Error: the data set cannot be parsed
HANDLER_FAILED = 0xC211  # Error: an unexpected exception (a bug): see the log

#: Seconds ``stop`` lets running associations finish before aborting them.
STOP_GRACE_SECONDS = 5.0
COPY_CHUNK = 1 << 20


class Refused(Exception):
    """A C-STORE cannot be accepted; carries the status and a short comment for the peer."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


class Receiver:
    """A non-blocking C-ECHO/C-STORE SCP on ``settings.bind_address:port``."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self._ae = AE(ae_title=ctx.settings.ae_title)
        self._ae.maximum_pdu_size = ctx.settings.max_pdu_size
        self._ae.add_supported_context(Verification)
        for sop_class in STORAGE_CLASSES:
            self._ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        self._server: ThreadedAssociationServer | None = None
        self._tls_server: ThreadedAssociationServer | None = None
        self._networks = [ipaddress.ip_network(net) for net in ctx.settings.allowed_addresses]
        self._tallies: dict[int, Counter[str]] = {}
        self._tallies_lock = threading.Lock()

    @property
    def port(self) -> int:
        """The port listened on (the configured one until started)."""
        if self._server is None:
            return self.ctx.settings.port
        return int(self._server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The DICOM-over-TLS port (None without ``tls_port``)."""
        if self._tls_server is None:
            return self.ctx.settings.tls_port
        return int(self._tls_server.server_address[1])

    def start(self) -> None:
        """Remove unacknowledged partial files, then listen in background threads."""
        removed = self.ctx.spool.remove_partials()
        if removed:
            log.info("removed %d partial files left by an earlier run", removed)
        # Process-wide in pynetdicom: C-STORE data sets go to a temporary file, not memory.
        _config.STORE_RECV_CHUNKED_DATASET = True
        handlers = [
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_CONN_CLOSE, self.handle_close),
        ]
        address = (self.ctx.settings.bind_address, self.ctx.settings.port)
        self._server = self._ae.start_server(address, block=False, evt_handlers=handlers)
        log.info(
            "receiver %s listening on %s:%d",
            self.ctx.settings.ae_title,
            address[0],
            self.port,
            extra={"ae_title": self.ctx.settings.ae_title, "port": self.port},
        )
        settings = self.ctx.settings
        if settings.tls_port is not None:
            tls_address = (settings.bind_address, settings.tls_port)
            self._tls_server = self._ae.start_server(
                tls_address,
                block=False,
                evt_handlers=handlers,
                ssl_context=server_context(settings),
            )
            log.info(
                "receiver %s listening for DICOM over TLS on %s:%d%s",
                settings.ae_title,
                tls_address[0],
                self.tls_port,
                " (client certificate required)" if settings.tls_require_client_cert else "",
                extra={"ae_title": settings.ae_title, "port": self.tls_port},
            )

    def stop(self) -> None:
        """Stop accepting, let running associations finish briefly, then abort the rest."""
        if self._server is None:
            return
        for server in (self._server, self._tls_server):
            if server is not None:
                server.shutdown()
        self._server = self._tls_server = None
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for association in self._ae.active_associations:
            association.join(max(0.0, deadline - time.monotonic()))
        self._ae.shutdown()
        log.info("receiver stopped")

    def handle_requested(self, event: Event) -> None:
        """A-ASSOCIATE-RQ: reject callers outside the allow-lists before anything is stored."""
        settings = self.ctx.settings
        calling_ae = str(event.assoc.requestor.primitive.calling_ae_title).strip()
        address = str(event.assoc.requestor.address)
        reason = None
        if settings.allowed_calling_ae_titles and calling_ae not in (
            settings.allowed_calling_ae_titles
        ):
            reason, diagnostic = "calling AE title not in allowed_calling_ae_titles", 0x03
        elif self._networks and not _address_allowed(address, self._networks):
            reason, diagnostic = "address not in allowed_addresses", 0x01
        if reason is None:
            return
        log.warning(
            "association from %s at %s rejected: %s",
            _shown(calling_ae),
            address,
            reason,
            extra={"calling_ae": _shown(calling_ae), "peer_address": address},
        )
        # Rejected permanent, by the service user: the caller should not try again as is.
        # As pynetdicom does for its own rejections: wait until the peer has the A-ASSOCIATE-RJ.
        event.assoc.acse.send_reject(0x01, 0x01, diagnostic)
        event.assoc.kill()

    def handle_echo(self, event: Event) -> int:
        """C-ECHO: always success while the receiver runs."""
        log.debug("C-ECHO", extra={"calling_ae": _calling_ae(event)})
        return SUCCESS

    def handle_store(self, event: Event) -> Dataset:
        """C-STORE: spool, record, answer; each failure has its own status."""
        calling_ae = _calling_ae(event)
        try:
            outcome = self._store(event, calling_ae)
            self._tally(event, outcome)
            return _status(SUCCESS)
        except Refused as refused:
            self._tally(event, f"refused 0x{refused.status:04X}")
            return _status(refused.status, refused.comment)
        except Exception:
            self._tally(event, f"refused 0x{HANDLER_FAILED:04X}")
            # Answer (and so let pynetdicom remove its temporary file) even on a bug.
            log.exception(
                "C-STORE failed unexpectedly",
                extra={
                    "calling_ae": calling_ae,
                    "sop_uid": _shown_uid(event.request.AffectedSOPInstanceUID),
                },
            )
            return _status(HANDLER_FAILED, "internal error in the receiver, see its log")

    def handle_close(self, event: Event) -> None:
        """One log line per association that stored anything: what came and what was refused."""
        with self._tallies_lock:
            tally = self._tallies.pop(id(event.assoc), None)
        if tally:
            log.info(
                "association from %s closed: %s",
                _calling_ae(event),
                ", ".join(f"{count} {outcome}" for outcome, count in sorted(tally.items())),
                extra={"calling_ae": _calling_ae(event)},
            )

    def _tally(self, event: Event, outcome: str) -> None:
        with self._tallies_lock:
            self._tallies.setdefault(id(event.assoc), Counter())[outcome] += 1

    def _store(self, event: Event, calling_ae: str) -> str:
        """Spool and record one instance; returns the outcome, or raises Refused."""
        received = Path(event.dataset_path)
        request_uid = str(event.request.AffectedSOPInstanceUID or "")
        extra: dict[str, Any] = {"calling_ae": calling_ae, "sop_uid": _shown_uid(request_uid)}
        spool = self.ctx.spool
        try:
            spool.check_room(received.stat().st_size)
        except SpoolFull as exc:
            log.warning("C-STORE refused: %s", exc, extra=extra)
            raise Refused(SPOOL_FULL, "node spool is full") from exc

        ds, header = _read_header(received, extra)
        uids = _checked_uids(ds, event, extra)
        extra.update(sop_uid=uids["SOPInstanceUID"], series_uid=uids["SeriesInstanceUID"])

        relative = spool.new_incoming()
        digest = hashlib.sha256()
        try:
            spool.write_atomic(relative, lambda out: _copy_hashing(received, out, digest))
        except OSError as exc:
            log.error("C-STORE refused: cannot write the spool: %s", exc, extra=extra)
            raise Refused(SPOOL_WRITE_FAILED, "node cannot write its spool") from exc

        record = InstanceRecord(
            sop_instance_uid=uids["SOPInstanceUID"],
            series_instance_uid=uids["SeriesInstanceUID"],
            study_instance_uid=uids["StudyInstanceUID"],
            sop_class_uid=uids["SOPClassUID"],
            transfer_syntax_uid=str(event.context.transfer_syntax),
            spool_path=relative,
            sha256=digest.hexdigest(),
            size_bytes=spool.path(relative).stat().st_size,
            header=header,
            calling_ae_title=calling_ae,
            peer_address=str(event.assoc.requestor.address),
        )
        try:
            outcome, kept = self.ctx.manager.record_instance(record)
        except Exception as exc:
            spool.remove(relative)
            log.error(
                "C-STORE refused: the job table did not record the instance: %s: %s",
                exc.__class__.__name__,
                str(exc).splitlines()[0][:200] if str(exc) else "",
                extra=extra,
            )
            raise Refused(DATABASE_UNAVAILABLE, "node job table unavailable") from exc

        if outcome is RecordOutcome.NEW:
            log.debug("instance stored", extra={**extra, "spool_path": relative})
            return "stored"
        spool.remove(relative)
        if outcome is RecordOutcome.IDENTICAL:
            log.debug("instance received again with identical content; stored once", extra=extra)
            return "already stored"
        log.warning(
            "instance received again with DIFFERENT content; the first copy (%s) is kept",
            kept,
            extra=extra,
        )
        return "conflicting duplicates"


def selection_header(ds: Dataset) -> dict[str, Any]:
    """What the settler's rules and the worker need from a header: no patient identity."""
    header: dict[str, Any] = {
        "SOPClassUID": _text(ds.get("SOPClassUID")),
        "Modality": _text(ds.get("Modality")),
        "ImageType": [str(v) for v in _values(ds.get("ImageType"))],
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


def _read_header(path: Path, extra: dict[str, Any]) -> tuple[Dataset, dict[str, Any]]:
    """The data set without pixels and its selection header; Refused when unparsable."""
    try:
        ds = dcmread(path, stop_before_pixels=True, defer_size="64 KB")
        # pydicom parses lazily: touch what we need so a broken data set fails here.
        for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
            ds.get(keyword)
        return ds, selection_header(ds)
    except Exception as exc:
        log.warning("C-STORE refused: cannot decode the data set: %s", exc, extra=extra)
        raise Refused(DECODE_FAILED, "data set cannot be decoded") from exc


def _checked_uids(ds: Dataset, event: Event, extra: dict[str, Any]) -> dict[str, str]:
    """The four UIDs, valid and agreeing with the request, or Refused."""
    uids = {}
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        value = str(ds.get(keyword) or "")
        if not valid_uid(value):
            log.warning(
                "C-STORE refused: %s %s is missing or not a valid UID",
                keyword,
                _shown_uid(value),
                extra=extra,
            )
            raise Refused(CANNOT_UNDERSTAND, f"invalid or missing {keyword}")
        uids[keyword] = value
    if uids["SOPInstanceUID"] != str(event.request.AffectedSOPInstanceUID):
        log.warning("C-STORE refused: SOPInstanceUID differs from the request's", extra=extra)
        raise Refused(DATASET_MISMATCH, "SOPInstanceUID differs from the request")
    if uids["SOPClassUID"] != str(event.request.AffectedSOPClassUID):
        log.warning("C-STORE refused: SOPClassUID differs from the request's", extra=extra)
        raise Refused(DATASET_MISMATCH, "SOPClassUID differs from the request")
    return uids


def valid_uid(value: str) -> bool:
    """A DICOM UID: dotted digits without leading zeros, at most 64 characters."""
    return 0 < len(value) <= 64 and UID(value).is_valid


def _address_allowed(address: str, networks: list[Any]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


def _copy_hashing(source: Path, out: BinaryIO, digest: Any) -> None:
    with open(source, "rb") as handle:
        while chunk := handle.read(COPY_CHUNK):
            digest.update(chunk)
            out.write(chunk)


def _status(status: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


def _calling_ae(event: Event) -> str:
    return str(event.assoc.requestor.ae_title).strip()


def _shown_uid(value: object) -> str:
    """A received UID made safe to log: an invalid one may hold anything, a name included."""
    text = str(value or "")
    return text if valid_uid(text) else f"({len(text)} characters, not a UID)"


def _shown(value: object) -> str:
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
