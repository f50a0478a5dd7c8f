"""Refused connections, answered by one thread for all of them.

The listener refuses a caller (unknown address, association limits) before it gets a
thread of its own; this module owns such a connection until the caller has sent its
A-ASSOCIATE-RQ and been answered with the A-ASSOCIATE-RJ.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import cast

A_ASSOCIATE_RQ = 0x01
#: Association negotiation, release and abort PDUs are small; this bounds their length.
CONTROL_PDU_LIMIT = 1 << 20
#: At most this many refused connections wait for their A-ASSOCIATE-RJ at once.
REFUSED_WAITING_MAX = 256


class RefusedConnections:
    """Refused connections, answered by one thread for all of them, never one each.

    A DICOM caller expects the A-ASSOCIATE-RJ after its A-ASSOCIATE-RQ (pynetdicom
    drops an answer that comes first), so the request is read and discarded, then the
    answer sent; the connection closes when the caller does, or ``linger`` seconds after
    it was accepted, or at once when it sends something else or too much.
    """

    def __init__(self, linger: float) -> None:
        self.linger = linger
        self._selector = selectors.DefaultSelector()
        self._waiting: dict[socket.socket, _Refusal] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def __contains__(self, request: object) -> bool:
        with self._lock:
            return request in self._waiting

    def take(self, request: socket.socket, pdu: bytes) -> bool:
        """Own ``request`` until it is answered with ``pdu``; False when too many wait."""
        with self._lock:
            if len(self._waiting) >= REFUSED_WAITING_MAX:
                return False
            request.setblocking(False)
            self._waiting[request] = _Refusal(pdu, time.monotonic() + self.linger)
            self._selector.register(request, selectors.EVENT_READ)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="refused", daemon=True)
                self._thread.start()
        return True

    def _serve(self) -> None:
        while True:
            for key, _ in self._selector.select(0.1):
                self._read(cast(socket.socket, key.fileobj))
            now = time.monotonic()
            with self._lock:
                expired = [sock for sock, refusal in self._waiting.items() if refusal.until < now]
            for sock in expired:
                self._close(sock)

    def _read(self, sock: socket.socket) -> None:
        refusal = self._waiting[sock]
        try:
            data = sock.recv(1 << 16)
        except OSError:
            data = b""
        if not data:
            self._close(sock)
            return
        if refusal.answered:
            return
        refusal.header += data[: 6 - len(refusal.header)]
        refusal.received += len(data)
        if len(refusal.header) < 6:
            return
        pdu_type, _, length = struct.unpack(">BBL", refusal.header)
        if pdu_type != A_ASSOCIATE_RQ or length > CONTROL_PDU_LIMIT:
            self._close(sock)
        elif refusal.received >= 6 + length:
            refusal.answered = True
            try:
                sock.send(refusal.pdu)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        with self._lock:
            self._waiting.pop(sock, None)
            self._selector.unregister(sock)
        sock.close()


@dataclass
class _Refusal:
    """What a refused connection has sent so far and what it will be answered."""

    pdu: bytes
    until: float
    header: bytes = b""
    received: int = 0
    answered: bool = False
