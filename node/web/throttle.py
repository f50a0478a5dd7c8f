"""Login throttling: password guessing costs time, and floods cannot exhaust the node.

Each failed login of an (address, user) pair makes that pair wait longer before its next
attempt is even checked (a doubling delay), and after ``lock_after`` failures the pair is
locked for ``lock_seconds``.  An address that fails ``address_lock_after`` times over any
users is locked as a whole.  A lock never reaches beyond its address, so nobody can lock an
admin out from elsewhere.  Attempts that arrive early are refused without computing a hash,
and at most ``max_hashes`` password hashes (scrypt, 16 MiB each) run at once; the rest wait
briefly and are then refused with 429, so memory and the health check stay flat.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

#: Pairs and addresses remembered; the oldest unlocked ones are forgotten beyond this.
MAX_TRACKED = 10_000

Key = TypeVar("Key")


@dataclass(frozen=True)
class ThrottlePolicy:
    """The delays and locks, all in seconds (settings `web_login_*`)."""

    delay_seconds: float = 1.0
    max_delay_seconds: float = 30.0
    lock_after: int = 10
    lock_seconds: float = 900.0
    address_lock_after: int = 50
    max_hashes: int = 2
    hash_wait_seconds: float = 2.0


class TooManyAttempts(Exception):
    """The attempt was refused before its password was checked; says how long to wait."""

    def __init__(self, retry_after: float, locked: bool) -> None:
        super().__init__(
            f"too many failed logins: {'locked' if locked else 'wait'} {retry_after:.0f} s"
        )
        self.retry_after = retry_after
        self.locked = locked


@dataclass
class _Failures:
    count: int = 0
    not_before: float = 0.0
    locked_until: float = 0.0


class LoginThrottle:
    """Failure counts per (address, user) and per address, with the policy's delays."""

    def __init__(self, policy: ThrottlePolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._pairs: OrderedDict[tuple[str, str], _Failures] = OrderedDict()
        self._addresses: OrderedDict[str, _Failures] = OrderedDict()
        self._lock = threading.Lock()
        self._hashes = threading.BoundedSemaphore(policy.max_hashes)

    def check(self, address: str, user: str) -> None:
        """Raise TooManyAttempts when this attempt may not be checked yet."""
        now = self._clock()
        with self._lock:
            for record in (self._addresses.get(address), self._pairs.get((address, user))):
                if record is None:
                    continue
                if record.locked_until > now:
                    raise TooManyAttempts(record.locked_until - now, locked=True)
                if record.not_before > now:
                    raise TooManyAttempts(record.not_before - now, locked=False)

    def failed(self, address: str, user: str) -> None:
        """Count a wrong password: delay the pair's next attempt, lock it when due."""
        now = self._clock()
        policy = self.policy
        with self._lock:
            pair = self._touch(self._pairs, (address, user))
            pair.count += 1
            delay = policy.delay_seconds * 2 ** min(pair.count - 1, 30)
            pair.not_before = now + min(delay, policy.max_delay_seconds)
            if pair.count % policy.lock_after == 0:
                pair.locked_until = now + policy.lock_seconds
                log.warning(
                    "web login locked for %s s after %d failures",
                    policy.lock_seconds,
                    pair.count,
                    extra={"audit": True, "address": address, "user": user[:64]},
                )
            per_address = self._touch(self._addresses, address)
            per_address.count += 1
            if per_address.count % policy.address_lock_after == 0:
                per_address.locked_until = now + policy.lock_seconds
                log.warning(
                    "web logins from an address locked for %s s after %d failures",
                    policy.lock_seconds,
                    per_address.count,
                    extra={"audit": True, "address": address},
                )

    def succeeded(self, address: str, user: str) -> None:
        """A right password clears the pair's record (not the address's)."""
        with self._lock:
            self._pairs.pop((address, user), None)

    @contextlib.contextmanager
    def hashing(self) -> Iterator[None]:
        """Hold one of the few password-hash slots; TooManyAttempts when none frees in time."""
        if not self._hashes.acquire(timeout=self.policy.hash_wait_seconds):
            raise TooManyAttempts(self.policy.hash_wait_seconds, locked=False)
        try:
            yield
        finally:
            self._hashes.release()

    def _touch(self, table: OrderedDict[Key, _Failures], key: Key) -> _Failures:
        record = table.get(key)
        if record is None:
            record = table[key] = _Failures()
            self._forget_oldest(table)
        table.move_to_end(key)
        return record

    def _forget_oldest(self, table: OrderedDict[Key, _Failures]) -> None:
        """Bound memory: drop the oldest records that hold no lock."""
        now = self._clock()
        for key in list(table):
            if len(table) <= MAX_TRACKED:
                return
            if table[key].locked_until <= now:
                del table[key]
