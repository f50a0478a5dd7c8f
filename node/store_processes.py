"""C-STORE associations in processes of their own (``send_in_processes``, the default).

pynetdicom spends about 0.1 ms of Python on every 16 KB PDU it sends, and the threads of
one process take turns on one interpreter lock: the node's four associations in threads
made 0.67x storescu's rate into Orthanc, in four processes 0.91-0.93x (``bench.send``,
2 cores).  So each association of a delivery runs in a child process
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
import pickle
import signal
import sys
from collections.abc import Callable
from functools import partial
from multiprocessing import forkserver, util
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from node.c_store_client import StoreLink, ThreadLink
from node.config import Settings
from node.destinations import Destination
from node.logs import configure_logging
from node.send_errors import DeliveryError, Failure

log = logging.getLogger(__name__)

#: Seconds a child may take to answer beyond its own network timeouts: two of those per
#: request (a C-STORE: the data set out, the answer back; opening: connect, negotiate),
#: which keeps the wait below the claim's ``stale_after_seconds`` as ``send_timeout_seconds``
#: < stale_after / 2 asks.
ANSWER_GRACE_SECONDS = 5.0
#: Seconds a child has to exit once its pipe is closed, before it is killed.
EXIT_SECONDS = 5.0

_CONTEXT = multiprocessing.get_context("forkserver")


class AssociationProcessError(RuntimeError):
    """An exception no one foresaw in an association's process that could not be sent
    back as it was (its log has the traceback)."""


class NoAssociationProcess(RuntimeError):
    """No process could be started for an association (the fork server is unusable)."""


def start_association_server() -> None:
    """Start the fork server that association processes come from, with the DICOM
    libraries loaded, so the first delivery does not wait for it (idempotent).

    multiprocessing runs the main module again in every child (the ``denoise-node``
    script, or ``node.cli`` under ``python -m``): what it imports is loaded in the server,
    else each child would import it all again (0.7 s each).  Raises OSError where the
    server cannot start (no usable temporary folder for its socket)."""
    main = getattr(sys.modules["__main__"].__spec__, "name", None)
    _CONTEXT.set_forkserver_preload([__name__, "node.cli", *([main] if main else [])])
    forkserver.ensure_running()


def open_association(settings: Settings, name: str, destination: Destination) -> StoreLink:
    """An association in a process of its own, or in this process where none can be
    started (logged): sending goes on either way."""
    try:
        return ProcessLink(settings, name, destination)
    except NoAssociationProcess as exc:
        log.warning(
            "no process for an association (%s); it runs in the send role's process",
            exc,
            extra={"destination": name},
        )
        return ThreadLink(settings, name, destination)


class ProcessLink:
    """A ``StoreLink`` whose association lives in a child process."""

    def __init__(self, settings: Settings, name: str, destination: Destination) -> None:
        self.name = name
        self._timeout = 2 * settings.send_timeout_seconds + ANSWER_GRACE_SECONDS
        self._conn, child_end = _CONTEXT.Pipe()
        self._process = _CONTEXT.Process(
            target=serve_association,
            args=(child_end, settings, name, destination),
            name=f"c-store-{name}",
            daemon=True,
        )
        try:
            self._process.start()
        except (OSError, ChildProcessError) as exc:  # the server's socket is gone, say
            self._conn.close()
            raise NoAssociationProcess(f"{type(exc).__name__}: {exc}") from exc
        finally:
            child_end.close()
        # At the interpreter's exit multiprocessing joins its children without a limit:
        # the pipe closes first (this runs before that join), so a child never left
        # released ends instead of waiting for it.
        util.Finalize(self, self._conn.close, exitpriority=10)
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
        try:  # asked even where the child looks dead: a killed fork server makes it look so
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
        conn.send(("error", _as_sent(exc)))
        return None
    conn.send(("ok", result if reply else None))
    return result


def _as_sent(exc: Exception) -> Exception:
    """``exc`` where it comes back whole through a pipe (pickled and rebuilt as the same
    kind of exception), else an AssociationProcessError that names it."""
    try:
        if type(pickle.loads(pickle.dumps(exc))) is type(exc):
            return exc
    except Exception:  # it cannot be pickled, or not rebuilt from its arguments
        pass
    kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return AssociationProcessError(f"{kind}: {exc}")
