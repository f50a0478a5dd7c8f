"""C-STORE of a job's derived instances to a DICOM destination, over several associations.

One pynetdicom association sends about half as many instances per second as DCMTK's
storescu into the same PACS: each 16 KB PDU costs pynetdicom ~0.1 ms of Python, and the
reactor waits for the next answer in 1 ms steps (``bench.send``).  Those costs overlap
across associations, so a destination's ``associations`` (default 4) are opened together
and take the instances from one shared queue: a slow association never holds the tail.
Each association is a ``StoreLink``: a ``ThreadLink`` in this process, or (the default,
``send_in_processes``) one in a process of its own (``node.store_processes``), where the
associations do not queue for one interpreter lock.  Where the peer refuses or does not
answer the extra ones (a PACS that limits associations per calling AE, or serves one at a
time), the instances go over those it accepted.  The first failure stops every association
after its instance in flight; what was acknowledged is recorded, the rest is sent again by
the next attempt.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from node.association_request import request_association
from node.config import Settings
from node.destinations import Destination
from node.dicom_tls import TLSSetupError, client_tls_args
from node.send_errors import DeliveryError, Failure, is_retryable_status

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]

#: Records acknowledged (SOP Instance UID, status) pairs in one transaction.
Record = Callable[[list[tuple[str, int]]], None]
#: Called before each instance; raises to stop sending (the process stops, the claim is lost).
BeforeEach = Callable[[], None]


class StoreLink(Protocol):
    """One open association to a destination, as the thread that sends over it sees it."""

    def store(self, uid: str, path: Path) -> tuple[int, str | None]:
        """C-STORE one file: the peer's status and error comment, or a DeliveryError."""
        ...

    def release(self) -> None:
        """Release the association (nothing happens where it is gone already)."""
        ...


#: Opens a StoreLink to (settings, destination name, destination), or a DeliveryError.
OpenLink = Callable[[Settings, str, Destination], StoreLink]


def associate(
    settings: Settings,
    name: str,
    destination: Destination,
    sop_class: str = CTImageStorage,
    handlers: list[EventHandlerType] | None = None,
) -> Association:
    """An association that accepted ``sop_class``, or a DeliveryError that says why."""
    ae = AE(ae_title=settings.ae_title)
    ae.add_requested_context(sop_class, TRANSFER_SYNTAXES)
    timeout = settings.send_timeout_seconds
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    peer = f"{destination.ae_title}@{destination.host}:{destination.port}"
    try:
        tls_args = client_tls_args(settings, destination)
    except TLSSetupError as exc:
        raise DeliveryError(name, str(exc), Failure.BROKEN) from exc
    assoc, rejection = request_association(
        ae,
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        max_pdu=settings.max_pdu_size,
        tls_args=tls_args,
        evt_handlers=handlers,
    )
    if rejection is not None:
        # rejected-permanent (an unknown AE title, say) will not change by retrying
        failure = Failure.REFUSED if rejection.permanent else Failure.TRANSIENT
        message = f"{peer} rejected the association ({rejection.words})"
        raise DeliveryError(name, message, failure)
    if not assoc.is_established:
        reason = "could not be reached (connection refused, aborted or timed out)"
        raise DeliveryError(name, f"{peer} {reason}", Failure.TRANSIENT)
    if not any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts):
        assoc.release()
        raise DeliveryError(
            name, f"{peer} refused the {UID(sop_class).name} SOP class", Failure.REFUSED
        )
    return assoc


class CStoreClient:
    """Sends files to one DICOM destination: ``store`` returns the count acknowledged."""

    def __init__(
        self,
        settings: Settings,
        name: str,
        destination: Destination,
        before_each: BeforeEach,
        record: Record,
        open_link: OpenLink,
    ) -> None:
        self.settings = settings
        self.name = name
        self.destination = destination
        self._before_each = before_each
        self._open_link = open_link
        self._acknowledged = GroupCommit(record)

    def store(self, instances: Sequence[tuple[str, Path]]) -> int:
        """C-STORE each (SOP Instance UID, file); raises the first failure, after every
        association has finished the instance it had in flight.

        The first association opens before anything is sent (its failure is the
        destination's); the others open beside it while it sends, each in its own thread,
        which releases it when the queue is empty.  A peer that serves one association at
        a time (DCMTK's storescp without ``--fork``) answers the others only after the
        first is released, when nothing is left for them.
        """
        wanted = max(1, min(self.destination.associations, len(instances)))
        first = self._open_link(self.settings, self.name, self.destination)
        queue = iter(instances)
        lock = threading.Lock()
        failed = threading.Event()

        def take() -> Iterator[tuple[str, Path]]:
            while not failed.is_set():
                with lock:
                    item = next(queue, None)
                if item is None:
                    return
                yield item

        def send_all(link: StoreLink | None) -> int:
            link = link or self._open_another(wanted)
            if link is None:
                return 0
            try:
                return self._send_over(link, take())
            except BaseException:
                failed.set()
                raise
            finally:
                link.release()

        with ThreadPoolExecutor(wanted, thread_name_prefix="c-store") as pool:
            futures = [pool.submit(send_all, first if i == 0 else None) for i in range(wanted)]
        errors = [exc for exc in (f.exception() for f in futures) if exc is not None]
        try:
            self._acknowledged.drain()  # what was acknowledged is recorded, failure or not
        except Exception:
            if not errors:
                raise
            log.warning(
                "acknowledgements of %s not recorded after an earlier failure; they are sent again",
                self.name,
                exc_info=True,
                extra={"destination": self.name},
            )
        if errors:
            raise _first(errors)
        return sum(f.result() for f in futures)

    def _open_another(self, wanted: int) -> StoreLink | None:
        """One more association, or None (logged) where the peer refuses or does not answer,
        or opening it fails otherwise: the first association sends without it."""
        try:
            return self._open_link(self.settings, self.name, self.destination)
        except DeliveryError as exc:
            reason, trace = str(exc), False
        except Exception as exc:  # a fault while opening an extra one fails nothing
            reason, trace = f"{type(exc).__name__} while opening it", True
        log.info(
            "an association of the %d asked for was not opened: %s",
            wanted,
            reason,
            exc_info=trace,
            extra={"destination": self.name, "outcome": "fewer associations"},
        )
        return None

    def _send_over(self, link: StoreLink, instances: Iterator[tuple[str, Path]]) -> int:
        sent = 0
        for uid, path in instances:
            self._before_each()
            code, comment = link.store(uid, path)
            if code_to_category(code) in (STATUS_SUCCESS, STATUS_WARNING):
                # recorded before the next is taken (and the queue checked for a failure)
                self._acknowledged.wait(self._acknowledged.add(uid, code))
                sent += 1
                continue
            answer = f"status 0x{code:04X}" + (f" ({comment})" if comment else "")
            raise DeliveryError(
                self.name,
                f"{self.destination.ae_title} answered {answer} to the C-STORE of {uid}",
                Failure.TRANSIENT if is_retryable_status(code) else Failure.REFUSED,
            )
        return sent


class ThreadLink:
    """An association in this process: pynetdicom's reactor thread beside the caller's."""

    def __init__(self, settings: Settings, name: str, destination: Destination) -> None:
        self.name = name
        self._assoc = associate(settings, name, destination)
        _without_delay(self._assoc)

    def store(self, uid: str, path: Path) -> tuple[int, str | None]:
        """The peer's status and error comment, or a DeliveryError."""
        assoc = self._assoc
        try:
            status = assoc.send_c_store(_payload(path, assoc))
        except RuntimeError as exc:  # pynetdicom's answer once the peer has aborted
            if assoc.is_established:
                raise
            raise DeliveryError(
                self.name, f"association aborted before the C-STORE of {uid}", Failure.TRANSIENT
            ) from exc
        except (ValueError, AttributeError, InvalidDicomError) as exc:
            raise DeliveryError(
                self.name, f"cannot send derived instance {uid}: {exc}", Failure.BROKEN
            ) from exc
        if "Status" not in status:
            raise DeliveryError(
                self.name,
                f"no answer to the C-STORE of {uid} (association aborted or timed out)",
                Failure.TRANSIENT,
            )
        comment = status.get("ErrorComment")
        return int(status.Status), str(comment) if comment else None

    def release(self) -> None:
        if self._assoc.is_established:
            self._assoc.release()


class GroupCommit:
    """Acknowledgements of several associations, recorded by whichever of their threads
    is free: a batch per transaction instead of one per instance, and no thread queues
    for another's commit (SQLite would make them wait for its write lock in turn).

    Each association waits, before it takes its next instance, until its last
    acknowledgement is recorded (``wait``), so at most one of its instances is ever stored
    by the peer and not yet recorded, as with one association.  What was not recorded when the
    process died is sent again by the next attempt: the PACS gets those few instances
    twice, with the same UIDs.
    """

    def __init__(self, record: Record) -> None:
        self._record = record
        self._changed = threading.Condition()
        self._pending: list[tuple[str, int]] = []
        self._queued = 0  # tickets handed out, one per acknowledgement
        self._recorded = 0  # tickets recorded (batches are recorded in ticket order)
        self._recording = False
        self._failed: BaseException | None = None

    def add(self, uid: str, status: int) -> int:
        """Queue one and return its ticket; record the queue unless another thread is
        already doing it."""
        with self._changed:
            self._pending.append((uid, status))
            self._queued += 1
            ticket = self._queued
            if self._recording:
                return ticket
            self._recording = True
        self.drain()
        return ticket

    def wait(self, ticket: int) -> None:
        """Until the acknowledgement of ``ticket`` is recorded; raises what recording raised."""
        with self._changed:
            while self._recorded < ticket:
                if self._failed is not None:
                    raise self._failed
                self._changed.wait()

    def drain(self) -> None:
        """Record batches until nothing is queued (raises what recording raised)."""
        try:
            while True:
                with self._changed:
                    batch, self._pending = self._pending, []
                    if not batch:
                        self._recording = False
                        return
                self._record(batch)
                with self._changed:
                    self._recorded += len(batch)
                    self._changed.notify_all()
        except BaseException as exc:
            with self._changed:
                self._recording = False
                self._failed = exc
                self._changed.notify_all()
            raise


def _first(errors: list[BaseException]) -> BaseException:
    """What stops the job outranks a failure of this destination (stopping, a lost claim,
    the job table's outage, a bug); among those, the first."""
    others = [exc for exc in errors if not isinstance(exc, DeliveryError)]
    return (others or errors)[0]


def _without_delay(assoc: Association) -> None:
    """Turn Nagle's algorithm off, as storescu's ``TCP_NODELAY=1`` does: pynetdicom writes
    each PDU with its own ``send``, and an instance's last, short PDU would otherwise wait
    for the peer's delayed acknowledgement (measured: 3x fewer instances per second)."""
    transport = assoc.dul.socket
    if transport is not None and transport.socket is not None:
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _payload(path: Path, assoc: Association) -> Path | Dataset:
    """The file itself where the peer accepted its transfer syntax (derived instances
    are Explicit VR Little Endian): pynetdicom then sends the stored bytes as they are,
    never decoding and encoding them again.  Else the data set, which pynetdicom
    converts to the syntax the peer accepted."""
    if any(
        cx.abstract_syntax == CTImageStorage and cx.transfer_syntax[0] == ExplicitVRLittleEndian
        for cx in assoc.accepted_contexts
    ):
        # Process-wide in pynetdicom; it applies only to C-STOREs given a path, and the
        # node sends a path nowhere else.
        _config.STORE_SEND_CHUNKED_DATASET = True
        return path
    return dcmread(path)
