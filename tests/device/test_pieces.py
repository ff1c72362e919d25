"""The daemon's pieces, each through its seams: no sockets, no sound card, no event loop
unless the piece owns one (capture). A recording link stands in for DeviceLink, a
FakeClock for time; Opus, the resampler and the playback buffer are the real ones."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

import pytest
from device_support import RecordingLink, RecordingObserver, silence, tone

from edgevoice.audio.base import SourceStats
from edgevoice.audio.opus import OpusEncoder
from edgevoice.audio.playback import PlaybackBuffer, PlaybackEnded, PlaybackStarted
from edgevoice.audio.silence import SilenceDetector, SilenceSettings
from edgevoice.clock import FakeClock
from edgevoice.device.capture import CaptureLoop
from edgevoice.device.downlink import Downlink, DownlinkMode, ResponseEnd
from edgevoice.device.observer import Observers
from edgevoice.device.records import DeviceCounters, TurnOutcome, TurnRecorder, TurnTimeline
from edgevoice.device.status import (
    AUDIO_NOT_OPENED,
    ERROR_STATE_S,
    SHOWN_STATE,
    EarconPlayer,
    StatePresenter,
    StatusBoard,
)
from edgevoice.device.turn import TurnMachine, TurnSettings, TurnState
from edgevoice.device.turntaking import SPEAKER_LEAD_MS, TurnTaking
from edgevoice.device.uplink import Uplink
from edgevoice.errors import AudioDeviceError
from edgevoice.feedback.earcons import Earcons
from edgevoice.feedback.states import DeviceState
from edgevoice.protocol.connection import AudioReceived
from edgevoice.protocol.messages import (
    AudioFlags,
    AudioFrame,
    AudioKind,
    Error,
    Interrupt,
    ResponseStart,
    Transcript,
    TurnEnd,
    TurnStart,
)
from edgevoice.protocol.messages import (
    ResponseEnd as ResponseEndMessage,
)
from edgevoice.triggers.base import TurnEndRequested

OUT_RATE = 48_000


def reply_packet(k: int = 0) -> bytes:
    """One real 24 kHz Opus packet of tone."""
    enc = OpusEncoder(24_000)
    pcm = b"".join(tone(-12, 440, k * 3 + i) for i in range(3))[: 480 * 2]
    return enc.encode(pcm)


def received(seq: int, missing: int = 0) -> AudioReceived:
    frame = AudioFrame(AudioKind.DOWNLINK, seq, seq * 20, reply_packet(seq))
    return AudioReceived(frame, missing)


class Speaker:
    """An AudioSink that is never opened: counts prepare() calls."""

    name = "speaker"
    sample_rate_hz = OUT_RATE

    def __init__(self) -> None:
        self.prepared = 0

    async def open(self, buffer: PlaybackBuffer) -> None:
        raise AssertionError("not opened in these tests")

    def prepare(self) -> None:
        self.prepared += 1

    async def close(self) -> None:
        pass


@dataclass
class Rig:
    """The device's pieces wired as the daemon wires them, around a recording link."""

    clock: FakeClock = field(default_factory=lambda: FakeClock(100.0))
    link: RecordingLink = field(default_factory=RecordingLink)
    observer: RecordingObserver = field(default_factory=RecordingObserver)
    settings: TurnSettings = field(default_factory=lambda: TurnSettings(start="button"))
    earcons_on: bool = False
    displays: list[DeviceState] = field(default_factory=list)
    audio_triggers: list[object] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.counters = DeviceCounters()
        self.observers = Observers([self.observer])
        self.records = TurnRecorder(self.counters, on_closed=self.observers.turn_closed)
        self.status = StatusBoard()
        self.uplink = Uplink(OpusEncoder(16_000), self.link, self.clock, self.counters,
                             self.records, self.observers)
        self.speaker = Speaker()
        self.downlink = Downlink(self.speaker, prefill_ms=60, max_ms=10_000, clock=self.clock,
                                 counters=self.counters, observer=self.observers,
                                 on_reply_event=lambda e, now: self.turns.on_reply_playback(e, now))
        shown = self.displays

        class Display:
            def set_state(self, state: DeviceState) -> None:
                shown.append(state)

        self.presenter = StatePresenter(self.clock, self.link, [Display()])
        earcons = Earcons(OUT_RATE, 0.5) if self.earcons_on else None
        self.earcons = EarconPlayer(earcons, self.downlink, self.presenter, self.clock)
        self.machine = TurnMachine(self.settings)
        self.turns = TurnTaking(
            self.machine, SilenceDetector(SilenceSettings()), self.clock, link=self.link,
            uplink=self.uplink, downlink=self.downlink, records=self.records,
            earcons=self.earcons, presenter=self.presenter, status=self.status,
            counters=self.counters, observer=self.observers,
            audio_triggers=self.audio_triggers)  # type: ignore[arg-type]
        self.turns.link_changed(True, self.clock.now())


# ------------------------------------------------------------------ records


def test_a_new_turn_supersedes_an_open_one_and_closing_twice_changes_nothing() -> None:
    counters = DeviceCounters()
    closed: list[TurnTimeline] = []
    records = TurnRecorder(counters, on_closed=closed.append)
    first = records.begin(1, "button", 1.0)
    records.begin(2, "vad", 2.0)
    assert first.outcome is TurnOutcome.SUPERSEDED and first.outcome == "superseded"
    assert records.current is not None and records.current.speech_start == 2.0  # vad
    records.playback_ended(flushed=False, now=3.0)
    records.close(TurnOutcome.LINK_LOST)  # after the fact: history is not rewritten
    assert [t.outcome for t in closed] == [TurnOutcome.SUPERSEDED, TurnOutcome.COMPLETED]
    assert counters.turns == 2 and len(records.turns) == 2
    with pytest.raises(ValueError):
        records.close(TurnOutcome.OPEN)


@pytest.mark.parametrize(("reason", "outcome"), [("no_speech", TurnOutcome.NO_SPEECH),
                                                  ("cancelled", TurnOutcome.CANCELLED),
                                                  ("speech_ended", TurnOutcome.OPEN),
                                                  ("answered", TurnOutcome.OPEN)])
def test_only_some_turn_ends_close_the_record(reason: str, outcome: TurnOutcome) -> None:
    records = TurnRecorder(DeviceCounters())
    turn = records.begin(1, "button", 1.0)
    records.finished(reason, 1.5)
    assert turn.turn_end == 1.5 and turn.outcome is outcome


def test_kept_turns_are_bounded() -> None:
    records = TurnRecorder(DeviceCounters())
    for k in range(50):
        records.begin(k, "api", float(k))
        records.close(TurnOutcome.NO_REPLY)
    assert len(records.turns) == 20 and records.turns[0].turn_id == 30


# ------------------------------------------------------------------- uplink


def test_uplink_announces_the_turn_then_sends_preroll_with_start_flag_and_timestamps() -> None:
    rig = Rig()
    rig.records.begin(7, "button", 100.0)
    rig.uplink.begin(7, "button", (silence(), silence()), 100.0)
    rig.uplink.send(tone(), 100.02)
    assert rig.link.messages == [TurnStart(7, "button")]
    assert [(ts, flags) for _p, ts, flags in rig.link.audio] == [
        (0, AudioFlags.START), (20, AudioFlags.NONE), (40, AudioFlags.NONE)]
    assert all(0 < len(p) < 200 for p, _ts, _f in rig.link.audio)  # real Opus packets
    assert rig.counters.frames_sent == 3
    assert rig.observer.events[0][:3] == ("turn_begun", 7, "button")
    assert [e for e in rig.observer.events if e[0] == "uplink_frame"] == [
        ("uplink_frame", True, True), ("uplink_frame", True, True),
        ("uplink_frame", True, False)]
    assert rig.records.current is not None and rig.records.current.uplink_frames == 3


def test_uplink_counts_only_what_the_link_took() -> None:
    rig = Rig()
    rig.link.connected = False
    rig.uplink.begin(1, "api", (), 1.0)
    rig.uplink.send(tone(), 1.0)
    assert rig.counters.frames_sent == 0 and rig.link.audio == []
    assert ("uplink_frame", False, False) in rig.observer.events


# ----------------------------------------------------------------- downlink


def test_reply_audio_is_decoded_straight_to_an_opus_output_rate_with_nothing_held() -> None:
    # 48 kHz is one of Opus's own rates: libopus decodes the 24 kHz stream to it, so
    # every frame is in the buffer whole the moment it arrives (a resampler holds
    # some back, which kept 1-2 % of reply frames waiting a frame for the next one).
    rig = Rig()
    assert OUT_RATE == 48_000 and rig.downlink.resampler.passthrough
    rig.downlink.response_start()
    for seq in range(5):
        assert rig.downlink.audio(received(seq))
        pushes = [e[1] for e in rig.observer.events if e[0] == "playback_pushed"]
        assert pushes == [960] * (seq + 1)
    assert rig.counters.frames_received == 5
    assert rig.downlink.playback.buffered_samples == 5 * 960
    assert rig.downlink.reply_playing


def test_reply_audio_is_resampled_to_an_output_rate_opus_does_not_have() -> None:
    rig = Rig()
    speaker = Speaker()
    speaker.sample_rate_hz = 44_100
    downlink = Downlink(speaker, prefill_ms=60, max_ms=10_000, clock=rig.clock,
                        counters=rig.counters, observer=rig.observers,
                        on_reply_event=lambda e, now: None)
    assert not downlink.resampler.passthrough
    downlink.response_start()
    for seq in range(10):
        downlink.audio(received(seq))
    # 200 ms at 44.1 kHz, give or take what the resampler still holds
    assert 0.8 * 10 * 882 < downlink.playback.buffered_samples <= 10 * 882


def test_a_gap_is_concealed_but_not_a_long_one() -> None:
    rig = Rig()
    rig.downlink.response_start()
    rig.downlink.audio(received(0))
    rig.downlink.audio(received(3, missing=2))
    assert rig.counters.frames_concealed == 2
    rig.downlink.audio(received(40, missing=36))
    assert rig.counters.frames_concealed == 2 + 5  # capped: invented audio only confuses


def test_after_a_local_stop_the_rest_of_that_reply_is_dropped_until_the_next() -> None:
    rig = Rig()
    rig.downlink.response_start()
    rig.downlink.audio(received(0))
    rig.downlink.stop("button")
    assert rig.downlink.mode is DownlinkMode.DISCARDING
    assert rig.downlink.playback.buffered_samples == 0 and not rig.downlink.reply_playing
    assert "playback_flushed" in rig.observer.names() and rig.counters.interrupts == 1
    assert not rig.downlink.audio(received(1)) and rig.counters.frames_received == 1
    assert rig.downlink.response_end("done") is ResponseEnd.IGNORED
    rig.downlink.response_start()
    assert rig.downlink.audio(received(0))


def test_response_end_tells_an_empty_reply_from_one_draining() -> None:
    rig = Rig()
    rig.downlink.response_start()
    assert rig.downlink.response_end("done") is ResponseEnd.EMPTY
    assert not rig.downlink.reply_playing
    rig.downlink.response_start()
    rig.downlink.audio(received(0))
    assert rig.downlink.response_end("done") is ResponseEnd.DRAINING
    rig.downlink.response_start()
    assert rig.downlink.response_end("interrupted") is ResponseEnd.IGNORED


def test_earcons_are_mixed_in_never_over_a_reply_and_every_event_is_the_replys() -> None:
    rig = Rig(earcons_on=True)
    seen: list[object] = []
    rig.downlink.on_reply_event = lambda e, now: seen.append(e)
    assert rig.downlink.play_earcon(b"\x01\x00" * 480)
    assert rig.downlink.playback.cue_playing and rig.downlink.playback.buffered_samples == 0
    rig.downlink.response_start()
    assert not rig.downlink.play_earcon(b"\x01\x00" * 480)
    rig.downlink.on_playback_event(PlaybackStarted(2.0))
    rig.downlink.on_playback_event(PlaybackEnded(2.5, flushed=False))
    assert seen == [PlaybackStarted(2.0), PlaybackEnded(2.5, flushed=False)]
    assert not rig.downlink.reply_playing
    assert rig.downlink.play_earcon(b"\x01\x00" * 480)


# ------------------------------------------------------------------- status


def test_ready_needs_open_audio_and_a_first_link_attempt_and_happens_once() -> None:
    ready: list[str] = []
    board = StatusBoard(on_ready=ready.append)
    assert board.audio_problem == AUDIO_NOT_OPENED
    board.link_tried()
    assert not board.ready
    board.audio_failed("microphone unavailable: gone")
    board.audio_opened()
    board.set("idle")
    board.audio_failed("microphone unavailable: gone again")
    board.link_tried()
    assert board.ready and ready == ["starting"]


def test_every_turn_state_is_shown_and_described() -> None:
    rig = Rig()
    for state in TurnState:
        assert state in SHOWN_STATE
        assert rig.turns.state_text(state)


def test_shown_state_is_offline_without_link_error_for_a_while_and_told_once() -> None:
    rig = Rig()
    rig.presenter.show(TurnState.IDLE)
    rig.presenter.show(TurnState.IDLE)
    assert rig.displays == [DeviceState.IDLE]
    rig.link.connected = False
    rig.presenter.show(TurnState.IDLE)
    rig.link.suspended = True  # a resumable drop is not "offline"
    rig.presenter.show(TurnState.IDLE)
    rig.presenter.flag_error(rig.clock.now())
    rig.presenter.show(TurnState.IDLE)
    rig.clock.advance(ERROR_STATE_S + 0.1)
    rig.presenter.show(TurnState.IDLE)
    assert rig.displays == [DeviceState.IDLE, DeviceState.OFFLINE, DeviceState.IDLE,
                            DeviceState.ERROR, DeviceState.IDLE]


def test_an_error_during_a_reply_shows_at_once_and_sounds_once_the_reply_was_heard() -> None:
    rig = Rig(earcons_on=True)
    rig.downlink.response_start()
    rig.earcons.play("error")
    rig.presenter.show(TurnState.IDLE)
    assert rig.presenter.state is DeviceState.ERROR  # the LED says so at once
    assert not rig.downlink.playback.cue_playing  # but the reply is not talked over
    rig.downlink.on_playback_event(PlaybackEnded(1.0, flushed=False))
    assert rig.downlink.playback.cue_playing  # now it sounds


def test_a_stopped_reply_drops_the_error_earcon_that_waited_for_it() -> None:
    rig = Rig(earcons_on=True)
    rig.turns.request_turn("api")
    rig.downlink.playback.pull(OUT_RATE)  # the "listening" cue is heard
    assert not rig.downlink.playback.cue_playing
    rig.turns.on_message(ResponseStart(1))
    rig.downlink.audio(received(0))
    rig.earcons.play("error")
    assert rig.earcons.after_reply == "error"
    rig.turns.request_interrupt("button")
    rig.downlink.on_playback_event(PlaybackEnded(1.0, flushed=True))
    assert rig.earcons.after_reply is None and not rig.downlink.playback.cue_playing


# -------------------------------------------------------------- turn taking


def test_a_button_turn_streams_and_an_empty_reply_closes_it_as_no_reply() -> None:
    rig = Rig()
    assert rig.turns.request_turn("button")
    assert rig.link.messages == [TurnStart(1, "button")]
    assert rig.status.text == "streaming turn 1"
    assert rig.speaker.prepared == 1  # a parked speaker reopens as the turn begins
    for _ in range(10):
        rig.turns.on_frame(silence())  # the room: nothing is streamed
    assert rig.link.audio == []
    for k in range(25):
        rig.turns.on_frame(tone(-20, 440, k))  # speech: streamed, with its pre-roll
    assert 25 <= len(rig.link.audio) <= 35 and rig.counters.frames_captured == 35
    assert rig.link.audio[0][2] is AudioFlags.START
    rig.turns.on_message(ResponseStart(1))
    assert rig.link.of(TurnEnd) == [TurnEnd(1, "answered")]
    assert rig.machine.state is TurnState.SPEAKING
    rig.turns.on_message(Transcript("assistant", "hello", final=True))
    rig.turns.on_message(ResponseEndMessage(1, "done"))
    turn = rig.observer.closed[-1]
    assert turn.outcome is TurnOutcome.NO_REPLY and turn.transcripts == [("assistant", "hello")]
    assert rig.machine.state is TurnState.IDLE


def _voice_rig() -> Rig:
    """An always-on device past the detector's warm-up, idle in a quiet room."""
    rig = Rig(settings=TurnSettings(start="voice"))
    for _ in range(rig.turns.detector.settings.warmup_ms // 20 + 5):
        rig.turns.on_frame(silence())
    assert rig.machine.state is TurnState.IDLE
    return rig


def test_a_voice_turn_opens_the_speaker_only_as_its_speech_may_be_ending() -> None:
    # An open output stream costs its audio threads a wake-up per block (0.9 % of a
    # core on the virtual card): nothing plays while the user talks, so it stays
    # parked then, and opens early enough in the hangover to have settled for the reply.
    rig = _voice_rig()
    for k in range(50):
        rig.turns.on_frame(tone(-20, 440, k))
    assert rig.machine.state is TurnState.LISTENING
    assert rig.speaker.prepared == 0
    for _ in range(5):  # a pause between words
        rig.turns.on_frame(silence())
    for k in range(25):
        rig.turns.on_frame(tone(-20, 440, k))
    assert rig.speaker.prepared == 0
    quiet = 0
    while not rig.speaker.prepared:
        rig.turns.on_frame(silence())
        quiet += 1
        assert rig.machine.state is TurnState.LISTENING
    hangover = rig.turns.detector.hangover_frames
    assert (hangover - quiet) * 20 >= SPEAKER_LEAD_MS  # opened this long before the end
    while rig.machine.state is TurnState.LISTENING:
        rig.turns.on_frame(silence())
    assert rig.machine.state is TurnState.THINKING and rig.speaker.prepared == 1
    assert rig.link.of(TurnEnd) == [TurnEnd(1, "silence")]


def test_a_voice_turn_ended_before_any_pause_still_opens_the_speaker() -> None:
    # the user pressed the button to end it mid-word: the reply must still find an
    # open stream
    rig = _voice_rig()
    for k in range(50):
        rig.turns.on_frame(tone(-20, 440, k))
    rig.turns.on_trigger_event(TurnEndRequested("button", "pressed"))
    assert rig.machine.state is TurnState.THINKING and rig.speaker.prepared == 1
    for _ in range(40):  # the speech's hangover runs out afterwards: no second open
        rig.turns.on_frame(silence())
    assert rig.speaker.prepared == 1


def test_a_voice_turn_with_a_short_hangover_opens_the_speaker_at_its_first_quiet_frame() -> None:
    rig = Rig(settings=TurnSettings(start="voice"))
    rig.turns.detector = SilenceDetector(SilenceSettings(hangover_ms=200))
    for _ in range(rig.turns.detector.settings.warmup_ms // 20 + 5):
        rig.turns.on_frame(silence())
    for k in range(20):
        rig.turns.on_frame(tone(-20, 440, k))
    assert rig.speaker.prepared == 0
    rig.turns.on_frame(silence())
    assert rig.speaker.prepared == 1


def test_a_played_reply_completes_the_turn_and_a_local_stop_interrupts_it() -> None:
    rig = Rig()
    rig.turns.request_turn("api")
    rig.turns.on_message(ResponseStart(1))
    rig.downlink.audio(received(0))
    rig.turns.on_message(ResponseEndMessage(1, "done"))
    rig.downlink.on_playback_event(PlaybackStarted(rig.clock.now()))
    rig.clock.advance(0.5)
    rig.downlink.on_playback_event(PlaybackEnded(rig.clock.now(), flushed=False))
    assert rig.observer.closed[-1].outcome is TurnOutcome.COMPLETED
    assert rig.observer.closed[-1].playback_end == rig.clock.now()

    rig.turns.request_turn("api")
    rig.turns.on_message(ResponseStart(2))
    rig.downlink.audio(received(0))
    assert rig.turns.request_interrupt("button")
    assert rig.link.of(Interrupt)[-1] == Interrupt(reason="button")
    # the flush's event arrives after the record of what plays was cleared
    rig.downlink.on_playback_event(PlaybackEnded(rig.clock.now(), flushed=True))
    assert rig.observer.closed[-1].outcome is TurnOutcome.INTERRUPTED


def test_the_relays_interrupt_is_seen_before_playback_stops() -> None:
    rig = Rig()
    rig.turns.request_turn("api")
    rig.turns.on_message(ResponseStart(1))
    rig.downlink.audio(received(0))
    rig.turns.on_message(Interrupt(reason="barge_in"))
    names = rig.observer.names()
    assert names.index("remote_interrupt") < names.index("playback_flushed")
    assert rig.link.of(Interrupt) == []  # the relay knows: not echoed back


def test_a_link_lost_before_any_reply_closes_the_turn_and_errors_are_counted() -> None:
    rig = Rig()
    rig.turns.request_turn("api")
    rig.link.connected = False
    rig.turns.link_changed(False, rig.clock.now())
    assert rig.observer.closed[-1].outcome is TurnOutcome.LINK_LOST
    rig.link.connected = True
    rig.turns.link_changed(True, rig.clock.now())
    rig.turns.on_message(Error(code="upstream_unavailable", message="x"))
    rig.turns.on_message(Error(code="upstream_unavailable", message="x"))
    assert rig.counters.errors == {"upstream_unavailable": 2}


def test_a_turn_the_relay_refuses_stops_streaming_at_once() -> None:
    # At capacity the relay answers turn_start with relay_busy and drops the turn's
    # audio: the device ends the turn there (no more uplink, no waiting for a reply
    # that will not come), says so with the error cue and records why.
    rig = Rig(settings=TurnSettings(start="button"))
    rig.turns.request_turn("api")
    rig.turns.on_frame(tone())
    sent = len(rig.link.audio)
    rig.turns.on_message(Error(code="relay_busy", message="at capacity", retryable=True))
    assert rig.link.of(TurnEnd) == [TurnEnd(1, "refused")]
    assert rig.observer.closed[-1].outcome is TurnOutcome.REFUSED
    assert rig.turns.machine.state is TurnState.IDLE
    for _ in range(10):
        rig.clock.advance(0.02)
        rig.turns.on_frame(tone())
    assert len(rig.link.audio) == sent
    assert rig.counters.errors == {"relay_busy": 1}


def test_an_error_for_no_particular_turn_leaves_the_users_turn_open() -> None:
    rig = Rig(settings=TurnSettings(start="button"))
    rig.turns.request_turn("api")
    rig.turns.on_message(Error(code="upstream_unavailable", message="x", retryable=True))
    assert rig.turns.machine.state is TurnState.LISTENING and rig.link.of(TurnEnd) == []


def test_no_speech_timeout_ends_the_turn_on_the_wire_and_in_the_record() -> None:
    rig = Rig()
    rig.turns.request_turn("api")
    rig.clock.advance(rig.settings.no_speech_timeout_ms / 1000 + 0.1)
    rig.turns.tick(rig.clock.now())
    assert rig.link.of(TurnEnd) == [TurnEnd(1, "no_speech")]
    assert rig.observer.closed[-1].outcome is TurnOutcome.NO_SPEECH


def test_stopping_while_streaming_cancels_the_turn_at_the_relay() -> None:
    rig = Rig()
    rig.turns.stopping()
    assert rig.link.of(TurnEnd) == []
    rig.turns.request_turn("api")
    rig.turns.stopping()
    assert rig.link.of(TurnEnd) == [TurnEnd(1, "cancelled")]


# ------------------------------------------------------------------ capture


class FlakyMicrophone:
    """Fails to open twice, then delivers three frames, fails, delivers two, ends."""

    name = "flaky"

    def __init__(self) -> None:
        self.stats = SourceStats()
        self.script: list[object] = [AudioDeviceError("unplugged"),
                                     AudioDeviceError("unplugged"),
                                     3, AudioDeviceError("gone"), 2]
        self.pending = 0
        self.opens = 0

    async def open(self) -> None:
        self.opens += 1
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        assert isinstance(step, int)
        self.pending = step

    async def read(self) -> bytes:
        if self.pending == 0:
            if not self.script:
                raise EOFError
            step = self.script.pop(0)
            assert isinstance(step, Exception)
            raise step
        self.pending -= 1
        return silence()

    async def close(self) -> None:
        pass


def test_capture_reopens_a_failing_microphone_with_backoff_and_reports_it() -> None:
    clock = FakeClock()
    status = StatusBoard()
    counters = DeviceCounters()
    frames: list[bytes] = []
    texts: list[str] = []
    status.on_state = texts.append
    ended: list[bool] = []
    mic = FlakyMicrophone()
    loop = CaptureLoop(mic, clock, status, counters, frames.append, reopen_max_ms=5_000,
                       on_eof=lambda: ended.append(True))
    asyncio.run(asyncio.wait_for(loop.run(), 5))
    assert len(frames) == 5 and ended == [True]
    assert counters.audio_reopens == 3 and mic.opens == 4
    assert status.audio_problem is None  # reopened: no problem left
    assert any(t.startswith("microphone unavailable: unplugged; retrying in") for t in texts)
    assert clock.now() >= 0.2 * 3  # it waited between attempts (min 200 ms)


class Deaf:
    """An audio trigger that needs every frame at once (not a QuietListener)."""

    name = "deaf"

    def __init__(self) -> None:
        self.frames = 0

    def process(self, frame: bytes, level_dbfs: float | None = None,
                noise_floor_dbfs: float | None = None) -> list[object]:
        self.frames += 1
        return []


class Listener(Deaf):
    """An audio trigger that may take a quiet room's frames late (a QuietListener)."""

    def __init__(self, margin_db: float | None) -> None:
        super().__init__()
        self.margin_db = margin_db

    def listen_margin_db(self) -> float | None:
        return self.margin_db


def test_quiet_margin_is_the_closest_listener_and_none_unless_every_one_can_wait() -> None:
    """Quiet frames may be batched only while the detector is settled and every audio
    trigger can wait; the margin is the smallest any of them needs (inf: none)."""
    near, far = Listener(6.0), Listener(9.0)
    rig = Rig(audio_triggers=[far, near])
    assert rig.turns.quiet_margin_db() is None  # the detector has not settled yet
    for _ in range(40):
        rig.turns.on_frame(tone(-60.0))
    assert rig.turns.quiet_margin_db() == 6.0
    near.margin_db = None  # its models are running: every frame now
    assert rig.turns.quiet_margin_db() is None
    near.margin_db = 12.0
    assert rig.turns.quiet_margin_db() == 9.0
    assert far.frames == near.frames == 40  # batching or not, every frame arrives
    assert Rig().turns.quiet_margin_db() is None  # unsettled, no trigger
    bare = Rig()
    for _ in range(40):
        bare.turns.on_frame(tone(-60.0))
    assert bare.turns.quiet_margin_db() == math.inf  # nobody listens below the onset
    mixed = Rig(audio_triggers=[Listener(6.0), Deaf()])
    for _ in range(40):
        mixed.turns.on_frame(tone(-60.0))
    assert mixed.turns.quiet_margin_db() is None  # one trigger cannot wait
    bare.turns.on_frame(tone(-20.0))  # speech: the detector leaves QUIET
    assert bare.turns.quiet_margin_db() is None
