"""The wake word's quiet gate and its frame ring, driven as pure cores."""

from __future__ import annotations

import pytest

from edgevoice.triggers.quietgate import FrameRing, GateState, QuietGate

FLOOR = -60.0


def test_starts_open_so_the_models_hear_the_room_once_then_closes_after_the_hold() -> None:
    gate = QuietGate(margin_db=6.0, hold_frames=3)
    assert gate.state is GateState.OPEN
    assert [gate.update(FLOOR, FLOOR) for _ in range(5)] == [True, True, True, False, False]
    assert gate.state is GateState.CLOSED
    assert gate.openings == 0  # the start is not an opening


def test_opens_at_the_margin_above_the_floor_not_below() -> None:
    gate = QuietGate(margin_db=6.0, hold_frames=1)
    gate.update(FLOOR, FLOOR)
    gate.update(FLOOR, FLOOR)
    assert gate.state is GateState.CLOSED
    assert not gate.update(FLOOR + 5.9, FLOOR)
    assert gate.update(FLOOR + 6.0, FLOOR)
    assert gate.state is GateState.OPEN and gate.openings == 1


def test_the_margin_is_relative_to_the_floor_however_loud_the_room() -> None:
    gate = QuietGate(margin_db=6.0, hold_frames=1)
    fan = -30.0
    for _ in range(3):
        gate.update(fan + 1.0, fan)  # a loud room's own fluctuation
    assert gate.state is GateState.CLOSED
    assert gate.update(fan + 8.0, fan)


def test_every_loud_frame_restarts_the_hold() -> None:
    gate = QuietGate(margin_db=6.0, hold_frames=2)
    levels = [FLOOR] * 3 + [-40.0, FLOOR, FLOOR, -40.0, FLOOR, FLOOR, FLOOR]
    assert [gate.update(level, FLOOR) for level in levels] == [
        True, True, False,  # the start's hold runs out
        True, True, True,  # opened; two quiet frames held
        True, True, True, False,  # loud again before it closed: held from here
    ]
    assert gate.openings == 1


def test_reset_opens_it_again() -> None:
    gate = QuietGate(margin_db=6.0, hold_frames=1)
    gate.update(FLOOR, FLOOR)
    gate.update(FLOOR, FLOOR)
    assert gate.state is GateState.CLOSED
    gate.reset()
    assert gate.state is GateState.OPEN
    assert gate.update(FLOOR, FLOOR)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="margin_db"):
        QuietGate(margin_db=-1.0, hold_frames=1)
    with pytest.raises(ValueError, match="hold_frames"):
        QuietGate(margin_db=6.0, hold_frames=0)


def test_ring_holds_the_last_frames_by_index() -> None:
    ring = FrameRing(4)
    assert ring.newest_index == -1
    for index in range(100, 110):
        ring.push(index, bytes([index]))
    assert (ring.oldest_index, ring.newest_index) == (106, 109)
    assert [ring.get(i) for i in range(106, 110)] == [bytes([i]) for i in range(106, 110)]
    with pytest.raises(IndexError, match="105"):
        ring.get(105)
    with pytest.raises(IndexError):
        ring.get(110)


def test_ring_refuses_a_gap_and_starts_anew_after_clear() -> None:
    ring = FrameRing(4)
    ring.push(0, b"a")
    with pytest.raises(ValueError, match="does not follow"):
        ring.push(2, b"c")
    ring.clear()
    ring.push(7, b"h")
    assert (ring.oldest_index, ring.newest_index) == (7, 7)
    assert ring.get(7) == b"h"
