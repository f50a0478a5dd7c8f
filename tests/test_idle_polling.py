"""An association's pace: busy while data arrives, idle after a pause, busy again."""

from __future__ import annotations

from node.idle_polling import IDLE_AFTER_SECONDS, IDLE_POLL_SECONDS, PollingPace


def test_the_pace_turns_idle_after_a_pause_and_busy_when_data_arrives() -> None:
    now = [100.0]
    pace = PollingPace(0.001, clock=lambda: now[0])
    assert not pace.idle and pace.step() == 0.001
    now[0] += IDLE_AFTER_SECONDS / 2
    assert not pace.idle, "a short pause between instances is not idleness"
    now[0] += IDLE_AFTER_SECONDS
    assert pace.idle and pace.step() == IDLE_POLL_SECONDS
    pace.heard()
    assert not pace.idle and pace.step() == 0.001 and pace.heard_at == now[0]
    pace.busy_seconds = 0.0002  # the receiver re-tunes the busy step
    assert pace.step() == 0.0002
