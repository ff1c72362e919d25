"""The button: its decision table driven directly, then through gpiozero's mock pins."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgevoice.config.base import SettingError
from edgevoice.feedback.states import DeviceState
from edgevoice.triggers.base import (
    InterruptRequested,
    MuteToggled,
    Trigger,
    TriggerEvent,
    TurnEndRequested,
    TurnStartRequested,
)
from edgevoice.triggers.button import (
    PRESS_PLANS,
    ButtonLogic,
    ButtonMode,
    ButtonPhase,
    ButtonSettings,
    ButtonTrigger,
)

START = TurnStartRequested("button", held=True)
RELEASED = TurnEndRequested("button", "released")
PRESSED = TurnEndRequested("button", "pressed")
INTERRUPT = InterruptRequested("button")


def logic(mode: ButtonMode, state: DeviceState = DeviceState.IDLE) -> ButtonLogic:
    core = ButtonLogic(ButtonSettings(mode=mode, long_press_ms=2000))
    core.set_state(state)
    return core


# -- push-to-talk ----------------------------------------------------------------------


def test_push_to_talk_press_starts_and_release_ends() -> None:
    core = logic("push_to_talk")
    assert core.on_press(10.0) == [START]
    core.set_state(DeviceState.LISTENING)
    assert core.on_release(11.5) == [RELEASED]
    assert core.phase is ButtonPhase.UP


def test_push_to_talk_long_hold_is_a_long_sentence_not_mute() -> None:
    core = logic("push_to_talk")
    assert core.on_press(0.0) == [START]
    assert core.deadline is None
    assert core.tick(5.0) == []
    assert core.on_release(9.0) == [RELEASED]


def test_push_to_talk_press_while_speaking_interrupts_then_starts() -> None:
    core = logic("push_to_talk", DeviceState.SPEAKING)
    assert core.on_press(0.0) == [INTERRUPT, START]
    assert core.on_release(1.0) == [RELEASED]


def test_push_to_talk_press_while_thinking_interrupts_then_starts() -> None:
    core = logic("push_to_talk", DeviceState.THINKING)
    assert core.on_press(0.0) == [INTERRUPT, START]


def test_push_to_talk_press_during_open_turn_takes_it_over() -> None:
    core = logic("push_to_talk", DeviceState.LISTENING)
    assert core.on_press(0.0) == [START]  # holds the open turn until release
    assert core.on_release(2.0) == [RELEASED]


def test_push_to_talk_while_muted_short_press_does_nothing_long_press_unmutes() -> None:
    core = logic("push_to_talk", DeviceState.MUTED)
    assert core.on_press(0.0) == []
    assert core.on_release(0.3) == []
    assert core.on_press(1.0) == []
    assert core.deadline == pytest.approx(3.0)
    assert core.tick(2.9) == []
    assert core.tick(3.0) == [MuteToggled(False)]
    assert core.on_release(3.5) == []


# -- toggle ------------------------------------------------------------------------------


def test_toggle_press_starts_press_again_ends() -> None:
    core = logic("toggle")
    assert core.on_press(0.0) == []  # decided at release: it could become a long press
    assert core.on_release(0.15) == [START]
    core.set_state(DeviceState.LISTENING)
    assert core.on_press(3.0) == []
    assert core.on_release(3.2) == [PRESSED]


def test_toggle_long_press_mutes_and_starts_no_turn() -> None:
    core = logic("toggle")
    assert core.on_press(0.0) == []
    assert core.deadline == pytest.approx(2.0)
    assert core.tick(1.99) == []
    assert core.tick(2.0) == [MuteToggled(True)]
    assert core.phase is ButtonPhase.HELD_LONG
    assert core.tick(2.5) == []  # fires once per press
    assert core.on_release(2.6) == []
    core.set_state(DeviceState.MUTED)
    assert core.on_press(5.0) == []
    assert core.on_release(5.2) == []  # a short press while muted does nothing
    assert core.on_press(6.0) == []
    assert core.tick(8.0) == [MuteToggled(False)]
    assert core.on_release(8.1) == []


def test_toggle_long_press_counts_even_if_the_tick_came_late() -> None:
    core = logic("toggle")
    core.on_press(0.0)
    # The loop was busy and the release arrived before the timer: still a long press.
    assert core.on_release(2.4) == [MuteToggled(True)]


def test_toggle_press_while_speaking_only_interrupts() -> None:
    core = logic("toggle", DeviceState.SPEAKING)
    assert core.on_press(0.0) == [INTERRUPT]
    assert core.on_release(0.2) == []


def test_toggle_long_press_while_speaking_interrupts_then_mutes() -> None:
    core = logic("toggle", DeviceState.SPEAKING)
    assert core.on_press(0.0) == [INTERRUPT]
    assert core.tick(2.0) == [MuteToggled(True)]
    assert core.on_release(2.1) == []


# -- both --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["push_to_talk", "toggle"])
def test_bounced_edges_are_ignored(mode: ButtonMode) -> None:
    core = logic(mode)
    assert core.on_release(0.0) == []
    first = core.on_press(1.0)
    assert core.on_press(1.01) == []
    assert first + core.on_release(1.2) in ([START, RELEASED], [START])


def _bouncy_press(t: float, hold_s: float, bounce_s: float = 0.005,
                  bounces: int = 2) -> list[tuple[str, float]]:
    """Raw edges of one real press: each edge chatters ``bounces`` times."""
    edges: list[tuple[str, float]] = []
    for level, start in (("press", t), ("release", t + hold_s)):
        other = "release" if level == "press" else "press"
        edges.append((level, start))
        for k in range(bounces):
            edges.append((other, start + (2 * k + 1) * bounce_s))
            edges.append((level, start + (2 * k + 2) * bounce_s))
    return edges


def _drive(core: ButtonLogic, edges: list[tuple[str, float]], until: float) -> list[Any]:
    """Feed raw edges, ticking at every deadline like ButtonTrigger does."""
    out: list[Any] = []
    for action, at in sorted(edges, key=lambda e: e[1]):
        while core.deadline is not None and core.deadline <= at:
            out += core.tick(core.deadline)
        out += core.on_press(at) if action == "press" else core.on_release(at)
    while core.deadline is not None and core.deadline <= until:
        out += core.tick(core.deadline)
    return out


@pytest.mark.parametrize("bounce_s", [0.001, 0.005, 0.009])
def test_push_to_talk_bouncing_press_gives_exactly_one_turn(bounce_s: float) -> None:
    """The issue's switch: a 5 ms bounce, twice at each edge, gave 5 turns."""
    core = logic("push_to_talk")
    events = _drive(core, _bouncy_press(1.0, 2.0, bounce_s), until=5.0)
    assert events == [START, RELEASED]
    assert core.bounces >= 6  # the chatter was seen and dropped


def test_release_bounce_does_not_interrupt_the_reply() -> None:
    """A bounce at release used to be a new press: it interrupted the real answer."""
    core = logic("push_to_talk")
    events: list[Any] = []
    for action, at in _bouncy_press(0.0, 1.5):
        if action == "release" and at == 1.5:
            core.set_state(DeviceState.LISTENING)
        events += core.on_press(at) if action == "press" else core.on_release(at)
        if events and events[-1] == RELEASED:
            core.set_state(DeviceState.THINKING)  # the turn ended at once
    assert events == [START, RELEASED]
    assert INTERRUPT not in events


def test_toggle_bouncing_presses_start_then_end_once_each() -> None:
    core = logic("toggle")
    events = _drive(core, _bouncy_press(0.0, 0.15), until=1.0)
    assert events == [START]
    core.set_state(DeviceState.LISTENING)
    events = _drive(core, _bouncy_press(3.0, 0.15), until=4.0)
    assert events == [PRESSED]


def test_a_level_that_settles_after_the_lockout_is_committed() -> None:
    """The last bounce was a real change: the tick commits it when it has settled."""
    core = logic("push_to_talk")
    assert core.on_press(0.0) == [START]
    assert core.on_release(0.010) == []  # inside the 30 ms lockout: maybe a bounce
    assert core.deadline == pytest.approx(0.040)  # steady for bounce_ms from 0.010
    assert core.tick(0.039) == []
    assert core.tick(0.040) == [RELEASED]  # it stayed up: a very short real press


def test_a_late_tick_is_caught_up_by_the_next_edge() -> None:
    core = logic("push_to_talk")
    core.on_press(0.0)
    core.on_release(0.010)
    # No tick ran (busy loop); the next press comes much later: release first.
    assert core.on_press(1.0) == [RELEASED, START]


def test_every_mode_and_state_has_a_plan() -> None:
    modes: tuple[ButtonMode, ...] = ("push_to_talk", "toggle")
    assert set(PRESS_PLANS) == {(m, s) for m in modes for s in DeviceState}


@pytest.mark.parametrize("bounce_ms", [0, 1, 4, 201])
def test_no_debounce_is_refused(bounce_ms: int) -> None:
    with pytest.raises(SettingError, match=r"bounce_ms.*every mechanical switch bounces"):
        ButtonSettings(bounce_ms=bounce_ms)


def test_default_debounce_suits_tactile_switches() -> None:
    assert 10 <= ButtonSettings().bounce_ms <= 50


def test_settings_are_checked() -> None:
    with pytest.raises(SettingError, match="long_press_ms"):
        ButtonSettings(long_press_ms=100)
    with pytest.raises(SettingError, match="pin"):
        ButtonSettings(pin=40)


_steps = st.lists(
    st.tuples(
        st.sampled_from(["press", "release", "tick", "state"]),
        st.floats(min_value=0.0, max_value=3.0),
        st.sampled_from(list(DeviceState)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(_steps)
def test_push_to_talk_every_started_turn_is_ended_once(steps: list[Any]) -> None:
    core = logic("push_to_talk")
    now = 0.0
    open_turns = 0
    for action, dt, state in steps:
        now += dt
        if action == "press":
            events = core.on_press(now)
        elif action == "release":
            events = core.on_release(now)
        elif action == "tick":
            events = core.tick(now)
        else:
            if core.phase is ButtonPhase.UP:  # the daemon's state can't change mid-press
                core.set_state(state)  # in a way this test can model
            continue
        for event in events:
            if event == START:
                assert open_turns == 0
                open_turns += 1
            elif isinstance(event, TurnEndRequested):
                open_turns = 0
        if core.phase is ButtonPhase.UP:
            assert open_turns == 0


@settings(max_examples=200, deadline=None)
@given(_steps)
def test_toggle_long_presses_never_start_or_end_turns(steps: list[Any]) -> None:
    core = logic("toggle")
    now = 0.0
    pressed_at: float | None = None
    for action, dt, state in steps:
        now += dt
        events: list[TriggerEvent] = []
        if action == "press":
            if pressed_at is None:
                pressed_at = now
            events = core.on_press(now)
        elif action == "release":
            events = core.on_release(now)
            if pressed_at is not None and now - pressed_at >= 2.0:
                assert not any(isinstance(e, TurnStartRequested | TurnEndRequested) for e in events)
            pressed_at = None
        elif action == "tick":
            events = core.tick(now)
        elif core.phase is ButtonPhase.UP:
            core.set_state(state)
        mutes = [e for e in events if isinstance(e, MuteToggled)]
        assert len(mutes) <= 1


# -- through gpiozero's mock pins ---------------------------------------------------------


@pytest.fixture
def pin_factory() -> Iterator[Any]:
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory

    factory = MockFactory()
    Device.pin_factory = factory
    yield factory
    factory.reset()
    Device.pin_factory = None


async def _settle() -> None:
    # call_soon_threadsafe callbacks run on the next loop iterations; mock edges come
    # microseconds apart, so the debounce commits a release by its timer (5 ms), which
    # fires before this longer sleep ends (same loop, earlier deadline).
    for _ in range(3):
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)


def _run_button(factory: Any, settings: ButtonSettings, script: Any) -> list[TriggerEvent]:
    events: list[TriggerEvent] = []

    async def main() -> None:
        trigger = ButtonTrigger(settings, pin_factory=factory)
        assert isinstance(trigger, Trigger)
        await trigger.start(events.append)
        try:
            await script(trigger, factory.pin(settings.pin))
        finally:
            await trigger.stop()

    asyncio.run(main())
    return events


def test_gpio_push_to_talk_sequence(pin_factory: Any) -> None:
    threads: set[int] = set()

    async def script(trigger: ButtonTrigger, pin: Any) -> None:
        loop_thread = threading.get_ident()
        # Edges come from another thread, as gpiozero's do on a real Pi.
        await asyncio.to_thread(pin.drive_low)  # pressed: shorts the pulled-up pin to GND
        await _settle()
        trigger.set_state(DeviceState.LISTENING)
        await asyncio.to_thread(pin.drive_high)
        await _settle()
        trigger.set_state(DeviceState.SPEAKING)
        await asyncio.to_thread(pin.drive_low)
        await _settle()
        await asyncio.to_thread(pin.drive_high)
        await _settle()
        assert threads == {loop_thread}

    def record(event: TriggerEvent) -> None:
        threads.add(threading.get_ident())
        events.append(event)

    events: list[TriggerEvent] = []

    async def main() -> None:
        settings = ButtonSettings(bounce_ms=5)
        trigger = ButtonTrigger(settings, pin_factory=pin_factory)
        await trigger.start(record)
        try:
            await script(trigger, pin_factory.pin(settings.pin))
        finally:
            await trigger.stop()

    asyncio.run(main())
    assert events == [START, RELEASED, INTERRUPT, START, RELEASED]


def test_gpio_toggle_sequence(pin_factory: Any) -> None:
    async def script(trigger: ButtonTrigger, pin: Any) -> None:
        for state in (DeviceState.IDLE, DeviceState.LISTENING, DeviceState.SPEAKING):
            trigger.set_state(state)
            pin.drive_low()
            await _settle()
            pin.drive_high()
            await _settle()

    # long_press_ms is far above the few milliseconds a mock press lasts.
    settings = ButtonSettings(mode="toggle", bounce_ms=5, long_press_ms=5000)
    assert _run_button(pin_factory, settings, script) == [START, PRESSED, INTERRUPT]


def test_gpio_long_press_mutes_without_starting_a_turn(pin_factory: Any) -> None:
    async def script(trigger: ButtonTrigger, pin: Any) -> None:
        pin.drive_low()
        # Held until the long-press timer fired (the wait is not a timing assertion).
        for _ in range(200):
            await asyncio.sleep(0.01)
            if trigger.logic.phase is ButtonPhase.HELD_LONG:
                break
        pin.drive_high()
        await _settle()

    settings = ButtonSettings(mode="toggle", bounce_ms=5, long_press_ms=400)
    assert _run_button(pin_factory, settings, script) == [MuteToggled(True)]


def test_gpio_pull_down_wiring_presses_on_high(pin_factory: Any) -> None:
    async def script(trigger: ButtonTrigger, pin: Any) -> None:
        pin.drive_high()
        await _settle()
        pin.drive_low()
        await _settle()

    settings = ButtonSettings(pull_up=False, bounce_ms=5)
    assert _run_button(pin_factory, settings, script) == [START, RELEASED]


def test_gpio_stop_releases_the_pin(pin_factory: Any) -> None:
    async def main() -> None:
        trigger = ButtonTrigger(ButtonSettings(), pin_factory=pin_factory)
        await trigger.start(lambda event: None)
        await trigger.stop()
        await trigger.stop()  # idempotent
        # The pin is free again: another device can claim it.
        again = ButtonTrigger(ButtonSettings(), pin_factory=pin_factory)
        await again.start(lambda event: None)
        await again.stop()

    asyncio.run(main())


def test_gpio_bouncing_contacts_give_one_turn(pin_factory: Any) -> None:
    """Raw chatter on the pin (no pin-factory debounce): one press, one release."""

    async def script(trigger: ButtonTrigger, pin: Any) -> None:
        for level in ("low", "high", "low", "high", "low"):  # closing, with bounces
            getattr(pin, f"drive_{level}")()
        await _settle()
        trigger.set_state(DeviceState.LISTENING)
        for level in ("high", "low", "high", "low", "high"):  # opening, with bounces
            getattr(pin, f"drive_{level}")()
        await _settle()

    settings = ButtonSettings(bounce_ms=20)
    assert _run_button(pin_factory, settings, script) == [START, RELEASED]
