"""The DICOM receiver: C-ECHO and C-STORE of CT images into the spool and the job table.

An instance is answered with success only once it is checked (``node.instance_checks``),
fsynced in the spool under a generated name and recorded in the job table; every other
outcome is a specific failure status so that the sender keeps its copy and retries.
pynetdicom gathers each data set in memory (the listener bounds its size,
``max_instance_mb``); the receiver adds the file meta information (``node.receiving``),
hashes the bytes and writes them once into the spool.  The data set is never decoded
here: the header is parsed once, with large values left unread.  Storage commitment
reports (N-EVENT-REPORT, the PACS acting as SCP of the Push Model class) are handled by
``node.commitment``.  Who may connect, for how long and with how large a PDU is the
listener's policy (``node.listener``).
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import sys
import threading
import time
from collections import Counter
from multiprocessing.synchronize import Event as EventType
from typing import cast

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType

# Verification is made at import time, so mypy cannot see it.
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node import storing
from node.association_slots import AssociationSlots
from node.commitment import STORAGE_COMMITMENT, handle_report
from node.config import Settings
from node.context import NodeContext
from node.dicom_tls import server_context
from node.instance_checks import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    DECODE_FAILED,
    PIXEL_DATA_INVALID,
    Refused,
    shown,
    shown_uid,
)
from node.listener import GuardedServer, GuardedSocket, ListenerLimits
from node.logs import configure_logging
from node.receiver_processes import ReceiverProcesses, check_port_free
from node.receiving import file_bytes
from node.recovery import rerecord_unrecorded
from node.storing import (
    DATABASE_UNAVAILABLE,
    HANDLER_FAILED,
    SPOOL_FULL,
    SPOOL_WRITE_FAILED,
    STORAGE_CLASSES,
    TRANSFER_SYNTAXES,
    Arrival,
    where,
)

log = logging.getLogger(__name__)

__all__ = [
    "CANNOT_UNDERSTAND",
    "DATABASE_UNAVAILABLE",
    "DATASET_MISMATCH",
    "DECODE_FAILED",
    "HANDLER_FAILED",
    "PIXEL_DATA_INVALID",
    "SPOOL_FULL",
    "SPOOL_WRITE_FAILED",
    "STORAGE_CLASSES",
    "TRANSFER_SYNTAXES",
    "Receiver",
]

#: Storage commitment reports carry no pixel data: the uncompressed syntaxes only.
COMMITMENT_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]

SUCCESS = 0x0000

#: Seconds ``stop`` lets running associations finish before aborting them.
STOP_GRACE_SECONDS = 5.0
#: The lock file of the receiver processes' shared association counts, in ``state_dir``.
SLOTS_LOCK = "receiver-slots.lock"
#: Seconds between a receiver process's checks that the node's process still runs.
PARENT_CHECK_SECONDS = 1.0
#: pynetdicom's reader polls its socket and queue in steps of ``_run_loop_delay`` (1 ms by
#: default) while its association receives (``node.idle_polling`` slows an idle one
#: down).  While at most ``QUICK_POLL_ASSOCIATIONS`` are open (in all receiver
#: processes; a process re-tunes its own at each open and close) each gets
#: ``QUICK_POLL_SECONDS``: an instance is answered sooner (bench.receiver_costs, one
#: association: pynetdicom's part 2.3 against 2.8-3.5 ms).  More get the default back:
#: eight that poll quickly spend the CPU they need (one process, eight associations: 137
#: against 172 slices/s).
QUICK_POLL_SECONDS = 0.0002
QUICK_POLL_ASSOCIATIONS = 2
DEFAULT_POLL_SECONDS = 0.001


class Receiver:
    """A non-blocking C-ECHO/C-STORE SCP on ``settings.bind_address:port``."""

    def __init__(
        self, ctx: NodeContext, process: int = 0, slots: AssociationSlots | None = None
    ) -> None:
        """``process`` 0 is the node's own receiver; 1 and above serve beside it on its
        port (``node.receiver_processes``), counting associations in its ``slots``."""
        self.ctx = ctx
        settings = ctx.settings
        self.process = process
        self.slots = slots or AssociationSlots(
            settings.receiver_processes,
            settings.state_dir / SLOTS_LOCK if settings.receiver_processes > 1 else None,
        )
        self.limits = ListenerLimits.from_settings(settings)
        self._ae = AE(ae_title=settings.ae_title)
        self._ae.maximum_pdu_size = settings.max_pdu_size
        # The listener admits at most max_associations; pynetdicom must not refuse sooner.
        self._ae.maximum_associations = settings.max_associations
        self._ae.acse_timeout = settings.association_request_timeout_seconds
        self._ae.network_timeout = settings.idle_timeout_seconds
        self._ae.add_supported_context(Verification)
        for sop_class in STORAGE_CLASSES:
            self._ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        # Reports come from the PACS as SCP of the class: accept the role it proposes.
        self._ae.add_supported_context(
            STORAGE_COMMITMENT, COMMITMENT_SYNTAXES, scu_role=False, scp_role=True
        )
        self._servers: list[GuardedServer] = []
        self._others: ReceiverProcesses | None = None
        self._tallies: dict[int, Counter[str]] = {}
        self._tallies_lock = threading.Lock()

    @property
    def port(self) -> int:
        """The port listened on (the configured one until started)."""
        if not self._servers:
            return self.ctx.settings.port
        return int(self._servers[0].server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The DICOM-over-TLS port (None without ``tls_port``)."""
        if len(self._servers) < 2:
            return self.ctx.settings.tls_port
        return int(self._servers[1].server_address[1])

    def start(self) -> None:
        """Remove what an earlier run left half-written, record again what the job table
        lost (``node.recovery``), then listen in background threads, and start the other
        receiver processes (``receiver_processes``) on the same port."""
        removed = self.ctx.spool.remove_partials()
        if removed:
            log.info("removed %d partial files left by an earlier run", removed)
        rerecord_unrecorded(self.ctx)
        self.listen()
        if self.ctx.settings.receiver_processes > 1:
            bound = self.ctx.settings.model_copy(
                update={"port": self.port, "tls_port": self.tls_port}
            )
            self._others = ReceiverProcesses(bound, self.slots, run_receiver_process)
            self._others.start()

    def listen(self) -> None:
        """Listen on the configured ports (one more process of the node's receiver starts
        here)."""
        settings = self.ctx.settings
        self._listen(settings.port, None)
        log.info(
            "receiver %s listening on %s:%d",
            settings.ae_title,
            settings.bind_address,
            self.port,
            extra={
                "ae_title": settings.ae_title,
                "port": self.port,
                "receiver_process": self.process,
            },
        )
        if settings.tls_port is not None:
            self._listen(settings.tls_port, server_context(settings))
            log.info(
                "receiver %s listening for DICOM over TLS on %s:%d%s",
                settings.ae_title,
                settings.bind_address,
                self.tls_port,
                " (client certificate required)" if settings.tls_require_client_cert else "",
                extra={"ae_title": settings.ae_title, "port": self.tls_port},
            )

    def _listen(self, port: int, ssl_context: ssl.SSLContext | None) -> None:
        if self.process == 0 and self.slots.processes > 1:
            check_port_free(self.ctx.settings.bind_address, port)
        handlers: list[EventHandlerType] = [
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_N_EVENT_REPORT, self.handle_report),
            (evt.EVT_CONN_OPEN, self.handle_open),
            (evt.EVT_CONN_CLOSE, self.handle_close),
        ]
        server = cast(
            GuardedServer,
            self._ae.make_server(
                (self.ctx.settings.bind_address, port),
                ssl_context=ssl_context,
                evt_handlers=handlers,
                server_class=GuardedServer,
                limits=self.limits,
                slots=self.slots,
                process=self.process,
            ),
        )
        # As AE.start_server does for a non-blocking server; AE.shutdown stops what it lists.
        self._ae._servers.append(server)
        threading.Thread(target=server.serve_forever, name=f"listener:{port}", daemon=True).start()
        self._servers.append(server)

    def stop(self) -> None:
        """Stop accepting, let running associations finish briefly, then abort the rest."""
        if not self._servers:
            return
        if self._others is not None:
            self._others.stop()  # in parallel with this process's own grace
        for server in self._servers:
            server.shutdown()
        self._servers = []
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for association in self._ae.active_associations:
            association.join(max(0.0, deadline - time.monotonic()))
        self._ae.shutdown()
        if self._others is not None:
            self._others.join()
            self._others = None
        log.info("receiver stopped")

    def handle_requested(self, event: Event) -> None:
        """A-ASSOCIATE-RQ: reject calling AE titles outside the allow-list before anything."""
        settings = self.ctx.settings
        primitive = event.assoc.requestor.primitive
        calling_ae = str(primitive.calling_ae_title if primitive else "").strip()
        if not settings.allowed_calling_ae_titles or calling_ae in (
            settings.allowed_calling_ae_titles
        ):
            return
        address = str(event.assoc.requestor.address)
        log.warning(
            "association from %s at %s rejected: calling AE title not in allowed_calling_ae_titles",
            shown(calling_ae),
            address,
            extra={"calling_ae": shown(calling_ae), "peer_address": address},
        )
        # Rejected permanent, by the service user: the caller should not try again as is.
        # As pynetdicom does for its own rejections: wait until the peer has the A-ASSOCIATE-RJ.
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)
        event.assoc.kill()

    def handle_echo(self, event: Event) -> int:
        """C-ECHO: always success while the receiver runs."""
        log.debug("C-ECHO", extra={"calling_ae": _calling_ae(event)})
        return SUCCESS

    def handle_report(self, event: Event) -> tuple[Dataset, None]:
        """N-EVENT-REPORT: a storage commitment report (``node.commitment``)."""
        return handle_report(self.ctx.manager, self.ctx.name, event)

    def handle_store(self, event: Event) -> Dataset:
        """C-STORE: check, spool, record, answer; each failure has its own status."""
        calling_ae = _calling_ae(event)
        try:
            outcome = self._store(event, calling_ae)
            self._tally(event, outcome)
            return _status(SUCCESS)
        except Refused as refused:
            self._tally(event, f"refused 0x{refused.status:04X}")
            return _status(refused.status, refused.comment)
        except Exception as exc:
            self._tally(event, f"refused 0x{HANDLER_FAILED:04X}")
            # Answer even on a bug; the exception's kind and place only, as its text may
            # quote a header value.
            log.error(
                "C-STORE failed unexpectedly: %s at %s",
                exc.__class__.__name__,
                where(exc),
                extra={
                    "calling_ae": calling_ae,
                    "sop_uid": shown_uid(cast(C_STORE, event.request).AffectedSOPInstanceUID),
                },
            )
            return _status(HANDLER_FAILED, "internal error in the receiver, see its log")

    def handle_open(self, event: Event) -> None:
        """A connection was admitted: its polling step, and the others', for their number."""
        self._tune_polling(event, opening=True)

    def handle_close(self, event: Event) -> None:
        """One log line per association that stored anything: what came and what was refused."""
        self._tune_polling(event, opening=False)
        with self._tallies_lock:
            tally = self._tallies.pop(id(event.assoc), None)
        if tally:
            log.info(
                "association from %s closed: %s",
                _calling_ae(event),
                ", ".join(f"{count} {outcome}" for outcome, count in sorted(tally.items())),
                extra={"calling_ae": _calling_ae(event), "receiver_process": self.process},
            )

    def _tune_polling(self, event: Event, opening: bool) -> None:
        running = [assoc for assoc in self._ae.active_associations if assoc is not event.assoc]
        if opening:
            running.append(event.assoc)
        # The closing association still holds its slot.
        quick = self.slots.open_total() - (not opening) <= QUICK_POLL_ASSOCIATIONS
        for assoc in running:
            pace = cast(GuardedSocket, assoc.dul.socket).pace
            pace.busy_seconds = QUICK_POLL_SECONDS if quick else DEFAULT_POLL_SECONDS

    def _tally(self, event: Event, outcome: str) -> None:
        with self._tallies_lock:
            self._tallies.setdefault(id(event.assoc), Counter())[outcome] += 1

    def _store(self, event: Event, calling_ae: str) -> str:
        """Check, spool and record one instance; returns the outcome, or raises Refused."""
        store = cast(C_STORE, event.request)
        request = (
            str(store.AffectedSOPClassUID or ""),
            str(store.AffectedSOPInstanceUID or ""),
        )
        extra = {"calling_ae": calling_ae, "sop_uid": shown_uid(request[1])}
        syntax = str(event.context.transfer_syntax)
        data = file_bytes(*request, syntax, event.encoded_dataset(include_meta=False))
        arrival = Arrival(
            data,
            calling_ae,
            str(event.assoc.requestor.address),
            request=request,
            transfer_syntax=syntax,
        )
        return storing.accept(self.ctx, arrival, extra).outcome


def run_receiver_process(
    settings: Settings,
    process: int,
    slots: AssociationSlots,
    ready: EventType,
    stop: EventType,
    parent: int,
) -> None:
    """Receiver process ``process`` of the node (``node.receiver_processes``): listen
    until ``stop`` is set or the node's process (``parent``) is gone, then stop as the
    node's does."""
    # The node's process decides when its receiver processes stop (Ctrl-C, SIGTERM).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(settings.log_level, settings.log_format)
    try:
        ctx = NodeContext.open(settings)
    except Exception as exc:
        log.error("receiver process %d cannot open the job table: %s", process, exc)
        sys.exit(1)
    receiver = Receiver(ctx, process, slots)
    try:
        receiver.listen()
        ready.set()
        while not stop.wait(PARENT_CHECK_SECONDS) and os.getppid() == parent:
            pass
    except Exception as exc:
        log.error("receiver process %d failed: %s: %s", process, exc.__class__.__name__, exc)
        sys.exit(1)
    finally:
        receiver.stop()
        ctx.close()


def _status(status: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


def _calling_ae(event: Event) -> str:
    return str(event.assoc.requestor.ae_title).strip()
