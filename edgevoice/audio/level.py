"""The level of a block of s16le PCM, in one place for every consumer.

One convention (RMS relative to full scale: a full-scale square wave reads 0 dBFS,
a full-scale sine -3 dBFS, digital silence :data:`SILENCE_DBFS`) and one way to
compute it: the mean square of the samples, then one logarithm. The silence
detector, the echo guard and the playback buffer all measured it with their own
copy of this code (issue 15); a frame's level is now measured once, by the silence
detector, and handed to the wake word's gate and to barge-in.

Measured here for a 20 ms frame at 16 kHz: converting to float64 and one dot product
takes 3.6 us; copying into a preallocated float64 array first (what the detector did)
7.2 us; ``math.sumprod`` over the int16 samples 43 us.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

#: The level reported for digital silence (an all-zero block has no finite dBFS).
SILENCE_DBFS = -100.0

_FULL_SCALE_SQUARED = 32768.0 * 32768.0


def mean_square(samples: npt.NDArray[np.int16] | bytes | bytearray | memoryview) -> float:
    """The mean square of s16le samples relative to full scale (0.0 for an empty block)."""
    wide: npt.NDArray[Any]
    if isinstance(samples, np.ndarray):
        wide = samples.astype(np.float64)
    else:
        wide = np.frombuffer(samples, dtype="<i2").astype(np.float64)
    n = wide.size
    if n == 0:
        return 0.0
    return float(np.dot(wide, wide)) / (n * _FULL_SCALE_SQUARED)


def to_dbfs(mean_square_fs: float) -> float:
    """A mean square relative to full scale, in dBFS (floored at :data:`SILENCE_DBFS`)."""
    if mean_square_fs <= 0.0:
        return SILENCE_DBFS
    level = 10.0 * math.log10(mean_square_fs)
    return level if level > SILENCE_DBFS else SILENCE_DBFS


def pcm_dbfs(samples: npt.NDArray[np.int16] | bytes | bytearray | memoryview) -> float:
    """The RMS level of s16le samples in dBFS (see the module docstring)."""
    return to_dbfs(mean_square(samples))
