"""The status LED: the state-to-pattern table, and the pin it drives (gpiozero mock pins)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from edgevoice.feedback.led import LedController, LedPattern, pattern_for
from edgevoice.feedback.settings import FeedbackSettings
from edgevoice.feedback.states import DeviceState
from edgevoice.triggers.base import TriggerUnavailableError

S = DeviceState


def test_every_state_has_a_pattern_and_they_differ() -> None:
    patterns = {state: pattern_for(state) for state in DeviceState}
    assert len(set(patterns.values())) == len(DeviceState)


def test_the_documented_table() -> None:
    assert pattern_for(S.IDLE) == LedPattern("off")
    assert pattern_for(S.LISTENING) == LedPattern("on")
    assert pattern_for(S.THINKING).kind == "blink"
    assert pattern_for(S.SPEAKING).kind == "pulse"
    error, offline, thinking = pattern_for(S.ERROR), pattern_for(S.OFFLINE), pattern_for(S.THINKING)
    # fast on error, slow while offline, in between while thinking
    assert error.on_ms + error.off_ms < thinking.on_ms + thinking.off_ms
    assert thinking.on_ms + thinking.off_ms < offline.on_ms + offline.off_ms
    muted = pattern_for(S.MUTED)
    assert muted.kind == "blink" and muted.on_ms <= 150 and muted.on_ms + muted.off_ms == 3000


@pytest.fixture
def pwm_factory() -> Iterator[Any]:
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory, MockPWMPin

    factory = MockFactory(pin_class=MockPWMPin)
    Device.pin_factory = factory
    yield factory
    factory.reset()
    Device.pin_factory = None


@pytest.fixture
def plain_factory() -> Iterator[Any]:
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory

    factory = MockFactory()
    Device.pin_factory = factory
    yield factory
    factory.reset()
    Device.pin_factory = None


def wait_for_changes(pin: Any, count: int, timeout_s: float = 5.0) -> int:
    """Wait until the mock pin changed ``count`` times since its states were cleared.

    A liveness wait for gpiozero's background thread, not a timing assertion.
    """
    deadline = time.monotonic() + timeout_s
    while len(pin.states) - 1 < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(pin.states) - 1


def test_led_follows_a_state_sequence(pwm_factory: Any) -> None:
    settings = FeedbackSettings(led_enabled=True)
    controller = LedController(settings, pin_factory=pwm_factory)
    pin = pwm_factory.pin(settings.led_pin)
    try:
        controller.set_state(S.LISTENING)
        assert controller.led.value == 1.0 and controller.led.is_lit
        controller.set_state(S.IDLE)
        assert controller.led.value == 0.0 and not controller.led.is_lit

        controller.set_state(S.ERROR)  # fast blink: on/off every 100 ms
        pin.clear_states()
        assert wait_for_changes(pin, 4) >= 4
        assert {state for _, state in pin.states[1:]} == {0.0, 1.0}

        controller.set_state(S.SPEAKING)  # pulse: many levels in between
        pin.clear_states()
        wait_for_changes(pin, 10)
        levels = {state for _, state in pin.states[1:]}
        assert any(0.0 < level < 1.0 for level in levels)
        assert controller.pattern == pattern_for(S.SPEAKING)

        controller.set_state(S.LISTENING)
        assert controller.led.value == 1.0
    finally:
        controller.close()
    assert pin.state == 0  # left dark


def test_repeating_a_state_keeps_the_rhythm(pwm_factory: Any) -> None:
    controller = LedController(FeedbackSettings(led_enabled=True), pin_factory=pwm_factory)
    try:
        controller.set_state(S.THINKING)
        thread = controller.led._blink_thread
        controller.set_state(S.THINKING)
        assert controller.led._blink_thread is thread
    finally:
        controller.close()


def test_plain_led_blinks_where_a_pulse_was_asked(plain_factory: Any) -> None:
    settings = FeedbackSettings(led_enabled=True, led_pwm=False)
    controller = LedController(settings, pin_factory=plain_factory)
    pin = plain_factory.pin(settings.led_pin)
    try:
        controller.set_state(S.SPEAKING)
        pin.clear_states()
        assert wait_for_changes(pin, 2) >= 2
        assert {state for _, state in pin.states[1:]} <= {False, True}
    finally:
        controller.close()


def test_close_is_idempotent_and_later_states_are_ignored(pwm_factory: Any) -> None:
    controller = LedController(FeedbackSettings(led_enabled=True), pin_factory=pwm_factory)
    controller.close()
    controller.close()
    controller.set_state(S.LISTENING)  # after shutdown: nothing to drive, no error


def test_missing_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gpiozero", None)
    with pytest.raises(TriggerUnavailableError, match=r"edgevoice\[pi\]"):
        LedController(FeedbackSettings(led_enabled=True))


def test_pin_in_use_is_reported(pwm_factory: Any) -> None:
    first = LedController(FeedbackSettings(led_enabled=True), pin_factory=pwm_factory)
    try:
        with pytest.raises(TriggerUnavailableError, match="GPIO27"):
            LedController(FeedbackSettings(led_enabled=True), pin_factory=pwm_factory)
    finally:
        first.close()
