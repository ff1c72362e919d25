"""Real PortAudio devices, on the virtual PulseAudio sound card (scripts/soundcard).

PortAudio scans devices once, when sounddevice is imported, so everything that opens
a device runs in a child interpreter (soundcard_probe.py) started with the card's
environment; this process never imports sounddevice.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgevoice_dev import repository_root
from edgevoice_dev.testing.soundcard import SPEAKER_RATE_HZ, VirtualSoundCard, missing_tools
from edgevoice_dev.testing.speech import synthesize

from edgevoice.audio.wavio import load_wav, write_wav

from ._signals import dominant_hz, from_pcm, level_dbfs, to_pcm, tone

PROBE = Path(__file__).with_name("soundcard_probe.py")

pytestmark = [
    pytest.mark.soundcard,
    pytest.mark.skipif(bool(missing_tools()), reason=f"missing: {missing_tools()}"),
]


@pytest.fixture(scope="module")
def card() -> Iterator[VirtualSoundCard]:
    with VirtualSoundCard() as card:
        yield card


def probe(card: VirtualSoundCard, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(PROBE), *args],
        env=card.environ(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"probe did not start: {line!r} {err}")


def finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def align(reference: np.ndarray, recorded: np.ndarray) -> np.ndarray:
    """The stretch of ``recorded`` that best matches ``reference`` (by correlation)."""
    n = len(reference) + len(recorded)
    spectrum = np.fft.rfft(recorded, n) * np.conj(np.fft.rfft(reference, n))
    lag = int(np.argmax(np.fft.irfft(spectrum, n)))
    segment = recorded[lag : lag + len(reference)]
    assert len(segment) == len(reference), "the recording does not hold the whole reference"
    return segment


def test_portaudio_sees_the_pulse_devices(card: VirtualSoundCard) -> None:
    devices = finish(probe(card, "devices"))["devices"]
    names = {d["name"] for d in devices}
    assert {"pulse", "default"} <= names
    default = next(d for d in devices if d["name"] == "default")
    assert default["default_input"] and default["default_output"]


def test_speech_played_into_the_mic_is_captured_through_sounddevice(
    card: VirtualSoundCard, tmp_path: Path
) -> None:
    speech = synthesize("Turn on the kitchen lights, please.", voice="slt", path=tmp_path / "s.wav")
    proc = probe(card, "capture", "4", str(tmp_path / "captured.raw"))
    wait_ready(proc)
    card.play_into_mic(speech)
    result = finish(proc)
    assert result["plan"]["rate_hz"] == 16_000  # no resampling on the way in
    assert result["stats"]["overflows"] == 0 and result["stats"]["frames_dropped"] == 0
    # PortAudio's callback thread carries a name of its own, not the interpreter's
    assert "edgevoice-mic" in result["threads"], result["threads"]
    reference = from_pcm(load_wav(speech))
    captured = align(reference, from_pcm((tmp_path / "captured.raw").read_bytes()))
    assert np.corrcoef(reference, captured)[0, 1] >= 0.99
    # Bit-exact except for the first few tens of ms of paplay's stream, which PulseAudio
    # delivers as zeros (more of them the longer the capture blocks: ~40 ms at 60 ms).
    exact = np.mean(reference[1600:] == captured[1600:])
    assert exact >= 0.999, f"only {exact:.4f} of the samples after 100 ms are bit-exact"


def test_an_idle_gate_batches_the_quiet_but_cuts_nothing_of_speech(
    card: VirtualSoundCard, tmp_path: Path
) -> None:
    """The real PortAudio callback thread with the daemon's idle gate: while the room
    is quiet the loop is woken per batch, not per block; speech that starts between
    two wake-ups arrives whole, and the gate was armed when its onset began."""
    speech = synthesize("Turn on the kitchen lights, please.", voice="slt", path=tmp_path / "s.wav")
    proc = probe(card, "capture-idle", "5", str(tmp_path / "captured.raw"))
    wait_ready(proc)
    time.sleep(1.5)  # quiet first: the gate arms and batches
    card.play_into_mic(speech)
    result = finish(proc)
    assert result["stats"]["overflows"] == 0 and result["stats"]["frames_dropped"] == 0
    reference = from_pcm(load_wav(speech))
    captured = align(reference, from_pcm((tmp_path / "captured.raw").read_bytes()))
    exact = np.mean(reference[1600:] == captured[1600:])
    assert exact >= 0.999, f"only {exact:.4f} of the samples after 100 ms are bit-exact"
    assert result["onsets_while_armed"][:1] == [True]
    # per block while speech flows, per batch (5 blocks) while quiet
    assert result["wakeups"] < 0.8 * result["blocks"]


def test_the_wake_word_is_heard_through_the_idle_gate_as_without_it(
    card: VirtualSoundCard, tmp_path: Path
) -> None:
    """The real PortAudio callback thread, the idle gate and the wake word (real
    models): while the room is quiet and the wake word's quiet gate closed, quiet
    blocks reach the loop in batches; "hey jarvis" said into the room still wakes it,
    on the very frame a trigger fed every captured frame one by one wakes on (no frame
    lost or reordered by the batching)."""
    from edgevoice.audio.silence import SilenceDetector
    from edgevoice.triggers.wake import WakeSettings, WakeWordTrigger

    pytest.importorskip("pymicro_wakeword")
    rng = np.random.default_rng(7)
    room = rng.standard_normal(16_000 * 20) * (32768 * 10 ** (-60 / 20))  # a quiet room
    write_wav(tmp_path / "room.wav", to_pcm(room), 16_000)
    phrase = synthesize("hey jarvis, what time is it", voice="slt", path=tmp_path / "s.wav")
    room_player = card.play_into_mic(tmp_path / "room.wav", wait=False)
    try:
        proc = probe(card, "capture-wake", "8", str(tmp_path / "captured.raw"))
        wait_ready(proc)
        time.sleep(3.0)  # the wake word's gate closes after its hold: batching
        card.play_into_mic(phrase)  # said into the room (the sound server mixes them)
        result = finish(proc)
    finally:
        room_player.terminate()
        room_player.wait(10)
    assert result["stats"]["overflows"] == 0 and result["stats"]["frames_dropped"] == 0
    assert len(result["detections"]) == 1, result["detections"]
    # the gate was batching when the phrase began, and fewer wake-ups than blocks
    assert result["openings_while_armed"][-1:] == [True] and result["armed_frames"] > 100
    assert result["wakeups"] < 0.8 * result["blocks"]
    # the same frames, one by one and never batched: the same detection frame
    captured = (tmp_path / "captured.raw").read_bytes()
    detector, trigger = SilenceDetector(), WakeWordTrigger(WakeSettings())
    try:
        replayed = []
        for index in range(len(captured) // 640):
            frame = captured[index * 640:(index + 1) * 640]
            detector.process(frame)
            if trigger.process(frame, detector.level_dbfs, detector.noise_floor_dbfs):
                replayed.append(index)
    finally:
        trigger.close()
    assert replayed == result["detections"]


def test_a_recording_is_connected_when_start_recording_returns(card: VirtualSoundCard) -> None:
    """A sound played right after start_recording() is heard from its first sample: the
    recording's stream is connected before it returns (a loaded host once connected
    parec 1 s late and a test heard 13 ms of a one-second tone)."""
    recording = card.start_recording()
    heard = recording.stop()
    assert len(heard) > 0 and not any(heard)  # the idle speaker's silence, already flowing


def test_both_sinks_run_at_a_sound_cards_latency_not_seconds(card: VirtualSoundCard) -> None:
    """A null sink takes its latency from its streams. The keep-alive streams keep it
    at 10 ms, as a real card's small fixed buffers would, and the card starts with nothing
    rendered ahead: left at PulseAudio's default (~2 s), a new 44.1 kHz stream was
    sometimes pulled a second ahead at CPU speed, and most of what it played never
    reached the speaker (CI heard 16 ms of a 1 s tone)."""
    out = subprocess.run(["pactl", "list", "sinks"], env=card.environ(), capture_output=True,
                         text=True, check=True).stdout
    latencies = {}
    for block in out.split("Sink #")[1:]:
        name = re.search(r"Name: (\S+)", block)
        latency = re.search(r"Latency: (\d+) usec, configured (\d+) usec", block)
        assert name and latency, block
        latencies[name.group(1)] = (int(latency.group(1)), int(latency.group(2)))
    assert set(latencies) == {"spk", "micfeed"}
    # rendered ahead now, and asked for: neither near PulseAudio's default of seconds
    assert all(now <= 100_000 and asked <= 10_000 for now, asked in latencies.values()), latencies


def test_a_card_whose_keep_alive_streams_die_fails_to_start_and_says_why(tmp_path: Path) -> None:
    """Without its keep-alive streams a sink never settles at a card's latency: the
    card must not come up half-working (and silently lossy) but fail, naming why."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_pacat = bin_dir / "pacat"
    fake_pacat.write_text("#!/bin/sh\nexit 1\n")
    fake_pacat.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)}
    script = str(repository_root() / "scripts" / "soundcard")
    card_dir = str(tmp_path / "card")
    try:
        started = subprocess.run([script, "start", card_dir], env=env, capture_output=True,
                                 text=True, timeout=60)
        assert started.returncode == 1, started
        assert "keep-alive stream" in started.stderr and "exited" in started.stderr
        status = subprocess.run([script, "status", card_dir], env=env, capture_output=True)
        assert status.returncode == 3  # stopped again: nothing left running
    finally:
        subprocess.run([script, "stop", card_dir], env=env, capture_output=True, timeout=60)


@pytest.mark.parametrize("rate_hz", [None, 44_100])
def test_a_tone_played_through_the_sink_reaches_the_speaker(
    card: VirtualSoundCard, tmp_path: Path, rate_hz: int | None
) -> None:
    wav = tmp_path / "tone.wav"
    write_wav(wav, to_pcm(tone(1000.0, -10.0, 48_000, rate_hz=48_000)), 48_000)
    recording = card.start_recording()
    result = finish(probe(card, "play", str(wav), *([str(rate_hz)] if rate_hz else [])))
    heard = from_pcm(recording.stop())
    assert result["underruns"] == 0 and result["callbacks_alive"]
    assert "edgevoice-play" in result["threads"], result["threads"]
    # unconfigured, the speaker runs at 48 kHz, not the pulse device's default 44.1 kHz;
    # at 44.1 kHz (a device that takes nothing else) it goes through resamplers, as whole
    assert result["rate_hz"] == (rate_hz or 48_000)
    loud = heard[np.abs(heard) > 1000]
    assert len(loud) > 0.8 * SPEAKER_RATE_HZ  # most of the second arrived
    start = int(np.argmax(np.abs(heard) > 1000))
    steady = heard[start + 4800 : start + 4800 + 24_000]  # 0.5 s inside the tone
    assert abs(dominant_hz(steady, SPEAKER_RATE_HZ) - 1000.0) < 3
    assert abs(level_dbfs(steady) - (-10.0)) < 1.0


def test_a_speaker_with_40_ms_blocks_plays_everything_in_blocks_of_that_size(
    card: VirtualSoundCard, tmp_path: Path
) -> None:
    """audio.speaker_block_ms: 40 (half the wake-ups of PortAudio and the sound server)
    plays the same sound, whole, at 1920 samples a callback."""
    wav = tmp_path / "tone.wav"
    write_wav(wav, to_pcm(tone(1000.0, -10.0, 48_000, rate_hz=48_000)), 48_000)
    recording = card.start_recording()
    result = finish(probe(card, "play", str(wav), "48000", "40"))
    heard = from_pcm(recording.stop())
    assert result["underruns"] == 0 and result["played_samples"] == 48_000, result
    assert result["block_samples"] == [1920], result["block_samples"]
    assert len(heard[np.abs(heard) > 1000]) > 0.8 * SPEAKER_RATE_HZ


def test_an_idle_sink_parks_its_stream_and_wakes_for_the_next_sound(
    card: VirtualSoundCard, tmp_path: Path
) -> None:
    wav = tmp_path / "beep.wav"
    write_wav(wav, to_pcm(tone(1000.0, -10.0, 14_400, rate_hz=48_000)), 48_000)  # 0.3 s
    result = finish(probe(card, "park", str(wav)))
    # parked before the first beep, woken for it, parked, woken for the second, parked
    assert result["parks"] == 3 and result["wakes"] == 2, result
    assert result["states"] == [False, True, False, True]
    assert not result["callbacks_while_parked"]  # a parked sink costs no callbacks at all
    # Every sample of both beeps was handed to the device, none late. (What the speaker
    # made of it is not checked here: parec loses varying stretches of the null sink's
    # output, more so around streams that come and go.)
    assert result["played_samples"] == 2 * result["beep_samples"] and result["underruns"] == 0


def test_a_vanished_device_surfaces_as_audio_device_error(tmp_path: Path) -> None:
    with VirtualSoundCard() as own_card:  # this test kills its card
        proc = probe(own_card, "unplug")
        wait_ready(proc)
        own_card.stop()  # the sound server (and with it every device) goes away
        result = finish(proc)
    assert result["error"] == "AudioDeviceError", result
