"""The receiver's open associations, counted for the node however many processes serve them.

With ``receiver_processes`` above 1 several processes accept on one port and the kernel
decides which one gets a connection, so the limits (``max_associations``, and
``max_associations_per_address``) can only hold if every process counts in one place:
an array in shared memory under its lock.  Each process has a row of its own, so the
slots of a process that died can be given back (``clear_process``) without knowing which
connections it held.  Per calling address the counts go to ``ADDRESS_BUCKETS`` buckets
by a hash of the address: two callers sharing a bucket share its count, which can refuse
one of them sooner, never admit more than the limit.
"""

from __future__ import annotations

import multiprocessing
import zlib
from multiprocessing.sharedctypes import SynchronizedArray

#: Buckets for the per-address counts: with 20 callers, about one chance in 40 that two
#: share one (and only then, near their limit, does it matter).
ADDRESS_BUCKETS = 8192


class AssociationSlots:
    """Open associations of every receiver process of a node, in shared memory."""

    def __init__(self, processes: int = 1) -> None:
        self.processes = processes
        self._width = 1 + ADDRESS_BUCKETS  # column 0: the process's total
        self._counts: SynchronizedArray[int] = multiprocessing.get_context("spawn").Array(
            "i", processes * self._width
        )

    def take(self, process: int, address: str, most: int, most_per_address: int) -> str | None:
        """Count a new association of ``address`` in ``process``; or why it may not open."""
        bucket = 1 + zlib.crc32(address.encode()) % ADDRESS_BUCKETS
        with self._counts.get_lock():
            counts = self._counts
            rows = range(0, len(counts), self._width)
            total = sum(counts[row] for row in rows)
            here = sum(counts[row + bucket] for row in rows)
            if total >= most:
                return f"{total} associations open (max_associations)"
            if here >= most_per_address:
                return f"{here} associations open from it (max_associations_per_address)"
            mine = process * self._width
            counts[mine] += 1
            counts[mine + bucket] += 1
        return None

    def release(self, process: int, address: str) -> None:
        """An association of ``address`` in ``process`` ended."""
        bucket = 1 + zlib.crc32(address.encode()) % ADDRESS_BUCKETS
        mine = process * self._width
        with self._counts.get_lock():
            counts = self._counts
            counts[mine] -= 1
            counts[mine + bucket] -= 1

    def clear_process(self, process: int) -> int:
        """Give back every slot ``process`` held (it died); how many it held."""
        mine = process * self._width
        with self._counts.get_lock():
            counts = self._counts
            held = int(counts[mine])
            counts[mine : mine + self._width] = [0] * self._width
        return held

    def open_total(self) -> int:
        """Associations open now, in all processes."""
        with self._counts.get_lock():
            counts = self._counts
            return sum(counts[row] for row in range(0, len(counts), self._width))
