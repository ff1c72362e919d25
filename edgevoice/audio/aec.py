"""Acoustic echo cancellation: remove the device's own reply from the microphone.

Without it, barge-in can only *raise its threshold* over the echo (the echo guard in
``edgevoice.triggers.bargein``), so a user quieter than the echo cannot interrupt. With
it, the echo is subtracted, and the same guard then learns a far smaller residual.

Pieces, all usable without a sound card:

* :class:`EchoCanceller` -- the seam: ``process(capture, reference)`` on one 20 ms
  frame of 16 kHz mono s16le each, returns the cleaned capture frame.
* :class:`WebRtcEchoCanceller` -- the WebRTC audio processing module's AEC3 through
  the ``pywebrtc-audio`` binding (the ``aec`` extra). AEC3 estimates the echo path's
  delay itself (up to several hundred ms), so the reference only has to be in the
  capture's *sample clock*, not sample-aligned.
* :class:`ReferenceFifo` -- that sample clock. The playback side writes what the
  sound card actually took (resampled to 16 kHz) from the audio thread; the capture
  side reads exactly one frame per captured frame, zeros when nothing was played.
  Both clocks run at nominally the same rate; the FIFO is bounded, so drift or a
  stall can only drop (counted) or pad, never grow latency without end.
* :func:`load_echo_canceller` -- the optional extra: ``auto`` uses it when installed
  and falls back to the echo guard (logged once) when not.

Candidates compared (hardware/README.md has the table, with CPU measured here):
pywebrtc-audio was the one binding with current wheels for x86_64 and aarch64
(Apache-2.0, maintained); none has armv7 wheels, so a 32-bit Pi OS uses the echo
guard or the sound server's ``module-echo-cancel`` (hardware/README.md).
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from edgevoice.config.base import require
from edgevoice.errors import EdgevoiceError

logger = logging.getLogger(__name__)

RATE_HZ = 16_000
FRAME_SAMPLES = 320  # 20 ms at 16 kHz
FRAME_BYTES = FRAME_SAMPLES * 2
_HALF = FRAME_SAMPLES // 2  # AEC3 works on 10 ms frames
#: 20 ms of silence, shared: what the reference reads while nothing was played
ZERO_FRAME = bytes(FRAME_BYTES)

AecMode = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class AecSettings:
    """Acoustic echo cancellation of the device's own playback (the ``aec`` extra)."""

    mode: AecMode = "auto"
    """auto: cancel the echo when the ``aec`` extra (pywebrtc-audio) is installed, else
    rely on the echo guard alone. on: refuse to start without it. off: never."""

    stream_delay_ms: int = 0
    """A hint for the playback-to-capture delay (ms). 0 lets AEC3 find it (it does so
    within a second of the first reply)."""

    reference_max_ms: int = 500
    """Most played audio waiting to be matched with the capture (ms); beyond it the
    oldest is dropped (counted): the two sound-card clocks have drifted or stalled."""

    def __post_init__(self) -> None:
        require(0 <= self.stream_delay_ms <= 500, "stream_delay_ms", "must be in [0, 500] ms")
        require(60 <= self.reference_max_ms <= 5000, "reference_max_ms",
                "must be in [60, 5000] ms")


class EchoCancellerUnavailableError(EdgevoiceError):
    """``aec.mode: on`` but the binding is not installed or does not load here."""


class EchoCanceller(Protocol):
    """Removes the reference (what was played) from the capture, frame by frame."""

    def process(self, capture: bytes, reference: bytes) -> bytes:
        """One 20 ms frame of each (640 bytes, 16 kHz s16le) in, the cleaned capture out."""

    def reset(self) -> None:
        """Forget the learnt echo path (the speaker or the room changed)."""


class WebRtcEchoCanceller:
    """WebRTC AEC3 through ``pywebrtc_audio.EchoCanceller`` (10 ms frames inside).

    While nothing has been played for ``bypass_after_ms`` (the reference is all
    zeros: a parked speaker, an idle device listening to a silent room), there is no
    echo left to cancel, and AEC3 is skipped: it was half of the event loop's CPU on a
    device listening idle (py-spy, issue 15). The cleaned stream keeps its timing across
    the switch: AEC3 delays its output by :data:`LATENCY_SAMPLES`, so a bypassed frame
    is delayed as much, and the first frame after a bypass is preceded by the last one
    fed to AEC3 again (output discarded), so its look-back holds recent audio, not
    audio from before the bypass.
    """

    #: AEC3's own delay from capture in to cleaned out, in samples (measured: 8 ms).
    LATENCY_SAMPLES = 128
    #: nothing played for this long: the room's echo has died away (delay + ring)
    BYPASS_AFTER_MS = 1000

    def __init__(self, settings: AecSettings | None = None, module: Any = None, *,
                 bypass_after_ms: int | None = BYPASS_AFTER_MS) -> None:
        settings = settings or AecSettings()
        if module is None:
            import pywebrtc_audio as module  # the optional extra
        self._aec: Any = module.EchoCanceller(sample_rate=RATE_HZ, num_channels=1,
                                              stream_delay_ms=settings.stream_delay_ms)
        self._out = np.empty(FRAME_SAMPLES, dtype=np.int16)
        self._bypass_after = (None if bypass_after_ms is None
                              else max(1, -(-bypass_after_ms // 20)))
        self._silent_frames = 0  # consecutive all-zero reference frames
        self._last_capture = ZERO_FRAME  # the last frame seen, raw
        self.bypassing = False
        #: frames processed by AEC3, and frames passed by (reference silent long enough)
        self.frames = 0
        self.bypassed = 0

    def process(self, capture: bytes, reference: bytes) -> bytes:
        if len(capture) != FRAME_BYTES or len(reference) != FRAME_BYTES:
            raise ValueError(f"expected {FRAME_BYTES}-byte frames, got {len(capture)} "
                             f"and {len(reference)}")
        if reference is ZERO_FRAME or reference == ZERO_FRAME:
            self._silent_frames += 1
        else:
            self._silent_frames = 0
        last, self._last_capture = self._last_capture, capture
        if self._bypass_after is not None and self._silent_frames > self._bypass_after:
            # nothing to cancel: the capture as AEC3 would have timed it
            self.bypassing = True
            self.bypassed += 1
            lag = 2 * self.LATENCY_SAMPLES  # bytes
            return last[FRAME_BYTES - lag:] + capture[:FRAME_BYTES - lag]
        if self.bypassing:  # resuming: AEC3's look-back must hold the frame just before
            self.bypassing = False
            self._run(last, ZERO_FRAME)
        out = self._run(capture, reference)
        self.frames += 1
        return out.tobytes()

    def _run(self, capture: bytes, reference: bytes) -> np.ndarray[Any, np.dtype[np.int16]]:
        near = np.frombuffer(capture, dtype="<i2")
        far = np.frombuffer(reference, dtype="<i2")
        out = self._out
        for start in (0, _HALF):
            out[start:start + _HALF] = self._aec.process(near[start:start + _HALF],
                                                         far[start:start + _HALF])
        return out

    def reset(self) -> None:
        self._aec.reset()


def load_echo_canceller(settings: AecSettings) -> EchoCanceller | None:
    """The canceller ``settings`` ask for, or None (the echo guard alone then)."""
    if settings.mode == "off":
        return None
    try:
        import pywebrtc_audio  # the optional extra
    except ImportError as exc:
        if settings.mode == "on":
            raise EchoCancellerUnavailableError(
                f"aec.mode is 'on' but pywebrtc-audio does not load ({exc}): install it with "
                "pip install 'edgevoice[aec]' (x86_64 and aarch64 only), or set aec.mode: auto"
            ) from exc
        logger.info("echo cancellation not installed (edgevoice[aec]): barge-in uses the "
                    "echo guard alone")
        return None
    logger.info("echo cancellation: WebRTC AEC3 (pywebrtc-audio)")
    return WebRtcEchoCanceller(settings, pywebrtc_audio)


@dataclass
class ReferenceStats:
    written_samples: int = 0
    #: samples dropped because the FIFO was full (clock drift, or capture stalled)
    dropped_samples: int = 0
    #: capture frames that found less than a frame of reference (padded with zeros)
    short_frames: int = 0


class ReferenceFifo:
    """Played audio (16 kHz) waiting to be paired with the captured frame it echoes in.

    Thread-safe: :meth:`write` runs in the sound card's callback thread, :meth:`read`
    in the event loop. One :meth:`read` per captured frame puts the reference in the
    capture's sample clock.
    """

    def __init__(self, max_ms: int = 500) -> None:
        self.max_samples = RATE_HZ * max_ms // 1000
        self._chunks: collections.deque[np.ndarray[Any, np.dtype[np.int16]]] = \
            collections.deque()
        self._buffered = 0
        self._lock = threading.Lock()
        self.stats = ReferenceStats()

    @property
    def buffered_samples(self) -> int:
        return self._buffered

    def write(self, samples: np.ndarray[Any, np.dtype[np.int16]]) -> None:
        """What the speaker just took, at 16 kHz (silence included: it keeps time)."""
        if not len(samples):
            return
        with self._lock:
            self._chunks.append(np.array(samples, dtype=np.int16))
            self._buffered += len(samples)
            self.stats.written_samples += len(samples)
            excess = self._buffered - self.max_samples
            while excess > 0 and self._chunks:
                head = self._chunks[0]
                if len(head) <= excess:
                    self._chunks.popleft()
                    dropped = len(head)
                else:
                    self._chunks[0] = head[excess:]
                    dropped = excess
                self._buffered -= dropped
                self.stats.dropped_samples += dropped
                excess -= dropped

    def read(self) -> bytes:
        """The next 20 ms of reference; zeros where nothing was played (nothing
        played at all: :data:`ZERO_FRAME` itself, nothing allocated)."""
        if not self._buffered:
            self.stats.short_frames += 1
            return ZERO_FRAME
        out = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        filled = 0
        with self._lock:
            while filled < FRAME_SAMPLES and self._chunks:
                head = self._chunks[0]
                take = min(len(head), FRAME_SAMPLES - filled)
                out[filled:filled + take] = head[:take]
                if take == len(head):
                    self._chunks.popleft()
                else:
                    self._chunks[0] = head[take:]
                filled += take
            self._buffered -= filled
            if filled < FRAME_SAMPLES:
                self.stats.short_frames += 1
        return out.tobytes()

    def clear(self) -> None:
        with self._lock:
            self._chunks.clear()
            self._buffered = 0


class PlaybackReference:
    """Feeds a :class:`ReferenceFifo` from the speaker's blocks (any output rate).

    Set an instance as ``PlaybackBuffer.on_pulled``: it runs in the sound card's
    thread, converts each block to 16 kHz (soxr, low-delay quality: a steady output
    matters more here than the last dB of stop-band) and writes it.
    """

    def __init__(self, fifo: ReferenceFifo, output_rate_hz: int) -> None:
        from edgevoice.audio.resample import StreamResampler  # soxr: only with AEC on

        self.fifo = fifo
        self._resampler = (StreamResampler(output_rate_hz, RATE_HZ, quality="LQ")
                           if output_rate_hz != RATE_HZ else None)

    def __call__(self, block: np.ndarray[Any, np.dtype[np.int16]]) -> None:
        samples = block if self._resampler is None else self._resampler.process(block)
        self.fifo.write(samples)
