"""The CPU floor of the device: libopus and soxr alone, on the frames the device handled.

What the device cannot avoid doing for N uplink and M downlink frames: encode N
frames of 16 kHz speech with its Opus settings, decode M frames of 24 kHz Opus to the
output rate (libopus does it alone for its own rates, 48 kHz among them; others are
decoded at 24 kHz and resampled by soxr). Timed in this process with ``process_time``,
best of three passes, so it is the cost of the codec work and nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgevoice.audio.base import CAPTURE_FRAME_BYTES
from edgevoice.audio.opus import OPUS_RATES_HZ, OpusDecoder, OpusEncoder, OpusSettings
from edgevoice.audio.resample import StreamResampler
from edgevoice.relay.server import DOWNLINK_FRAME_SAMPLES
from edgevoice.relay.settings import DOWNLINK_OPUS
from edgevoice_dev.bench.proc import best_stage_times

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class Floor:
    uplink_frames: int
    downlink_frames: int
    encode_s: float
    decode_s: float
    resample_s: float

    @property
    def total_s(self) -> float:
        return self.encode_s + self.decode_s + self.resample_s

    def as_dict(self) -> dict[str, Any]:
        return {"uplink_frames": self.uplink_frames, "downlink_frames": self.downlink_frames,
                "encode_s": round(self.encode_s, 5), "decode_s": round(self.decode_s, 5),
                "resample_s": round(self.resample_s, 5), "total_s": round(self.total_s, 5)}


def _frames(pcm: bytes, size: int, count: int) -> list[bytes]:
    """``count`` consecutive frames of ``size`` bytes from ``pcm``, wrapping around."""
    usable = len(pcm) - len(pcm) % size
    return [pcm[(i * size) % usable: (i * size) % usable + size] for i in range(count)]


def measure_floor(speech16k: bytes, reply24k: bytes, uplink_frames: int, downlink_frames: int,
                  output_rate_hz: int, settings: OpusSettings | None = None,
                  passes: int = 3) -> Floor:
    settings = settings or OpusSettings()
    # as the device does: libopus decodes straight to an output rate it has, else to
    # 24 kHz for soxr (LQ) to finish
    decode_rate_hz = output_rate_hz if output_rate_hz in OPUS_RATES_HZ else 24_000
    up = _frames(speech16k, CAPTURE_FRAME_BYTES, uplink_frames)
    relay_encoder = OpusEncoder.from_settings(DOWNLINK_OPUS, 24_000)
    packets = [relay_encoder.encode(f)
               for f in _frames(reply24k, DOWNLINK_FRAME_SAMPLES * 2, downlink_frames)]
    def one_pass() -> tuple[Callable[[], None], Callable[[], None], Callable[[], None]]:
        encoder = OpusEncoder.from_settings(settings)
        decoder = OpusDecoder(decode_rate_hz)
        resampler = StreamResampler(decode_rate_hz, output_rate_hz, quality="LQ")
        decoded: list[bytes] = []

        def encode() -> None:
            for frame in up:
                encoder.encode(frame)

        def decode() -> None:
            decoded.extend(decoder.decode(p) for p in packets)

        def resample() -> None:
            for pcm in decoded:
                resampler.process(np.frombuffer(pcm, dtype=np.int16))

        return encode, decode, resample

    best = best_stage_times(passes, one_pass)
    return Floor(uplink_frames, downlink_frames, *best)


def relay_opus_seconds_per_frame(speech16k: bytes, reply24k: bytes, frames: int = 500,
                                 passes: int = 3) -> float:
    """CPU the relay cannot avoid per session and 20 ms: one 16 kHz Opus decode plus one
    24 kHz Opus encode with the relay's default reply settings (best of ``passes``)."""
    uplink = OpusEncoder.from_settings(OpusSettings())
    packets = [uplink.encode(f) for f in _frames(speech16k, CAPTURE_FRAME_BYTES, frames)]
    replies = _frames(reply24k, DOWNLINK_FRAME_SAMPLES * 2, frames)
    def one_pass() -> tuple[Callable[[], None]]:
        decoder = OpusDecoder(16_000)
        encoder = OpusEncoder.from_settings(DOWNLINK_OPUS, 24_000)

        def both() -> None:
            for packet, reply in zip(packets, replies, strict=True):
                decoder.decode(packet)
                encoder.encode(reply)

        return (both,)

    (best,) = best_stage_times(passes, one_pass)
    return best / frames
