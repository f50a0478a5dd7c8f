"""The in-flight budget evicts the largest unfinished data set, and only as many as needed."""

from __future__ import annotations

from node.inflight import InflightBudget


class Caller:
    def __init__(self, name: str) -> None:
        self.name = name
        self.evicted: list[tuple[int, int]] = []

    def evict(self, held: int, budget: int) -> None:
        self.evicted.append((held, budget))


def test_the_largest_holders_go_first_and_settled_bytes_come_back() -> None:
    budget = InflightBudget(100)
    small, middle, large = Caller("small"), Caller("middle"), Caller("large")
    assert budget.grow(large, 60)
    assert budget.grow(middle, 30)
    assert budget.grow(small, 5)
    assert budget.total == 95
    assert budget.grow(small, 10), "the newcomer is not the largest: it goes on"
    assert large.evicted == [(60, 100)] and middle.evicted == []
    assert budget.total == 45
    budget.settle(middle)
    assert budget.total == 15
    assert budget.grow(middle, 85)
    assert not budget.grow(middle, 10), "the grower is the largest: it stops itself"
    assert middle.evicted == [], "a grower that must stop is told by the answer, not evict"
    assert budget.total == 15
    budget.settle(small)
    budget.settle(small)
    assert budget.total == 0


def test_a_grower_that_becomes_the_largest_stops_alone() -> None:
    budget = InflightBudget(100)
    a, b, c = Caller("a"), Caller("b"), Caller("c")
    budget.grow(a, 40)
    budget.grow(b, 35)
    assert budget.grow(c, 25)
    assert budget.grow(c, 70) is False, "c (95) is the largest and goes first"
    assert a.evicted == [] and b.evicted == [] and budget.total == 75
    budget.grow(c, 30)
    assert a.evicted == [(40, 100)] and b.evicted == []
    assert budget.total == 65
