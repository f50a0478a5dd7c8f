"""The receiver's other processes: more interpreters accepting on the node's DICOM port.

One Python process receives at most about what one interpreter lock lets its threads do
(bench.ingest, eight associations on two cores: a durable pynetdicom receiver made
0.55-0.76x Orthanc's rate in one process, 0.75-1.44x in two).  With ``receiver_processes``
N above 1 the node's receiver starts N - 1 more processes that bind the same ports with
``SO_REUSEPORT`` (the kernel spreads new connections over them), each with its own job
table connections, all counting associations in one ``AssociationSlots``.  They only
listen: the start-up recovery ran in the node's own process before they start.  One
that dies is logged, its slots are given back and it is started again; they stop when
the receiver stops, and on their own when the node's process is gone.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event as EventType

from node.association_slots import AssociationSlots
from node.config import Settings

log = logging.getLogger(__name__)

#: Seconds between checks that every receiver process is alive.
WATCH_SECONDS = 1.0
#: Seconds a stopping receiver process gets before it is killed (its own grace is 5 s).
STOP_SECONDS = 15.0
#: Seconds a receiver process has to listen after it was started.
START_SECONDS = 60.0
#: A process that ended is started again at most this often.
RESTART_SECONDS = 10.0

#: The function a receiver process runs: (settings, process index, slots, ready, stop,
#: the node's process id).
ProcessTarget = Callable[[Settings, int, AssociationSlots, EventType, EventType, int], None]


class ReceiverProcessFailed(RuntimeError):
    """A receiver process ended before it listened (its own log line says why)."""


class ReceiverProcesses:
    """Receiver processes 1 .. N-1 beside the node's own (process 0), kept running."""

    def __init__(self, settings: Settings, slots: AssociationSlots, target: ProcessTarget) -> None:
        self.settings = settings
        self.slots = slots
        self.target = target
        self._spawn = multiprocessing.get_context("spawn")
        self._stop = self._spawn.Event()
        self._processes: dict[int, SpawnProcess] = {}
        self._started: dict[int, float] = {}
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        """Start every other process at once and return when all listen; raises
        ReceiverProcessFailed (after stopping the others) when one cannot."""
        waiting = {
            index: self._launch(index) for index in range(1, self.settings.receiver_processes)
        }
        failed = [index for index, ready in waiting.items() if not self._listening(index, ready)]
        if failed:
            self.join()
            raise ReceiverProcessFailed(f"receiver process {failed[0]} did not start")
        self._watcher = threading.Thread(target=self._watch, name="receiver-processes", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        """Ask every process to stop (each lets its associations finish, as process 0 does)."""
        self._stop.set()

    def join(self) -> None:
        """Wait for the processes to end; kill those that outlive ``STOP_SECONDS``."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        for index, process in self._processes.items():
            process.join(STOP_SECONDS)
            if process.is_alive():
                log.error("receiver process %d did not stop; killing it", index)
                process.kill()
                process.join()

    def _launch(self, index: int) -> EventType:
        ready = self._spawn.Event()
        process = self._spawn.Process(
            target=self.target,
            args=(self.settings, index, self.slots, ready, self._stop, os.getpid()),
            name=f"receiver-{index}",
            daemon=True,
        )
        process.start()
        self._processes[index] = process
        return ready

    def _listening(self, index: int, ready: EventType) -> bool:
        """Wait until process ``index`` listens (True) or ends first (False)."""
        process = self._processes[index]
        deadline = time.monotonic() + START_SECONDS
        listening = True
        while listening and not ready.wait(0.2):
            listening = process.is_alive() and time.monotonic() <= deadline
        self._started[index] = time.monotonic()
        if listening:
            log.info("receiver process %d started (pid %s)", index, process.pid)
        else:
            log.error(
                "receiver process %d (pid %s) did not start listening (exit code %s)",
                index,
                process.pid,
                process.exitcode,
            )
        return listening

    def _watch(self) -> None:
        """Start again, with its slots given back, any process that ended while running."""
        while not self._stop.wait(WATCH_SECONDS):
            for index, process in list(self._processes.items()):
                if process.is_alive() or self._stop.is_set():
                    continue
                if time.monotonic() - self._started[index] < RESTART_SECONDS:
                    continue  # one that cannot run (the port taken) is not restarted in a loop
                held = self.slots.clear_process(index)
                log.error(
                    "receiver process %d (pid %s) ended with exit code %s while the node "
                    "runs; %d association slots it held are free again; starting it again",
                    index,
                    process.pid,
                    process.exitcode,
                    held,
                )
                self._listening(index, self._launch(index))


def check_port_free(host: str, port: int) -> None:
    """Raise OSError (address in use) when something listens on ``host:port`` already.

    Receiver processes bind with ``SO_REUSEPORT``, which would let a second node, or one
    left from an earlier run, share the port silently; this bind without it is refused
    as a plain bind would be.
    """
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as pynetdicom binds
        probe.bind((host, port))
