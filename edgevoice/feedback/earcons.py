"""Earcons: the short sounds that tell the user what the device is doing.

They are synthesised here, from a few notes each, rather than shipped as audio files:
no licensing question, any output rate without resampling, and the volume is exact.
Every note starts and ends with a short raised-cosine fade, because a tone that starts
or stops at a non-zero sample is heard as a click. Any of them can be replaced by a
WAV file (``feedback.earcon_files``): it is converted to the output rate and scaled
so its peak is the earcon volume, like the synthesised ones.

=============  ======================================  =============================
earcon         sound                                   when
=============  ======================================  =============================
LISTEN_START   two rising notes (E5 then A5)           a turn opened (wake, button)
LISTEN_END     the same two notes, falling             the user's turn ended
ERROR          a low buzz (200 Hz, odd harmonics)      a turn failed
OFFLINE        three low beeps (E4)                    a turn was asked while offline
FOLLOW_UP      one high note (D6)                      the follow-up window opened
THINKING       two soft short notes (C5), repeated     waiting for the reply (optional)
=============  ======================================  =============================
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

#: Length of the fade at both ends of every note. Long enough to avoid clicks (a few
#: periods of the lowest note), short enough to keep the attack crisp.
FADE_MS = 6.0

_Samples = npt.NDArray[np.float64]


class Earcon(enum.Enum):
    """The sounds the device can make on its own."""

    LISTEN_START = "listen_start"
    LISTEN_END = "listen_end"
    ERROR = "error"
    OFFLINE = "offline"
    FOLLOW_UP = "follow_up"
    THINKING = "thinking"


@dataclass(frozen=True)
class _Note:
    frequency_hz: float
    duration_ms: float
    #: harmonic number -> relative amplitude
    partials: tuple[tuple[int, float], ...] = ((1, 1.0),)
    #: silence after the note
    gap_ms: float = 0.0


# A soft timbre: the fundamental with a little second harmonic, so low notes are still
# heard on small speakers that cannot reproduce 330 Hz well.
_SOFT = ((1, 1.0), (2, 0.3))
# The buzz: odd harmonics falling as 1/n, a band-limited square wave that reads as
# "wrong" without being harsh.
_BUZZ = tuple((n, 1.0 / n) for n in range(1, 20, 2))

_SCORES: dict[Earcon, tuple[_Note, ...]] = {
    Earcon.LISTEN_START: (_Note(659.3, 90, gap_ms=15), _Note(880.0, 120)),
    Earcon.LISTEN_END: (_Note(880.0, 90, gap_ms=15), _Note(659.3, 120)),
    Earcon.ERROR: (_Note(200.0, 350, _BUZZ),),
    Earcon.OFFLINE: (
        _Note(329.6, 110, _SOFT, gap_ms=90),
        _Note(329.6, 110, _SOFT, gap_ms=90),
        _Note(329.6, 110, _SOFT),
    ),
    Earcon.FOLLOW_UP: (_Note(1174.7, 150, gap_ms=30),),
    # quiet enough to sit under a wait, short enough to repeat every ~1.5 s
    Earcon.THINKING: (_Note(523.3, 70, _SOFT, gap_ms=110), _Note(523.3, 70, _SOFT)),
}


class Earcons:
    """Renders each :class:`Earcon` as s16le mono PCM at ``rate_hz``, once, then caches it.

    ``volume`` is the peak amplitude as a fraction of full scale (0..1). ``files`` maps
    earcon names (``"listen_start"``...) to WAV files that replace the synthesised
    sound; they are read here, so a broken file fails at start-up.
    """

    def __init__(self, rate_hz: int, volume: float = 0.5,
                 files: Mapping[str, str] | None = None) -> None:
        if not 8000 <= rate_hz <= 192_000:
            raise ValueError(f"rate_hz must be in [8000, 192000], got {rate_hz}")
        if not 0.0 <= volume <= 1.0:
            raise ValueError(f"volume must be in [0, 1], got {volume}")
        self.rate_hz = rate_hz
        self.volume = volume
        self._cache: dict[Earcon, bytes] = {}
        for name, path in (files or {}).items():
            self._cache[Earcon(name)] = self._load(path)
            logger.info("earcon %s from %s", name, path)

    def _load(self, path: str) -> bytes:
        from edgevoice.audio.wavio import load_wav  # soxr only when a file is used

        signal = np.frombuffer(load_wav(path, self.rate_hz), dtype="<i2").astype(np.float64)
        peak = float(np.max(np.abs(signal))) if len(signal) else 0.0
        if peak > 0.0:
            signal *= self.volume * 32767.0 / peak
        return np.round(signal).astype("<i2").tobytes()

    def pcm(self, earcon: Earcon) -> bytes:
        """The earcon as 16-bit signed little-endian mono PCM."""
        cached = self._cache.get(earcon)
        if cached is None:
            cached = self._render(earcon)
            self._cache[earcon] = cached
            logger.debug("rendered earcon %s: %d bytes", earcon.value, len(cached))
        return cached

    def duration_ms(self, earcon: Earcon) -> float:
        return len(self.pcm(earcon)) / 2 / self.rate_hz * 1000.0

    def _render(self, earcon: Earcon) -> bytes:
        parts: list[_Samples] = []
        for note in _SCORES[earcon]:
            parts.append(self._note(note))
            parts.append(np.zeros(self._samples(note.gap_ms)))
        signal = np.concatenate(parts)
        peak = float(np.max(np.abs(signal)))
        if peak > 0.0:
            # 32767, not 32768: the positive half of int16 is one step shorter.
            signal *= self.volume * 32767.0 / peak
        return np.round(signal).astype("<i2").tobytes()

    def _note(self, note: _Note) -> _Samples:
        n = self._samples(note.duration_ms)
        t = np.arange(n) / self.rate_hz
        nyquist = self.rate_hz / 2
        wave = np.zeros(n)
        for harmonic, amplitude in note.partials:
            # Partials above Nyquist would alias into audible, unrelated tones.
            if harmonic * note.frequency_hz < nyquist * 0.9:
                wave += amplitude * np.sin(2 * math.pi * harmonic * note.frequency_hz * t)
        fade = min(self._samples(FADE_MS), n // 2)
        if fade > 0:
            ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)
            wave[:fade] *= ramp
            wave[n - fade :] *= ramp[::-1]
        return wave

    def _samples(self, ms: float) -> int:
        return round(ms * self.rate_hz / 1000.0)
