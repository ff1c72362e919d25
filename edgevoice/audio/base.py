"""Audio formats and the AudioSource / AudioSink seams.

Everything inside edgevoice speaks 16-bit signed little-endian mono PCM. The device
captures at :data:`CAPTURE_RATE_HZ` in :data:`FRAME_MS` frames; replies arrive at
:data:`PLAYBACK_INPUT_RATE_HZ` and are resampled to whatever the output device runs at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from edgevoice.audio.playback import PlaybackBuffer
    from edgevoice.audio.silence import IdleGate

FRAME_MS = 20
CAPTURE_RATE_HZ = 16_000
PLAYBACK_INPUT_RATE_HZ = 24_000
SAMPLE_WIDTH_BYTES = 2


def frame_samples(rate_hz: int, frame_ms: int = FRAME_MS) -> int:
    """Samples in one frame at ``rate_hz``."""
    return rate_hz * frame_ms // 1000


CAPTURE_FRAME_SAMPLES = frame_samples(CAPTURE_RATE_HZ)  # 320
CAPTURE_FRAME_BYTES = CAPTURE_FRAME_SAMPLES * SAMPLE_WIDTH_BYTES  # 640


@dataclass
class SourceStats:
    """Counters a source keeps (read by /stats and the watchdog)."""

    frames_captured: int = 0
    frames_dropped: int = 0
    #: monotonic time of the last frame the capture callback delivered (0 = never)
    last_frame_at: float = 0.0
    #: times the device was (re)opened
    opens: int = 0
    #: blocks the device reported as overflowed (audio lost before we could take it)
    overflows: int = 0


class AudioSource(Protocol):
    """Delivers 20 ms frames of 16 kHz mono s16le PCM (640 bytes each)."""

    name: str
    stats: SourceStats

    async def open(self) -> None:
        """Open the device or file. Raises AudioDeviceError if it cannot."""

    async def read(self) -> bytes:
        """The next frame. Raises EOFError at the end of a finite source and
        AudioDeviceError when the device vanished."""

    async def close(self) -> None:
        """Release the device. Idempotent."""


@runtime_checkable
class BatchingSource(Protocol):
    """A source that can hold quiet frames back while an idle gate allows it, so that
    a device waiting for speech wakes its event loop less often (the sound card's)."""

    def set_idle_gate(self, gate: IdleGate | None) -> None:
        """Hold blocks back while ``gate`` is armed and says they cannot start speech."""

    def read_nowait(self) -> bytes | None:
        """A frame captured already, or None; never waits. Raises AudioDeviceError
        like ``read`` when the device is gone."""


class AudioSink(Protocol):
    """Plays what a PlaybackBuffer holds, pulling 20 ms blocks at its own rate."""

    name: str
    sample_rate_hz: int

    async def open(self, buffer: PlaybackBuffer) -> None:
        """Open the device or file and start pulling from ``buffer``."""

    def prepare(self) -> None:
        """Sound is coming soon (a turn began): get ready to play without delay."""

    async def close(self) -> None:
        """Stop pulling and release the device. Idempotent."""
