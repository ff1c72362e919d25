"""Feedback people can shape: earcons from WAV files, the thinking sound, the volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgevoice.audio.wavio import write_wav
from edgevoice.config.loader import load_text
from edgevoice.config.model import DeviceConfig
from edgevoice.errors import ConfigError
from edgevoice.feedback.earcons import Earcon, Earcons
from edgevoice.feedback.settings import EARCON_NAMES


def chirp_wav(path: Path, rate_hz: int, seconds: float = 0.3) -> Path:
    t = np.arange(int(rate_hz * seconds)) / rate_hz
    x = 0.2 * np.sin(2 * np.pi * (300 + 1000 * t) * t)
    write_wav(path, np.round(x * 32767).astype("<i2").tobytes(), rate_hz)
    return path


def test_a_wav_file_replaces_an_earcon_at_the_output_rate_and_volume(tmp_path: Path) -> None:
    wav = chirp_wav(tmp_path / "ding.wav", 22_050)
    earcons = Earcons(48_000, 0.4, {"listen_start": str(wav)})
    pcm = np.frombuffer(earcons.pcm(Earcon.LISTEN_START), "<i2") / 32767
    assert len(pcm) == pytest.approx(0.3 * 48_000, abs=48)  # resampled, same length
    assert np.max(np.abs(pcm)) == pytest.approx(0.4, abs=0.002)  # peak = earcon volume
    # the others are still synthesised
    assert earcons.pcm(Earcon.ERROR) == Earcons(48_000, 0.4).pcm(Earcon.ERROR)


def test_every_earcon_can_be_replaced() -> None:
    assert set(EARCON_NAMES) == {e.value for e in Earcon}


@pytest.mark.parametrize(("files", "reason"), [
    ("{beep: /x.wav}", "feedback.earcon_files.beep: is not an earcon"),
    ("{error: /x.mp3}", "feedback.earcon_files.error: must be the path of a .wav file"),
    ("{error: /nonexistent/x.wav}",
     "feedback.earcon_files.error: /nonexistent/x.wav does not exist"),
])
def test_bad_earcon_files_are_refused_with_file_key_reason(files: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(f"feedback: {{earcon_files: {files}}}", DeviceConfig, "device.yaml")
    assert str(info.value).startswith(f"device.yaml: {reason}")


def test_config_accepts_a_real_wav_and_the_volume(tmp_path: Path) -> None:
    wav = chirp_wav(tmp_path / "bye.wav", 16_000)
    config = load_text(f"feedback: {{earcon_files: {{listen_end: {wav}}}, output_volume: 0.3,"
                       " thinking_sound: true}", DeviceConfig, "device.yaml")
    assert config.feedback.earcon_files == {"listen_end": str(wav)}
    assert config.feedback.output_volume == 0.3 and config.feedback.thinking_sound


@pytest.mark.parametrize("volume", [-0.1, 1.5])
def test_output_volume_range(volume: float) -> None:
    with pytest.raises(ConfigError, match=r"feedback\.output_volume"):
        load_text(f"feedback: {{output_volume: {volume}}}", DeviceConfig, "device.yaml")


def test_thinking_and_follow_up_sounds_are_short_and_quiet_enough_to_repeat() -> None:
    earcons = Earcons(24_000, 0.5)
    assert earcons.duration_ms(Earcon.THINKING) < 400
    assert earcons.duration_ms(Earcon.FOLLOW_UP) < 300
