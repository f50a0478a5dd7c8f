"""Storage commitment (Push Model): the node asks a destination to take responsibility
for what it acknowledged, and hears the answer.

Where a destination has ``storage_commitment = true``, the sender asks once every
instance is acknowledged: an N-ACTION (action type 1) listing the instances under a
Transaction UID that the job table records before the request goes out.  The request
goes again every ``commitment_retry_seconds`` until the report comes; after
``commitment_timeout_seconds`` from the first request the destination fails.

The answer is an N-EVENT-REPORT.  A PACS sends it on a new association to the receive
role (Orthanc does, to the modality it knows by the node's AE title), acting there as
the SCP of the class, or on the request's own association while it is open; one
handler serves both.  It finds the request by its Transaction UID and marks the
destination through the job table (``Deliveries.record_commitment``); an unknown
Transaction UID is answered with a failure status and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import cast

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import N_EVENT_REPORT
from pynetdicom.events import Event, EventHandlerType

# Made at import time, so mypy cannot see it.
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from node.context import NodeContext
from node.db import utcnow
from node.destinations import Destination
from node.instance_checks import shown_uid
from node.jobs.delivery import ReportOutcome
from node.jobs.manager import JobManager
from node.jobs.records import DestinationView, JobView
from node.jobs.states import DeliveryState

log = logging.getLogger(__name__)

__all__ = ["STORAGE_COMMITMENT", "Committer", "handle_report"]

STORAGE_COMMITMENT = str(StorageCommitmentPushModel)  # 1.2.840.10008.1.20.1
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP instance
REQUEST_COMMITMENT = 1  # N-ACTION action type
ALL_COMMITTED, SOME_FAILED = 1, 2  # N-EVENT-REPORT event types
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_EVENT_TYPE = 0x0113
NO_SUCH_SOP_CLASS = 0x0118

#: Opens an association for the commitment class to a destination, with these handlers;
#: None when it could not (the sender has logged why): the request goes again later.
Connect = Callable[[str, Destination, list[EventHandlerType]], Association | None]


class Committer:
    """The sender's side: requests commitment where due and fails it where too late."""

    def __init__(self, ctx: NodeContext, connect: Connect) -> None:
        self.ctx = ctx
        self._connect = connect

    def awaiting(self, states: list[DestinationView]) -> list[DestinationView]:
        """Destinations that acknowledged everything and still owe a commitment report."""
        return [
            state
            for state in states
            if state.state == DeliveryState.ACKNOWLEDGED and self._committing(state.destination)
        ]

    def _committing(self, name: str) -> Destination | None:
        """The DICOM destination ``name`` where it asks for commitment (DICOMweb has none)."""
        return self.ctx.settings.committing().get(name)

    def step(self, job: JobView, state: DestinationView) -> None:
        """Fail the destination when its timeout passed; else send the request when due."""
        destination = self._committing(state.destination)
        if destination is None:
            return
        now = utcnow()
        if state.commitment_requested_at is not None and _elapsed(
            state.commitment_requested_at, now
        ) >= (destination.commitment_timeout_seconds):
            reason = (
                f"no storage commitment report from {destination.ae_title} within "
                f"{destination.commitment_timeout_seconds:g} s "
                f"(transaction {state.commitment_uid})"
            )
            self.ctx.manager.fail_destination(job.id, self.ctx.name, state.destination, reason)
            log.error(
                "job %s: destination %s failed: %s",
                job.id,
                state.destination,
                reason,
                extra={"job_id": job.id, "destination": state.destination, "outcome": "gave up"},
            )
        elif state.commitment_sent_at is None or _elapsed(state.commitment_sent_at, now) >= (
            destination.commitment_retry_seconds
        ):
            self._request(job, state.destination, destination)

    def next_due(self, states: list[DestinationView]) -> float | None:
        """Seconds until an awaiting destination's next request or timeout; None: none waits."""
        now = utcnow()
        waits = []
        for state in self.awaiting(states):
            destination = self._committing(state.destination)
            if destination is None:
                continue
            sent = state.commitment_sent_at or now
            first = state.commitment_requested_at or now
            waits.append(
                min(
                    destination.commitment_retry_seconds - _elapsed(sent, now),
                    destination.commitment_timeout_seconds - _elapsed(first, now),
                )
            )
        return max(0.0, min(waits)) if waits else None

    def _request(self, job: JobView, name: str, destination: Destination) -> None:
        """Record the request, then send it: a report can never precede its record."""
        instances = [item.sop_instance_uid for item in self.ctx.queries.derived_instances(job.id)]
        state = self.ctx.manager.request_commitment(
            job.id, self.ctx.name, name, generate_uid(), len(instances)
        )
        transaction = str(state.commitment_uid)
        fields = {"job_id": job.id, "destination": name, "transaction_uid": transaction}
        assoc = self._connect(name, destination, report_handlers(self.ctx))
        if assoc is None:
            return
        try:
            status, _ = assoc.send_n_action(
                request_dataset(transaction, instances),
                REQUEST_COMMITMENT,
                STORAGE_COMMITMENT,
                STORAGE_COMMITMENT_INSTANCE,
            )
        except RuntimeError:  # pynetdicom's answer once the peer has aborted
            if assoc.is_established:
                raise
            status = Dataset()  # no answer: asked again after commitment_retry_seconds
        finally:
            if assoc.is_established:
                assoc.release()
        code = int(status.Status) if "Status" in status else None
        if code == SUCCESS:
            log.info("job %s: storage commitment requested from %s", job.id, name, extra=fields)
            return
        answer = "no answer" if code is None else f"status 0x{code:04X}"
        log.warning(
            "job %s: storage commitment request to %s got %s; asked again in %g s",
            job.id,
            name,
            answer,
            destination.commitment_retry_seconds,
            extra=fields,
        )


def request_dataset(transaction_uid: str, instances: list[str]) -> Dataset:
    """The N-ACTION's Action Information: the Transaction UID and the instances."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for uid in instances:
        item = Dataset()
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = uid
        items.append(item)
    ds.ReferencedSOPSequence = Sequence(items)
    return ds


def report_handlers(ctx: NodeContext) -> list[EventHandlerType]:
    """The handler of storage commitment reports, as bound on any association."""
    return [(evt.EVT_N_EVENT_REPORT, lambda event: handle_report(ctx.manager, ctx.name, event))]


def handle_report(manager: JobManager, actor: str, event: Event) -> tuple[Dataset, None]:
    """N-EVENT-REPORT: apply a storage commitment report; anything else is refused."""
    request = cast(N_EVENT_REPORT, event.request)
    calling_ae = str(event.assoc.requestor.ae_title).strip()
    if str(request.AffectedSOPClassUID) != STORAGE_COMMITMENT:
        return _status(NO_SUCH_SOP_CLASS, "only storage commitment reports are accepted")
    if request.EventTypeID not in (ALL_COMMITTED, SOME_FAILED):
        return _status(NO_SUCH_EVENT_TYPE, "storage commitment event types are 1 and 2")
    try:
        info = event.event_information
        transaction = str(info.TransactionUID)
        committed = [str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])]
        reasons = sorted(
            {f"0x{int(i.get('FailureReason', 0)):04X}" for i in info.get("FailedSOPSequence", [])}
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        log.warning(
            "storage commitment report from %s unreadable: %s",
            calling_ae,
            exc.__class__.__name__,
            extra={"calling_ae": calling_ae},
        )
        return _status(PROCESSING_FAILURE, "cannot read the storage commitment report")
    fields = {"calling_ae": calling_ae, "transaction_uid": shown_uid(transaction)}
    detail = f"failure reasons {', '.join(reasons)}" if reasons else ""
    try:
        report = manager.record_commitment(transaction, committed, detail, actor)
    except Exception as exc:
        log.error(
            "storage commitment report not recorded: %s",
            exc.__class__.__name__,
            extra=fields,
        )
        return _status(PROCESSING_FAILURE, "node job table unavailable, send it again")
    if report is None:
        log.warning(
            "storage commitment report from %s for unknown transaction %s refused",
            calling_ae,
            shown_uid(transaction),
            extra=fields,
        )
        return _status(PROCESSING_FAILURE, "unknown Transaction UID")
    level = {ReportOutcome.COMMITTED: logging.INFO, ReportOutcome.FAILED: logging.ERROR}.get(
        report.outcome, logging.WARNING
    )
    log.log(
        level,
        "job %s: storage commitment report from %s: %s (%d not committed)",
        report.job_id,
        report.destination,
        report.outcome,
        report.not_committed,
        extra={**fields, "job_id": report.job_id, "destination": report.destination},
    )
    return _status(SUCCESS)


def _status(code: int, comment: str | None = None) -> tuple[Dataset, None]:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds, None


def _elapsed(since: datetime, now: datetime) -> float:
    return (now - since).total_seconds()
