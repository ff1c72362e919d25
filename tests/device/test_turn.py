"""The turn state machine, driven without audio, sockets or clocks."""

from __future__ import annotations

import pytest

from edgevoice.device.turn import (
    TRANSITIONS,
    BeginTurn,
    FinishTurn,
    PlayEarcon,
    StateChanged,
    StopPlayback,
    StreamFrame,
    TurnMachine,
    TurnSettings,
    TurnState,
)
from edgevoice.errors import IllegalTransitionError

F = b"\x00" * 640


def machine(**kwargs: object) -> TurnMachine:
    m = TurnMachine(TurnSettings(**kwargs))  # type: ignore[arg-type]
    m.on_link(True, 0.0)
    return m


def frame(m: TurnMachine, now: float, *, start: tuple[bytes, ...] | None = None,
          end: bool = False, speech: bool = False) -> list[object]:
    return list(m.on_frame(F, speech_started=start, speech_ended=end, in_speech=speech, now=now))


def test_always_on_turn_streams_preroll_and_speech_then_waits_for_reply() -> None:
    m = machine()
    out = frame(m, 1.0, start=(b"a", b"b"), speech=True)
    assert BeginTurn(1, "vad", (b"a", b"b")) in out
    assert StreamFrame(F) in out
    assert m.state is TurnState.LISTENING
    out = frame(m, 1.5, end=True, speech=True)
    assert FinishTurn(1, "silence") in out and m.state is TurnState.THINKING
    m.on_response_start(2.0)
    assert m.state is TurnState.SPEAKING
    m.on_reply_finished(4.0)
    assert m.state is TurnState.IDLE


def test_silence_is_not_streamed() -> None:
    m = machine()
    frame(m, 1.0, start=(), speech=True)
    assert frame(m, 1.02, speech=False) == []


def test_button_turn_without_speech_ends_quietly_after_timeout() -> None:
    m = machine(start="button", no_speech_timeout_ms=2000)
    out = m.request_turn("button", 10.0)
    assert BeginTurn(1, "button") in out and PlayEarcon("listening") in out
    assert m.tick(11.0) == []
    out = m.tick(12.1)
    assert FinishTurn(1, "no_speech") in out and m.state is TurnState.IDLE
    assert PlayEarcon("done") not in out


def test_max_turn_length_ends_the_turn() -> None:
    m = machine(max_turn_ms=5000)
    frame(m, 0.0, start=(), speech=True)
    assert FinishTurn(1, "max_length") in m.tick(5.01)


def test_release_ends_a_push_to_talk_turn() -> None:
    m = machine(start="button")
    m.request_turn("button", 0.0)
    frame(m, 0.3, start=(b"p",), speech=True)
    assert FinishTurn(1, "release") in m.request_end("button", "release", 1.0)


def test_voice_barge_in_interrupts_the_reply_and_starts_a_turn() -> None:
    m = machine()
    frame(m, 0.0, start=(), speech=True)
    frame(m, 1.0, end=True)
    m.on_response_start(1.5)
    out = frame(m, 2.0, start=(b"x",), speech=True)
    assert StopPlayback("barge_in", notify_relay=True) in out
    assert BeginTurn(2, "vad", (b"x",)) in out and m.state is TurnState.LISTENING


def test_button_interrupts_the_reply() -> None:
    m = machine()
    frame(m, 0.0, start=(), speech=True)
    frame(m, 1.0, end=True)
    m.on_response_start(1.5)
    out = m.request_interrupt("button", 2.0)
    assert StopPlayback("button", notify_relay=True) in out and m.state is TurnState.IDLE


def test_remote_interrupt_flushes_without_echoing_back() -> None:
    m = machine()
    frame(m, 0.0, start=(), speech=True)
    frame(m, 1.0, end=True)
    m.on_response_start(1.5)
    assert m.on_remote_interrupt(2.0)[0] == StopPlayback("remote", notify_relay=False)


def test_offline_turn_plays_the_offline_earcon_and_starts_nothing() -> None:
    m = TurnMachine()
    out = m.request_turn("button", 0.0)
    assert out == [PlayEarcon("offline")] and m.state is TurnState.IDLE


def test_link_loss_mid_turn_returns_to_idle() -> None:
    m = machine()
    frame(m, 0.0, start=(), speech=True)
    out = m.on_link(False, 0.5)
    assert PlayEarcon("offline") in out and m.state is TurnState.IDLE


def test_mute_cancels_the_turn_and_blocks_new_ones() -> None:
    m = machine()
    frame(m, 0.0, start=(), speech=True)
    assert FinishTurn(1, "cancelled") in m.set_muted(True, 0.5)
    assert m.request_turn("button", 0.6) == []
    assert frame(m, 0.7, start=(b"x",), speech=True) == []
    m.set_muted(False, 1.0)
    assert m.state is TurnState.IDLE


def test_reply_timeout_gives_up_with_error_earcon() -> None:
    m = machine(reply_timeout_ms=3000)
    frame(m, 0.0, start=(), speech=True)
    frame(m, 1.0, end=True)
    assert PlayEarcon("error") in m.tick(4.1) and m.state is TurnState.IDLE


def test_every_state_change_is_reported_and_legal() -> None:
    m = machine()
    seen = []
    for out in (frame(m, 0, start=(), speech=True), frame(m, 1, end=True),
                m.on_response_start(2), m.on_reply_finished(3)):
        seen += [c for c in out if isinstance(c, StateChanged)]
    assert [(c.previous, c.state) for c in seen] == [
        (TurnState.IDLE, TurnState.LISTENING), (TurnState.LISTENING, TurnState.THINKING),
        (TurnState.THINKING, TurnState.SPEAKING), (TurnState.SPEAKING, TurnState.IDLE)]
    assert all(c.state in TRANSITIONS[c.previous] for c in seen)


def test_illegal_transition_raises() -> None:
    m = machine()
    with pytest.raises(IllegalTransitionError, match="illegal"):
        m._enter(TurnState.SPEAKING, 0.0, [])


def test_wake_turn_is_not_ended_by_the_wake_phrase_hangover() -> None:
    m = machine(start="button")
    m.request_turn("wake", 0.0)  # the detector is still inside "hey jarvis"
    frame(m, 0.02, speech=True)
    assert frame(m, 0.6, end=True, speech=True) == [StreamFrame(F)]
    assert m.state is TurnState.LISTENING
    # the question: a new onset inside the turn, then its end
    frame(m, 1.0, start=(b"q",), speech=True)
    assert FinishTurn(1, "silence") in frame(m, 2.0, end=True, speech=True)


def test_long_voiced_speech_inside_a_trigger_turn_counts_as_heard() -> None:
    m = machine(start="button")
    m.request_turn("button", 0.0)
    for i in range(15):
        m.on_frame(F, speech_started=None, speech_ended=False, in_speech=True,
                   now=0.02 * i, voiced=True)
    out = m.on_frame(F, speech_started=None, speech_ended=True, in_speech=True, now=0.5)
    assert FinishTurn(1, "silence") in out


def test_a_reply_that_starts_mid_turn_ends_the_turn() -> None:
    m = machine()
    frame(m, 0.0, start=(), speech=True)
    out = m.on_response_start(0.5)
    assert FinishTurn(1, "answered") in out and m.state is TurnState.SPEAKING
