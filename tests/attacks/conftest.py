"""Fixtures of the attack suite."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def speech_wav() -> Path:
    from edgevoice.demo import bundled_speech
    return bundled_speech()
