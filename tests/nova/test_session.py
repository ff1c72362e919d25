"""The Nova session core, driven with made-up time and no I/O."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from edgevoice.nova import events as nova
from edgevoice.nova.faults import Fault
from edgevoice.nova.session import (
    FRAME_BYTES,
    AbortStream,
    Action,
    CloseStream,
    Emit,
    IllegalTransition,
    OpenStream,
    RunTool,
    SendAudio,
    SendEvents,
    SessionCore,
    SessionState,
)
from edgevoice.nova.settings import NovaSettings
from edgevoice.upstream.base import (
    AudioOutput,
    ResponseEnded,
    ResponseInterrupted,
    ResponseStarted,
    ToolCalled,
    TranscriptReceived,
    UpstreamEvent,
    UpstreamFailed,
    UsageReported,
)

SPEECH = (3000).to_bytes(2, "little", signed=True) * (FRAME_BYTES // 2)
TOOL_SPEC = nova.tool_spec("current_time", "Time.", {"type": "object"})


def make(**overrides: Any) -> SessionCore:
    values: dict[str, Any] = {
        "rotate_after_s": 10.0,
        "rotate_hard_s": 20.0,
        "idle_close_s": 30.0,
        "stall_timeout_s": 5.0,
        "response_wait_s": 4.0,
        "replay_buffer_s": 1.0,
        "max_attempts": 3,
        "system_prompt": "Be brief.",
    }
    values.update(overrides)
    counter = itertools.count()
    return SessionCore(
        NovaSettings(**values),
        tool_specs=(TOOL_SPEC,),
        new_id=lambda: f"id{next(counter)}",
        rng=random.Random(7),
    )


def of(actions: list[Action], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def emitted(actions: list[Action], *, usage: bool = False) -> list[UpstreamEvent]:
    """What the device's session gets (usage reports only when asked for)."""
    return [
        a.event
        for a in actions
        if isinstance(a, Emit) and (usage or not isinstance(a.event, UsageReported))
    ]


def names(events: tuple[nova.Event, ...] | list[nova.Event]) -> list[str]:
    return [next(iter(e["event"])) for e in events]


def sent_events(actions: list[Action], stream_id: int) -> list[nova.Event]:
    return [e for a in of(actions, SendEvents) if a.stream_id == stream_id for e in a.events]


def sent_audio(actions: list[Action], stream_id: int) -> list[bytes]:
    return [f for a in of(actions, SendAudio) if a.stream_id == stream_id for f in a.frames]


def open_stream(core: SessionCore, now: float = 0.0) -> int:
    (opened,) = of(core.start_turn(now), OpenStream)
    core.stream_opened(opened.stream_id, now)
    assert core.state is SessionState.OPEN
    return int(opened.stream_id)


def feed(core: SessionCore, sid: int, now: float, *events: nova.OutputEvent) -> list[Action]:
    actions: list[Action] = []
    for event in events:
        actions += core.output_event(sid, event, now)
    return actions


def reply(tag: str, chunks: int = 2, *, end: bool = True) -> list[nova.OutputEvent]:
    """Nova's events for one spoken reply to 'question'."""
    final = '{"generationStage":"FINAL"}'
    events: list[nova.OutputEvent] = [
        nova.CompletionStarted("c-" + tag),
        nova.ContentStarted("u-" + tag, "TEXT", "USER", "FINAL"),
        nova.TextReceived("u-" + tag, "USER", "question " + tag),
        nova.ContentEnded("u-" + tag, "TEXT", "END_TURN"),
        nova.ContentStarted("s-" + tag, "TEXT", "ASSISTANT", "SPECULATIVE"),
        nova.TextReceived("s-" + tag, "ASSISTANT", "planned " + tag),
        nova.ContentEnded("s-" + tag, "TEXT", "PARTIAL_TURN"),
        nova.ContentStarted("a-" + tag, "AUDIO", "ASSISTANT", "FINAL"),
        *(nova.AudioReceived("a-" + tag, bytes([i + 1, 0]) * 10) for i in range(chunks)),
    ]
    del final
    if end:
        events += [
            nova.ContentEnded("a-" + tag, "AUDIO", "END_TURN"),
            nova.ContentStarted("f-" + tag, "TEXT", "ASSISTANT", "FINAL"),
            nova.TextReceived("f-" + tag, "ASSISTANT", "answer " + tag),
            nova.ContentEnded("f-" + tag, "TEXT", "END_TURN"),
            nova.CompletionEnded("c-" + tag, "END_TURN"),
        ]
    return events


def converse(core: SessionCore, sid: int, now: float, tag: str) -> list[Action]:
    """A full turn: speech, end of turn, and Nova's reply."""
    actions = core.start_turn(now)
    for i in range(10):
        actions += core.audio_in(SPEECH, now + i * 0.02)
    actions += core.end_turn(now + 0.2)
    return actions + feed(core, sid, now + 0.5, *reply(tag))


# --- opening ---------------------------------------------------------------------


def test_a_turn_opens_a_stream_with_the_prelude_and_held_audio_follows() -> None:
    core = make()
    (opened,) = of(core.start_turn(0.0), OpenStream)
    assert core.state is SessionState.OPENING
    assert names(opened.events) == [
        "sessionStart",
        "promptStart",
        "contentStart",
        "textInput",
        "contentEnd",
        "contentStart",
    ]
    prompt = opened.events[1]["event"]["promptStart"]
    assert prompt["toolConfiguration"]["tools"] == [TOOL_SPEC]
    assert opened.events[3]["event"]["textInput"]["content"] == "Be brief."
    assert opened.events[5]["event"]["contentStart"]["type"] == "AUDIO"
    frames = [SPEECH[:-2] + bytes([i, 0]) for i in range(5)]
    held = [a for i, f in enumerate(frames) for a in core.audio_in(f, 0.02 * i)]
    assert of(held, SendEvents) == of(held, SendAudio) == []  # nothing before the stream opens
    flushed = core.stream_opened(opened.stream_id, 0.3)
    assert core.state is SessionState.OPEN
    assert sent_audio(flushed, opened.stream_id) == frames
    audio_content = opened.events[5]["event"]["contentStart"]
    assert {(a.prompt_name, a.content_name) for a in of(flushed, SendAudio)} == {
        (audio_content["promptName"], audio_content["contentName"])
    }


def test_nova_1_gets_no_turn_detection_setting() -> None:
    for model, expected in (("amazon.nova-2-sonic-v1:0", True), ("amazon.nova-sonic-v1:0", False)):
        core = make(model_id=model, endpointing_sensitivity="LOW")
        (opened,) = of(core.start_turn(0.0), OpenStream)
        start = opened.events[0]["event"]["sessionStart"]
        assert ("turnDetectionConfiguration" in start) is expected


# --- continuous audio --------------------------------------------------------------


def test_silence_fills_gaps_at_real_time_but_not_between_device_frames() -> None:
    core = make()
    sid = open_stream(core, 0.0)
    talking: list[Action] = []
    for i in range(50):  # one second of speech, a frame every 20 ms
        now = 0.02 * i
        talking += core.audio_in(SPEECH, now) + core.tick(now)
    assert sent_audio(talking, sid) == [SPEECH] * 50
    core.end_turn(1.0)
    quiet: list[Action] = []
    for i in range(1, 51):  # one second of nothing from the device
        quiet += core.tick(1.0 + 0.02 * i)
    silence = sent_audio(quiet, sid)
    assert set(silence) == {bytes(FRAME_BYTES)}
    assert 46 <= len(silence) <= 50  # real time, give or take the jitter slack


def test_a_stalled_loop_skips_ahead_instead_of_bursting_silence() -> None:
    core = make()
    sid = open_stream(core, 0.0)
    assert len(sent_audio(core.tick(30.0), sid)) <= 5


# --- replies -----------------------------------------------------------------------


def test_a_reply_becomes_upstream_events_and_history() -> None:
    core = make()
    sid = open_stream(core)
    out = emitted(converse(core, sid, 0.0, "one"))
    assert out == [
        TranscriptReceived("user", "question one"),
        ResponseStarted(),
        AudioOutput(bytes([1, 0]) * 10),
        AudioOutput(bytes([2, 0]) * 10),
        ResponseEnded("end_turn"),
        TranscriptReceived("assistant", "answer one"),
    ]
    assert [(m.role, m.text) for m in core.history.select()] == [
        ("USER", "question one"),
        ("ASSISTANT", "answer one"),
    ]


def test_barge_in_by_text_marker_and_stop_reason_is_one_interruption() -> None:
    core = make()
    sid = open_stream(core)
    actions = feed(core, sid, 1.0, *reply("x", chunks=1, end=False))
    assert ResponseStarted() in emitted(actions)
    barge = feed(
        core,
        sid,
        1.1,
        nova.ContentStarted("m", "TEXT", "ASSISTANT", "SPECULATIVE"),
        nova.parse_output_event(
            '{"event": {"textOutput": {"contentId": "m", "role": "ASSISTANT", '
            '"content": "{ \\"interrupted\\" : true }"}}}'
        ),
        nova.AudioReceived("a-x", b"\x09\x00"),  # already in flight: must not play
        nova.ContentEnded("a-x", "AUDIO", "INTERRUPTED"),
        nova.ContentStarted("f", "TEXT", "ASSISTANT", "FINAL"),
        nova.TextReceived("f", "ASSISTANT", "Sure, the"),
    )
    assert emitted(barge) == [ResponseInterrupted(), TranscriptReceived("assistant", "Sure, the")]
    assert not core.responding


def test_barge_in_by_stop_reason_alone() -> None:
    core = make()
    sid = open_stream(core)
    feed(core, sid, 1.0, *reply("x", chunks=1, end=False))
    out = emitted(feed(core, sid, 1.1, nova.ContentEnded("a-x", "AUDIO", "INTERRUPTED")))
    assert out == [ResponseInterrupted()]


def test_local_interrupt_drops_the_rest_of_the_reply() -> None:
    core = make()
    sid = open_stream(core)
    feed(core, sid, 1.0, *reply("x", chunks=1, end=False))
    assert emitted(core.interrupt(1.05)) == [ResponseInterrupted()]
    assert emitted(core.interrupt(1.06)) == []
    rest = emitted(
        feed(
            core,
            sid,
            1.1,
            nova.AudioReceived("a-x", b"\x01\x00"),
            nova.ContentEnded("a-x", "AUDIO", "END_TURN"),
        )
    )
    assert rest == []


# --- tools ---------------------------------------------------------------------------


def test_tool_use_runs_the_tool_and_answers_with_a_tool_result() -> None:
    core = make()
    sid = open_stream(core)
    core.end_turn(0.5)
    actions = feed(
        core,
        sid,
        1.0,
        nova.ContentStarted("t", "TOOL", "TOOL"),
        nova.ToolUseRequested("t", "use-1", "current_time", "{}"),
        nova.ContentEnded("t", "TOOL", "TOOL_USE"),
    )
    assert of(actions, RunTool) == [RunTool(sid, "use-1", "current_time", "{}")]
    assert not core.paused()
    done = core.tool_finished(sid, "use-1", "current_time", True, '{"time":"12:00"}', 3.0, 1.2)
    assert emitted(done) == [ToolCalled("current_time", True, 3.0)]
    block = sent_events(done, sid)
    assert names(block) == ["contentStart", "toolResult", "contentEnd"]
    start = block[0]["event"]["contentStart"]
    assert start["toolResultInputConfiguration"]["toolUseId"] == "use-1"
    assert block[1]["event"]["toolResult"]["content"] == '{"time":"12:00"}'
    assert core.paused()


def test_a_tool_result_for_a_lost_stream_is_not_sent() -> None:
    core = make()
    sid = open_stream(core)
    feed(core, sid, 1.0, nova.ToolUseRequested("t", "use-1", "slow", "{}"))
    core.stream_failed(sid, Fault("ModelTimeoutException"), 1.5)
    done = core.tool_finished(sid, "use-1", "slow", False, '{"error":"x"}', 5000.0, 6.0)
    assert of(done, SendEvents) == []
    assert emitted(done) == [ToolCalled("slow", False, 5000.0)]


# --- rotation --------------------------------------------------------------------------


def test_rotation_at_a_pause_carries_history_and_loses_no_audio() -> None:
    core = make()
    old = open_stream(core, 0.0)
    converse(core, old, 1.0, "one")
    assert of(core.tick(9.9), OpenStream) == []
    rotating = core.tick(10.0)
    (opened,) = of(rotating, OpenStream)
    assert core.state is SessionState.ROTATING
    texts = [e["event"]["textInput"]["content"] for e in opened.events if "textInput" in e["event"]]
    assert texts == ["Be brief.", "question one", "answer one"]
    # The user speaks while the new stream opens: held, and the old one hears silence.
    core.start_turn(10.05)
    words = [SPEECH[:-2] + bytes([i, 1]) for i in range(10)]
    during: list[Action] = []
    for i, frame in enumerate(words):
        during += core.audio_in(frame, 10.05 + 0.02 * i) + core.tick(10.05 + 0.02 * i)
    assert sent_audio(during, opened.stream_id) == []
    assert set(sent_audio(during, old)) <= {bytes(FRAME_BYTES)}
    switched = core.stream_opened(opened.stream_id, 10.3)
    assert core.state is SessionState.OPEN
    assert core.current_stream == opened.stream_id
    (closed,) = of(switched, CloseStream)
    assert closed.stream_id == old
    assert names(closed.events) == ["contentEnd", "promptEnd", "sessionEnd"]
    assert sent_audio(switched, opened.stream_id) == words
    assert core.stats.rotations == 1
    assert emitted(switched) == []  # invisible to the device


@pytest.mark.parametrize("busy", ["turn", "reply", "tool"])
def test_no_soft_rotation_while_someone_is_talking_or_a_tool_runs(busy: str) -> None:
    core = make()
    sid = open_stream(core, 0.0)
    core.end_turn(0.0)
    if busy == "turn":
        core.start_turn(9.0)
        for i in range(100):
            core.audio_in(SPEECH, 9.0 + 0.02 * i)
    elif busy == "reply":
        feed(core, sid, 9.0, *reply("x", end=False))
    else:
        feed(core, sid, 9.0, nova.ToolUseRequested("t", "u", "x", "{}"))
    assert of(core.tick(12.0), OpenStream) == []
    assert core.state is SessionState.OPEN


def test_hard_rotation_during_a_long_turn_replays_the_turn_so_far() -> None:
    core = make(replay_buffer_s=2.0)
    open_stream(core, 0.0)
    core.start_turn(19.0)
    frames = [SPEECH[:-2] + bytes([i % 250, 2]) for i in range(50)]
    for i, frame in enumerate(frames):
        core.audio_in(frame, 19.0 + 0.02 * i)
    (opened,) = of(core.tick(20.0), OpenStream)
    switched = core.stream_opened(opened.stream_id, 20.4)
    assert sent_audio(switched, opened.stream_id) == frames


def test_a_failed_rotation_keeps_the_old_stream_and_retries_later() -> None:
    core = make()
    old = open_stream(core, 0.0)
    core.end_turn(0.0)
    (opened,) = of(core.tick(10.0), OpenStream)
    failed = core.stream_failed(opened.stream_id, Fault("ThrottlingException", "", 429), 10.5)
    assert of(failed, AbortStream) == [AbortStream(opened.stream_id)]
    assert emitted(failed) == []
    assert core.state is SessionState.OPEN and core.current_stream == old
    assert of(core.tick(10.6), OpenStream) == []
    later = [a for t in range(11, 40) for a in core.tick(float(t))]
    assert len(of(later, OpenStream)) == 1


# --- idle close ----------------------------------------------------------------------------


def test_idle_stream_is_closed_and_the_next_turn_reopens_with_history() -> None:
    core = make(idle_close_s=30.0, rotate_after_s=100.0, rotate_hard_s=200.0)
    sid = open_stream(core, 0.0)
    converse(core, sid, 1.0, "one")
    assert of(core.tick(31.0), CloseStream) == []
    (closed,) = of(core.tick(31.6), CloseStream)
    assert closed.stream_id == sid and core.state is SessionState.CLOSING
    assert core.tick(40.0) == []  # no silence for a closed stream
    core.stream_ended(sid, 31.7)
    assert core.state is SessionState.CLOSED and core.stats.idle_closes == 1
    (reopened,) = of(core.start_turn(50.0), OpenStream)
    texts = [
        e["event"]["textInput"]["content"] for e in reopened.events if "textInput" in e["event"]
    ]
    assert texts[1:] == ["question one", "answer one"]


# --- failures --------------------------------------------------------------------------------


def test_access_denied_tells_the_device_and_does_not_retry() -> None:
    core = make()
    (opened,) = of(core.start_turn(0.0), OpenStream)
    core.audio_in(SPEECH, 0.0)
    out = core.stream_failed(opened.stream_id, Fault("AccessDeniedException", "no", 403), 0.1)
    (failed,) = emitted(out)
    assert isinstance(failed, UpstreamFailed)
    assert failed.code == "nova_access_denied" and failed.retryable is False
    assert "bedrock:InvokeModelWithBidirectionalStream" in failed.message
    assert core.state is SessionState.CLOSED
    assert of(core.tick(5.0), OpenStream) == []
    # The rest of the failed turn's audio must not become another attempt each frame.
    assert core.audio_in(SPEECH, 0.2) == []
    assert core.stats.frames_without_stream == 1


def test_throttling_backs_off_then_gives_up_retryable() -> None:
    core = make(max_attempts=3)
    now = 0.0
    (opened,) = of(core.start_turn(now), OpenStream)
    sid = opened.stream_id
    delays = []
    for _ in range(3):
        out = core.stream_failed(sid, Fault("ThrottlingException", "slow down", 429), now)
        assert emitted(out) == [] and core.state is SessionState.BACKOFF
        retry_at = core.next_deadline(now)
        assert retry_at is not None and retry_at > now
        delays.append(retry_at - now)
        assert of(core.tick(retry_at - 0.001), OpenStream) == []
        now = retry_at
        (opened,) = of(core.tick(now), OpenStream)
        sid = opened.stream_id
    out = core.stream_failed(sid, Fault("ThrottlingException", "slow down", 429), now)
    (failed,) = emitted(out)
    assert isinstance(failed, UpstreamFailed)
    assert failed.code == "nova_throttled" and failed.retryable is True
    assert core.state is SessionState.CLOSED


def test_model_timeout_mid_turn_resumes_at_once_and_replays_the_speech() -> None:
    core = make(replay_buffer_s=1.0)
    sid = open_stream(core, 0.0)
    core.start_turn(1.0)
    frames = [SPEECH[:-2] + bytes([i, 3]) for i in range(30)]
    for i, frame in enumerate(frames):
        core.audio_in(frame, 1.0 + 0.02 * i)
    core.end_turn(1.6)
    out = core.stream_failed(sid, Fault("ModelTimeoutException", "timed out"), 1.8)
    assert of(out, AbortStream) == [AbortStream(sid)]
    (reopened,) = of(out, OpenStream)
    assert emitted(out) == []  # transparent to the device
    replay = core.stream_opened(reopened.stream_id, 2.0)
    assert sent_audio(replay, reopened.stream_id) == frames
    assert core.stats.resumes == 1


def test_system_instability_is_resumed_but_unknown_validation_is_fatal() -> None:
    core = make()
    sid = open_stream(core, 0.0)
    out = core.stream_failed(sid, Fault("ValidationException", "System instability detected"), 0.5)
    assert len(of(out, OpenStream)) == 1
    core2 = make()
    (opened,) = of(core2.start_turn(0.0), OpenStream)
    out2 = core2.stream_failed(
        opened.stream_id,
        Fault("ValidationException", "The provided model identifier is invalid.", 400),
        0.1,
    )
    (failed,) = emitted(out2)
    assert isinstance(failed, UpstreamFailed) and failed.code == "nova_unknown_model"


def ask(core: SessionCore, now: float, frames: int = 10, tag: int = 0) -> list[bytes]:
    """The user says ``frames`` distinct frames from ``now`` on and ends the turn."""
    said = [SPEECH[:-2] + bytes([tag, i]) for i in range(frames)]
    core.start_turn(now)
    for i, frame in enumerate(said):
        core.audio_in(frame, now + 0.02 * i)
    core.end_turn(now + 0.02 * frames)
    return said


def test_a_reply_cut_by_a_lost_stream_is_replayed_once_into_a_fresh_stream() -> None:
    core = make()
    sid = open_stream(core, 0.0)
    core.audio_in(SPEECH, 0.0)
    core.end_turn(0.1)
    said = ask(core, 0.5, tag=9)
    started = feed(core, sid, 1.0, *reply("x", end=False))
    assert ResponseStarted() in emitted(started)
    out = core.stream_ended(sid, 1.2)  # no completionEnd: the connection was lost
    assert AbortStream(sid) in out and emitted(out) == []  # the device's reply goes on
    (reopened,) = of(out, OpenStream)
    # the history carries the conversation, but not the question that is replayed
    texts = [
        e["event"]["textInput"]["content"] for e in reopened.events if "textInput" in e["event"]
    ]
    assert "question x" not in texts
    flushed = core.stream_opened(reopened.stream_id, 1.3)
    assert sent_audio(flushed, reopened.stream_id) == said
    answer = emitted(feed(core, reopened.stream_id, 1.8, *reply("y")))
    assert ResponseStarted() not in answer  # the same reply, started over
    assert ResponseEnded("end_turn") in answer
    assert core.stats.replays == 1 and core.stats.failures == 1


def replayed_after_a_cut(core: SessionCore) -> int:
    """A reply cut mid-way at 1.2 s; its question replayed into a stream open at 1.3 s."""
    sid = open_stream(core, 0.0)
    ask(core, 0.0)
    feed(core, sid, 1.0, *reply("x", end=False))
    (reopened,) = of(core.stream_ended(sid, 1.2), OpenStream)
    core.stream_opened(reopened.stream_id, 1.3)
    stream_id: int = reopened.stream_id
    return stream_id


def test_a_replayed_question_gets_novas_end_of_turn_pause_not_the_mid_reply_stall() -> None:
    # Nova hears the replayed question and then waits its end-of-turn pause (1.5-2 s)
    # before it answers: a stall timeout shorter than that must not tear the fresh
    # stream down; the first-output deadline (pause + margin) applies until it speaks.
    core = make(stall_timeout_s=1.0, reply_margin_s=1.0, endpointing_sensitivity="HIGH")
    reopened = replayed_after_a_cut(core)
    assert of(core.tick(3.7), AbortStream) == []  # 2.4 s of quiet: Nova still pausing
    answer = emitted(feed(core, reopened, 3.75, *reply("y")))
    assert ResponseEnded("end_turn") in answer and core.stats.stalls == 0


def test_a_replayed_question_nova_never_answers_is_a_stall_after_the_pause() -> None:
    core = make(stall_timeout_s=1.0, reply_margin_s=1.0, endpointing_sensitivity="HIGH")
    reopened = replayed_after_a_cut(core)
    assert of(core.tick(3.7), AbortStream) == []
    out = core.tick(3.9)  # 2.5 s (pause 1.5 + margin 1.0) after the replay began
    assert AbortStream(reopened) in out and core.stats.stalls == 1


def test_a_replayed_question_that_fails_again_ends_the_reply_with_an_error() -> None:
    core = make()
    sid = open_stream(core, 0.0)
    ask(core, 0.0)
    feed(core, sid, 1.0, *reply("x", end=False))
    (reopened,) = of(core.stream_ended(sid, 1.2), OpenStream)
    core.stream_opened(reopened.stream_id, 1.3)
    out = core.stream_failed(reopened.stream_id, Fault("ModelStreamErrorException", "boom"), 1.5)
    events = emitted(out)
    assert events[0] == ResponseEnded("error")
    assert isinstance(events[1], UpstreamFailed)
    assert (events[1].code, events[1].retryable) == ("nova_stream_lost", True)
    assert of(out, OpenStream) == [] and core.state is SessionState.CLOSED
    assert len(of(core.start_turn(3.0), OpenStream)) == 1  # the next turn tries again


def test_a_stalled_reply_is_torn_down_and_replaced() -> None:
    core = make(stall_timeout_s=5.0)
    sid = open_stream(core, 0.0)
    ask(core, 0.0)
    feed(core, sid, 1.0, *reply("x", end=False))
    assert of(core.tick(5.9), AbortStream) == []
    out = core.tick(6.1)
    assert AbortStream(sid) in out and len(of(out, OpenStream)) == 1
    assert emitted(out) == []
    assert core.stats.stalls == 1


def test_a_stream_that_never_answers_is_replaced_then_the_device_is_told() -> None:
    core = make(reply_margin_s=1.0, endpointing_sensitivity="HIGH")  # due 2.5 s after the turn
    sid = open_stream(core, 0.0)
    ask(core, 0.0)  # ends at 0.2
    assert of(core.tick(2.6), AbortStream) == []
    out = core.tick(2.75)
    assert AbortStream(sid) in out and emitted(out) == []
    (second,) = of(out, OpenStream)
    core.stream_opened(second.stream_id, 2.8)
    assert of(core.tick(5.2), AbortStream) == []
    out = core.tick(5.35)  # the replacement is silent too
    (failed,) = emitted(out)
    assert isinstance(failed, UpstreamFailed) and failed.code == "nova_stalled"
    assert AbortStream(second.stream_id) in out


def test_a_stream_that_hears_the_user_but_chooses_not_to_answer_is_kept() -> None:
    core = make(reply_margin_s=1.0)
    sid = open_stream(core, 0.0)
    ask(core, 0.0)
    heard = reply("x")[:4]  # the user's transcript, then nothing
    feed(core, sid, 1.0, *heard)
    quiet = [a for t in range(30, 80) for a in core.tick(t / 10)]
    assert of(quiet, AbortStream) == [] and emitted(quiet) == []


def test_an_unacknowledged_tool_result_is_a_stall() -> None:
    core = make(tool_ack_timeout_s=2.0)
    sid = open_stream(core, 0.0)
    ask(core, 0.0)
    use = nova.ToolUseRequested("t1", "tu1", "current_time", "{}")
    (run,) = of(feed(core, sid, 0.5, nova.ContentStarted("t1", "TOOL", "TOOL", None), use), RunTool)
    sent = core.tool_finished(sid, "tu1", "current_time", True, '{"time": "noon"}', 3.0, 0.6)
    (result,) = [e for e in sent_events(sent, sid) if "toolResult" in e["event"]]
    assert isinstance(result["event"]["toolResult"]["content"], str)  # a JSON string
    assert of(core.tick(2.5), AbortStream) == []
    out = core.tick(2.7)
    assert AbortStream(sid) in out and len(of(out, OpenStream)) == 1
    del run


def test_a_tool_that_finishes_before_its_block_closes_still_waits_for_an_ack() -> None:
    # A fast tool answers before Nova's contentEnd for the toolUse block arrives.
    # That contentEnd closes the request; it does not acknowledge the result.
    core = make(tool_ack_timeout_s=2.0)
    sid = open_stream(core, 0.0)
    ask(core, 0.0)
    use = nova.ToolUseRequested("t1", "tu1", "current_time", "{}")
    feed(core, sid, 0.5, nova.ContentStarted("t1", "TOOL", "TOOL", None), use)
    core.tool_finished(sid, "tu1", "current_time", True, '{"time": "noon"}', 0.1, 0.5)
    feed(core, sid, 0.51, nova.ContentEnded("t1", "TOOL", nova.STOP_TOOL_USE))
    assert of(core.tick(2.4), AbortStream) == []
    out = core.tick(2.6)
    assert AbortStream(sid) in out and len(of(out, OpenStream)) == 1
    assert core.stats.stalls == 1


def test_nova_speaking_after_a_tool_result_acknowledges_it() -> None:
    core = make(tool_ack_timeout_s=2.0, stall_timeout_s=30.0)
    sid = open_stream(core, 0.0)
    ask(core, 0.0)
    use = nova.ToolUseRequested("t1", "tu1", "current_time", "{}")
    feed(core, sid, 0.5, nova.ContentStarted("t1", "TOOL", "TOOL", None), use)
    feed(core, sid, 0.51, nova.ContentEnded("t1", "TOOL", nova.STOP_TOOL_USE))
    core.tool_finished(sid, "tu1", "current_time", True, '{"time": "noon"}', 0.1, 0.6)
    feed(core, sid, 1.0, nova.ContentStarted("a1", "AUDIO", "ASSISTANT", None))
    assert of([a for t in range(11, 60) for a in core.tick(t / 10)], AbortStream) == []
    assert core.stats.stalls == 0


def test_open_failures_reach_the_device_within_open_timeout_of_the_first() -> None:
    core = make(open_timeout_s=2.0, max_attempts=10)
    (opened,) = of(core.start_turn(0.0), OpenStream)
    core.audio_in(SPEECH, 0.0)
    core.end_turn(0.1)
    now, sid, told = 0.3, opened.stream_id, []
    first_failure = now
    while not told and now < 10:
        out = core.stream_failed(sid, Fault("ThrottlingException", "slow", 429), now)
        told += emitted(out)
        while not told:
            deadline = core.next_deadline(now)
            assert deadline is not None
            now = deadline
            out = core.tick(now)
            told += emitted(out)
            if of(out, OpenStream):
                sid = of(out, OpenStream)[0].stream_id
                now += 0.05
                break
    assert isinstance(told[0], UpstreamFailed) and told[0].code == "nova_throttled"
    assert now - first_failure <= 2.0 + 1e-6
    assert core.state is SessionState.BACKOFF or core.state is SessionState.OPENING


def test_silence_is_sent_only_until_nova_takes_its_turn() -> None:
    core = make(endpointing_sensitivity="MEDIUM")  # Nova waits 1.75 s of silence
    sid = open_stream(core, 0.0)
    ask(core, 0.0, frames=50)  # one second of speech
    quiet = [a for i in range(1, 400) for a in core.tick(1.0 + 0.02 * i)]
    silence = len(sent_audio(quiet, sid))
    assert 1.75 / 0.02 <= silence <= (1.75 + 0.6) / 0.02
    # once Nova answers, no more silence at all
    core2 = make()
    sid2 = open_stream(core2, 0.0)
    ask(core2, 0.0, frames=50)
    feed(core2, sid2, 1.5, *reply("x"))
    after = [a for i in range(1, 200) for a in core2.tick(1.5 + 0.02 * i)]
    assert sent_audio(after, sid2) == []
    assert core2.stats.upstream_audio_s < 1.5 + 0.1


def test_a_stream_is_replaced_before_its_temporary_credentials_expire() -> None:
    core = make(rotate_after_s=300.0, rotate_hard_s=400.0, idle_close_s=1000.0)
    (opened,) = of(core.start_turn(0.0), OpenStream)
    core.stream_opened(opened.stream_id, 0.0, credentials_expire_in_s=200.0)
    core.end_turn(0.0)
    assert of(core.tick(50.0), OpenStream) == []
    (rotated,) = of(core.tick(81.0), OpenStream)  # 120 s before they expire, at a pause
    assert core.state is SessionState.ROTATING
    del rotated


def test_every_response_end_reason_is_in_the_protocol_vocabulary() -> None:
    from edgevoice.nova.session import RESPONSE_END_REASONS

    assert {"end_turn", "interrupted", "error"} == RESPONSE_END_REASONS


def test_a_cleanly_ended_idle_stream_is_reopened_lazily() -> None:
    core = make()
    sid = open_stream(core, 0.0)
    converse(core, sid, 0.0, "one")
    core.tick(5.0)  # the reply is old news
    out = core.stream_ended(sid, 6.0)
    assert emitted(out) == [] and of(out, OpenStream) == []
    assert core.state is SessionState.CLOSED
    assert len(of(core.start_turn(7.0), OpenStream)) == 1


def test_usage_is_totalled_across_streams() -> None:
    core = make()
    old = open_stream(core, 0.0)
    core.end_turn(0.0)
    first = emitted(usage=True, actions=feed(core, old, 1.0, nova.UsageUpdated(100, 40)))
    assert first == [UsageReported(100, 40)]
    (opened,) = of(core.tick(10.0), OpenStream)
    core.stream_opened(opened.stream_id, 10.2)
    late = emitted(
        usage=True, actions=feed(core, old, 10.3, nova.UsageUpdated(110, 45))
    )  # the old one drains
    assert late == [UsageReported(110, 45)]
    core.stream_ended(old, 10.4)
    new = emitted(usage=True, actions=feed(core, opened.stream_id, 11.0, nova.UsageUpdated(20, 5)))
    assert new == [UsageReported(130, 50)]
    assert (
        emitted(usage=True, actions=feed(core, opened.stream_id, 11.1, nova.UsageUpdated(20, 5)))
        == []
    )


def test_malformed_and_unknown_events_are_counted_and_ignored() -> None:
    core = make()
    sid = open_stream(core, 0.0)
    out = feed(
        core,
        sid,
        1.0,
        nova.MalformedEventReceived("not JSON"),
        nova.UnknownEventReceived("futureThing"),
        nova.AudioReceived("nobody", b"\x00\x00"),
    )
    assert emitted(out) == []
    assert core.stats.malformed_events == 1 and core.stats.unknown_events == 1
    assert core.state is SessionState.OPEN


def test_close_ends_every_stream_politely_and_is_final() -> None:
    core = make()
    sid = open_stream(core, 0.0)
    (closed,) = of(core.close(1.0), CloseStream)
    assert closed.stream_id == sid
    assert core.state is SessionState.STOPPED
    assert core.close(2.0) == []
    assert core.start_turn(3.0) == [] and core.audio_in(SPEECH, 3.0) == []


def test_the_transition_table_refuses_illegal_moves() -> None:
    core = make()
    with pytest.raises(IllegalTransition):
        core._transition(SessionState.OPEN)  # CLOSED -> OPEN skips OPENING
    core.close(0.0)
    with pytest.raises(IllegalTransition):
        core._transition(SessionState.OPENING)


def test_a_scripted_day_sends_at_most_two_and_a_half_times_the_users_speech() -> None:
    """Five turns in two minutes, against a scripted Nova 2 (answers after 1.75 s of
    silence, speaks for 2 s): what goes upstream is the speech, the device's hangover
    and the silence Nova waits for, never the pauses between turns."""
    core = make(
        endpointing_sensitivity="MEDIUM",
        idle_close_s=10.0,
        rotate_after_s=360.0,
        rotate_hard_s=450.0,
        response_wait_s=10.0,
    )
    quiet = bytes(FRAME_BYTES)
    speech_frames, sid, now = 0, None, 0.0
    for turn in range(5):
        now = turn * 24.0
        opened = of(core.start_turn(now), OpenStream)
        if opened:
            sid = opened[0].stream_id
            core.stream_opened(sid, now + 0.1)
        assert sid is not None
        sent: list[bytes] = []
        for _ in range(95):  # 1.9 s of speech
            sent += sent_audio(core.audio_in(SPEECH, now) + core.tick(now), sid)
            speech_frames += 1
            now += 0.02
        for _ in range(15):  # the device's 0.3 s hangover
            sent += sent_audio(core.audio_in(quiet, now) + core.tick(now), sid)
            now += 0.02
        core.end_turn(now)
        silent = 0
        while silent < 88:  # Nova answers after 1.75 s of silence after the speech
            out = core.tick(now)
            silent += len(sent_audio(out, sid))
            now += 0.02
        feed(core, sid, now + 0.3, *reply(str(turn), chunks=20))
        while now < (turn + 1) * 24.0 - 0.1:  # the pause until the next turn
            for action in core.tick(now):
                if isinstance(action, CloseStream):
                    core.stream_ended(action.stream_id, now + 0.1)
            now += 0.1
    ratio = core.stats.upstream_audio_s / (speech_frames * 0.02)
    assert 1.9 <= ratio <= 2.5, ratio
    assert core.stats.streams_opened == 5  # closed after each reply, reopened for the next


def test_audio_held_for_a_stream_that_failed_to_open_reaches_the_next_one_once() -> None:
    core = make()
    (first,) = of(core.start_turn(0.0), OpenStream)
    said = [SPEECH[:-2] + bytes([7, i]) for i in range(5)]
    for i, frame in enumerate(said):
        core.audio_in(frame, 0.02 * i)
    out = core.stream_failed(first.stream_id, Fault("ThrottlingException", "slow", 429), 0.2)
    assert core.state is SessionState.BACKOFF and emitted(out) == []
    retry_at = core.next_deadline(0.2)
    assert retry_at is not None
    (second,) = of(core.tick(retry_at), OpenStream)
    flushed = core.stream_opened(second.stream_id, retry_at + 0.1)
    assert sent_audio(flushed, second.stream_id) == said  # each frame once, in order
