"""The wake-word trigger on speech synthesised by flite while the tests run."""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import speech_synth as synth

from edgevoice.config.base import SettingError
from edgevoice.feedback.states import DeviceState
from edgevoice.triggers.base import (
    AudioTrigger,
    InterruptRequested,
    TriggerEvent,
    TriggerUnavailableError,
    TurnStartRequested,
)
from edgevoice.triggers.wake import (
    WakeSettings,
    WakeUplinkBuffer,
    WakeWordTrigger,
    frames_after_detection,
)

pytest.importorskip("pymicro_wakeword")

needs_flite = pytest.mark.skipif(not synth.flite_available(), reason="flite is not installed")

PAD_S = 1.0
START = TurnStartRequested("wake")

# slt, rms, awb, kal16 speak at 16 kHz; kal at 8 kHz (resampled, a harder case).
VOICES = ("slt", "rms", "awb", "kal16", "kal")
NEGATIVES = (
    "hey travis, what's up",
    "good morning",
    "turn on the lights",
    "what's the weather like today",
    "hey jasmine, play some jazz",
    "set a timer for ten minutes",
)


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("flite")


@pytest.fixture(scope="module")
def jarvis() -> Iterator[WakeWordTrigger]:
    trigger = WakeWordTrigger(WakeSettings(models=("hey_jarvis",)))
    yield trigger
    trigger.close()


@pytest.fixture(scope="module")
def nabu() -> Iterator[WakeWordTrigger]:
    trigger = WakeWordTrigger(WakeSettings(models=("okay_nabu",)))
    yield trigger
    trigger.close()


def padded(signal: synth.Signal) -> synth.Signal:
    """``signal`` with a second of quiet room noise before and after it."""
    quiet = np.zeros(int(PAD_S * synth.RATE_HZ))
    body = np.concatenate([quiet, signal, quiet])
    return body + synth.noise(len(body) / synth.RATE_HZ, -70.0)


def feed(
    trigger: WakeWordTrigger, signal: synth.Signal, state: DeviceState = DeviceState.IDLE
) -> list[tuple[int, TriggerEvent]]:
    """Restart ``trigger`` and feed it ``signal``; return (frame index, event) pairs."""
    asyncio.run(trigger.start(lambda event: None))
    trigger.set_state(state)
    out: list[tuple[int, TriggerEvent]] = []
    for index, frame in enumerate(synth.frames_of(signal)):
        out.extend((index, event) for event in trigger.process(frame))
    return out


def test_is_an_audio_trigger(jarvis: WakeWordTrigger) -> None:
    assert isinstance(jarvis, AudioTrigger)
    assert jarvis.wake_word == "Hey Jarvis"
    assert jarvis.probability_cutoff == pytest.approx(0.8)  # measured, not the 0.97 shipped


@needs_flite
@pytest.mark.parametrize(
    ("model", "wake_text", "rest_text"),
    [
        ("hey_jarvis", "hey jarvis", "what time is it"),
        ("okay_nabu", "okay nabu", "turn on the lights"),
    ],
)
def test_wake_phrases_are_detected_within_a_second_of_their_end(
    model: str,
    wake_text: str,
    rest_text: str,
    jarvis: WakeWordTrigger,
    nabu: WakeWordTrigger,
    speech_dir: Path,
) -> None:
    trigger = jarvis if model == "hey_jarvis" else nabu
    detected = []
    for voice in VOICES:
        phrase = synth.flite(f"{wake_text}, {rest_text}", voice, speech_dir)
        # Where the wake phrase ends inside the sentence: flite speaks the same words
        # the same way alone, so the end of the phrase said alone marks it.
        wake_end_s = PAD_S + synth.speech_end_s(synth.flite(wake_text, voice, speech_dir))
        events = feed(trigger, padded(phrase))
        starts = [index for index, event in events if event == START]
        assert len(starts) <= 1, f"{voice}: one phrase woke the device {len(starts)} times"
        if starts:
            heard_at_s = (starts[0] + 1) * synth.FRAME / synth.RATE_HZ
            assert PAD_S < heard_at_s <= wake_end_s + 1.0, f"{voice}: woke at {heard_at_s:.2f} s"
            assert trigger.last_detection_frame_index == starts[0]
            detected.append(voice)
    assert len(detected) >= 4, f"{model} detected only for {detected}"


# flite's slt voice says "hey travis" so much like "hey jarvis" that the model's mean
# probability reaches 0.969-0.980 once any room noise is added (0.949 on digital
# silence), against its own cutoff of 0.97: a genuine near-rhyme weakness of the model,
# kept visible here instead of being tuned away.
_NEAR_RHYME = pytest.mark.xfail(
    reason="hey_jarvis model: slt 'hey travis' peaks at ~0.97-0.98, the model's cutoff",
    strict=False,
)


@needs_flite
@pytest.mark.parametrize("model", ["hey_jarvis", "okay_nabu"])
@pytest.mark.parametrize(
    "voice",
    [pytest.param(voice, id=voice) for voice in VOICES],
)
@pytest.mark.parametrize("text", NEGATIVES)
def test_other_phrases_never_wake(
    model: str,
    voice: str,
    text: str,
    jarvis: WakeWordTrigger,
    nabu: WakeWordTrigger,
    speech_dir: Path,
    request: pytest.FixtureRequest,
) -> None:
    if (model, voice, text) == ("hey_jarvis", "slt", NEGATIVES[0]):
        request.applymarker(_NEAR_RHYME)
    trigger = jarvis if model == "hey_jarvis" else nabu
    assert feed(trigger, padded(synth.flite(text, voice, speech_dir))) == []


@needs_flite
def test_one_long_stream_of_other_speech_never_wakes(
    jarvis: WakeWordTrigger, speech_dir: Path
) -> None:
    parts = [synth.flite(text, "rms", speech_dir) for text in NEGATIVES * 2]
    stream = padded(np.concatenate(parts))
    assert feed(jarvis, stream) == []
    assert jarvis.detections == 0


@needs_flite
def test_state_decides_what_a_detection_means(jarvis: WakeWordTrigger, speech_dir: Path) -> None:
    wake = padded(synth.flite("hey jarvis", "rms", speech_dir))
    assert [e for _, e in feed(jarvis, wake, DeviceState.IDLE)] == [START]
    assert [e for _, e in feed(jarvis, wake, DeviceState.SPEAKING)] == [
        InterruptRequested("wake"),
        START,
    ]
    assert [e for _, e in feed(jarvis, wake, DeviceState.THINKING)] == [
        InterruptRequested("wake"),
        START,
    ]
    assert feed(jarvis, wake, DeviceState.LISTENING) == []
    assert jarvis.detections == 1  # heard, but a turn is already open
    assert feed(jarvis, wake, DeviceState.MUTED) == []
    assert jarvis.detections == 0  # muted: the model did not even run


@needs_flite
def test_refractory_period_merges_close_detections(speech_dir: Path) -> None:
    wake = synth.flite("hey jarvis", "slt", speech_dir)
    gap = np.zeros(int(0.3 * synth.RATE_HZ))
    twice = padded(np.concatenate([wake, gap, wake]))
    strict = WakeWordTrigger(WakeSettings(models=("hey_jarvis",), refractory_ms=5000))
    relaxed = WakeWordTrigger(WakeSettings(models=("hey_jarvis",), refractory_ms=500))
    try:
        assert len(feed(strict, twice)) == 1
        assert len(feed(relaxed, twice)) == 2
    finally:
        strict.close()
        relaxed.close()


@needs_flite
def test_probability_cutoff_override(speech_dir: Path) -> None:
    deaf = WakeWordTrigger(WakeSettings(models=("hey_jarvis",),
                                        probability_cutoffs={"hey_jarvis": 0.999}))
    try:
        assert deaf.probability_cutoff == pytest.approx(0.999)
        assert feed(deaf, padded(synth.flite("hey jarvis", "slt", speech_dir))) == []
    finally:
        deaf.close()


def test_custom_model_by_path(tmp_path: Path) -> None:
    import pymicro_wakeword

    models = Path(pymicro_wakeword.__file__).parent / "models"
    for name in ("okay_nabu.json", "okay_nabu.tflite"):
        shutil.copy(models / name, tmp_path / name)
    for path in (tmp_path / "okay_nabu.json", tmp_path / "okay_nabu.tflite"):
        trigger = WakeWordTrigger(WakeSettings(models=(str(path),)))
        assert trigger.wake_word == "Okay Nabu"
        trigger.close()


def test_missing_custom_model_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(TriggerUnavailableError, match="does not exist"):
        WakeWordTrigger(WakeSettings(models=(str(tmp_path / "mine.tflite"),)))


def test_missing_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pymicro_wakeword", None)
    with pytest.raises(TriggerUnavailableError, match=r"edgevoice\[wake\]"):
        WakeWordTrigger(WakeSettings())


def test_settings_are_checked() -> None:
    with pytest.raises(SettingError, match="models"):
        WakeSettings(models=("hey_siri",))
    with pytest.raises(SettingError, match="models"):
        WakeSettings(models=())
    with pytest.raises(SettingError, match=r"probability_cutoffs\.okay_nabu"):
        WakeSettings(probability_cutoffs={"okay_nabu": 1.5})
    with pytest.raises(SettingError, match=r"probability_cutoffs\.alexa.*not one of the models"):
        WakeSettings(probability_cutoffs={"alexa": 0.5})
    with pytest.raises(SettingError, match="refractory_ms"):
        WakeSettings(refractory_ms=-1)


def test_frames_must_be_whole_20_ms_frames(jarvis: WakeWordTrigger) -> None:
    with pytest.raises(ValueError, match="640"):
        jarvis.process(b"\0" * 320)


def test_frames_after_detection_drops_the_wake_word() -> None:
    frames = [bytes([i]) * 640 for i in range(10)]  # frames 90..99
    assert frames_after_detection(frames, 99, 96) == frames[7:]
    assert frames_after_detection(frames, 99, 99) == []
    assert frames_after_detection(frames, 99, 80) == frames  # all came after it


# -- several models, custom files, and where the question starts ----------------------


def test_several_models_at_once_each_with_its_own_cutoff() -> None:
    trigger = WakeWordTrigger(WakeSettings(models=("hey_jarvis", "alexa"),
                                           probability_cutoffs={"alexa": 0.7}))
    try:
        assert trigger.wake_words == {"hey_jarvis": "Hey Jarvis", "alexa": "Alexa"}
        assert trigger.probability_cutoffs == {"hey_jarvis": 0.8, "alexa": 0.7}
    finally:
        trigger.close()


@needs_flite
def test_either_model_wakes_and_the_trigger_says_which(speech_dir: Path) -> None:
    trigger = WakeWordTrigger(WakeSettings(models=("alexa", "hey_jarvis")))
    try:
        events = feed(trigger, padded(synth.flite("hey jarvis", "rms", speech_dir)))
        assert [e for _, e in events] == [START]
        assert trigger.last_model == "hey_jarvis"
    finally:
        trigger.close()


def test_a_bare_tflite_loads_by_path(tmp_path: Path) -> None:
    import pymicro_wakeword

    models = Path(pymicro_wakeword.__file__).parent / "models"
    shutil.copy(models / "hey_jarvis.tflite", tmp_path / "kitchen_helper.tflite")
    path = str(tmp_path / "kitchen_helper.tflite")
    trigger = WakeWordTrigger(WakeSettings(models=(path,), probability_cutoffs={path: 0.75}))
    try:
        assert trigger.wake_word == "Kitchen Helper"
        assert trigger.probability_cutoff == 0.75
    finally:
        trigger.close()


@needs_flite
@pytest.mark.parametrize("voice", ["slt", "rms", "awb"])
def test_phrase_end_estimate_falls_between_phrase_and_detection(
        voice: str, speech_dir: Path, tmp_path: Path) -> None:
    """In one breath, the uplink must start before the detection, near the phrase end."""
    import re
    import subprocess

    text = "hey jarvis what's the weather"
    wav = tmp_path / "breath.wav"
    out = subprocess.run(["flite", "-voice", voice, "-psdur", "-t", text, "-o", str(wav)],
                         capture_output=True, text=True, check=True).stdout
    spoken = [float(end) for name, end in re.findall(r"(\S+?):([\d.]+)", out) if name != "pau"]
    phrase_end_s = PAD_S + spoken[7]  # hh ey jh aa r v ih s: the 8th segment
    trigger = WakeWordTrigger(WakeSettings(models=("hey_jarvis",),
                                           probability_cutoffs={"hey_jarvis": 0.5}))
    try:
        events = feed(trigger, padded(synth.flite(text, voice, speech_dir)))
        if not events:
            pytest.skip(f"{voice} said it in one breath too fast to be recognised")
        detected = trigger.last_detection_frame_index
        estimate = trigger.last_phrase_end_frame_index
        assert detected is not None and estimate is not None
        assert estimate <= detected
        error_ms = (estimate * 20) - phrase_end_s * 1000
        assert -250 <= error_ms <= 150, error_ms
    finally:
        trigger.close()


def test_uplink_buffer_gives_the_frames_since_an_index_and_stays_bounded() -> None:
    buffer = WakeUplinkBuffer(max_frames=5)
    for i in range(10):
        buffer.push(i, bytes([i]) * 640)
    assert buffer.since(7) == tuple(bytes([i]) * 640 for i in (7, 8, 9))
    assert buffer.since(0) == tuple(bytes([i]) * 640 for i in range(5, 10))  # bounded
    assert buffer.since(10) == ()
    buffer.clear()
    assert buffer.since(0) == ()
