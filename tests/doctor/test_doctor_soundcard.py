"""The doctor's audio checks against the virtual sound card (real PortAudio devices)."""

from __future__ import annotations

import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from doctor_support import TIMEOUT_FACTOR

from edgevoice.doctor import TONE_DBFS, TONE_HZ

soundcard = pytest.importorskip("edgevoice_dev.testing.soundcard")

pytestmark = [
    pytest.mark.soundcard,
    pytest.mark.skipif(
        bool(soundcard.missing_tools()),
        reason=f"no virtual sound card: {soundcard.missing_tools()}",
    ),
]

MIC_TONE_DBFS = -20.0

# PortAudio lists devices when sounddevice is imported, so the checks run in a fresh
# interpreter that starts with the card's environment.
RUN_CHECKS = """
import json
from edgevoice.doctor import DoctorEnv, check_microphone, check_sound_devices, check_speaker
env = DoctorEnv()
results = {
    "devices": check_sound_devices(env),
    "microphone": check_microphone("default", env),
    "speaker": check_speaker("pulse", env),
}
print(json.dumps({k: [r.status.value, r.detail] for k, r in results.items()}))
"""


def write_mic_feed(path: Path) -> None:
    """10 s of a 1 kHz tone at -20 dBFS peak, switching on and off every 0.5 s: any
    3 s the doctor records holds both the tone and digital silence."""
    rate = soundcard.MIC_RATE_HZ
    n = np.arange(rate * 10)
    on = (n // (rate // 2)) % 2 == 0
    samples = 32768 * 10 ** (MIC_TONE_DBFS / 20) * np.sin(2 * np.pi * 1000 * n / rate) * on
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.astype("<i2").tobytes())


def test_audio_checks_hear_the_mic_and_reach_the_speaker(tmp_path: Path) -> None:
    feed = tmp_path / "mic.wav"
    write_mic_feed(feed)
    with soundcard.VirtualSoundCard() as card:
        player = card.play_into_mic(feed, wait=False)
        recording = card.start_recording()
        try:
            done = subprocess.run(
                [sys.executable, "-c", RUN_CHECKS],
                env=card.environ(),
                capture_output=True,
                text=True,
                timeout=60 * TIMEOUT_FACTOR,
            )
        finally:
            heard = np.frombuffer(recording.stop(), dtype="<i2").astype(np.float64)
            player.terminate()
            player.wait(timeout=10)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)

    status, detail = results["devices"]
    assert status == "OK" and "'pulse' (in/out" in detail

    status, detail = results["microphone"]
    assert status == "OK", detail
    peak = float(detail.split("peak ")[1].split(" dBFS")[0])
    assert peak == pytest.approx(MIC_TONE_DBFS, abs=1.0)
    assert "noise floor -100.0 dBFS" in detail  # the gaps are digital silence

    status, detail = results["speaker"]
    assert status == "OK", detail
    # What reached the speaker is the promised beep.
    assert heard.size > 0
    assert 20 * np.log10(np.max(np.abs(heard)) / 32768) == pytest.approx(TONE_DBFS, abs=1.0)
    spectrum = np.abs(np.fft.rfft(heard))
    loudest_hz = np.argmax(spectrum) * soundcard.SPEAKER_RATE_HZ / heard.size
    assert loudest_hz == pytest.approx(TONE_HZ, abs=5)
