"""The wake word behind its quiet gate, against the same trigger without one.

Real microWakeWord models on real frames (flite speech, numpy noise); the level and the
noise floor come from a real silence detector, as in the daemon. The gate may change
when the models run, never what they decide: each case runs the gated and the ungated
trigger on the same audio. Detection frames may differ by a frame or two (the models'
frontend heard the room a little differently: a stride of 30 ms is 1.5 frames), never
whether the phrase was heard.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import speech_synth as synth

from edgevoice.audio.silence import SilenceDetector
from edgevoice.config.base import SettingError
from edgevoice.feedback.states import DeviceState
from edgevoice.triggers.base import InterruptRequested, TurnStartRequested
from edgevoice.triggers.quietgate import GateState
from edgevoice.triggers.wake import WakeSettings, WakeWordTrigger

pytest.importorskip("pymicro_wakeword")
needs_flite = pytest.mark.skipif(not synth.flite_available(), reason="flite is not installed")

START = TurnStartRequested("wake")
#: a frame or two: the frontend heard the room a little differently (see the docstring)
SAME_FRAME_WITHIN = 2


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("flite")


@pytest.fixture(scope="module")
def gated() -> Iterator[WakeWordTrigger]:
    trigger = WakeWordTrigger(WakeSettings())  # the shipped default: the gate on
    assert trigger.settings.gate_margin_db is not None
    yield trigger
    trigger.close()


@pytest.fixture(scope="module")
def ungated() -> Iterator[WakeWordTrigger]:
    trigger = WakeWordTrigger(WakeSettings(gate_margin_db=None))
    yield trigger
    trigger.close()


@dataclass
class Heard:
    events: list[tuple[int, object]]
    detection: int | None
    phrase_end: int | None
    gated: int
    replayed: int
    openings: int


def listen(trigger: WakeWordTrigger, signal: synth.Signal,
           state: DeviceState = DeviceState.IDLE) -> Heard:
    """Restart ``trigger`` and feed it ``signal`` as the daemon does."""
    asyncio.run(trigger.start(lambda event: None))
    trigger.set_state(state)
    detector = SilenceDetector()
    events: list[tuple[int, object]] = []
    for index, frame in enumerate(synth.frames_of(signal)):
        detector.process(frame)
        for event in trigger.process(frame, detector.level_dbfs, detector.noise_floor_dbfs):
            events.append((index, event))
    return Heard(events, trigger.last_detection_frame_index,
                 trigger.last_phrase_end_frame_index, trigger.frames_gated,
                 trigger.frames_replayed, trigger.gate_openings)


def scene(speech: synth.Signal, *, speech_dbfs: float, noise_dbfs: float,
          before_s: float, after_s: float = 2.0, seed: int = 3) -> synth.Signal:
    """``speech`` at ``speech_dbfs`` in a room whose steady noise is ``noise_dbfs``."""
    voice = synth.at_level(speech, speech_dbfs)
    body = np.concatenate([np.zeros(int(before_s * synth.RATE_HZ)), voice,
                           np.zeros(int(after_s * synth.RATE_HZ))])
    return body + synth.noise(len(body) / synth.RATE_HZ, noise_dbfs, seed)


def assert_same_decision(gated: Heard, ungated: Heard, what: str) -> None:
    assert [e for _, e in gated.events] == [e for _, e in ungated.events], what
    if ungated.detection is None:
        return
    assert gated.detection is not None and gated.phrase_end is not None, what
    assert ungated.phrase_end is not None
    assert abs(gated.detection - ungated.detection) <= SAME_FRAME_WITHIN, what
    assert abs(gated.phrase_end - ungated.phrase_end) <= SAME_FRAME_WITHIN, what


@needs_flite
def test_a_quiet_wake_word_over_steady_noise_is_heard_as_without_the_gate(
        gated: WakeWordTrigger, ungated: WakeWordTrigger, speech_dir: Path) -> None:
    detected = same_frame = 0
    for seed, (voice, text) in enumerate(
            (voice, text) for voice in ("slt", "rms", "awb", "kal16", "kal")
            for text in ("hey jarvis", "hey jarvis, what time is it")):
        audio = scene(synth.flite(text, voice, speech_dir), speech_dbfs=-35.0,
                      noise_dbfs=-55.0, before_s=5.0, seed=seed)
        with_gate, without = listen(gated, audio), listen(ungated, audio)
        assert_same_decision(with_gate, without, f"{voice}: {text}")
        if with_gate.detection is not None:
            detected += 1
            same_frame += (with_gate.detection, with_gate.phrase_end) == (
                without.detection, without.phrase_end)
        # the room alone kept it closed: from the end of the start's hold to the phrase
        assert with_gate.gated >= (5.0 - 1.0 - 1.5) / 0.02, voice
        assert with_gate.openings >= 1
    assert detected >= 6, f"a quiet 'hey jarvis' heard in {detected} clips of 10"
    # the pre-roll gives the models the room up to the onset: mostly the very same
    # frames (without it, fewer than half are: measured, docs/wake-words.md)
    assert same_frame >= detected - 1, f"{same_frame} of {detected} on the same frames"


@needs_flite
def test_a_wake_word_after_minutes_of_silence_is_caught_up_from_the_preroll(
        gated: WakeWordTrigger, ungated: WakeWordTrigger, speech_dir: Path) -> None:
    audio = scene(synth.flite("hey jarvis", "rms", speech_dir), speech_dbfs=-25.0,
                  noise_dbfs=-62.0, before_s=180.0)
    with_gate, without = listen(gated, audio), listen(ungated, audio)
    assert [e for _, e in without.events] == [START]
    assert_same_decision(with_gate, without, "after three minutes")
    frames = len(audio) // synth.FRAME
    assert with_gate.gated >= frames - (1.0 + 3.0 + 2.0 + 1.5) / 0.02  # all but the speech
    preroll_frames = gated.settings.gate_preroll_ms // 20
    assert 0 < with_gate.replayed <= preroll_frames  # the models heard the onset's past


@needs_flite
@pytest.mark.parametrize("voice", ["slt", "kal16"])
def test_a_wake_word_over_a_loud_fan_opens_the_gate_relative_to_the_fan(
        voice: str, gated: WakeWordTrigger, ungated: WakeWordTrigger,
        speech_dir: Path) -> None:
    audio = scene(synth.flite("hey jarvis", voice, speech_dir), speech_dbfs=-25.0,
                  noise_dbfs=-35.0, before_s=5.0)
    with_gate, without = listen(gated, audio), listen(ungated, audio)
    assert_same_decision(with_gate, without, voice)
    assert with_gate.gated >= (5.0 - 1.0 - 1.5) / 0.02  # the fan alone did not hold it open


def test_a_noise_burst_opens_the_gate_wakes_nothing_and_the_gate_closes_after_the_hold(
        gated: WakeWordTrigger) -> None:
    rate = synth.RATE_HZ
    burst = np.random.default_rng(5).standard_normal(int(0.3 * rate)) * 0.3  # a slam
    burst *= np.exp(-np.arange(len(burst)) / (0.08 * rate))
    audio = np.concatenate([np.zeros(4 * rate), burst, np.zeros(5 * rate)])
    audio = audio + synth.noise(len(audio) / rate, -60.0)
    heard = listen(gated, audio)
    assert heard.events == []
    assert heard.openings == 1
    assert gated._gate is not None and gated._gate.state is GateState.CLOSED
    hold_frames = gated.settings.gate_hold_ms // 20
    frames = len(audio) // synth.FRAME
    burst_frames = int(0.3 * rate) // synth.FRAME + 2  # its ring-down above the margin
    # closed again after the hold: every frame but the start's hold, the burst and its hold
    assert heard.gated >= frames - 2 * hold_frames - burst_frames


@needs_flite
def test_a_detection_in_the_preroll_keeps_its_frame_and_rewinds_from_the_frame_now(
        gated: WakeWordTrigger, ungated: WakeWordTrigger, speech_dir: Path) -> None:
    """A phrase the gate did not open for (said under the margin), followed within
    the pre-roll by a sound that opens it: the models find the phrase in the pre-roll,
    at its own frame; the event comes on the frame being captured, and its rewind
    reaches back to the phrase's end all the same."""
    audio = scene(synth.flite("hey jarvis what's the time", "rms", speech_dir),
                  speech_dbfs=-25.0, noise_dbfs=-60.0, before_s=4.0)
    without = listen(ungated, audio)
    assert without.detection is not None and without.phrase_end is not None
    opens_at = without.detection + 10  # 200 ms later: inside the 1.5 s pre-roll
    asyncio.run(gated.start(lambda event: None))
    events = []
    for index, frame in enumerate(synth.frames_of(audio)):
        # the levels the gate judges by: the room's, until a loud frame at opens_at
        level = -20.0 if index == opens_at else -60.0
        for event in gated.process(frame, level, -60.0):
            events.append((index, event))
    assert [e for _, e in events] == [START]
    (now, event), = events
    assert isinstance(event, TurnStartRequested)
    assert gated.last_detection_frame_index is not None
    assert gated.last_phrase_end_frame_index is not None
    assert abs(gated.last_detection_frame_index - without.detection) <= SAME_FRAME_WITHIN
    assert abs(gated.last_phrase_end_frame_index - without.phrase_end) <= SAME_FRAME_WITHIN
    assert now >= opens_at > gated.last_detection_frame_index
    assert now + 1 - event.rewind_frames == gated.last_phrase_end_frame_index


@needs_flite
def test_while_speaking_the_gate_works_the_same_and_the_wake_word_interrupts(
        gated: WakeWordTrigger, speech_dir: Path) -> None:
    audio = scene(synth.flite("hey jarvis", "rms", speech_dir), speech_dbfs=-25.0,
                  noise_dbfs=-60.0, before_s=4.0)
    heard = listen(gated, audio, DeviceState.SPEAKING)
    assert [e for _, e in heard.events] == [InterruptRequested("wake"), START]
    assert heard.gated > 0


@needs_flite
def test_muted_nothing_runs_and_unmuted_the_models_start_afresh_with_the_gate_open(
        gated: WakeWordTrigger, speech_dir: Path) -> None:
    audio = scene(synth.flite("hey jarvis", "rms", speech_dir), speech_dbfs=-25.0,
                  noise_dbfs=-60.0, before_s=4.0)
    muted = listen(gated, audio, DeviceState.MUTED)
    assert muted.events == [] and muted.detection is None
    assert muted.gated == 0  # not gated: muted (nothing at all runs)
    gated.set_state(DeviceState.IDLE)
    assert gated._gate is not None and gated._gate.state is GateState.OPEN
    assert gated.frames_processed == len(audio) // synth.FRAME


def test_without_a_gate_the_models_run_on_every_frame(ungated: WakeWordTrigger) -> None:
    heard = listen(ungated, synth.noise(3.0, -60.0))
    assert heard.gated == 0 and heard.openings == 0 and heard.events == []


def test_gate_settings_are_checked() -> None:
    with pytest.raises(SettingError, match="gate_margin_db"):
        WakeSettings(gate_margin_db=-1.0)
    with pytest.raises(SettingError, match="gate_hold_ms"):
        WakeSettings(gate_hold_ms=100)
    with pytest.raises(SettingError, match="gate_preroll_ms"):
        WakeSettings(gate_preroll_ms=10_000)
    assert WakeSettings(gate_margin_db=None).gate_margin_db is None
