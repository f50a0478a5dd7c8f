"""``GroupCommit``: acknowledgements of several associations recorded in batches, in order."""

from __future__ import annotations

import threading

import pytest

from node.c_store_client import GroupCommit


def test_acknowledgements_queue_behind_a_commit_and_go_in_one_batch() -> None:
    batches: list[list[tuple[str, int]]] = []
    first_commit_started, first_commit_may_end = threading.Event(), threading.Event()

    def record(batch: list[tuple[str, int]]) -> None:
        if not batches:
            first_commit_started.set()
            first_commit_may_end.wait(10)  # the first commit is slow
        batches.append(batch)

    acks = GroupCommit(record)
    first = threading.Thread(target=acks.add, args=("1", 0))
    first.start()
    assert first_commit_started.wait(10), "the first acknowledgement's thread records it"
    assert acks.add("2", 0) == 2 and acks.add("3", 0xB000) == 3  # queued, not waiting
    waiter = threading.Thread(target=acks.wait, args=(3,))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive(), "ticket 3 is not recorded while the first commit runs"

    first_commit_may_end.set()
    first.join(10)
    waiter.join(10)
    assert not waiter.is_alive()
    assert batches == [[("1", 0)], [("2", 0), ("3", 0xB000)]]


def test_a_failed_commit_reaches_those_waiting_for_it() -> None:
    class Outage(Exception):
        pass

    def record(batch: list[tuple[str, int]]) -> None:
        raise Outage("job table down")

    acks = GroupCommit(record)
    with pytest.raises(Outage):
        acks.add("1", 0)
    with pytest.raises(Outage):
        acks.wait(1)


def test_acknowledgements_queued_behind_a_failed_commit_learn_of_the_failure() -> None:
    class Outage(Exception):
        pass

    commit_started, commit_may_fail = threading.Event(), threading.Event()

    def record(batch: list[tuple[str, int]]) -> None:
        commit_started.set()
        commit_may_fail.wait(10)
        raise Outage("job table down")

    acks = GroupCommit(record)
    failures: list[BaseException] = []

    def add_first() -> None:
        try:
            acks.add("1", 0)
        except Outage as exc:
            failures.append(exc)

    first = threading.Thread(target=add_first)
    first.start()
    assert commit_started.wait(10)
    ticket = acks.add("2", 0)  # queued behind the commit that will fail
    commit_may_fail.set()
    with pytest.raises(Outage):
        acks.wait(ticket)
    first.join(10)
    assert len(failures) == 1
