"""The receiver's open associations, counted for the node however many processes serve them.

With ``receiver_processes`` above 1 several processes accept on one port and the kernel
decides which one gets a connection, so the limits (``max_associations``, and
``max_associations_per_address``) can only hold if every process counts in one place:
an array in shared memory.  Each process has a row of its own, so the slots of a process
that died can be given back (``clear_process``) without knowing which connections it
held.  Between processes the array is guarded by an ``flock`` on a file, which the kernel
releases when its holder dies (a lock in shared memory would stay taken for good).  Per
calling address the counts go to ``ADDRESS_BUCKETS`` buckets by a hash of the address:
two callers sharing a bucket share its count, which can refuse one of them sooner, never
admit more than the limit.
"""

from __future__ import annotations

import fcntl
import os
import threading
import zlib
from collections.abc import Iterator, MutableSequence
from contextlib import contextmanager
from multiprocessing.sharedctypes import RawArray
from pathlib import Path
from typing import Any

#: Buckets for the per-address counts: with 20 callers, about one chance in 40 that two
#: share one (and only then, near their limit, does it matter).
ADDRESS_BUCKETS = 8192


class AssociationSlots:
    """Open associations of every receiver process of a node (``lock_path``: the file
    whose ``flock`` guards them when there are several processes)."""

    def __init__(self, processes: int = 1, lock_path: Path | None = None) -> None:
        if processes > 1 and lock_path is None:
            raise ValueError("several receiver processes need a lock file")
        if lock_path is not None:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
        self.processes = processes
        self.lock_path = lock_path
        self._width = 1 + ADDRESS_BUCKETS  # column 0: the process's total
        size = processes * self._width
        self._counts: MutableSequence[int] = RawArray("i", size) if processes > 1 else [0] * size
        self._thread_lock = threading.Lock()
        self._lock_file: tuple[int, int] | None = None  # (pid, descriptor)

    def __getstate__(self) -> dict[str, Any]:
        """For a receiver process: the shared array, not this process's locks."""
        state = self.__dict__.copy()
        del state["_thread_lock"], state["_lock_file"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _thread_lock=threading.Lock(), _lock_file=None)

    def take(self, process: int, address: str, most: int, most_per_address: int) -> str | None:
        """Count a new association of ``address`` in ``process``; or why it may not open."""
        bucket = _bucket(address)
        with self._locked():
            total, here = self._column_total(0), self._column_total(bucket)
            if total >= most:
                return f"{total} associations open (max_associations)"
            if here >= most_per_address:
                return f"{here} associations open from it (max_associations_per_address)"
            mine = process * self._width
            self._counts[mine] += 1
            self._counts[mine + bucket] += 1
        return None

    def release(self, process: int, address: str) -> None:
        """An association of ``address`` in ``process`` ended."""
        bucket = _bucket(address)
        mine = process * self._width
        with self._locked():
            self._counts[mine] -= 1
            self._counts[mine + bucket] -= 1

    def clear_process(self, process: int) -> int:
        """Give back every slot ``process`` held (it died); how many it held."""
        mine = process * self._width
        with self._locked():
            held = int(self._counts[mine])
            self._counts[mine : mine + self._width] = [0] * self._width
        return held

    def open_total(self) -> int:
        """Associations open now, in all processes."""
        with self._locked():
            return self._column_total(0)

    def _column_total(self, column: int) -> int:
        """``column`` summed over every process's row (under the lock)."""
        return sum(self._counts[row + column] for row in range(0, len(self._counts), self._width))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            if self.lock_path is None:
                yield
                return
            descriptor = self._descriptor()
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(descriptor, fcntl.LOCK_UN)

    def _descriptor(self) -> int:
        """This process's own open lock file (an flock belongs to an open file)."""
        if self._lock_file is None or self._lock_file[0] != os.getpid():
            assert self.lock_path is not None
            self._lock_file = (os.getpid(), os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600))
        return self._lock_file[1]


def _bucket(address: str) -> int:
    """The column of ``address``'s count (column 0 is the process's total)."""
    return 1 + zlib.crc32(address.encode()) % ADDRESS_BUCKETS
