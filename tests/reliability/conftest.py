"""Fixtures of the reliability suite (resume, faults, bad input)."""

from __future__ import annotations

from pathlib import Path

import pytest
from reliability_support import write_voice_like


@pytest.fixture
def voice_wav(tmp_path: Path) -> Path:
    """0.6 s of quiet, then 3 s of one unbroken 'utterance'."""
    return write_voice_like(tmp_path / "voice.wav")


@pytest.fixture
def long_voice_wav(tmp_path: Path) -> Path:
    """0.6 s of quiet, then 6 s of one unbroken 'utterance'."""
    return write_voice_like(tmp_path / "long-voice.wav", voiced_ms=6000)


@pytest.fixture
def speech_wav() -> Path:
    from edgevoice.demo import bundled_speech
    return bundled_speech()
