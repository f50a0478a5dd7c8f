"""Accepting one received instance, whatever brought it: C-STORE or STOW-RS.

The DICOM receiver hands over a data set as a DICOM file's bytes in memory, the STOW-RS
endpoint as a file already written on the spool's disk; here it is checked
(``node.instance_checks``), written or moved into the spool durably (fsync, rename,
fsync of the folder: its bytes written once either way) and recorded in the job table.
Only when ``accept`` returns is the instance acknowledged; every failure is a Refused
with its own status, so the sender keeps its copy and retries.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
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

from node.context import NodeContext
from node.instance_checks import (
    DATASET_MISMATCH,
    Inspected,
    Refused,
    Source,
    check_pixel_data,
    checked_uids,
    read_header,
    service,
)
from node.jobs.intake import instance_record
from node.jobs.manager import InstanceRecord, RecordOutcome
from node.spool import PendingWrite, SpoolFull
from node.unrecorded import mark

log = logging.getLogger(__name__)

#: Only CT is accepted (C-STORE: at presentation-context negotiation already).
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

SPOOL_FULL = 0xA700  # Refused: out of resources (free space below the watermark)
SPOOL_WRITE_FAILED = 0xA701  # Refused: out of resources (the file could not be written)
DATABASE_UNAVAILABLE = 0xA702  # Refused: out of resources (the job table did not record it)
SOP_CLASS_NOT_SUPPORTED = 0x0122  # not a CT image storage class
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122  # STOW-RS: referenced transfer syntax not supported
HANDLER_FAILED = 0xC211  # Error: an unexpected exception (a bug): see the log


@dataclass(frozen=True)
class Arrival:
    """A received data set and what came with it.

    ``source``: the DICOM file's bytes (C-STORE) or the file on the spool's disk
    (STOW-RS); ``content``: a file's (SHA-256, size), hashed as it was written (bytes
    are hashed in ``accept``, while they are written); ``request``: the (SOP class, SOP
    instance) the transport named (C-STORE), which the data set must repeat;
    ``transfer_syntax``: the negotiated one, else the file meta's; ``study``: the study
    a STOW-RS request was posted to, if any.
    """

    source: Source
    calling_ae_title: str
    peer_address: str
    content: tuple[str, int] | None = None
    request: tuple[str, str] | None = None
    transfer_syntax: str | None = None
    study: str | None = None


@dataclass(frozen=True)
class Accepted:
    """An instance fsynced and recorded: its outcome (``stored``, ``already stored``,
    ``conflicting duplicates``) and UIDs."""

    outcome: str
    sop_class_uid: str
    sop_instance_uid: str


def accept(ctx: NodeContext, arrival: Arrival, extra: dict[str, Any]) -> Accepted:
    """Check, spool and record one instance; raises Refused with the status to answer.

    Bytes go to the disk as soon as the spool has room for them: their write and fsync
    (in a writer thread) overlap the hash and the checks, and a refused instance's file
    is removed.  Only a file that passed every check gets its final name, and only a
    file with its final name, fsynced, gets a committed row (on PostgreSQL the row's
    statements overlap the write, the commit waits for it: ``Intake.record_instance``).
    """
    writing = None
    content = arrival.content
    if isinstance(arrival.source, bytes):
        writing = _begin_writing(ctx, arrival.source, extra)
        content = (hashlib.sha256(arrival.source).hexdigest(), len(arrival.source))
    assert content is not None, "a file arrives with its content hashed"
    try:
        ds, header = read_header(arrival.source, extra)
        uids = checked_uids(ds, arrival.request, extra)
        extra.update(sop_uid=uids["SOPInstanceUID"], series_uid=uids["SeriesInstanceUID"])
        try:
            outcome = _store(ctx, arrival, (ds, header, uids, content), writing, extra)
        except Refused as refused:
            refused.uids = (uids["SOPClassUID"], uids["SOPInstanceUID"])
            raise
    finally:
        if writing is not None:
            writing.discard()  # nothing once the file has its final name
    return Accepted(outcome, uids["SOPClassUID"], uids["SOPInstanceUID"])


def _store(
    ctx: NodeContext,
    arrival: Arrival,
    parsed: tuple[Dataset, dict[str, Any], dict[str, str], tuple[str, int]],
    writing: PendingWrite | None,
    extra: dict[str, Any],
) -> str:
    """Room (a file's; bytes had theirs checked before their write began), class,
    syntax, study and pixel data (once the UIDs are known, so that a STOW-RS answer can
    name the instance), then the spool and the job table."""
    ds, header, uids, content = parsed
    if writing is None:
        check_room(ctx, content[1], extra)
    syntax = arrival.transfer_syntax or str(ds.file_meta.get("TransferSyntaxUID", ""))
    _check_supported(uids, syntax, arrival.study, extra)
    check_pixel_data(ds, arrival.source, extra)
    inspected = Inspected(uids, header, syntax)
    sender = (arrival.calling_ae_title, arrival.peer_address)
    if writing is None:
        relative = _into_spool(ctx, arrival.source, None, extra)
        return _record(ctx, instance_record(inspected, relative, content, sender), extra)
    record = instance_record(inspected, writing.relative, content, sender)
    return _record(ctx, record, extra, lambda: _into_spool(ctx, arrival.source, writing, extra))


def _begin_writing(ctx: NodeContext, data: bytes, extra: dict[str, Any]) -> PendingWrite:
    """Refused unless the spool has room for ``data``; else its write has begun."""
    check_room(ctx, len(data), extra)
    try:
        return ctx.spool.begin_received(data)
    except OSError as exc:
        raise _write_failed(exc, extra) from exc


def check_room(ctx: NodeContext, needed: int, extra: dict[str, Any]) -> None:
    """Refused (out of resources) when the spool would fall below its watermark."""
    try:
        ctx.spool.check_room(needed)
    except SpoolFull as exc:
        log.warning("%s refused: %s", service(extra), exc, extra=extra)
        raise Refused(SPOOL_FULL, "node spool is full") from exc


def _check_supported(
    uids: dict[str, str], syntax: str, study: str | None, extra: dict[str, Any]
) -> None:
    """A CT class in a transfer syntax the node reads, of the study asked for."""
    if uids["SOPClassUID"] not in STORAGE_CLASSES:
        log.warning("%s refused: not a CT image storage class", service(extra), extra=extra)
        raise Refused(SOP_CLASS_NOT_SUPPORTED, "only CT image storage is accepted")
    if syntax not in TRANSFER_SYNTAXES:
        log.warning("%s refused: transfer syntax not supported", service(extra), extra=extra)
        raise Refused(TRANSFER_SYNTAX_NOT_SUPPORTED, "transfer syntax not supported")
    if study is not None and uids["StudyInstanceUID"] != study:
        log.warning(
            "%s refused: StudyInstanceUID differs from the request's", service(extra), extra=extra
        )
        raise Refused(DATASET_MISMATCH, "StudyInstanceUID differs from the request")


def _into_spool(
    ctx: NodeContext, source: Source, writing: PendingWrite | None, extra: dict[str, Any]
) -> str:
    """The written bytes, or the file moved, into the spool durably: its relative path."""
    try:
        if writing is not None:
            return writing.keep()
        assert isinstance(source, Path), "bytes are written by a PendingWrite"
        return ctx.spool.adopt(source)
    except OSError as exc:
        raise _write_failed(exc, extra) from exc


def _write_failed(exc: OSError, extra: dict[str, Any]) -> Refused:
    log.error("%s refused: cannot write the spool: %s", service(extra), exc.strerror, extra=extra)
    return Refused(SPOOL_WRITE_FAILED, "node cannot write its spool")


def _record(
    ctx: NodeContext,
    record: InstanceRecord,
    extra: dict[str, Any],
    make_durable: Callable[[], object] | None = None,
) -> str:
    """One row in the job table; the spool copy is removed when a row names another.

    ``make_durable`` puts the copy in place (``Intake.record_instance`` says when); it
    raises Refused when the spool cannot take it.  After a database error a copy in
    place stays: the row may exist (a COMMIT whose answer was lost), and a row must
    never name a removed file.  The answer is a failure, so the sender resends; the
    resend finds the row (identical content: success, stored once) or records itself.
    The copy is marked (``node.unrecorded``): housekeeping removes it soon if no row
    names it, so that retries during an outage do not fill the spool.
    """
    spool = ctx.spool
    try:
        outcome, kept = ctx.manager.record_instance(record, make_durable)
    except Refused:
        raise
    except Exception as exc:
        if spool.path(record.spool_path).exists():
            mark(spool, record.spool_path)
        log.error(
            "%s refused: the job table did not record the instance (its spool copy goes "
            "after unrecorded_grace_seconds unless a row names it): %s: %s",
            service(extra),
            exc.__class__.__name__,
            str(exc).splitlines()[0][:200] if str(exc) else "",
            extra=extra,
        )
        raise Refused(DATABASE_UNAVAILABLE, "node job table unavailable") from exc

    if outcome is RecordOutcome.NEW:
        log.debug("instance stored", extra={**extra, "spool_path": record.spool_path})
        return "stored"
    if kept != record.spool_path:  # a row names this very file: it stays
        spool.remove(record.spool_path)
    if outcome is RecordOutcome.IDENTICAL:
        log.debug("instance received again with identical content; stored once", extra=extra)
        return "already stored"
    log.warning(
        "instance received again with DIFFERENT content; the first copy (%s) is kept",
        kept,
        extra=extra,
    )
    return "conflicting duplicates"


def where(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of ``exc``'s traceback: logged for an
    unexpected failure instead of its text, which may quote a header value."""
    trace = exc.__traceback__
    while trace is not None and trace.tb_next is not None:
        trace = trace.tb_next
    if trace is None:
        return "?"
    return f"{Path(trace.tb_frame.f_code.co_filename).name}:{trace.tb_lineno}"
