"""How turns start and end: the one ``turn.start`` setting, held turns, the follow-up.

Driven through the pure turn machine and the real config loader; no audio, no clock.
"""

from __future__ import annotations

import pytest

from edgevoice.config.loader import load_text
from edgevoice.config.model import DeviceConfig
from edgevoice.device.turn import (
    BeginTurn,
    Command,
    FinishTurn,
    PlayEarcon,
    StreamFrame,
    TurnMachine,
    TurnSettings,
    TurnState,
    parse_start,
)
from edgevoice.errors import ConfigError
from edgevoice.triggers.base import TurnEndRequested, TurnStartRequested
from edgevoice.triggers.button import ButtonLogic, ButtonSettings

F = b"\x01" * 640


def machine(**kwargs: object) -> TurnMachine:
    m = TurnMachine(TurnSettings(**kwargs))  # type: ignore[arg-type]
    m.on_link(True, 0.0)
    return m


def speak(m: TurnMachine, now: float, *, start: bool = False, end: bool = False,
          send: bool = True) -> list[Command]:
    return m.on_frame(F, speech_started=(F,) if start else None, speech_ended=end,
                      in_speech=send, now=now, voiced=send and not end)


# -- turn.start: one setting, no contradictions -------------------------------------------


@pytest.mark.parametrize(("value", "ways"), [
    ("voice", {"voice"}), ("wake", {"wake"}), ("button", {"button"}),
    ("wake+button", {"wake", "button"}), ("button + voice", {"voice", "button"}),
    ("api", set()),
])
def test_start_values_name_the_ways(value: str, ways: set[str]) -> None:
    assert parse_start(value) == ways


@pytest.mark.parametrize(("value", "reason"), [
    ("voice+wake", "would send every wake phrase upstream"),
    ("wake+voice+button", "would send every wake phrase upstream"),
    ("wake+wake", "names a way twice"),
    ("clap", "'clap' is not a way to start a turn"),
    ("api+wake", "'api' is not a way"),
    ("", "'' is not a way"),
])
def test_contradicting_or_unknown_start_is_refused_with_file_key_reason(
        value: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(f"turn:\n  start: {value!r}\n", DeviceConfig, "device.yaml")
    assert str(info.value).startswith("device.yaml: turn.start: ")
    assert reason in str(info.value)


def test_the_old_switches_are_gone_so_they_cannot_contradict() -> None:
    for text in ("turn: {always_on: true}", "triggers: {wake: {enabled: true}}",
                 "triggers: {button: {enabled: true}}"):
        with pytest.raises(ConfigError, match="unknown key"):
            load_text(text, DeviceConfig, "device.yaml")


def test_the_shipped_default_never_sends_a_wake_phrase() -> None:
    ways = DeviceConfig().turn.ways
    assert not {"voice", "wake"} <= ways


def test_in_wake_mode_speech_alone_starts_nothing() -> None:
    m = machine(start="wake")
    assert speak(m, 1.0, start=True) == []
    assert m.state is TurnState.IDLE


def test_voice_mode_speech_starts_a_turn() -> None:
    m = machine(start="voice")
    assert any(isinstance(c, BeginTurn) for c in speak(m, 1.0, start=True))


# -- push-to-talk: held = listening -------------------------------------------------------


def test_push_to_talk_long_pause_while_held_is_one_turn_ending_at_release() -> None:
    """The issue's user: a 1.2 s pause while holding split one request into two."""
    m = machine(start="button")
    button = ButtonLogic(ButtonSettings(mode="push_to_talk"))
    commands: list[Command] = []
    for event in button.on_press(0.0):
        assert isinstance(event, TurnStartRequested) and event.held
        commands += m.request_turn(event.source, 0.0, held=event.held)
    t = 0.02
    commands += speak(m, t, start=True)
    while t < 1.5:  # "what's the weather ..."
        t += 0.02
        commands += speak(m, t)
    commands += speak(m, t, end=True)  # the detector's hangover ran out: 1.2 s pause
    while t < 2.7:
        t += 0.02
        commands += speak(m, t, send=False)
        commands += m.tick(t)
    assert m.state is TurnState.LISTENING and m.held
    commands += speak(m, 2.72, start=True)  # "... in Paris tomorrow"
    while t < 4.0:
        t += 0.02
        commands += speak(m, t)
    assert not any(isinstance(c, FinishTurn) for c in commands)
    for event in button.on_release(4.0):
        assert isinstance(event, TurnEndRequested)
        commands += m.request_end(event.source, event.reason, 4.0)
    finishes = [c for c in commands if isinstance(c, FinishTurn)]
    assert finishes == [FinishTurn(1, "released")]  # one turn, ended at release
    assert m.state is TurnState.THINKING
    assert sum(isinstance(c, BeginTurn) for c in commands) == 1
    assert any(isinstance(c, StreamFrame) for c in commands)


def test_held_turn_still_ends_at_max_turn_ms() -> None:
    m = machine(start="button", max_turn_ms=5000)
    m.request_turn("button", 0.0, held=True)
    speak(m, 0.1, start=True)
    assert m.tick(4.9) == []
    assert FinishTurn(1, "max_length") in m.tick(5.0)


def test_held_turn_without_speech_is_not_ended_by_the_no_speech_timeout() -> None:
    m = machine(start="button", no_speech_timeout_ms=1000, max_turn_ms=9000)
    m.request_turn("button", 0.0, held=True)
    assert m.tick(3.0) == [] and m.state is TurnState.LISTENING
    assert FinishTurn(1, "no_speech") in m.request_end("button", "released", 3.5)


def test_toggle_second_press_ends_the_held_turn() -> None:
    m = machine(start="button")
    button = ButtonLogic(ButtonSettings(mode="toggle"))
    button.on_press(0.0)
    for event in button.on_release(0.15):
        assert isinstance(event, TurnStartRequested)
        m.request_turn(event.source, 0.15, held=event.held)
    speak(m, 0.2, start=True)
    assert speak(m, 1.0, end=True) == [StreamFrame(F)]  # a pause does not end it
    from edgevoice.feedback.states import DeviceState
    button.set_state(DeviceState.LISTENING)
    assert button.on_press(3.0) == []
    (end,) = button.on_release(3.1)
    assert isinstance(end, TurnEndRequested)
    assert FinishTurn(1, "pressed") in m.request_end(end.source, end.reason, 3.1)


def test_not_held_turn_still_ends_at_silence() -> None:
    m = machine(start="wake")
    m.request_turn("wake", 0.0)
    speak(m, 0.1, start=True)
    assert FinishTurn(1, "silence") in speak(m, 1.0, end=True)


def test_push_to_talk_during_a_voice_turn_holds_it() -> None:
    m = machine(start="voice+button")
    speak(m, 0.0, start=True)
    assert m.request_turn("button", 0.1, held=True) == []  # takes the open turn over
    assert m.held
    assert not any(isinstance(c, FinishTurn) for c in speak(m, 1.0, end=True))


# -- follow-up window ----------------------------------------------------------------------


def _to_reply_end(m: TurnMachine) -> list[Command]:
    m.request_turn("wake", 0.0)
    speak(m, 0.1, start=True)
    speak(m, 1.0, end=True)
    m.on_response_start(1.5)
    return m.on_reply_finished(4.0)


def test_follow_up_window_opens_after_the_reply_and_speech_starts_a_turn() -> None:
    m = machine(start="wake", follow_up_s=5.0)
    out = _to_reply_end(m)
    assert m.state is TurnState.FOLLOW_UP and PlayEarcon("follow_up") in out
    assert m.tick(8.9) == []
    out = speak(m, 9.0, start=True)
    assert BeginTurn(2, "follow_up", (F,)) in out and m.state is TurnState.LISTENING


def test_follow_up_window_closes_after_follow_up_s() -> None:
    m = machine(start="wake", follow_up_s=5.0)
    _to_reply_end(m)
    m.tick(8.99)
    assert m.state is TurnState.FOLLOW_UP
    m.tick(9.0)
    assert m.state is TurnState.IDLE
    assert speak(m, 9.5, start=True) == []  # the wake word is needed again


def test_follow_up_is_off_by_default() -> None:
    m = machine(start="wake")
    _to_reply_end(m)
    assert m.state is TurnState.IDLE


def test_follow_up_window_closed_by_interrupt_and_by_link_loss() -> None:
    m = machine(start="button", follow_up_s=5.0)
    _to_reply_end(m)
    m.request_interrupt("button", 4.5)
    assert m.state is TurnState.IDLE
    _to_reply_end(m)
    m.on_link(False, 4.5)
    assert m.state is TurnState.IDLE


@pytest.mark.parametrize("seconds", [-1.0, 31.0])
def test_follow_up_s_is_checked(seconds: float) -> None:
    with pytest.raises(ConfigError, match=r"turn\.follow_up_s"):
        load_text(f"turn: {{follow_up_s: {seconds}}}", DeviceConfig, "device.yaml")
