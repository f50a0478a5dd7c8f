"""The DICOM listener's policy: who gets a connection slot, for how long, and how large a PDU.

pynetdicom's server gives every accepted connection a thread, reads each PDU with a
blocking socket that has no deadline and no length limit, and checks callers only once
a whole A-ASSOCIATE-RQ has arrived.  Here, when a connection is accepted and before any
thread exists, the source address is checked against ``allowed_addresses`` and the
association limits (all, and per address); a refused caller gets an A-ASSOCIATE-RJ and
the socket is closed.  Every admitted connection then reads through ``GuardedSocket``:
the A-ASSOCIATE-RQ must be complete within ``association_request_timeout_seconds`` of
the connection, every later PDU within ``idle_timeout_seconds`` of the one before, a
PDU whose header claims more than the advertised maximum is answered with an A-ABORT
before any of its body is read, and so is the P-DATA that takes one message's data set
past ``max_instance_mb`` (pynetdicom gathers a data set in memory: this bounds it); the
data sets arriving at once share ``max_inflight_mb`` (``node.inflight``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from node.association_slots import AssociationSlots
from node.config import Settings
from node.idle_polling import PacedDIMSE, PollingPace
from node.inflight import InflightBudget
from node.listener_refusals import A_ASSOCIATE_RQ, CONTROL_PDU_LIMIT, RefusedConnections

log = logging.getLogger(__name__)

P_DATA_TF = 0x04
#: A-ABORT, source: service provider, reason: invalid PDU parameter value.
ABORT_INVALID_PDU = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06])
#: A-ASSOCIATE-RJ: rejected permanent, service user, no reason given (an unknown caller).
REJECT_ADDRESS = bytes([0x03, 0, 0, 0, 0, 4, 0, 0x01, 0x01, 0x01])
#: A-ASSOCIATE-RJ: rejected transient, service provider (presentation), local limit exceeded.
REJECT_LIMIT = bytes([0x03, 0, 0, 0, 0, 4, 0, 0x02, 0x03, 0x02])
#: Seconds a finished association's handler waits for pynetdicom's reader thread to end.
READER_JOIN_SECONDS = 5.0
#: Refused connections from one address are logged at most once per this many seconds.
REFUSAL_LOG_SECONDS = 10.0
REFUSAL_LOG_ADDRESSES = 4096

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ListenerLimits:
    """The settings the listener enforces, read once at start."""

    max_associations: int
    max_associations_per_address: int
    association_request_timeout: float
    idle_timeout: float
    max_pdu_size: int
    max_instance_bytes: int
    max_inflight_bytes: int
    networks: tuple[Network, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> ListenerLimits:
        return cls(
            max_associations=settings.max_associations,
            max_associations_per_address=settings.max_associations_per_address,
            association_request_timeout=settings.association_request_timeout_seconds,
            idle_timeout=settings.idle_timeout_seconds,
            max_pdu_size=settings.max_pdu_size,
            max_instance_bytes=settings.max_instance_mb << 20,
            max_inflight_bytes=settings.max_inflight_mb << 20,
            networks=tuple(ipaddress.ip_network(net) for net in settings.allowed_addresses),
        )

    def address_allowed(self, address: str) -> bool:
        """True when ``allowed_addresses`` is empty or one of its networks holds ``address``."""
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(_plain_address(address))
        except ValueError:
            return False
        return any(ip in network for network in self.networks)


class GuardedSocket(AssociationSocket):
    """pynetdicom's socket with a deadline on every PDU and a ceiling on its length.

    pynetdicom's reader asks for a PDU as ``recv(6)`` (type and length) then
    ``recv(length)``; this class reads both against the current deadline and checks the
    length in between, and counts each message's data set bytes in the P-DATA it reads.
    On a missed deadline, an oversized PDU or data set or a closed connection it returns
    short, which pynetdicom treats as a closed transport.
    """

    limits: ListenerLimits
    budget: InflightBudget
    pace: PollingPace
    requested: bool
    _deadline: float
    _header_next: bool
    _data_next: bool
    _dataset_bytes: int
    _ended: bool

    @classmethod
    def adopt(
        cls,
        sock: AssociationSocket,
        limits: ListenerLimits,
        budget: InflightBudget,
        pace: PollingPace,
    ) -> GuardedSocket:
        """Give the socket pynetdicom made for an accepted connection this class's reads.

        pynetdicom builds that socket inside its request handler (and queues the
        connection's first event as it does), so it is adopted rather than replaced.
        """
        sock.__class__ = cls
        guarded = cast(GuardedSocket, sock)
        guarded.limits = limits
        guarded.budget = budget
        guarded.pace = pace
        guarded.requested = False
        guarded._deadline = time.monotonic() + limits.association_request_timeout
        guarded._header_next = True
        guarded._data_next = False
        guarded._dataset_bytes = 0
        guarded._ended = False
        return guarded

    @property
    def ready(self) -> bool:
        """No more reads once the connection has ended (pynetdicom would read EOF again).
        The reader asks before each sleep: its next step follows the association's pace."""
        ready = not self._ended and super().ready
        if ready:
            self.pace.heard()
        self.assoc.dul._run_loop_delay = self.pace.step()
        return ready

    @property
    def peer(self) -> str:
        return str(self.assoc.requestor.address)

    def recv(self, nr_bytes: int) -> bytearray:
        if self._header_next:
            return self._recv_header(nr_bytes)
        body = self._read(nr_bytes)
        self._header_next = True
        if self._data_next and not self._dataset_within_limit(body):
            return bytearray()
        if len(body) == nr_bytes:
            self._deadline = time.monotonic() + self.limits.idle_timeout
            if self.socket is not None:
                self.socket.settimeout(self.limits.idle_timeout)  # bounds our sends too
        return body

    def close(self) -> None:
        super().close()
        self._end()

    def _recv_header(self, nr_bytes: int) -> bytearray:
        header = self._read(nr_bytes)
        if len(header) != 6:
            return header
        pdu_type, _, length = struct.unpack(">BBL", header)
        limit = self.limits.max_pdu_size if pdu_type == P_DATA_TF else CONTROL_PDU_LIMIT
        if length > limit:
            log.warning(
                "association from %s aborted: a PDU of %d bytes exceeds the %d-byte maximum",
                self.peer,
                length,
                limit,
                extra={"peer_address": self.peer},
            )
            self._send_and_end(ABORT_INVALID_PDU)
            return bytearray()
        self.requested = self.requested or pdu_type == A_ASSOCIATE_RQ
        self._header_next = False
        self._data_next = pdu_type == P_DATA_TF
        return header

    def _dataset_within_limit(self, body: bytearray) -> bool:
        """Count the data set fragments of a P-DATA-TF body (each PDV: 4-byte length,
        context ID, control header whose bit 0 marks a command and bit 1 a last fragment);
        False, with the association aborted, when a data set outgrows ``max_instance_mb``
        or is the largest of those that take the process past ``max_inflight_mb``."""
        offset = 0
        while offset + 6 <= len(body):
            (length,) = struct.unpack_from(">L", body, offset)
            control = body[offset + 5]
            if not control & 1:
                self._dataset_bytes += length - 2
                if self._dataset_bytes > self.limits.max_instance_bytes:
                    limit = self.limits.max_instance_bytes >> 20
                    return self._abort_dataset(f"a data set exceeds max_instance_mb ({limit} MiB)")
                if not self.budget.grow(self, length - 2):
                    return self._abort_dataset(self._inflight_reason(self._dataset_bytes))
                if control & 2:
                    self._dataset_bytes = 0
                    self.budget.settle(self)
            offset += 4 + length
        return True

    def evict(self, held: int, budget: int) -> None:
        """Abort from another association's thread: this data set was the largest when the
        data sets arriving passed ``max_inflight_mb``; the blocked read then returns short."""
        log.warning(
            "association from %s aborted: %s",
            self.peer,
            self._inflight_reason(held),
            extra={"peer_address": self.peer},
        )
        raw = self.socket
        if raw is None:
            return
        with contextlib.suppress(OSError):  # never wait on this peer: it may not read
            raw.send(ABORT_INVALID_PDU, socket.MSG_DONTWAIT)
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_RDWR)

    def _inflight_reason(self, held: int) -> str:
        return (
            f"its unfinished data set ({held} bytes) was the largest when the data sets "
            f"arriving passed max_inflight_mb ({self.budget.limit_bytes >> 20} MiB)"
        )

    def _abort_dataset(self, reason: str) -> bool:
        log.warning(
            "association from %s aborted: %s", self.peer, reason, extra={"peer_address": self.peer}
        )
        self._send_and_end(ABORT_INVALID_PDU)
        return False

    def _read(self, nr_bytes: int) -> bytearray:
        """Up to ``nr_bytes``, fewer when the deadline passes or the peer closes."""
        data = bytearray()
        raw = self.socket
        while raw is not None and len(data) < nr_bytes:
            remaining = self._deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                raw.settimeout(remaining)
                chunk = raw.recv(min(nr_bytes - len(data), 1 << 16))
            except TimeoutError:
                log.warning(
                    "connection from %s closed: no complete PDU within its %.1f s",
                    self.peer,
                    self.limits.idle_timeout
                    if self.requested
                    else self.limits.association_request_timeout,
                    extra={"peer_address": self.peer},
                )
                self._send_and_end(ABORT_INVALID_PDU if self.requested else b"")
                return data
            except OSError:
                chunk = b""
            if not chunk:
                self._end()
                return data
            data += chunk
        return data

    def _send_and_end(self, pdu: bytes) -> None:
        if pdu and self.socket is not None:
            try:
                self.socket.settimeout(1.0)
                self.socket.sendall(pdu)
            except OSError:
                pass
        self._end()

    def _end(self) -> None:
        """Mark the connection over; before an A-ASSOCIATE-RQ, release its waiting thread.

        pynetdicom's association thread waits for the request up to ``acse_timeout``
        even after the connection is gone; an empty answer ends that wait at once.
        """
        if not self._ended and not self.requested:
            self.assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]
        self._ended = True
        self.budget.settle(self)


class GuardedHandler(RequestHandler):
    """Run one accepted connection's association and hold its slot until it ends."""

    server: GuardedServer

    def handle(self) -> None:
        try:
            assoc = self._create_association()
            pace = PollingPace(assoc.dul._run_loop_delay)
            sock = cast(AssociationSocket, assoc.dul.socket)
            GuardedSocket.adopt(sock, self.server.limits, self.server.budget, pace)
            PacedDIMSE.adopt(assoc.dimse, pace)
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            assoc.join()
            if assoc.dul.is_alive():
                assoc.dul.join(READER_JOIN_SECONDS)
        finally:
            self.server.release(str(self.client_address[0]))


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server that admits a connection only within the limits."""

    block_on_close = False  # stop() decides how long associations may finish

    def __init__(
        self,
        *args: Any,
        limits: ListenerLimits,
        slots: AssociationSlots,
        process: int = 0,
        **kwargs: Any,
    ) -> None:
        self.limits = limits
        #: Open associations of the node, this server's process as ``process``.
        self.slots = slots
        self.process = process
        self.refused = RefusedConnections(limits.association_request_timeout)
        #: Data sets still arriving in this process, all associations together.
        self.budget = InflightBudget(limits.max_inflight_bytes)
        self._refusals_logged: dict[str, tuple[float, int]] = {}  # accept loop only
        kwargs["request_handler"] = GuardedHandler
        super().__init__(*args, **kwargs)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit the connection, or answer A-ASSOCIATE-RJ; runs before any thread exists."""
        address = _plain_address(str(client_address[0]))
        if not self.limits.address_allowed(address):
            reason, answer = "address not in allowed_addresses", REJECT_ADDRESS
        else:
            refusal = self.slots.take(
                self.process,
                address,
                self.limits.max_associations,
                self.limits.max_associations_per_address,
            )
            if refusal is None:
                return True
            reason, answer = refusal, REJECT_LIMIT
        self._log_refusal(address, reason)
        if not isinstance(request, ssl.SSLSocket):  # no handshake here: TLS callers just close
            self.refused.take(request, answer)
        return False

    def _log_refusal(self, address: str, reason: str) -> None:
        """One line per address every ``REFUSAL_LOG_SECONDS``, counting those in between,
        so that a caller connecting in a loop cannot flood the log."""
        now = time.monotonic()
        logged, unlogged = self._refusals_logged.get(address, (0.0, 0))
        if logged and now - logged < REFUSAL_LOG_SECONDS:
            self._refusals_logged[address] = (logged, unlogged + 1)
            return
        if len(self._refusals_logged) >= REFUSAL_LOG_ADDRESSES:
            self._refusals_logged.clear()  # bounded, whatever the number of callers
        self._refusals_logged[address] = (now, 0)
        log.warning(
            "connection from %s rejected: %s%s",
            address,
            reason,
            f" ({unlogged} more rejected since the last line)" if unlogged else "",
            extra={"peer_address": address},
        )

    def shutdown_request(self, request: Any) -> None:
        """Close a finished or refused connection, unless it still waits for its answer."""
        if request not in self.refused:
            super().shutdown_request(request)

    def server_bind(self) -> None:
        """Bind; beside the node's other receiver processes on the port when there are any
        (``SO_REUSEPORT``: the kernel spreads connections over them)."""
        if self.slots.processes > 1:
            cast(socket.socket, self.socket).setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def release(self, address: str) -> None:
        """The connection is over: free its slot."""
        self.slots.release(self.process, _plain_address(address))


def _plain_address(address: str) -> str:
    """``::ffff:10.0.0.1`` and ``10.0.0.1`` are one caller."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)
