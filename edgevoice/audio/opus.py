"""Opus encoding and decoding of 20 ms mono frames, with in-band FEC and concealment.

A thin, typed wrapper over ``opuslib_next`` (libopus through ctypes). It owns the
codec choices that both ends must agree on: VOIP application, 16-bit mono, fixed
frame duration, and how a lost packet is rebuilt: from the forward error correction
carried by the next packet (:meth:`OpusDecoder.recover`) or, when that is not there
either, by libopus' packet loss concealment (:meth:`OpusDecoder.conceal`).

Per packet it calls libopus itself, through the library ``opuslib_next`` loaded (its own
function pointers, with argument types that take ``bytes`` as they are), into an output
buffer made once per codec state: ``opuslib_next``'s per-call path allocates a ctypes
buffer and copies its result through a Python list or array every call, 14 us of the
~100 us a relay pays per session and 20 ms for a decode and an encode (measured on the
bench machine). ``opuslib_next`` still makes, configures and frees the states.

``opuslib_next`` loads libopus when it is imported, so it is imported lazily: a
machine without libopus can still import edgevoice and gets a clear
:class:`CodecUnavailableError` when it first needs the codec (making an encoder or
decoder checks that it is there).

The codec state itself (about 30 KB an encoder, 18 KB a decoder) is allocated on the
first packet, not when the object is made, and :meth:`OpusEncoder.release` /
:meth:`OpusDecoder.release` give it back: a relay holding thousands of connected
devices that never talk keeps no codec state for them.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from edgevoice.audio.base import CAPTURE_RATE_HZ, FRAME_MS, SAMPLE_WIDTH_BYTES
from edgevoice.config.base import require
from edgevoice.errors import EdgevoiceError

logger = logging.getLogger(__name__)

#: Sample rates libopus accepts.
OPUS_RATES_HZ = (8000, 12000, 16000, 24000, 48000)
#: Frame durations libopus accepts (ms); 2.5 ms is left out on purpose (never used here).
OPUS_FRAME_MS = (5, 10, 20, 40, 60)
#: The longest packet libopus can produce: what a decode buffer must hold.
_MAX_PACKET_MS = 120


class CodecUnavailableError(EdgevoiceError):
    """libopus or its Python binding is missing. Retrying will not help: install it."""


class OpusDecodeError(EdgevoiceError, ValueError):
    """A packet could not be decoded (corrupt or not Opus). Conceal it instead."""


@dataclass(frozen=True)
class OpusSettings:
    """Opus encoder settings (VOIP application, mono, 20 ms frames)."""

    bitrate_bps: int = 16_000
    """Target bitrate (VBR). For the microphone's 16 kHz speech, 16 kbps (about 40 bytes
    per 20 ms frame) keeps the loudness contour (envelope correlation 0.999 after a round
    trip, bench row 16); 24 kbps costs a third more on the wire for no gain a speech
    model hears."""

    complexity: int = 5
    """Encoder effort, 0-10. 5 is a fair trade on a Pi; 9-10 costs twice the CPU."""

    fec: bool = True
    """Carry a low-bitrate copy of each frame in the next packet (in-band FEC), so a
    single lost packet can be rebuilt from its successor. libopus adds the copy only
    when the bitrate leaves room: for 16 kHz speech from about 19 kbps at 10 % expected
    loss (so not at the microphone's 16 kbps, where a lost frame is concealed; on the
    WebSocket a frame is lost only when a queue overflows)."""

    expected_loss_pct: int = 10
    """Packet loss the encoder plans for (0-100); FEC is only added when this is > 0."""

    dtx: bool = False
    """Discontinuous transmission: tiny packets during silence. Off by default because
    the silence detector already stops sending when nobody speaks."""

    def __post_init__(self) -> None:
        require(6_000 <= self.bitrate_bps <= 510_000, "bitrate_bps", "must be in [6000, 510000]")
        require(0 <= self.complexity <= 10, "complexity", "must be in [0, 10]")
        require(0 <= self.expected_loss_pct <= 100, "expected_loss_pct", "must be in [0, 100]")


def _opuslib() -> ModuleType:
    """Import ``opuslib_next``, turning its failures into one actionable error."""
    try:
        return importlib.import_module("opuslib_next")
    except ImportError as exc:
        raise CodecUnavailableError(
            "the Opus binding is not installed: pip install opuslib-next "
            f"(it comes with edgevoice's dependencies) [{exc}]"
        ) from exc
    except Exception as exc:
        # opuslib_next raises a bare Exception when it cannot find libopus, and ctypes
        # an OSError when the library it found cannot be loaded.
        raise CodecUnavailableError(
            f"libopus is not installed or cannot be loaded: apt-get install libopus0 [{exc}]"
        ) from exc


@dataclass(frozen=True)
class _Calls:
    """libopus' encode and decode, typed to take bytes and a reused ctypes buffer."""

    encode: Any
    decode: Any


_calls: _Calls | None = None


def _libopus_calls(lib: ModuleType) -> _Calls:
    """New function pointers into the libopus ``opuslib_next`` loaded (indexing a CDLL
    makes a new one), so the argument types set here do not change ``opuslib_next``'s."""
    global _calls
    if _calls is None:
        cdll = lib.api.libopus
        encode = cdll["opus_encode"]
        encode.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_int32)
        encode.restype = ctypes.c_int32
        decode = cdll["opus_decode"]
        decode.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, ctypes.c_char_p,
                           ctypes.c_int, ctypes.c_int)
        decode.restype = ctypes.c_int
        _calls = _Calls(encode, decode)
    return _calls


def _address(state: Any) -> int:
    """The C address of an ``opuslib_next`` state (a ctypes pointer), for c_void_p."""
    address: int | None = ctypes.cast(state, ctypes.c_void_p).value
    if not address:
        raise CodecUnavailableError("libopus returned no codec state")
    return address


#: The largest packet an encoder may write (libopus' recommended bound is 4000 bytes).
_MAX_PACKET_BYTES = 4000


def _check_format(sample_rate_hz: int, frame_ms: int) -> None:
    if sample_rate_hz not in OPUS_RATES_HZ:
        raise ValueError(f"Opus cannot run at {sample_rate_hz} Hz; use one of {OPUS_RATES_HZ}")
    if frame_ms not in OPUS_FRAME_MS:
        raise ValueError(f"Opus cannot use {frame_ms} ms frames; use one of {OPUS_FRAME_MS}")


class OpusEncoder:
    """Encodes whole frames of mono s16le PCM into Opus packets. Not thread-safe."""

    def __init__(
        self,
        sample_rate_hz: int = CAPTURE_RATE_HZ,
        frame_ms: int = FRAME_MS,
        bitrate_bps: int = 16_000,
        complexity: int = 5,
        fec: bool = True,
        expected_loss_pct: int = 10,
        dtx: bool = False,
    ) -> None:
        _check_format(sample_rate_hz, frame_ms)
        # Validates the ranges with the same messages a config file would get.
        self.settings = OpusSettings(bitrate_bps, complexity, fec, expected_loss_pct, dtx)
        self._lib = _opuslib()
        self.sample_rate_hz = sample_rate_hz
        self.frame_ms = frame_ms
        self.frame_samples = sample_rate_hz * frame_ms // 1000
        self.frame_bytes = self.frame_samples * SAMPLE_WIDTH_BYTES
        self._calls = _libopus_calls(self._lib)
        self._enc: Any = None  # made on first use (see the module docstring)
        self._enc_at = 0  # its C address
        self._out: Any = None  # the packet buffer, made with the state

    def _state(self) -> Any:
        enc = self._enc
        if enc is None:
            lib, s = self._lib, self.settings
            enc = self._enc = lib.Encoder(self.sample_rate_hz, 1, lib.APPLICATION_VOIP)
            self._enc_at = _address(enc.encoder_state)
            self._out = ctypes.create_string_buffer(_MAX_PACKET_BYTES)
            enc.bitrate = s.bitrate_bps
            enc.complexity = s.complexity
            enc.inband_fec = int(s.fec)
            enc.packet_loss_perc = s.expected_loss_pct
            enc.dtx = int(s.dtx)
            logger.debug(
                "opus encoder: %d Hz, %d ms, %d bps, complexity %d, fec %s, loss %d%%, dtx %s",
                self.sample_rate_hz,
                self.frame_ms,
                s.bitrate_bps,
                s.complexity,
                s.fec,
                s.expected_loss_pct,
                s.dtx,
            )
        return enc

    @classmethod
    def from_settings(
        cls,
        settings: OpusSettings,
        sample_rate_hz: int = CAPTURE_RATE_HZ,
        frame_ms: int = FRAME_MS,
    ) -> OpusEncoder:
        return cls(
            sample_rate_hz,
            frame_ms,
            bitrate_bps=settings.bitrate_bps,
            complexity=settings.complexity,
            fec=settings.fec,
            expected_loss_pct=settings.expected_loss_pct,
            dtx=settings.dtx,
        )

    @property
    def fec_enabled(self) -> bool:
        """What libopus reports, read back (not what was asked)."""
        return bool(self._state().inband_fec)

    @property
    def lookahead_samples(self) -> int:
        """Encoder delay: decoded audio lags the input by this many samples."""
        return int(self._state().lookahead)

    def encode(self, pcm: bytes) -> bytes:
        """One packet for exactly one frame (``frame_bytes`` of s16le PCM)."""
        if len(pcm) != self.frame_bytes:
            raise ValueError(f"Opus encoder needs {self.frame_bytes}-byte frames, got {len(pcm)}")
        if self._enc is None:
            self._state()
        out = self._out
        written: int = self._calls.encode(self._enc_at, pcm, self.frame_samples, out,
                                          _MAX_PACKET_BYTES)
        if written < 0:
            raise EdgevoiceError(f"libopus could not encode: {self._lib.OpusError(written)}")
        return ctypes.string_at(out, written)

    @property
    def allocated(self) -> bool:
        """Whether libopus state is held now."""
        return self._enc is not None

    def reset(self) -> None:
        """Start a new stream (as after a reconnect): forget the prediction state."""
        if self._enc is not None:
            self._enc.reset_state()

    def release(self) -> None:
        """Free the codec state (an idle session); the next packet starts a new stream."""
        self._enc = self._out = None
        self._enc_at = 0


class OpusDecoder:
    """Decodes Opus packets to mono s16le PCM and rebuilds lost ones. Not thread-safe."""

    def __init__(self, sample_rate_hz: int = CAPTURE_RATE_HZ, frame_ms: int = FRAME_MS) -> None:
        _check_format(sample_rate_hz, frame_ms)
        self._lib = lib = _opuslib()
        self._error_type: type[Exception] = lib.OpusError
        self.sample_rate_hz = sample_rate_hz
        self.frame_samples = sample_rate_hz * frame_ms // 1000
        self._max_samples = sample_rate_hz * _MAX_PACKET_MS // 1000
        # A lost packet is rebuilt at the duration of the last good one (the codec
        # needs the exact duration of the gap).
        self._last_samples = self.frame_samples
        self._calls = _libopus_calls(lib)
        self._dec: Any = None  # made on first use (see the module docstring)
        self._dec_at = 0  # its C address
        self._pcm: Any = None  # the PCM buffer (120 ms), made with the state

    @property
    def allocated(self) -> bool:
        """Whether libopus state is held now."""
        return self._dec is not None

    def release(self) -> None:
        """Free the codec state (an idle session); the next packet starts a new stream."""
        self._dec = self._pcm = None
        self._dec_at = 0
        self._last_samples = self.frame_samples

    def decode(self, packet: bytes) -> bytes:
        """PCM for one received packet."""
        if not packet:
            raise OpusDecodeError("empty Opus packet (use conceal() for a lost one)")
        pcm = self._run(packet, self._max_samples, fec=False)
        self._last_samples = len(pcm) // SAMPLE_WIDTH_BYTES
        return pcm

    def conceal(self) -> bytes:
        """PCM standing in for one lost packet, extrapolated by libopus (PLC)."""
        return self._run(b"", self._last_samples, fec=False)

    def recover(self, next_packet: bytes) -> bytes:
        """Rebuild the packet lost just before ``next_packet`` from the FEC data it
        carries (libopus falls back to concealment when it carries none). Then decode
        ``next_packet`` itself with :meth:`decode`."""
        return self._run(next_packet, self._last_samples, fec=True)

    def decode_after_gap(self, packet: bytes, missing: int, max_concealed: int) -> list[bytes]:
        """PCM for ``packet`` that arrived ``missing`` packets after the last one.

        One lost packet is rebuilt from the FEC that ``packet`` carries; a longer gap
        is bridged by concealment, but only up to ``max_concealed`` packets (invented
        audio beyond that would only confuse). Raises OpusDecodeError when ``packet``
        itself is corrupt, after the gap's audio was made.
        """
        out: list[bytes] = []
        if missing == 1:
            out.append(self.recover(packet))
        else:
            out.extend(self.conceal() for _ in range(min(missing, max_concealed)))
        out.append(self.decode(packet))
        return out

    def reset(self) -> None:
        """Start a new stream: forget the state used for concealment."""
        if self._dec is not None:
            self._dec.reset_state()
        self._last_samples = self.frame_samples

    def _run(self, packet: bytes, max_samples: int, *, fec: bool) -> bytes:
        """Decode ``packet`` (empty: conceal) into at most ``max_samples``."""
        if self._dec is None:
            self._dec = self._lib.Decoder(self.sample_rate_hz, 1)
            self._dec_at = _address(self._dec.decoder_state)
            self._pcm = ctypes.create_string_buffer(self._max_samples * SAMPLE_WIDTH_BYTES)
        pcm = self._pcm
        samples: int = self._calls.decode(self._dec_at, packet or None, len(packet), pcm,
                                          max_samples, fec)
        if samples < 0:
            raise OpusDecodeError(f"cannot decode Opus packet of {len(packet)} bytes: "
                                  f"{self._error_type(samples)}")
        return ctypes.string_at(pcm, samples * SAMPLE_WIDTH_BYTES)
