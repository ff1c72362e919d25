"""Echo-safe barge-in: the guard's prediction, and the detector on simulated rooms.

The simulations play a reply through a simulated speaker-to-microphone path (delay,
coupling, reverberation, room noise) and count 20 ms frames, never wall time.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import speech_synth as synth
from hypothesis import given, settings
from hypothesis import strategies as st

from edgevoice.clock import FakeClock
from edgevoice.config.base import SettingError
from edgevoice.feedback.states import DeviceState
from edgevoice.triggers.bargein import (
    SILENCE_DBFS,
    BargeInDetector,
    BargeInSettings,
    EchoGuard,
    VoiceBargeInTrigger,
    pcm_dbfs,
)
from edgevoice.triggers.base import AudioTrigger, InterruptRequested

FRAME_S = 0.02
BARGE_IN = InterruptRequested("voice")
REPLY_TEXT = (
    "The weather today will be mostly sunny with a high of twenty three degrees. "
    "Tomorrow, expect clouds in the morning and light rain in the afternoon. "
    "Remember to take an umbrella if you go out."
)
needs_flite = pytest.mark.skipif(not synth.flite_available(), reason="flite is not installed")


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("flite")


def simulate(reply: synth.Signal, mic: synth.Signal, detector: BargeInDetector) -> list[int]:
    """Play ``reply`` block by block while ``mic`` is captured; return the frames at which
    the detector interrupted (re-armed after each, as if a new reply had started)."""
    detector.set_state(DeviceState.SPEAKING)
    fired = []
    for index, (played, heard) in enumerate(
        zip(synth.frames_of(reply), synth.frames_of(mic), strict=False)
    ):
        # Block k starts playing at k * 20 ms; capture frame k is complete 20 ms later.
        detector.guard.on_playback_block(pcm_dbfs(played), index * FRAME_S)
        if detector.on_capture_frame(pcm_dbfs(heard), (index + 1) * FRAME_S):
            fired.append(index)
            detector.set_state(DeviceState.IDLE)
            detector.set_state(DeviceState.SPEAKING)
    return fired


def echo_of(
    reply: synth.Signal, coupling_db: float, delay_ms: float, rt60_ms: float = 250.0
) -> synth.Signal:
    """What the microphone hears while ``reply`` plays: its echo plus room noise."""
    seconds = len(reply) / synth.RATE_HZ
    return synth.room(reply, coupling_db, delay_ms, rt60_ms) + synth.noise(seconds, -65.0)


def reply_speech(seed: int) -> synth.Signal:
    return synth.at_level(synth.speech_like(10.0, seed), -20.0)


# -- the assistant's own voice must never interrupt it -----------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("coupling_db", "delay_ms", "rt60_ms"),
    [(-20, 40, 250), (-12, 100, 400), (-6, 80, 300), (-30, 0, 100), (-20, 100, 600)],
)
def test_echo_of_ten_seconds_of_reply_never_interrupts(
    seed: int, coupling_db: float, delay_ms: float, rt60_ms: float
) -> None:
    reply = reply_speech(seed)
    detector = BargeInDetector()
    assert simulate(reply, echo_of(reply, coupling_db, delay_ms, rt60_ms), detector) == []
    # It learnt the coupling: an upper envelope, so at most a little above the truth;
    # below it by up to a few dB when the room rings for less than reverb_rt60_ms
    # (the predicted tail then overstates the playback).
    assert coupling_db - 8.0 < detector.guard.coupling_db < coupling_db + 4.0


@needs_flite
@pytest.mark.parametrize("voice", ["slt", "rms", "awb", "kal16"])
def test_echo_of_a_spoken_reply_never_interrupts(voice: str, speech_dir: Path) -> None:
    reply = synth.at_level(synth.pad_to(synth.flite(REPLY_TEXT, voice, speech_dir), 10.0), -20)
    for coupling_db, delay_ms, rt60_ms in [(-20, 40, 250), (-12, 100, 400), (-6, 80, 300)]:
        mic = echo_of(reply, coupling_db, delay_ms, rt60_ms)
        assert simulate(reply, mic, BargeInDetector()) == [], (coupling_db, delay_ms)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    coupling_db=st.floats(-35.0, -6.0),
    delay_ms=st.floats(0.0, 100.0),
    rt60_ms=st.floats(100.0, 500.0),
    level_dbfs=st.floats(-30.0, -12.0),
)
def test_echo_never_interrupts_in_any_plausible_room(
    seed: int, coupling_db: float, delay_ms: float, rt60_ms: float, level_dbfs: float
) -> None:
    reply = synth.at_level(synth.speech_like(5.0, seed), level_dbfs)
    assert simulate(reply, echo_of(reply, coupling_db, delay_ms, rt60_ms), BargeInDetector()) == []


# -- the user talking over it must --------------------------------------------------------


def _user_cases(speech_dir: Path) -> list[tuple[str, synth.Signal]]:
    cases = [(f"synthetic-{seed}", synth.speech_like(3.0, 100 + seed, 220.0)) for seed in range(3)]
    if synth.flite_available():
        for text in ("no, no, the other one", "hold on, that's wrong", "wait, I meant tomorrow"):
            for voice in ("slt", "rms", "awb", "kal16"):
                cases.append((f"{voice}: {text}", synth.flite(text, voice, speech_dir)))
    return cases


@pytest.mark.parametrize("reply_seed", [0, 1])
def test_user_over_the_reply_interrupts_within_200_ms(reply_seed: int, speech_dir: Path) -> None:
    reply = reply_speech(reply_seed)
    echo = echo_of(reply, -20.0, 40.0)  # the reply leaks at about -40 dBFS
    late = []
    for name, speech in _user_cases(speech_dir):
        user_alone = synth.at_level(speech, -25.0)
        for start_s in (3.0, 4.3, 6.1):
            user = np.zeros_like(reply)
            start = int(start_s * synth.RATE_HZ)
            user[start : start + len(user_alone)] = user_alone[: len(user) - start]
            # Onset: the first frame where the user's voice reaches 10 dB under its
            # speaking level (a breath or a faint lead-in consonant is not "speaking").
            onset = round(synth.speech_start_s(user, -35.0) / FRAME_S)
            fired = simulate(reply, echo + user, BargeInDetector())
            assert [f for f in fired if f < onset] == [], f"{name}: fired before speaking"
            if not fired or fired[0] - onset > 10:
                late.append((name, start_s, fired[:1], onset))
    assert late == []


def test_barge_in_needs_the_device_to_be_speaking() -> None:
    reply = reply_speech(0)
    user = synth.at_level(synth.speech_like(10.0, 200, 220.0), -25.0)
    detector = BargeInDetector()
    detector.set_state(DeviceState.THINKING)
    for index, (played, heard) in enumerate(
        zip(synth.frames_of(reply), synth.frames_of(echo_of(reply, -20, 40) + user), strict=False)
    ):
        detector.guard.on_playback_block(pcm_dbfs(played), index * FRAME_S)
        assert detector.on_capture_frame(pcm_dbfs(heard), (index + 1) * FRAME_S) == []


# -- the pieces ---------------------------------------------------------------------------


def test_reference_is_loudest_recent_playback_plus_coupling() -> None:
    guard = EchoGuard(BargeInSettings(prior_coupling_db=-10.0, max_delay_ms=100))
    assert guard.reference_dbfs(0.0) is None  # nothing played yet
    guard.on_playback_block(-20.0, 0.00)
    guard.on_playback_block(-30.0, 0.02)
    assert guard.reference_dbfs(0.05) == pytest.approx(-30.0)
    # the loud block is still within max_delay_ms + one block (120 ms) of now
    assert guard.reference_dbfs(0.12) == pytest.approx(-30.0)
    # then it counts as a decaying room tail (60 dB per reverb_rt60_ms = 400 ms)
    later = guard.reference_dbfs(0.22)
    assert later is not None
    assert later == pytest.approx(-30.0 - 60.0 * 0.1 / 0.4, abs=0.01)


def test_reference_ends_when_playback_has_died_away() -> None:
    guard = EchoGuard()
    guard.on_playback_block(-20.0, 0.0)
    assert guard.reference_dbfs(0.1) is not None
    assert guard.reference_dbfs(1.0) is None
    guard.on_playback_block(SILENCE_DBFS, 1.0)  # a block of digital silence plays nothing
    assert guard.reference_dbfs(1.01) is None


def _feed_echo(guard: EchoGuard, frames: int, play_dbfs: float, mic_dbfs: float) -> None:
    for k in range(frames):
        guard.on_playback_block(play_dbfs, k * FRAME_S)
        guard.on_capture_frame(mic_dbfs, (k + 1) * FRAME_S)


def test_coupling_is_learnt_from_echo() -> None:
    guard = EchoGuard(BargeInSettings(prior_coupling_db=-10.0))
    _feed_echo(guard, 400, -20.0, -44.0)  # the echo is 24 dB under the playback
    assert guard.coupling_db == pytest.approx(-24.0, abs=0.5)
    guard2 = EchoGuard(BargeInSettings(prior_coupling_db=-30.0, margin_db=8.0))
    _feed_echo(guard2, 50, -20.0, -44.0)  # a louder echo than assumed is learnt quickly
    assert guard2.coupling_db == pytest.approx(-24.0, abs=0.5)


def test_an_echo_far_above_the_prior_is_taken_for_the_user() -> None:
    # Why the prior must be pessimistic: beyond prior + margin, echo and a talking user
    # look the same, and the guard refuses to learn from either.
    guard = EchoGuard(BargeInSettings(prior_coupling_db=-30.0, margin_db=8.0))
    _feed_echo(guard, 50, -20.0, -25.0)
    assert guard.coupling_db == pytest.approx(-30.0)


def test_double_talk_is_not_learnt() -> None:
    guard = EchoGuard(BargeInSettings(prior_coupling_db=-20.0, margin_db=8.0))
    _feed_echo(guard, 200, -20.0, -15.0)  # mic 25 dB above the predicted echo: a user
    assert guard.coupling_db == pytest.approx(-20.0)
    assert guard.learnt_frames == 0


def test_nothing_is_learnt_before_the_echo_can_have_arrived() -> None:
    guard = EchoGuard(BargeInSettings(prior_coupling_db=-10.0, max_delay_ms=100))
    _feed_echo(guard, 100, -20.0, -44.0)
    learnt = guard.learnt_frames
    # A pause long enough to forget the playback, then the reply resumes at t = 10 s.
    # With a 100 ms delay the microphone hears nothing until 10.1 s, so the frames
    # ending at 10.02 .. 10.10 s may be silent: none of them may be learnt from.
    for k in range(5):
        guard.on_playback_block(-20.0, 10.0 + k * FRAME_S)
        guard.on_capture_frame(-70.0, 10.0 + (k + 1) * FRAME_S)
    assert guard.learnt_frames == learnt
    # From the frame after that, the echo must be there: learning resumes.
    guard.on_playback_block(-20.0, 10.1)
    guard.on_capture_frame(-44.0, 10.12)
    assert guard.learnt_frames == learnt + 1


def test_a_few_odd_frames_do_not_move_the_coupling() -> None:
    guard = EchoGuard(BargeInSettings(prior_coupling_db=-10.0, margin_db=8.0))
    _feed_echo(guard, 200, -20.0, -44.0)
    assert guard.coupling_db == pytest.approx(-24.0)
    start = 200 * FRAME_S
    for k in range(15):  # 300 ms of a silent microphone (a glitch, a pause)...
        guard.on_playback_block(-20.0, start + k * FRAME_S)
        guard.on_capture_frame(-90.0, start + (k + 1) * FRAME_S)
    start += 15 * FRAME_S
    for k in range(15):  # ...and 300 ms of a user too quiet to count as double talk
        guard.on_playback_block(-20.0, start + k * FRAME_S)
        guard.on_capture_frame(-38.0, start + (k + 1) * FRAME_S)
    assert guard.coupling_db == pytest.approx(-24.0)


def test_detector_fires_once_per_reply_and_rearms() -> None:
    detector = BargeInDetector(BargeInSettings(min_speech_ms=100))
    detector.set_state(DeviceState.SPEAKING)
    events = [detector.on_capture_frame(-20.0, k * FRAME_S) for k in range(20)]
    fired = [k for k, e in enumerate(events) if e]
    assert fired == [2]  # three strong frames (far above the -45 dBFS floor) suffice
    assert events[2] == [BARGE_IN]
    detector.set_state(DeviceState.LISTENING)
    detector.set_state(DeviceState.SPEAKING)
    assert detector.on_capture_frame(-20.0, 1.0) == []
    assert detector.interrupts == 1


def test_detector_needs_min_speech_ms_of_moderately_loud_frames() -> None:
    detector = BargeInDetector(BargeInSettings(min_speech_ms=100, min_level_dbfs=-45.0))
    detector.set_state(DeviceState.SPEAKING)
    # 3 dB above the threshold: loud, not strong. Dips between syllables are tolerated.
    levels = [-42.0, -42.0, -60.0, -42.0, -42.0, -60.0, -42.0]
    fired = [k for k, lvl in enumerate(levels) if detector.on_capture_frame(lvl, k * FRAME_S)]
    assert fired == [6]


def test_detector_ignores_clicks() -> None:
    detector = BargeInDetector()
    detector.set_state(DeviceState.SPEAKING)
    for k in range(100):
        level = -10.0 if k % 10 == 0 else -70.0  # a 20 ms click every 200 ms
        assert detector.on_capture_frame(level, k * FRAME_S) == []


def test_disabled_detector_never_fires_but_guard_still_learns() -> None:
    detector = BargeInDetector(BargeInSettings(enabled=False, prior_coupling_db=-10.0))
    detector.set_state(DeviceState.SPEAKING)
    for k in range(300):
        detector.guard.on_playback_block(-20.0, k * FRAME_S)
        assert detector.on_capture_frame(-45.0, (k + 1) * FRAME_S) == []
    assert detector.guard.coupling_db == pytest.approx(-25.0, abs=0.5)


def test_trigger_over_raw_pcm_with_a_fake_clock() -> None:
    clock = FakeClock(100.0)
    trigger = VoiceBargeInTrigger(clock=clock)
    assert isinstance(trigger, AudioTrigger)
    asyncio.run(trigger.start(lambda event: None))
    loud = synth.to_pcm(np.full(synth.FRAME, 0.1))  # -20 dBFS
    assert pcm_dbfs(loud) == pytest.approx(-20.0, abs=0.01)
    trigger.on_playback(loud)
    reference = trigger.reference_dbfs()
    assert reference == pytest.approx(-26.0, abs=0.01)  # prior coupling -6 dB
    trigger.set_state(DeviceState.SPEAKING)
    shout = synth.to_pcm(np.full(synth.FRAME, 0.9))
    events = []
    for _ in range(5):
        clock.advance(FRAME_S)
        trigger.on_playback(loud)
        events += trigger.process(shout)
    assert events == [BARGE_IN]
    asyncio.run(trigger.stop())


def test_pcm_dbfs_convention() -> None:
    t = np.arange(16_000) / 16_000
    sine = synth.to_pcm(0.999 * np.sin(2 * np.pi * 1000 * t))
    assert pcm_dbfs(sine) == pytest.approx(-3.0, abs=0.05)
    assert pcm_dbfs(b"\0" * 640) == SILENCE_DBFS
    assert pcm_dbfs(b"") == SILENCE_DBFS


def test_settings_are_checked() -> None:
    with pytest.raises(SettingError, match="margin_db"):
        BargeInSettings(margin_db=0.0)
    with pytest.raises(SettingError, match="min_speech_ms"):
        BargeInSettings(min_speech_ms=10)
    with pytest.raises(SettingError, match="prior_coupling_db"):
        BargeInSettings(prior_coupling_db=30.0)
    with pytest.raises(SettingError, match="reverb_rt60_ms"):
        BargeInSettings(reverb_rt60_ms=10)


# -- the room's ring, measured in the pauses ----------------------------------------------


def _bursts_in_a_ringing_room(
        guard: EchoGuard, rt60_ms: float, bursts: int,
        user_in_last_pause_dbfs: float | None = None) -> list[tuple[float, float, float]]:
    """0.4 s of playback at -20 dBFS then 0.6 s of pause, heard at -10 dB with 60 ms of
    delay, the room falling 60 dB per ``rt60_ms`` after each burst. Returns, for each
    frame of the last pause: the microphone, the predicted echo, the guard's RT60."""
    decay = 60.0 / (rt60_ms / 1000.0)
    last_pause = []
    frame = 0
    for burst in range(bursts):
        for k in range(50):
            now = frame * FRAME_S
            playing = k < 20
            guard.on_playback_block(-20.0 if playing else SILENCE_DBFS, now)
            since_end = (k + 1 - 20) * FRAME_S - 0.06
            mic = -30.0 if since_end <= 0 else max(-70.0, -30.0 - decay * since_end)
            in_last_pause = burst == bursts - 1 and not playing
            if in_last_pause and user_in_last_pause_dbfs is not None and k >= 30:
                mic = max(mic, user_in_last_pause_dbfs)
            predicted = guard.reference_dbfs((frame + 1) * FRAME_S)
            guard.on_capture_frame(mic, (frame + 1) * FRAME_S)
            if in_last_pause:
                last_pause.append((mic, predicted or SILENCE_DBFS, guard.reverb_rt60_ms))
            frame += 1
    return last_pause


def test_a_room_that_rings_longer_than_the_setting_is_measured() -> None:
    guard = EchoGuard(BargeInSettings(prior_coupling_db=-10.0))
    after = _bursts_in_a_ringing_room(guard, 1000.0, bursts=4)
    # measured: the prediction covers every frame of the tail loud enough to matter
    # (with 60 dB per 400 ms it fell up to 10 dB under the last of them)
    assert guard.reverb_rt60_ms > 500.0
    assert all(mic <= predicted + 0.5 for mic, predicted, _ in after if mic > -45.0)
    guard.reset()
    assert guard.reverb_rt60_ms == pytest.approx(400.0)


def test_a_room_that_rings_shorter_keeps_the_setting() -> None:
    guard = EchoGuard(BargeInSettings(prior_coupling_db=-10.0))
    _bursts_in_a_ringing_room(guard, 250.0, bursts=4)
    assert guard.reverb_rt60_ms == pytest.approx(400.0)


def test_a_user_talking_in_a_pause_does_not_raise_the_bar_during_that_pause() -> None:
    settings = BargeInSettings(prior_coupling_db=-10.0)
    alone = _bursts_in_a_ringing_room(EchoGuard(settings), 800.0, bursts=4)
    talked_over = _bursts_in_a_ringing_room(EchoGuard(settings), 800.0, bursts=4,
                                            user_in_last_pause_dbfs=-25.0)
    assert [rt60 for *_, rt60 in talked_over] == [rt60 for *_, rt60 in alone]
    # ... so the user's voice clears the predicted echo by the margin within the pause
    assert any(mic >= predicted + settings.margin_db for mic, predicted, _ in talked_over)
