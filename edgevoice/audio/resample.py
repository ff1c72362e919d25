"""Streaming sample-rate conversion of mono s16le PCM, and re-framing of its output.

:class:`StreamResampler` wraps ``soxr.ResampleStream`` so that chunks can be
converted one after another with no clicks at their seams; it passes audio through
untouched when both rates are equal. soxr's output at HQ quality comes in bursts
(nothing for one chunk, two chunks' worth for the next), so :class:`FrameFifo` turns
any sequence of pushes back into whole, fixed-size frames.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import numpy.typing as npt
import soxr

from edgevoice.audio.base import SAMPLE_WIDTH_BYTES

logger = logging.getLogger(__name__)

Quality = Literal["QQ", "LQ", "MQ", "HQ", "VHQ"]
Int16Array = npt.NDArray[np.int16]


def _as_int16(pcm: bytes | bytearray | memoryview | Int16Array) -> Int16Array:
    if isinstance(pcm, np.ndarray):
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError(f"expected 1-D int16 samples, got {pcm.dtype} of shape {pcm.shape}")
        return pcm
    if len(pcm) % SAMPLE_WIDTH_BYTES:
        raise ValueError(f"s16le PCM must have an even length, got {len(pcm)} bytes")
    return np.frombuffer(pcm, dtype=np.int16)


class StreamResampler:
    """Converts a continuous mono int16 stream from ``in_rate_hz`` to ``out_rate_hz``."""

    def __init__(self, in_rate_hz: int, out_rate_hz: int, quality: Quality = "HQ") -> None:
        if in_rate_hz <= 0 or out_rate_hz <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate_hz} -> {out_rate_hz}")
        self.in_rate_hz = in_rate_hz
        self.out_rate_hz = out_rate_hz
        self.quality = quality
        self.passthrough = in_rate_hz == out_rate_hz
        self._stream: soxr.ResampleStream | None = None
        if not self.passthrough:
            self._stream = soxr.ResampleStream(
                in_rate_hz, out_rate_hz, 1, dtype="int16", quality=quality
            )
            logger.debug("resampler %d -> %d Hz (%s)", in_rate_hz, out_rate_hz, quality)

    def process(self, pcm: bytes | bytearray | memoryview | Int16Array) -> Int16Array:
        """Convert the next chunk. The result may be empty or hold more than one chunk's
        worth: that is how soxr works. Feed it to a :class:`FrameFifo`."""
        samples = _as_int16(pcm)
        if self._stream is None:
            return samples
        out: Int16Array = self._stream.resample_chunk(samples)
        return out

    def process_bytes(self, pcm: bytes | bytearray | memoryview) -> bytes:
        """:meth:`process`, returning bytes (for callers that do not use numpy)."""
        if self._stream is None:
            return bytes(pcm)
        return self.process(pcm).tobytes()

    def flush(self) -> Int16Array:
        """The samples soxr still holds back; call once at the end of the stream.
        The resampler is then ready for a new stream."""
        if self._stream is None:
            return np.zeros(0, dtype=np.int16)
        out: Int16Array = self._stream.resample_chunk(np.zeros(0, dtype=np.int16), last=True)
        self._stream.clear()
        return out

    def reset(self) -> None:
        """Drop what soxr holds and start a new stream (after a gap or a flush)."""
        if self._stream is not None:
            self._stream.clear()

    @property
    def delay_samples(self) -> float:
        """soxr's current delay, in output samples."""
        return 0.0 if self._stream is None else float(self._stream.delay())


_NOTHING: Int16Array = np.zeros(0, dtype=np.int16)


class FrameFifo:
    """Accumulates samples and hands them out in frames of exactly ``frame_samples``.

    Backed by one int16 array, allocated by the first push (a relay session that never
    gets a reply holds none), compacted in place and grown only when a single push is
    larger than what it can hold. Not thread-safe.
    """

    def __init__(self, frame_samples: int, capacity_frames: int = 8) -> None:
        if frame_samples <= 0:
            raise ValueError(f"frame_samples must be positive, got {frame_samples}")
        self.frame_samples = frame_samples
        self._capacity = frame_samples * max(2, capacity_frames)
        self._buf: Int16Array = _NOTHING
        self._start = 0
        self._end = 0

    def __len__(self) -> int:
        """Samples held."""
        return self._end - self._start

    @property
    def frames_ready(self) -> int:
        return len(self) // self.frame_samples

    def push(self, pcm: bytes | bytearray | memoryview | Int16Array) -> None:
        samples = _as_int16(pcm)
        n = len(samples)
        if n == 0:
            return
        if not len(self._buf):
            self._buf = np.zeros(max(self._capacity, n), dtype=np.int16)
        if self._end + n > len(self._buf):
            held = len(self)
            if held + n > len(self._buf):
                bigger = np.zeros(max(2 * len(self._buf), held + n), dtype=np.int16)
                bigger[:held] = self._buf[self._start : self._end]
                self._buf = bigger
            else:
                self._buf[:held] = self._buf[self._start : self._end]
            self._start, self._end = 0, held
        self._buf[self._end : self._end + n] = samples
        self._end += n

    def pop(self) -> bytes | None:
        """The next whole frame as s16le bytes, or None when less than one is held."""
        if len(self) < self.frame_samples:
            return None
        a = self._start
        self._start += self.frame_samples
        frame = self._buf[a : self._start].tobytes()
        if self._start == self._end:
            self._start = self._end = 0
        return frame

    def flush(self) -> list[bytes]:
        """Everything held, as whole frames, the last one padded with silence."""
        frames: list[bytes] = []
        while (frame := self.pop()) is not None:
            frames.append(frame)
        held = len(self)
        if held:
            last = np.zeros(self.frame_samples, dtype=np.int16)
            last[:held] = self._buf[self._start : self._end]
            frames.append(last.tobytes())
            self._start = self._end = 0
        return frames

    def clear(self) -> int:
        """Drop everything; return how many samples were dropped."""
        held = len(self)
        self._start = self._end = 0
        return held
