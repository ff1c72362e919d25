"""Signal helpers for tests and benchmarks: envelopes and their aligned correlation."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soxr

FloatArray = npt.NDArray[np.float64]


def read_wav_mono(path: str | Path) -> tuple[FloatArray, int]:
    """A 16-bit WAV as mono float samples in [-1, 1], and its rate."""
    with wave.open(str(path), "rb") as w:
        rate, channels = w.getframerate(), w.getnchannels()
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit WAVs are compared")
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64)
    if channels > 1:
        data = data.reshape(-1, channels).mean(axis=1)
    return data / 32768.0, rate


def envelope(samples: FloatArray, rate_hz: int, window_ms: int = 10) -> FloatArray:
    """RMS per window, in dB (floored at -80), so loudness changes line up, not phase."""
    n = max(1, rate_hz * window_ms // 1000)
    usable = len(samples) // n * n
    blocks = samples[:usable].reshape(-1, n)
    rms = np.sqrt(np.mean(blocks**2, axis=1) + 1e-12)
    result: FloatArray = np.maximum(20 * np.log10(rms), -80.0)
    return result


def aligned_envelope_correlation(reference: FloatArray, ref_rate: int, test: FloatArray,
                                 test_rate: int, window_ms: int = 10) -> float:
    """Best normalized cross-correlation of the two speech envelopes over all lags.

    Both signals are brought to the same rate, their envelopes computed, and the
    shorter slid over the longer; the overlap must cover the reference's speech.
    """
    if test_rate != ref_rate:
        test = soxr.resample(test, test_rate, ref_rate)
    a = envelope(reference, ref_rate, window_ms)
    b = envelope(test, ref_rate, window_ms)
    if len(a) == 0 or len(b) == 0:
        return 0.0
    a = a - a.mean()
    best = -1.0
    # slide the reference over the test signal (the reply is later and may be longer)
    if len(b) < len(a):
        b = np.concatenate([b, np.full(len(a) - len(b), -80.0)])
    for lag in range(0, len(b) - len(a) + 1):
        seg = b[lag:lag + len(a)]
        seg = seg - seg.mean()
        denom = float(np.linalg.norm(a) * np.linalg.norm(seg))
        if denom > 0:
            best = max(best, float(np.dot(a, seg) / denom))
    return best
