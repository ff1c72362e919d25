"""One level for every consumer: edgevoice.audio.level, and the pieces that use it."""

from __future__ import annotations

import numpy as np
import pytest

from edgevoice.audio.level import SILENCE_DBFS, mean_square, pcm_dbfs, to_dbfs
from edgevoice.audio.playback import PlaybackBuffer
from edgevoice.audio.silence import SilenceDetector
from edgevoice.triggers.bargein import VoiceBargeInTrigger

from ._signals import tone


def test_the_convention_square_zero_sine_minus_three_silence_floor() -> None:
    square = np.array([32767, -32768] * 160, dtype=np.int16)
    assert pcm_dbfs(square) == pytest.approx(0.0, abs=0.001)
    sine = np.round(32767 * np.sin(2 * np.pi * 1000 * np.arange(320) / 16_000)).astype(np.int16)
    assert pcm_dbfs(sine) == pytest.approx(-3.01, abs=0.01)
    assert pcm_dbfs(np.round(tone(440.0, -30.0, 320)).astype(np.int16)) == pytest.approx(
        -30.0, abs=0.1)
    assert pcm_dbfs(bytes(640)) == SILENCE_DBFS
    assert pcm_dbfs(b"") == SILENCE_DBFS
    assert pcm_dbfs(np.array([1], dtype=np.int16)) == pytest.approx(-90.31, abs=0.01)
    assert to_dbfs(1e-12) == SILENCE_DBFS and to_dbfs(0.0) == SILENCE_DBFS


def test_bytes_and_arrays_give_the_same_level() -> None:
    rng = np.random.default_rng(4)
    samples = (rng.standard_normal(320) * 1000).astype(np.int16)
    assert pcm_dbfs(samples) == pcm_dbfs(samples.tobytes()) == pcm_dbfs(
        memoryview(samples.tobytes()))
    expected = float(np.mean(samples.astype(np.float64) ** 2)) / 32768.0**2
    assert mean_square(samples) == pytest.approx(expected, rel=1e-12)


def test_detector_barge_in_and_playback_measure_a_frame_alike() -> None:
    """The three consumers share the helper: the same block reads the same level."""
    rng = np.random.default_rng(5)
    frame = (rng.standard_normal(320) * 2000).astype(np.int16)
    detector = SilenceDetector()
    detector.process(frame.tobytes())
    buffer = PlaybackBuffer(16_000, prefill_ms=0)
    buffer.push(frame.tobytes())
    buffer.pull(320)
    trigger = VoiceBargeInTrigger()
    trigger.on_playback(frame.tobytes(), now=0.0)
    level = pcm_dbfs(frame)
    assert detector.level_dbfs == buffer.last_block_dbfs == level
    assert trigger.guard.playback_dbfs(0.0) == level
