"""How often an association's threads wake: less while it receives, far less when idle.

pynetdicom runs each accepted association with two threads that poll: the reader (its
DUL provider) sleeps ``_run_loop_delay`` between looks at the socket and at the queue of
answers to send, and the association's reactor sleeps 1 ms between looks at its queue
of decoded messages.  An open association that nobody uses thus wakes two threads about
2,000 times a second: 3-4 % of a core each (16 idle associations, one process: 54 %),
which callers that hold associations open, or hostile ones, take from the busy ones.

The reactor always waits on its message queue instead of only looking at it (a
decoded message wakes it at once): ``BUSY_WAIT_SECONDS`` at most while the association
receives, ``IDLE_POLL_SECONDS`` once it has received nothing for ``IDLE_AFTER_SECONDS``;
a release or abort request, which does not go through that queue, is noticed that much
later.  The reader sleeps the busy step the receiver sets while data arrives and
``IDLE_POLL_SECONDS`` once idle: the first PDU after a pause is read at most that late,
and so is an answer whose handler took longer than ``IDLE_AFTER_SECONDS``.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from typing import Any

from pynetdicom.dimse import DIMSEServiceProvider

#: Nothing received for this long: the association counts as idle.
IDLE_AFTER_SECONDS = 0.1
#: An idle association's reader step, and how long its reactor waits for a message.
IDLE_POLL_SECONDS = 0.02
#: How long a receiving association's reactor waits for a message (pynetdicom: 1 ms steps).
BUSY_WAIT_SECONDS = 0.005


class PollingPace:
    """When an association last received data, and its reader's step while busy."""

    def __init__(self, busy_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.busy_seconds = busy_seconds
        self._clock = clock
        #: When data last arrived (the clock's reading).
        self.heard_at = clock()

    def heard(self) -> None:
        """Data arrived: busy again."""
        self.heard_at = self._clock()

    @property
    def idle(self) -> bool:
        return self._clock() - self.heard_at > IDLE_AFTER_SECONDS

    def step(self) -> float:
        """The reader's sleep between looks, for now."""
        return IDLE_POLL_SECONDS if self.idle else self.busy_seconds


class PacedDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider whose non-blocking ``get_msg`` waits a little.

    The association's reactor calls ``get_msg(block=False)`` once per 1 ms loop; waiting
    on the queue instead makes its loop about 6 times slower while busy and 20 times
    while idle, and serves a message as soon as it is decoded.
    """

    pace: PollingPace

    @classmethod
    def adopt(cls, dimse: DIMSEServiceProvider, pace: PollingPace) -> PacedDIMSE:
        """Give an association's provider this class's ``get_msg`` (pynetdicom creates it
        with the association, so it is adopted rather than replaced)."""
        dimse.__class__ = cls
        paced: PacedDIMSE = dimse  # type: ignore[assignment]
        paced.pace = pace
        return paced

    def get_msg(self, block: bool = False) -> Any:
        if block:
            return super().get_msg(block)
        try:
            wait = IDLE_POLL_SECONDS if self.pace.idle else BUSY_WAIT_SECONDS
            return self.msg_queue.get(timeout=wait)
        except queue.Empty:
            return None, None
