"""C-STORE associations in processes of their own (``send_in_processes``, the default).

pynetdicom spends about 0.1 ms of Python on every 16 KB PDU it sends, and the threads of
one process take turns on one interpreter lock: four associations in threads made
0.65x storescu's rate into Orthanc, the same four in four processes 1.0-1.1x
(``bench.send``, 2 cores).  So each association of a delivery runs in a child process
that only speaks DICOM: the sending thread asks it, over a pipe, to store one file and
waits for the peer's status, exactly as it calls a ``ThreadLink``.  Everything else stays
with the thread: the stop and claim checks before each instance, the acknowledgement
recorded before the next.

The children are forked by multiprocessing's fork server (started once per process,
with this module loaded: a child starts in ~10 ms) and live for one delivery.  A child
never outlives the delivery's thread by more than one C-STORE: when its pipe closes
(the thread let go of it, or the node's process died) it releases the association and
exits.  A child that dies or stops answering fails the delivery as a transient failure.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import sys
from collections.abc import Callable
from functools import partial
from multiprocessing import forkserver
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from node.c_store_client import ThreadLink
from node.config import Settings
from node.destinations import Destination
from node.logs import configure_logging
from node.send_errors import DeliveryError, Failure

log = logging.getLogger(__name__)

#: Seconds a child may take to answer beyond its own network timeouts (three per step).
ANSWER_GRACE_SECONDS = 10.0
#: Seconds a child has to exit once its pipe is closed, before it is killed.
EXIT_SECONDS = 5.0

_CONTEXT = multiprocessing.get_context("forkserver")


class AssociationProcessError(RuntimeError):
    """An exception no one foresaw in an association's process that could not be sent
    back as it was (its log has the traceback)."""


def start_association_server() -> None:
    """Start the fork server that association processes come from, with the DICOM
    libraries loaded, so the first delivery does not wait for it (idempotent).

    multiprocessing runs the main module again in every child: it is loaded in the
    server too, else each child would import what it imports (a second per child)."""
    main = sys.modules["__main__"]
    name = getattr(main.__spec__, "name", None)
    main_preload = [name] if name else ["__main__"] if getattr(main, "__file__", None) else []
    _CONTEXT.set_forkserver_preload([__name__, *main_preload])
    forkserver.ensure_running()


class ProcessLink:
    """A ``StoreLink`` whose association lives in a child process."""

    def __init__(self, settings: Settings, name: str, destination: Destination) -> None:
        self.name = name
        self._timeout = 3 * settings.send_timeout_seconds + ANSWER_GRACE_SECONDS
        self._conn, child_end = _CONTEXT.Pipe()
        self._process = _CONTEXT.Process(
            target=serve_association,
            args=(child_end, settings, name, destination),
            name=f"c-store-{name}",
            daemon=True,
        )
        self._process.start()
        child_end.close()
        try:
            self._answer("opening the association")
        except BaseException:
            self._end()
            raise

    @property
    def pid(self) -> int | None:
        """The child's process id."""
        return self._process.pid

    def store(self, uid: str, path: Path) -> tuple[int, str | None]:
        """The peer's status and error comment, or a DeliveryError."""
        self._send(("store", uid, str(path)), f"the C-STORE of {uid}")
        code, comment = self._answer(f"the C-STORE of {uid}")
        return int(code), comment

    def release(self) -> None:
        """Release the association and let the child end (killed if it does not)."""
        try:
            if self._process.is_alive():
                self._send(("release",), "the release")
                self._answer("the release")
        except DeliveryError as exc:
            log.info("association process ended badly: %s", exc, extra={"destination": self.name})
        finally:
            self._end()

    def _send(self, request: tuple[Any, ...], during: str) -> None:
        try:
            self._conn.send(request)
        except OSError as exc:  # the child is gone: its pipe is broken
            raise self._lost(during) from exc

    def _answer(self, during: str) -> Any:
        """The child's answer to its last request; raises what it raised."""
        try:
            if not self._conn.poll(self._timeout):
                self._process.kill()
                raise DeliveryError(
                    self.name,
                    f"its association process did not answer within {self._timeout:g} s "
                    f"during {during}; it was killed",
                    Failure.TRANSIENT,
                )
            kind, *details = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise self._lost(during) from exc
        if kind == "ok":
            return details[0]
        if kind == "delivery":
            message, failure, retry_after = details
            raise DeliveryError(self.name, message, Failure(failure), retry_after)
        raise details[0]  # what no one foresaw, as the child raised it (its log has where)

    def _lost(self, during: str) -> DeliveryError:
        self._process.join(EXIT_SECONDS)
        return DeliveryError(
            self.name,
            f"its association process ended (exit code {self._process.exitcode}) during {during}",
            Failure.TRANSIENT,
        )

    def _end(self) -> None:
        self._conn.close()
        self._process.join(EXIT_SECONDS)
        if self._process.is_alive():
            log.warning(
                "association process %s did not end; killing it",
                self._process.pid,
                extra={"destination": self.name},
            )
            self._process.kill()
            self._process.join()


def serve_association(
    conn: Connection, settings: Settings, name: str, destination: Destination
) -> None:
    """The child: open the association, then store files until released or let go of."""
    # The node's process decides when to stop; its death closes this pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(settings.log_level, settings.log_format)
    link: ThreadLink | None = None
    released = False
    try:
        link = _answered(conn, name, lambda: ThreadLink(settings, name, destination), False)
        while link is not None and not released:
            request = conn.recv()
            released = request[0] == "release"
            if not released:
                _, uid, path = request
                _answered(conn, name, partial(link.store, uid, Path(path)))
    except (EOFError, OSError):
        pass  # the sending thread let go of the pipe: release and end
    finally:
        if link is not None:
            link.release()
    if released:
        conn.send(("ok", None))


def _answered(conn: Connection, name: str, call: Callable[[], Any], reply: bool = True) -> Any:
    """``call()``; its result (where ``reply``, else None), its DeliveryError or its
    unforeseen exception goes back over ``conn``.  Returns the result (None after a
    failure)."""
    try:
        result = call()
    except DeliveryError as exc:
        conn.send(("delivery", exc.message, exc.failure.value, exc.retry_after))
        return None
    except Exception as exc:
        log.exception("unexpected error in an association process", extra={"destination": name})
        try:
            conn.send(("error", exc))
        except Exception:  # it cannot be pickled: nothing was sent
            kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
            conn.send(("error", AssociationProcessError(f"{kind}: {exc}")))
        return None
    conn.send(("ok", result if reply else None))
    return result
