"""The sender: a job's derived series to each of its destinations, by C-STORE over several
associations (``node.c_store_client``) or, for ``kind = "dicomweb"`` destinations, by
STOW-RS (``node.dicomweb_client``).

Acknowledgements are recorded as they arrive (a batch per transaction where several
associations or a STOW-RS request bring them together), so after a restart (or an
outage) only what is missing is sent.  Each destination has a delivery state (``pending``,
``acknowledged``, ``committed``, ``failed``); a failure to send falls in one of three kinds:

* transient — the association could not be opened, was aborted or timed out, was
  rejected transiently, or the peer is out of resources (0xA7xx, 0x0213): tried again
  after an exponential backoff, until the destination has failed for
  ``send_give_up_hours``;
* refused — the peer rejected the association permanently (A-ASSOCIATE-RJ, e.g. an
  unknown called AE title), or refuses the object (0xCxxx, 0xA9xx, the SOP class):
  the destination fails after ``send_max_attempts`` refusals, with the peer's reason;
* broken — this node cannot send it (unknown destination, TLS setup, an unusable
  derived file, credentials refused or not set): the destination fails at once.

STOW-RS maps onto the same kinds: HTTP 5xx, 429 and timeouts are transient (429 and 503
wait at least the server's Retry-After), per-instance failures (202, 409) and other 4xx
are refusals, 401 and 403 are broken (a configuration error).

Where a destination asks for storage commitment, the job waits in ``sending`` after
the last acknowledgement until that destination is ``committed`` (``node.commitment``).
A job is ``done`` when every destination acknowledged, or committed where asked;
``failed`` when one failed and none is still pending or waiting for its commitment;
else it stays ``sending`` and is tried again after the backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from sqlalchemy.exc import SQLAlchemyError

from node.c_store_client import CStoreClient, OpenLink, ThreadLink, associate
from node.commitment import STORAGE_COMMITMENT, Committer
from node.context import NodeContext
from node.destinations import Destination, DicomWebDestination
from node.dicomweb_client import DicomWebClient, Part, batches
from node.jobs.manager import LostClaim
from node.jobs.records import DerivedView, JobView
from node.jobs.states import DeliveryState
from node.send_errors import DeliveryError, Failure, is_retryable_status
from node.store_processes import open_association, start_association_server

log = logging.getLogger(__name__)


class Stopping(Exception):
    """The process is shutting down: give the job back between two instances."""


class Sender:
    """The ``send`` role: claims ``sending`` jobs and delivers their derived instances."""

    def __init__(self, ctx: NodeContext, stop: threading.Event | None = None) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.manager = ctx.manager
        self.queries = ctx.queries
        self._stop = stop or threading.Event()
        self._last_beat = 0.0
        self._committer = Committer(ctx, self._connect_for_commitment)
        self._open_link: OpenLink = ThreadLink
        if self.settings.send_in_processes:
            self._open_link = self._association_processes()

    def run_once(self) -> bool:
        """Claim one job in ``sending`` and deliver it; False when there was none.

        ``node.service`` polls this.  Once ``stop`` is set the job in hand is released
        between instances.  A job whose acknowledgement could not be recorded (database
        outage) stays claimed and is taken again once its heartbeat is stale.
        """
        job = self.manager.claim_sending_job(self.ctx.name, self.settings.stale_after_seconds)
        if job is None:
            return False
        self._send_job(job)
        return True

    # -- one job -------------------------------------------------------------------------

    def _send_job(self, job: JobView) -> None:
        started = time.monotonic()
        total = len(self.queries.derived_instances(job.id))
        fields = {
            "job_id": job.id,
            "series_uid": job.series_instance_uid,
            "output_series_uid": job.output_series_uid,
            "destinations": ",".join(job.destinations),
            "instances": total,
        }
        self._last_beat = started
        errors: list[DeliveryError] = []
        sent = 0
        try:
            states = self.manager.open_destinations(job.id, self.ctx.name, job.destinations)
            for state in states:
                if state.state != DeliveryState.PENDING:
                    continue
                try:
                    sent += self._deliver_guarded(job, state.destination)
                    self.manager.acknowledge_destination(job.id, self.ctx.name, state.destination)
                except DeliveryError as exc:
                    self._record_failure(job, exc)
                    errors.append(exc)
            for state in self._committer.awaiting(self.queries.destinations(job.id)):
                self._heartbeat_if_due(job)
                self._committer.step(job, state)
            seconds = time.monotonic() - started
            fields.update(sent=sent, seconds=round(seconds, 3))
            self._conclude(job, errors, total, sent, seconds, fields)
        except Stopping:
            self.manager.release_sending(
                job.id, self.ctx.name, "sender stopping: released; acknowledged instances stay"
            )
            log.info("job %s released: sender stopping", job.id, extra=fields)
        except LostClaim as exc:
            log.warning("job %s taken away while sending: %s", job.id, exc, extra=fields)

    def _record_failure(self, job: JobView, exc: DeliveryError) -> None:
        """Count the failure against the destination; log it when the destination fails."""
        refusals = {
            Failure.TRANSIENT: None,
            Failure.REFUSED: self.settings.send_max_attempts,
            Failure.BROKEN: 1,
        }[exc.failure]
        state = self.manager.record_destination_failure(
            job.id,
            self.ctx.name,
            exc.destination,
            str(exc),
            refusals,
            self.settings.send_give_up_hours * 3600,
        )
        if state is DeliveryState.FAILED:
            log.error(
                "job %s: destination %s failed: %s",
                job.id,
                exc.destination,
                exc,
                extra={"job_id": job.id, "destination": exc.destination, "outcome": "gave up"},
            )

    def _conclude(
        self,
        job: JobView,
        errors: list[DeliveryError],
        total: int,
        sent: int,
        seconds: float,
        fields: dict[str, object],
    ) -> None:
        states = self.queries.destinations(job.id)
        pending = [s for s in states if s.state == DeliveryState.PENDING]
        failed = [s for s in states if s.state == DeliveryState.FAILED]
        awaiting = [s.destination for s in self._committer.awaiting(states)]
        waiting = self._committer.next_due(states)
        if failed and not pending and waiting is None:
            error = "; ".join(f"{s.reason}" for s in failed)
            self.manager.fail_sending(job.id, self.ctx.name, error)
            log.error("job %s failed: %s", job.id, error, extra={**fields, "outcome": "failed"})
        elif pending:
            error = "; ".join(str(exc) for exc in errors)
            delay = self._retry_delay(job, errors)
            self.manager.postpone_sending(job.id, self.ctx.name, error, delay)
            log.warning(
                "job %s postponed %.1f s: %s",
                job.id,
                delay,
                error,
                extra={**fields, "outcome": "postponed", "retry_in": delay},
            )
        elif waiting is not None:
            self.manager.wait_for_commitment(job.id, self.ctx.name, waiting, awaiting)
            log.debug("job %s waits for storage commitment", job.id, extra=fields)
        else:
            names = ", ".join(job.destinations)
            message = f"{total} instances acknowledged by {names} in {seconds:.1f} s"
            if not job.destinations:
                message = "no destination: the derived series stays in the spool only"
            elif sent != total * len(job.destinations):
                message += f" ({sent} sent now)"
            committed = [s.destination for s in states if s.state == DeliveryState.COMMITTED]
            if committed:
                message += f"; committed by {', '.join(committed)}"
            self.manager.finish_sending(job.id, self.ctx.name, message)
            log.info("job %s done: %s", job.id, message, extra={**fields, "outcome": "done"})

    def _retry_delay(self, job: JobView, errors: list[DeliveryError]) -> float:
        """Exponential backoff; where every failure came with a Retry-After, exactly that
        wish (at least ``send_retry_seconds``), and never sooner than any wish.

        A wish counts up to the give-up window: waiting longer cannot help (the
        destination fails at the next try), and a server's absurd Retry-After must not
        park the job for centuries."""
        previous = self.queries.consecutive_postponements(job.id)
        backoff: float = min(
            self.settings.send_retry_seconds * 2.0 ** min(previous, 30),
            self.settings.send_retry_max_seconds,
        )
        limit = self.settings.send_give_up_hours * 3600
        wishes = [min(exc.retry_after, limit) for exc in errors if exc.retry_after is not None]
        if wishes and len(wishes) == len(errors):
            return max([self.settings.send_retry_seconds, *wishes])
        return max([backoff, *wishes])

    # -- one destination -----------------------------------------------------------------

    def _deliver_guarded(self, job: JobView, name: str) -> int:
        """``_deliver``, where an exception no one foresaw (a fault, an odd answer) is a
        transient failure logged with its traceback: it never stops the send role, which
        would claim the same job again after a restart and stop again."""
        try:
            return self._deliver(job, name)
        except (DeliveryError, Stopping, LostClaim, SQLAlchemyError):
            raise  # each has its own handling: the job table's outage is the service's
        except Exception as exc:
            kind = f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins.")
            log.error(
                "job %s: unexpected %s while sending to %s; tried again after the backoff",
                job.id,
                kind,
                name,
                exc_info=True,
                extra={"job_id": job.id, "destination": name, "outcome": "unexpected error"},
            )
            message = f"unexpected {kind} while sending (a fault: the node log has its traceback)"
            raise DeliveryError(name, message, Failure.TRANSIENT) from exc

    def _deliver(self, job: JobView, name: str) -> int:
        """Send what ``name`` has not acknowledged (``node.c_store_client`` or STOW-RS);
        returns the count."""
        destination = self.settings.destinations.get(name)
        if destination is None:
            known = ", ".join(sorted(self.settings.destinations)) or "none"
            raise DeliveryError(
                name, f"unknown destination {name!r} (configured: {known})", Failure.BROKEN
            )
        missing = self.queries.missing_deliveries(job.id, name)
        if not missing:
            return 0
        self._heartbeat_if_due(job)
        if isinstance(destination, DicomWebDestination):
            return self._stow_all(job, name, destination, missing)
        instances = [(item.sop_instance_uid, self._spool_file(name, item)) for item in missing]

        def before_each() -> None:
            if self._stop.is_set():
                raise Stopping
            self._heartbeat_if_due(job)

        def record(acknowledged: list[tuple[str, int]]) -> None:
            self.manager.record_deliveries(job.id, name, acknowledged)

        client = CStoreClient(
            self.settings, name, destination, before_each, record, self._open_link
        )
        return client.store(instances)

    def _stow_all(
        self, job: JobView, name: str, destination: DicomWebDestination, missing: list[DerivedView]
    ) -> int:
        """STOW-RS in batches; refused instances are reported once every batch was tried."""
        client = DicomWebClient(
            name, destination, self.settings.send_timeout_seconds, self.settings.tls_ca_file
        )
        paths = [(item.sop_instance_uid, self._spool_file(name, item)) for item in missing]
        parts = [Part(uid, path, path.stat().st_size) for uid, path in paths]
        sent = 0
        refused: dict[str, int | None] = {}
        for batch in batches(parts, destination.batch_instances, destination.batch_bytes):
            if self._stop.is_set():
                raise Stopping
            self._heartbeat_if_due(job)
            result = client.store(batch)
            self.manager.record_deliveries(job.id, name, list(result.stored.items()))
            sent += len(result.stored)
            refused.update(result.failed)
        if refused:
            raise _stow_refusal(name, destination.url, refused)
        return sent

    def _spool_file(self, name: str, item: DerivedView) -> Path:
        path = self.ctx.spool.path(item.spool_path)
        if not path.is_file():
            raise DeliveryError(
                name,
                f"derived instance {item.sop_instance_uid} is missing from the spool",
                Failure.BROKEN,
            )
        return path

    def _heartbeat_if_due(self, job: JobView) -> None:
        """Between network steps, prove the claim is alive (raises LostClaim if it is not)."""
        if time.monotonic() - self._last_beat >= self.settings.heartbeat_seconds:
            self.manager.heartbeat(job.id, self.ctx.name)
            self._last_beat = time.monotonic()

    def _association_processes(self) -> OpenLink:
        """``open_association``, with its fork server started where a DICOM destination
        will need it; threads (logged) where it cannot start."""
        if any(isinstance(d, Destination) for d in self.settings.destinations.values()):
            try:
                start_association_server()
            except OSError as exc:
                log.warning(
                    "associations run in the send role's process: their fork server cannot "
                    "start (%s: %s); check that TMPDIR is a writable folder with a short path",
                    type(exc).__name__,
                    exc,
                )
                return ThreadLink
        return open_association

    def _connect_for_commitment(
        self, name: str, destination: Destination, handlers: list[EventHandlerType]
    ) -> Association | None:
        """An association for a storage commitment request; None (logged) when refused."""
        try:
            return associate(self.settings, name, destination, STORAGE_COMMITMENT, handlers)
        except DeliveryError as exc:
            log.warning(
                "storage commitment request not sent: %s",
                exc,
                extra={"destination": name, "outcome": "commitment request failed"},
            )
            return None


def _stow_refusal(name: str, url: str, refused: dict[str, int | None]) -> DeliveryError:
    """Instances the DICOMweb server did not store: out of resources (0xA7xx) passes,
    any other reason is a refusal."""
    reasons = [
        f"{uid} ({'not acknowledged' if code is None else f'FailureReason 0x{code:04X}'})"
        for uid, code in refused.items()
    ]
    shown = ", ".join(reasons[:3]) + (f" and {len(reasons) - 3} more" if len(reasons) > 3 else "")
    retryable = all(code is not None and is_retryable_status(code) for code in refused.values())
    return DeliveryError(
        name,
        f"{url} did not store {len(refused)} instance(s): {shown}",
        Failure.TRANSIENT if retryable else Failure.REFUSED,
    )
