"""The silence detector core, driven with synthesized frames (no clock, no device)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgevoice.audio.base import CAPTURE_RATE_HZ, FRAME_MS
from edgevoice.audio.silence import (
    SILENCE_DBFS,
    TRANSITIONS,
    FrameDecision,
    IdleGate,
    IllegalTransitionError,
    SilenceDetector,
    SilenceSettings,
    SpeechEnded,
    SpeechStarted,
    SpeechState,
)
from edgevoice.config.base import SettingError

from ._signals import frames, noise, tone

RATE = CAPTURE_RATE_HZ


def ms_to_samples(ms: float) -> int:
    return round(ms * RATE / 1000)


def burst_in_noise(
    start_ms: float,
    length_ms: float,
    total_ms: float,
    tone_dbfs: float = -20.0,
    noise_dbfs: float = -50.0,
    seed: int = 1,
) -> list[bytes]:
    n = ms_to_samples(total_ms)
    signal = noise(noise_dbfs, n, seed)
    a, b = ms_to_samples(start_ms), ms_to_samples(start_ms + length_ms)
    signal[a:b] += tone(440.0, tone_dbfs, b - a)
    return frames(signal)


def run(
    det: SilenceDetector, fs: list[bytes], reference_dbfs: float | None = None
) -> list[FrameDecision]:
    return [det.process(f, reference_dbfs) for f in fs]


def event_index(decisions: list[FrameDecision], kind: type) -> list[int]:
    return [i for i, d in enumerate(decisions) if isinstance(d.event, kind)]


@pytest.mark.parametrize("start_ms", [1000.0, 1007.0, 1013.0, 1019.5, 1500.0])
@pytest.mark.parametrize("tone_dbfs", [-35.0, -20.0, -6.0])
def test_onset_is_found_within_40_ms_of_a_tone_burst(start_ms: float, tone_dbfs: float) -> None:
    det = SilenceDetector()
    decisions = run(det, burst_in_noise(start_ms, 800, 2500, tone_dbfs=tone_dbfs))
    starts = event_index(decisions, SpeechStarted)
    assert len(starts) == 1
    k = starts[0]
    started = decisions[k].event
    assert isinstance(started, SpeechStarted)
    onset_ms = (k - started.onset_frames + 1) * FRAME_MS  # start of the first loud frame
    assert abs(onset_ms - start_ms) <= 40
    # Confirmation takes onset_ms, no more than one frame late.
    confirmed_ms = (k + 1) * FRAME_MS
    assert confirmed_ms <= start_ms + det.settings.onset_ms + FRAME_MS


def test_release_comes_after_the_hangover_not_before() -> None:
    s = SilenceSettings(hangover_ms=600)
    det = SilenceDetector(s)
    end_ms = 1000.0 + 700.0
    decisions = run(det, burst_in_noise(1000.0, 700.0, 3500.0))
    ends = event_index(decisions, SpeechEnded)
    assert len(ends) == 1
    ended_at_ms = (ends[0] + 1) * FRAME_MS  # end of the frame that carried the event
    assert ended_at_ms >= end_ms + s.hangover_ms
    assert ended_at_ms <= end_ms + s.hangover_ms + 2 * FRAME_MS
    start = event_index(decisions, SpeechStarted)[0]
    # Everything from the confirmation to the end of the hangover is sent, nothing else.
    sent = [i for i, d in enumerate(decisions) if d.send]
    assert sent == list(range(start, ends[0] + 1))


def test_hangover_bridges_a_pause_shorter_than_itself() -> None:
    n = ms_to_samples(4000)
    signal = noise(-50.0, n, 3)
    for a_ms, b_ms in [(1000, 1500), (1900, 2400)]:  # 400 ms pause < 600 ms hangover
        a, b = ms_to_samples(a_ms), ms_to_samples(b_ms)
        signal[a:b] += tone(300.0, -20.0, b - a)
    decisions = run(SilenceDetector(), frames(signal))
    assert len(event_index(decisions, SpeechStarted)) == 1
    assert len(event_index(decisions, SpeechEnded)) == 1


def test_level_between_release_and_onset_keeps_speech_going() -> None:
    # Hysteresis: once started, a level that could not start a turn still holds it.
    det = SilenceDetector(SilenceSettings(onset_db=12.0, release_db=4.0, min_speech_dbfs=-90))
    n = ms_to_samples(5000)
    signal = noise(-60.0, n, 4)
    a, b, c = ms_to_samples(1000), ms_to_samples(1500), ms_to_samples(4000)
    signal[a:b] += tone(300.0, -30.0, b - a)
    signal[b:c] += tone(300.0, -52.0, c - b, phase=2 * np.pi * 300.0 * (b - a) / RATE)
    decisions = run(det, frames(signal))
    assert len(event_index(decisions, SpeechStarted)) == 1
    ends = event_index(decisions, SpeechEnded)
    assert len(ends) == 1 and ends[0] * FRAME_MS >= 4000


@pytest.mark.parametrize("level_dbfs", [-70.0, -60.0, -50.0, -40.0, -30.0, -20.0, -10.0])
def test_steady_noise_never_opens_a_turn(level_dbfs: float) -> None:
    det = SilenceDetector()
    decisions = run(det, frames(noise(level_dbfs, ms_to_samples(10_000), seed=7)))
    assert not any(d.send or d.event for d in decisions)
    assert det.state is SpeechState.QUIET
    if level_dbfs > -55.0:
        assert abs(det.noise_floor_dbfs - level_dbfs) < 2.0


@settings(max_examples=40, deadline=None)
@given(level_dbfs=st.floats(-70.0, -10.0), seed=st.integers(0, 2**32 - 1))
def test_steady_noise_at_any_level_never_opens_a_turn(level_dbfs: float, seed: int) -> None:
    det = SilenceDetector()
    for f in frames(noise(level_dbfs, ms_to_samples(3000), seed)):
        d = det.process(f)
        assert d.event is None and not d.send


def test_digital_silence_reads_the_silence_level() -> None:
    det = SilenceDetector()
    for _ in range(50):
        assert det.process(bytes(640)) == FrameDecision(send=False)
    assert det.level_dbfs == SILENCE_DBFS


def test_preroll_holds_the_audio_before_the_onset() -> None:
    s = SilenceSettings(preroll_ms=400)
    det = SilenceDetector(s)
    fs = burst_in_noise(1013.0, 600, 2000)
    decisions = run(det, fs)
    k = event_index(decisions, SpeechStarted)[0]
    started = decisions[k].event
    assert isinstance(started, SpeechStarted)
    # The pre-roll is exactly the frames before this one, in order...
    assert started.preroll == tuple(fs[k - len(started.preroll) : k])
    # ...and reaches at least preroll_ms before the first loud frame.
    onset = k - started.onset_frames + 1
    first = k - len(started.preroll)
    assert (onset - first) * FRAME_MS >= s.preroll_ms
    assert first * FRAME_MS < 1013.0


def test_reference_level_suppresses_an_onset_at_that_level() -> None:
    fs = burst_in_noise(1000, 800, 2500, tone_dbfs=-30.0)
    # Without a reference the burst starts a turn (so the next assertion can fail)...
    assert event_index(run(SilenceDetector(), fs), SpeechStarted)
    # ...with playback leaking at the same level, it does not...
    assert not event_index(run(SilenceDetector(), fs, reference_dbfs=-30.0), SpeechStarted)


def test_reference_level_allows_speech_20_db_above_it() -> None:
    fs = burst_in_noise(1000, 800, 2500, tone_dbfs=-10.0)
    assert event_index(run(SilenceDetector(), fs, reference_dbfs=-30.0), SpeechStarted)


def test_a_click_shorter_than_onset_ms_does_not_start() -> None:
    det = SilenceDetector(SilenceSettings(onset_ms=60))
    decisions = run(det, burst_in_noise(1000, 30, 2000))
    assert not any(d.send or d.event for d in decisions)
    assert det.state is SpeechState.QUIET


def test_max_speech_ends_a_turn_held_open_by_new_noise() -> None:
    det = SilenceDetector(SilenceSettings(max_speech_ms=2000))
    n = ms_to_samples(8000)
    signal = noise(-60.0, n, 5)
    a = ms_to_samples(1000)
    signal[a:] += noise(-20.0, n - a, 6)  # a fan switched on and stays on
    decisions = run(det, frames(signal))
    ends = event_index(decisions, SpeechEnded)
    assert len(event_index(decisions, SpeechStarted)) == 1
    assert len(ends) == 1
    ended = decisions[ends[0]].event
    assert isinstance(ended, SpeechEnded) and ended.forced
    assert abs(det.noise_floor_dbfs - (-20.0)) < 2.0
    assert det.state is SpeechState.QUIET


def test_reset_forgets_an_utterance_in_progress() -> None:
    det = SilenceDetector()
    run(det, burst_in_noise(1000, 1000, 2000))
    assert det.state is SpeechState.SPEAKING
    det.reset()
    assert det.state is SpeechState.QUIET  # type: ignore[comparison-overlap]
    assert det.noise_floor_dbfs == det.settings.noise_floor_init_dbfs
    # A fresh warm-up: the loud tone is learnt as the floor, not taken for speech.
    decisions = run(det, frames(tone(440.0, -20.0, ms_to_samples(1000))))
    assert not any(d.event for d in decisions)


def test_frames_of_the_wrong_size_are_refused() -> None:
    with pytest.raises(ValueError, match="640-byte"):
        SilenceDetector().process(bytes(320))


def test_every_state_has_its_transitions_listed() -> None:
    assert set(TRANSITIONS) == set(SpeechState)


def test_an_illegal_transition_raises() -> None:
    det = SilenceDetector()
    with pytest.raises(IllegalTransitionError, match="QUIET -> SPEAKING"):
        det._goto(SpeechState.SPEAKING)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("release_db", 10.0),  # not below onset_db
        ("preroll_ms", 200),
        ("onset_db", 0.0),
        ("floor_rise_tau_ms", 10.0),
        ("max_speech_ms", 10),
        ("min_speech_dbfs", 3.0),
    ],
)
def test_bad_settings_name_the_field(field: str, value: float) -> None:
    with pytest.raises(SettingError) as info:
        SilenceSettings(**{field: value})  # type: ignore[arg-type]
    assert info.value.key == field


segments = st.lists(
    st.tuples(
        st.sampled_from(["noise", "tone", "zero"]),
        st.floats(-80.0, -3.0),
        st.integers(1, 60),  # frames
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(segments=segments, seed=st.integers(0, 1000))
def test_events_alternate_and_send_covers_exactly_each_utterance(
    segments: list[tuple[str, float, int]], seed: int
) -> None:
    parts = []
    for i, (kind, level, count) in enumerate(segments):
        n = count * 320
        if kind == "noise":
            parts.append(noise(level, n, seed + i))
        elif kind == "tone":
            parts.append(tone(200.0 + 100 * i, level, n))
        else:
            parts.append(np.zeros(n))
    det = SilenceDetector(SilenceSettings(hangover_ms=100, max_speech_ms=1000))
    inside = False
    for f in frames(np.concatenate(parts)):
        d = det.process(f)
        if isinstance(d.event, SpeechStarted):
            assert not inside
            inside = True
        assert d.send == inside
        if isinstance(d.event, SpeechEnded):
            assert inside
            inside = False
        assert inside == (det.state in (SpeechState.SPEAKING, SpeechState.STOPPING))


# -- the idle gate: what the capture thread may hold back ---------------------------------


def _levelled_frames(levels_dbfs: list[float], seed: int) -> list[bytes]:
    return [to_pcm_frame(noise(level, 320, seed=seed + i)) for i, level in enumerate(levels_dbfs)]


def to_pcm_frame(samples: np.ndarray) -> bytes:
    return np.clip(np.round(samples), -32768, 32767).astype("<i2").tobytes()


def _drive_in_blocks(gate: IdleGate, frame_list: list[bytes], batch_blocks: int,
                     on_frame: Callable[[bytes], bool], held_what: str) -> None:
    """Drive ``gate`` as the sound card's path does: 60 ms blocks, held while it says
    "cannot start speech" (at most ``batch_blocks``), handed over per batch. ``on_frame``
    takes each frame in order (and re-arms the gate); it says whether that frame had to
    come at once, which only a block the gate let through (or a batch one ended) may."""
    blocks = [frame_list[i:i + 3] for i in range(0, len(frame_list) - 2, 3)]
    held: list[list[bytes]] = []
    urgent_seen = False
    for block in blocks:
        if not held:
            gate.batch_began()
        urgent = gate.may_start(b"".join(block), 3)
        held.append(block)
        urgent_seen = urgent_seen or urgent
        if not (urgent or len(held) >= batch_blocks):
            continue
        for b in held:
            for pcm in b:
                was_armed = gate.armed
                if on_frame(pcm):
                    assert not was_armed or urgent_seen, held_what
        held, urgent_seen = [], False


@settings(max_examples=150, deadline=None)
@given(
    levels=st.lists(st.sampled_from([-100.0, -75.0, -62.0, -60.0, -58.0, -54.0, -51.0, -49.0,
                                     -40.0, -20.0]), min_size=12, max_size=60),
    batch_blocks=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_the_idle_gate_never_holds_back_a_frame_that_moves_the_detector(
    levels: list[float], batch_blocks: int, seed: int
) -> None:
    """Driven as the sound card's path drives it: 60 ms blocks, held while the gate says
    "cannot start speech", handed over per batch. Every frame that takes the detector
    out of QUIET must be in a block the gate let through at once (or in a batch one
    such block ended), even though the floor moves with the held frames."""
    detector = SilenceDetector(SilenceSettings(warmup_ms=0))
    gate = IdleGate(detector.settings)

    def frame(pcm: bytes) -> bool:
        detector.process(pcm)
        if detector.settled_quiet:
            gate.arm(detector.noise_floor_dbfs)
        else:
            gate.disarm()
        return detector.state is not SpeechState.QUIET

    _drive_in_blocks(gate, _levelled_frames(levels, seed), batch_blocks, frame,
                     "a frame that starts speech was held")


@settings(max_examples=150, deadline=None)
@given(
    levels=st.lists(st.sampled_from([-100.0, -80.0, -75.0, -72.0, -70.0, -68.0, -66.0, -62.0,
                                     -60.0, -54.0, -40.0]), min_size=12, max_size=90),
    batch_blocks=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_the_idle_gate_never_holds_back_a_frame_a_listening_trigger_needs(
    levels: list[float], batch_blocks: int, seed: int
) -> None:
    """The wake word's quiet gate (triggers/quietgate.py) opens 6 dB over the floor,
    below the detector's onset: armed with that margin, the idle gate lets through at
    once every block with a frame that opens it, as the floor moves with held frames,
    and holds only while the quiet gate is closed (as the daemon arms it)."""
    from edgevoice.triggers.quietgate import GateState, QuietGate

    detector = SilenceDetector(SilenceSettings(warmup_ms=0))
    wake_gate = QuietGate(6.0, hold_frames=4)
    gate = IdleGate(detector.settings)

    def frame(pcm: bytes) -> bool:
        detector.process(pcm)
        needed = wake_gate.update(detector.level_dbfs, detector.noise_floor_dbfs)
        if detector.settled_quiet and wake_gate.state is GateState.CLOSED:
            gate.arm(detector.noise_floor_dbfs, listen_margin_db=wake_gate.margin_db)
        else:
            gate.disarm()
        return needed

    _drive_in_blocks(gate, _levelled_frames(levels, seed), batch_blocks, frame,
                     "a frame the wake word needs was held")


def test_a_listening_trigger_lowers_what_the_idle_gate_lets_through() -> None:
    """A frame 8 dB over a -75 dBFS floor is not speech to the detector (under its
    minimum level) but is what the wake word's gate opens on."""
    gate = IdleGate(SilenceSettings())
    quiet = to_pcm_frame(noise(-75.0, 960, seed=3))
    louder_last = quiet[:1280] + to_pcm_frame(noise(-67.0, 320, seed=4))
    gate.arm(-75.0)
    assert not gate.may_start(louder_last, 3)
    gate.batch_began()
    gate.arm(-75.0, listen_margin_db=6.0)
    assert gate.may_start(louder_last, 3)
    gate.batch_began()
    assert not gate.may_start(quiet, 3)
    # digital zeros read -100 dBFS, not minus infinity: they are not "above" them
    zeros = bytes(1920)
    gate.batch_began()
    gate.arm(-100.0, listen_margin_db=6.0)
    assert not gate.may_start(zeros, 3)
    assert gate.may_start(zeros[:1280] + to_pcm_frame(noise(-85.0, 320, seed=5)), 3)
    gate.arm(-75.0)  # the trigger needs nothing below the onset again
    gate.batch_began()
    assert not gate.may_start(louder_last, 3)


def test_an_unarmed_gate_lets_every_block_through() -> None:
    gate = IdleGate(SilenceSettings())
    quiet = to_pcm_frame(noise(-90.0, 960, seed=3))
    assert gate.may_start(quiet, 3)
    gate.arm(-60.0)
    assert not gate.may_start(quiet, 3)
    loud_last_frame = quiet[:1280] + to_pcm_frame(noise(-30.0, 320, seed=4))
    assert gate.may_start(loud_last_frame, 3)  # speech in the block's last frame
    gate.disarm()
    assert gate.may_start(quiet, 3)


def test_the_detector_is_settled_quiet_only_after_its_warm_up_and_while_quiet() -> None:
    detector = SilenceDetector(SilenceSettings(warmup_ms=100))
    quiet = to_pcm_frame(noise(-60.0, 320, seed=5))
    loud = to_pcm_frame(noise(-20.0, 320, seed=6))
    for _ in range(5):
        assert not detector.settled_quiet
        detector.process(quiet)
    detector.process(quiet)
    assert detector.settled_quiet
    detector.process(loud)
    assert not detector.settled_quiet  # STARTING
