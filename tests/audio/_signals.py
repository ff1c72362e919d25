"""Synthetic test signals: tones and noise at a given RMS level, cut into frames."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from edgevoice.audio.base import CAPTURE_FRAME_SAMPLES, CAPTURE_RATE_HZ

Samples = npt.NDArray[np.float64]


def rms_amplitude(level_dbfs: float) -> float:
    """RMS in sample units for a level in dBFS (0 dBFS = full-scale square)."""
    return float(32768.0 * 10.0 ** (level_dbfs / 20.0))


def tone(
    freq_hz: float, level_dbfs: float, n: int, rate_hz: int = CAPTURE_RATE_HZ, phase: float = 0.0
) -> Samples:
    t = np.arange(n) / rate_hz
    out: Samples = (
        rms_amplitude(level_dbfs) * np.sqrt(2.0) * np.sin(2 * np.pi * freq_hz * t + phase)
    )
    return out


def noise(level_dbfs: float, n: int, seed: int = 0) -> Samples:
    rng = np.random.default_rng(seed)
    return rms_amplitude(level_dbfs) * rng.standard_normal(n)


def to_pcm(samples: Samples) -> bytes:
    return np.clip(np.round(samples), -32768, 32767).astype("<i2").tobytes()


def from_pcm(pcm: bytes) -> Samples:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64)


def frames(samples: Samples, frame_samples: int = CAPTURE_FRAME_SAMPLES) -> list[bytes]:
    """Cut into whole frames (a partial last frame is dropped)."""
    pcm = to_pcm(samples)
    step = frame_samples * 2
    return [pcm[i : i + step] for i in range(0, len(pcm) - step + 1, step)]


def dominant_hz(samples: Samples, rate_hz: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * rate_hz / len(samples))


def level_dbfs(samples: Samples) -> float:
    energy = float(np.mean(np.square(samples)))
    return -100.0 if energy <= 0 else 10.0 * np.log10(energy / 32768.0**2)
