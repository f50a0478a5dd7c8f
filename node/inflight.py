"""How much memory the data sets still arriving may take, over all associations at once.

pynetdicom gathers each C-STORE data set in memory until its last fragment. One data set
is bounded by ``max_instance_mb``; this bounds their sum in one receiver process by
``max_inflight_mb``, so that many slow callers, each within the per-instance limit,
cannot take the node's memory between them. When a fragment takes the sum past the
budget, the association holding the most unfinished bytes is the one aborted: a caller
that trickles a huge data set loses its association, not the scanner whose small slice
happened to arrive last.
"""

from __future__ import annotations

import threading
from typing import Protocol


class Holder(Protocol):
    """An association receiving a data set: it can be told to give it up."""

    def evict(self, held: int, budget: int) -> None:
        """Abort the association; ``held`` bytes of ``budget`` were its own."""


class InflightBudget:
    """The unfinished data set bytes of each association of one receiver process."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._held: dict[Holder, int] = {}
        self._total = 0
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        """Bytes of data sets still arriving, all associations together."""
        return self._total

    def grow(self, holder: Holder, nbytes: int) -> bool:
        """Count ``nbytes`` more for ``holder``; False when ``holder`` itself must stop.

        Past the budget, holders are evicted largest first (``holder`` included) until
        the sum fits again; the others are told through ``evict``, outside the lock.
        """
        evicted: list[tuple[Holder, int]] = []
        with self._lock:
            self._held[holder] = self._held.get(holder, 0) + nbytes
            self._total += nbytes
            while self._total > self.limit_bytes:
                largest = max(self._held, key=self._held.__getitem__)
                evicted.append((largest, self._held.pop(largest)))
                self._total -= evicted[-1][1]
        for other, held in evicted:
            if other is not holder:
                other.evict(held, self.limit_bytes)
        return all(other is not holder for other, _ in evicted)

    def settle(self, holder: Holder) -> None:
        """``holder``'s data set is complete, or its connection over: its bytes are free."""
        with self._lock:
            self._total -= self._held.pop(holder, 0)
