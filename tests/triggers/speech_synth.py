"""Test signals for the triggers: speech-like audio, flite speech, and an echo simulator.

Nothing here is a fixture file: every signal is generated when the tests run, from a
fixed seed or a deterministic synthesizer, so a failure reproduces exactly.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt

RATE_HZ = 16_000
FRAME = 320  # samples in 20 ms at 16 kHz

Signal = npt.NDArray[np.float64]


def speech_like(seconds: float, seed: int, f0_hz: float = 140.0) -> Signal:
    """Syllables of a harmonic tone under raised-cosine envelopes, with pauses.

    Not intelligible, but it has what matters for level-based logic: 100-300 ms
    syllables, short gaps between them, longer pauses between phrases, and a pitch
    that moves. Peak-normalised to 1.0.
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE_HZ)
    out = np.zeros(n)
    pos = int(rng.uniform(0.0, 0.05) * RATE_HZ)
    syllables_left = int(rng.integers(3, 8))
    while pos < n:
        length = int(rng.uniform(0.10, 0.30) * RATE_HZ)
        t = np.arange(length) / RATE_HZ
        pitch = f0_hz * rng.uniform(0.8, 1.25) * (1.0 + 0.1 * np.sin(2 * np.pi * 3.0 * t))
        phase = 2 * np.pi * np.cumsum(pitch) / RATE_HZ
        tone = sum(np.sin(k * phase) / k for k in range(1, 12) if k * f0_hz * 1.4 < RATE_HZ / 2)
        envelope = np.sin(np.pi * np.arange(length) / length) ** 0.5 * rng.uniform(0.4, 1.0)
        end = min(n, pos + length)
        out[pos:end] += (tone * envelope)[: end - pos]
        syllables_left -= 1
        if syllables_left == 0:
            pos = end + int(rng.uniform(0.25, 0.6) * RATE_HZ)
            syllables_left = int(rng.integers(3, 8))
        else:
            pos = end + int(rng.uniform(0.02, 0.12) * RATE_HZ)
    peak: float = np.max(np.abs(out))
    return out / peak


def active_dbfs(signal: Signal) -> float:
    """RMS level (dBFS, full-scale sine = -3) over the 20 ms frames that carry sound."""
    frames = signal[: len(signal) // FRAME * FRAME].reshape(-1, FRAME)
    energies = np.mean(frames**2, axis=1)
    active = energies[energies > np.max(energies) * 1e-3]
    return float(10 * np.log10(np.mean(active)))


def at_level(signal: Signal, dbfs: float) -> Signal:
    """``signal`` scaled so that its active RMS level is ``dbfs``."""
    return signal * 10 ** ((dbfs - active_dbfs(signal)) / 20)


def room(signal: Signal, coupling_db: float, delay_ms: float, rt60_ms: float = 250.0) -> Signal:
    """What a microphone hears of ``signal`` played through a speaker in a room.

    The direct path is delayed and attenuated by ``coupling_db``; an exponentially
    decaying diffuse tail (noise shaped to reach -60 dB after ``rt60_ms``) follows.
    """
    rng = np.random.default_rng(7)
    taps = int(rt60_ms / 1000 * RATE_HZ)
    tail = rng.standard_normal(taps) * np.exp(-6.9 * np.arange(taps) / taps) * 0.02
    response = np.zeros(int(delay_ms / 1000 * RATE_HZ) + taps)
    start = int(delay_ms / 1000 * RATE_HZ)
    response[start] = 1.0
    response[start : start + taps] += tail
    heard = np.convolve(signal, response)[: len(signal)]
    # Scale so the level the microphone hears is coupling_db below the played level.
    return heard * 10 ** ((coupling_db + active_dbfs(signal) - active_dbfs(heard)) / 20)


def noise(seconds: float, dbfs: float, seed: int = 3) -> Signal:
    rng = np.random.default_rng(seed)
    # white noise RMS sigma reads 20*log10(sigma) dBFS in this convention
    return rng.standard_normal(round(seconds * RATE_HZ)) * 10 ** (dbfs / 20)


def to_pcm(signal: Signal) -> bytes:
    clipped = np.clip(np.round(signal * 32768), -32768, 32767).astype("<i2")
    return clipped.tobytes()


def frames_of(signal: Signal) -> list[bytes]:
    pcm = to_pcm(signal)
    size = FRAME * 2
    return [pcm[i : i + size] for i in range(0, len(pcm) - size + 1, size)]


def pad_to(signal: Signal, seconds: float) -> Signal:
    n = int(seconds * RATE_HZ)
    return np.concatenate([signal, np.zeros(max(0, n - len(signal)))])[:n]


def flite_available() -> bool:
    return shutil.which("flite") is not None


def flite(text: str, voice: str, directory: Path) -> Signal:
    """``text`` spoken by flite's ``voice``, as 16 kHz float samples in [-1, 1)."""
    digest = hashlib.sha1(text.encode()).hexdigest()[:12]
    out = directory / f"{voice}-{digest}.wav"
    if not out.exists():
        subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(out)], check=True)
    with wave.open(str(out)) as wav:
        rate = wav.getframerate()
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    signal = samples.astype(np.float64) / 32768.0
    if rate != RATE_HZ:
        import soxr

        signal = soxr.resample(signal, rate, RATE_HZ)
    return np.asarray(signal, dtype=np.float64)


def speech_end_s(signal: Signal, threshold_dbfs: float = -50.0) -> float:
    """Time (s) at the end of the last 20 ms frame louder than ``threshold_dbfs``."""
    frames = signal[: len(signal) // FRAME * FRAME].reshape(-1, FRAME)
    levels = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    loud = np.nonzero(levels > threshold_dbfs)[0]
    return float((loud[-1] + 1) * FRAME / RATE_HZ) if loud.size else 0.0


def speech_start_s(signal: Signal, threshold_dbfs: float = -50.0) -> float:
    """Time (s) at the start of the first 20 ms frame louder than ``threshold_dbfs``."""
    frames = signal[: len(signal) // FRAME * FRAME].reshape(-1, FRAME)
    levels = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    loud = np.nonzero(levels > threshold_dbfs)[0]
    return float(loud[0] * FRAME / RATE_HZ) if loud.size else 0.0
