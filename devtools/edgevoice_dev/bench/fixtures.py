"""The speech every benchmark speaks: spoken phrases separated by pauses.

Phrases are synthesised with ``flite`` (four voices, in turn) when it is installed,
otherwise the speech WAV bundled with the package is repeated. Each phrase is
trimmed of its own leading and trailing silence, the pauses are drawn from a seeded
generator, and a faint noise (about -65 dBFS, a quiet room) runs under everything so
the silence detector sees a realistic floor. About 70 % of the result is speech.
"""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevoice.audio.base import CAPTURE_FRAME_SAMPLES, CAPTURE_RATE_HZ
from edgevoice.audio.wavio import load_wav, write_wav

logger = logging.getLogger(__name__)

PHRASES = (
    "Could you turn the heating down a little, it is getting warm in here.",
    "What is the weather going to be like tomorrow morning?",
    "Set a timer for twelve minutes and remind me to check the oven.",
    "Play something quiet in the kitchen while I make dinner.",
    "How long does it take to walk from the station to the museum?",
    "Add milk, eggs and a loaf of bread to the shopping list.",
    "Turn off every light downstairs except the one in the hall.",
    "Read me the first message from this afternoon, please.",
    "What time does the pharmacy on the corner close on Saturdays?",
    "Remind me to call my sister when I get home tonight.",
    "How many grams of flour are there in a cup?",
    "Open the blinds in the living room halfway.",
)
VOICES = ("slt", "rms", "awb", "kal16")
#: Silence between phrases (seconds): longer than the detector's hangover plus a
#: short reply, so each phrase is its own turn.
PAUSE_S = (1.3, 1.6)
LEAD_S = 1.0
NOISE_DBFS = -65.0
#: A 20 ms frame quieter than this counts as silence when trimming phrases.
TRIM_DBFS = -50.0


@dataclass(frozen=True)
class SpeechFixture:
    path: Path
    pcm: bytes
    duration_s: float
    speech_s: float
    phrases: int
    source: str

    @property
    def speech_fraction(self) -> float:
        return self.speech_s / self.duration_s if self.duration_s else 0.0


def _trim(samples: np.ndarray) -> np.ndarray:
    frames = len(samples) // CAPTURE_FRAME_SAMPLES
    if frames == 0:
        return samples
    blocks = samples[: frames * CAPTURE_FRAME_SAMPLES].astype(np.float64).reshape(frames, -1)
    level = 10 * np.log10(np.maximum((blocks / 32768.0) ** 2, 1e-12).mean(axis=1))
    loud = np.flatnonzero(level > TRIM_DBFS)
    if len(loud) == 0:
        return samples[:0]
    return samples[loud[0] * CAPTURE_FRAME_SAMPLES: (loud[-1] + 1) * CAPTURE_FRAME_SAMPLES]


def _phrases(work: Path) -> tuple[list[np.ndarray], str]:
    if shutil.which("flite") is not None:
        from edgevoice_dev.testing.speech import synthesize

        out = []
        for i, text in enumerate(PHRASES):
            voice = VOICES[i % len(VOICES)]
            path = work / f"phrase-{i:02d}-{voice}.wav"
            if not path.exists():
                synthesize(text, voice, path)
            out.append(_trim(np.frombuffer(load_wav(path), dtype="<i2")))
        return out, "flite (voices " + ", ".join(VOICES) + ")"
    from edgevoice.demo import bundled_speech

    logger.warning("flite is not installed: the benchmark speech is the bundled phrase, "
                   "repeated (apt-get install flite for varied speech)")
    one = _trim(np.frombuffer(load_wav(bundled_speech()), dtype="<i2"))
    return [one], "edgevoice/data/hello.wav, repeated"


def build_speech(work: Path, duration_s: float, *, seed: int = 7) -> SpeechFixture:
    """A ``duration_s`` speech WAV in ``work`` (phrases are cached there)."""
    work.mkdir(parents=True, exist_ok=True)
    phrases, source = _phrases(work)
    rng = random.Random(seed)
    total = int(duration_s * CAPTURE_RATE_HZ)
    track = np.zeros(total, dtype=np.float64)
    pos = int(LEAD_S * CAPTURE_RATE_HZ)
    speech = 0
    count = 0
    while True:
        phrase = phrases[count % len(phrases)]
        pause = int(rng.uniform(*PAUSE_S) * CAPTURE_RATE_HZ)
        if pos + len(phrase) + pause // 2 > total:
            break
        track[pos: pos + len(phrase)] = phrase
        speech += len(phrase)
        count += 1
        pos += len(phrase) + pause
    noise = np.random.default_rng(seed).standard_normal(total) * 32768.0 * 10 ** (NOISE_DBFS / 20)
    pcm = np.clip(np.round(track + noise), -32768, 32767).astype("<i2").tobytes()
    path = work / f"speech-{int(duration_s)}s.wav"
    write_wav(path, pcm, CAPTURE_RATE_HZ)
    fixture = SpeechFixture(path, pcm, total / CAPTURE_RATE_HZ, speech / CAPTURE_RATE_HZ,
                            count, source)
    logger.info("speech fixture %s: %.1f s, %d phrases, %.0f %% speech (%s)", path,
                fixture.duration_s, count, 100 * fixture.speech_fraction, source)
    return fixture


def reply_pcm(fixture: SpeechFixture, rate_hz: int = 24_000, seconds: float = 3.0) -> bytes:
    """A stretch of the fixture's speech at ``rate_hz``, standing in for a spoken reply."""
    import soxr

    samples = np.frombuffer(fixture.pcm, dtype="<i2")
    start = int(LEAD_S * CAPTURE_RATE_HZ)
    piece = samples[start: start + int(seconds * CAPTURE_RATE_HZ)].astype(np.float64)
    out = soxr.resample(piece, CAPTURE_RATE_HZ, rate_hz, quality="HQ")
    return bytes(np.clip(np.round(out), -32768, 32767).astype("<i2").tobytes())
