"""Login throttling: delays, locks per (address, user) and per address, hash slots."""

from __future__ import annotations

import threading

import pytest

from node.web.throttle import LoginThrottle, ThrottlePolicy, TooManyAttempts


class Clock:
    """A clock the test moves by hand, so delays of minutes take no time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


POLICY = ThrottlePolicy(
    delay_seconds=1.0, max_delay_seconds=8.0, lock_after=5, lock_seconds=60.0, address_lock_after=9
)


def _fail_until_locked(throttle: LoginThrottle, clock: Clock, address: str, user: str) -> int:
    """Wrong passwords at the fastest allowed pace; returns how many were checked."""
    checked = 0
    for _ in range(200):
        try:
            throttle.check(address, user)
        except TooManyAttempts as refused:
            if refused.locked:
                return checked
            clock.now += refused.retry_after
            continue
        throttle.failed(address, user)
        checked += 1
    return checked


def test_delay_doubles_up_to_its_cap() -> None:
    clock = Clock()
    throttle = LoginThrottle(POLICY, clock)
    waits = []
    for _ in range(4):
        throttle.failed("10.0.0.1", "alice")
        with pytest.raises(TooManyAttempts) as refused:
            throttle.check("10.0.0.1", "alice")
        waits.append(refused.value.retry_after)
        clock.now += refused.value.retry_after
    assert waits == [1.0, 2.0, 4.0, 8.0]
    throttle.check("10.0.0.1", "alice")


def test_a_locked_pair_waits_out_the_lock_and_other_addresses_are_not_locked() -> None:
    clock = Clock()
    throttle = LoginThrottle(POLICY, clock)
    assert _fail_until_locked(throttle, clock, "10.0.0.1", "admin") == POLICY.lock_after
    with pytest.raises(TooManyAttempts) as refused:
        throttle.check("10.0.0.1", "admin")
    assert refused.value.locked and refused.value.retry_after == pytest.approx(60.0)
    throttle.check("10.0.0.2", "admin")  # the admin from elsewhere
    throttle.check("10.0.0.1", "bob")  # another user from the same address
    clock.now += 60.0
    throttle.check("10.0.0.1", "admin")


def test_an_address_guessing_many_users_is_locked_as_a_whole() -> None:
    clock = Clock()
    throttle = LoginThrottle(POLICY, clock)
    for i in range(POLICY.address_lock_after):
        throttle.failed("10.0.0.9", f"user{i}")
    with pytest.raises(TooManyAttempts) as refused:
        throttle.check("10.0.0.9", "somebody-new")
    assert refused.value.locked
    throttle.check("10.0.0.8", "somebody-new")


def test_success_clears_the_pair() -> None:
    clock = Clock()
    throttle = LoginThrottle(POLICY, clock)
    throttle.failed("10.0.0.1", "alice")
    clock.now += 1.0
    throttle.succeeded("10.0.0.1", "alice")
    throttle.failed("10.0.0.1", "alice")
    with pytest.raises(TooManyAttempts) as refused:
        throttle.check("10.0.0.1", "alice")
    assert refused.value.retry_after == 1.0  # back to the first delay


def test_hash_slots_bound_concurrent_hashing() -> None:
    throttle = LoginThrottle(ThrottlePolicy(max_hashes=2, hash_wait_seconds=0.05))
    release = threading.Event()
    inside = threading.Barrier(3)

    def hold() -> None:
        with throttle.hashing():
            inside.wait()
            release.wait(5)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for t in holders:
        t.start()
    inside.wait()
    with pytest.raises(TooManyAttempts), throttle.hashing():
        pass
    release.set()
    for t in holders:
        t.join()
    with throttle.hashing():
        pass


def test_memory_is_bounded_but_locks_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("node.web.throttle.MAX_TRACKED", 50)
    clock = Clock()
    throttle = LoginThrottle(POLICY, clock)
    _fail_until_locked(throttle, clock, "10.0.0.1", "admin")
    for i in range(500):
        throttle.failed(f"10.1.{i // 250}.{i % 250}", "x")
    assert len(throttle._pairs) <= 51
    with pytest.raises(TooManyAttempts):
        throttle.check("10.0.0.1", "admin")
