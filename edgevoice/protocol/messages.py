"""Wire protocol v1 messages: JSON control messages and binary audio frames.

This module only converts between bytes/text and frozen dataclasses, and checks that
what arrives is well formed. Which message may be sent when, and by whom, is decided
in :mod:`edgevoice.protocol.connection`. The normative spec is ``docs/protocol.md``.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Any, ClassVar, Literal

from edgevoice.decoding import PROTOCOL_POLICY, DecodeError, dataclass_shape, decode
from edgevoice.errors import LocalProtocolError, RemoteProtocolError

PROTOCOL_VERSION = 1
SUBPROTOCOL = "edgevoice.v1"
#: Largest text (control) message either side accepts, in bytes.
MAX_TEXT_BYTES = 16 * 1024
#: Largest Opus packet (RFC 6716: 1275 bytes for one frame).
MAX_OPUS_PACKET_BYTES = 1275
AUDIO_HEADER = struct.Struct("!BBBxII")
AUDIO_HEADER_BYTES = AUDIO_HEADER.size  # 12
#: Largest binary frame either side accepts.
MAX_BINARY_BYTES = AUDIO_HEADER_BYTES + MAX_OPUS_PACKET_BYTES
#: The error code of a turn the relay refused (at capacity); the device ends that turn
#: with turn_end reason "refused" and stops sending its audio.
TURN_REFUSED_CODE = "relay_busy"


class CloseCode(IntEnum):
    """WebSocket close codes used by edgevoice."""

    NORMAL = 1000
    GOING_AWAY = 1001  # relay or device shutting down; come back later
    PROTOCOL_ERROR = 1002  # the peer broke this protocol
    POLICY_VIOLATION = 1008  # a limit was exceeded, or the hello names another device
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SESSION_REPLACED = 4000  # the same device connected again
    HELLO_TIMEOUT = 4001  # no hello within the handshake timeout
    UNSUPPORTED_VERSION = 4002  # hello.protocol is not one we speak
    IDLE_TIMEOUT = 4003  # nothing received for too long (heartbeats stopped)
    RECONNECT_NOW = 4004  # relay draining (restart, upgrade): session over, reconnect at once
    SLOW_READER = 4005  # the peer did not read what was sent to it; resumable


def handover_reason(last_received_seq: int | None, messages_received: int) -> str:
    """The reason of a 4004 close sent to an idle device: what the relay received, so
    the device re-sends, on its next session, anything the relay did not see."""
    seq = -1 if last_received_seq is None else last_received_seq
    return f"relay draining: reconnect now; got {seq} {messages_received}"


def parse_handover_reason(reason: str) -> tuple[int | None, int] | None:
    """(last uplink seq, reliable messages) from a 4004 reason; None if it has none."""
    _, sep, counts = reason.rpartition("; got ")
    parts = counts.split()
    if not sep or len(parts) != 2 or not (parts[0] == "-1" or parts[0].isdigit()) \
            or not parts[1].isdigit():
        return None
    seq, messages = int(parts[0]), int(parts[1])
    return (None if seq < 0 else seq), messages


class AudioKind(IntEnum):
    """Direction of an audio frame."""

    UPLINK = 1  # device microphone -> relay, Opus 16 kHz
    DOWNLINK = 2  # relay reply -> device speaker, Opus 24 kHz


class AudioFlags(IntFlag):
    """Bits of the audio header's flags byte."""

    NONE = 0
    START = 0x01  # first frame of an utterance (uplink) or of a response (downlink)
    END = 0x02  # last frame of an utterance or response
    REPLAY = 0x04  # re-sent after a session resume


KNOWN_FLAGS = int(AudioFlags.START | AudioFlags.END | AudioFlags.REPLAY)

# Header bytes to their enum members, made once: calling an enum class per frame costs
# more than the rest of the header's parse. None: not a known kind / carries unknown bits.
_KINDS: tuple[AudioKind | None, ...] = tuple(
    AudioKind(i) if i in AudioKind._value2member_map_ else None for i in range(256))
_FLAGS: tuple[AudioFlags | None, ...] = tuple(
    None if i & ~KNOWN_FLAGS else AudioFlags(i) for i in range(256))


@dataclass(frozen=True)
class AudioFrame:
    """One binary message: header plus exactly one Opus packet."""

    kind: AudioKind
    seq: int
    timestamp_ms: int
    payload: bytes
    flags: AudioFlags = AudioFlags.NONE

    def encode(self) -> bytes:
        if not 0 <= self.seq <= 0xFFFFFFFF or not 0 <= self.timestamp_ms <= 0xFFFFFFFF:
            raise LocalProtocolError("audio seq and timestamp must fit in 32 bits")
        if not 1 <= len(self.payload) <= MAX_OPUS_PACKET_BYTES:
            raise LocalProtocolError(f"Opus packet of {len(self.payload)} bytes: payloads "
                                     f"are 1 to {MAX_OPUS_PACKET_BYTES} bytes")
        header = AUDIO_HEADER.pack(
            PROTOCOL_VERSION, self.kind, self.flags, self.seq, self.timestamp_ms
        )
        return header + self.payload

    @classmethod
    def decode(cls, data: bytes) -> AudioFrame:
        if len(data) <= AUDIO_HEADER_BYTES:
            raise RemoteProtocolError(f"audio frame of {len(data)} bytes: a header and a "
                                      "payload of 1 to 1275 bytes")
        if len(data) > MAX_BINARY_BYTES:
            raise RemoteProtocolError(f"audio frame of {len(data)} bytes is too large")
        version, kind, flags, seq, timestamp_ms = AUDIO_HEADER.unpack_from(data)
        if version != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"audio frame version {version} is not {PROTOCOL_VERSION}")
        audio_kind, audio_flags = _KINDS[kind], _FLAGS[flags]
        if audio_kind is None:
            raise RemoteProtocolError(f"unknown audio kind {kind}")
        if audio_flags is None:
            raise RemoteProtocolError(f"unknown audio flags 0x{flags:02x}")
        payload = bytes(data[AUDIO_HEADER_BYTES:])
        return cls(audio_kind, seq, timestamp_ms, payload, audio_flags)


# --------------------------------------------------------------------------- control


@dataclass(frozen=True)
class AudioFormat:
    """An audio stream's format, fixed at the hello/welcome exchange."""

    codec: str = "opus"
    sample_rate_hz: int = 16_000
    channels: int = 1
    frame_ms: int = 20


UPLINK_FORMAT = AudioFormat(sample_rate_hz=16_000)
DOWNLINK_FORMAT = AudioFormat(sample_rate_hz=24_000)


@dataclass(frozen=True)
class ResumeRequest:
    """Sent in hello to continue a session after a short link drop."""

    session_id: str
    #: last downlink sequence number the device received (None: none yet)
    last_downlink_seq: int | None = None
    #: reliable control messages the device received from the relay in this session
    downlink_messages: int = 0


@dataclass(frozen=True)
class ResumeResult:
    """Sent in welcome: whether the session was resumed, and what the relay has."""

    resumed: bool
    #: last uplink sequence number the relay received (None: none yet)
    last_uplink_seq: int | None = None
    #: reliable control messages the relay received from the device in this session
    uplink_messages: int = 0


class Message:
    """Base of every control message; ``TYPE`` is its ``type`` field on the wire."""

    TYPE: ClassVar[str] = ""


@dataclass(frozen=True)
class Hello(Message):
    TYPE: ClassVar[str] = "hello"
    device: str
    protocol: int = PROTOCOL_VERSION
    software: str = ""
    uplink: AudioFormat = UPLINK_FORMAT
    downlink: AudioFormat = DOWNLINK_FORMAT
    resume: ResumeRequest | None = None


@dataclass(frozen=True)
class Welcome(Message):
    TYPE: ClassVar[str] = "welcome"
    session_id: str
    protocol: int = PROTOCOL_VERSION
    uplink: AudioFormat = UPLINK_FORMAT
    downlink: AudioFormat = DOWNLINK_FORMAT
    heartbeat_interval_ms: int = 10_000
    resume: ResumeResult = ResumeResult(resumed=False)
    #: a browser's reconnect ticket (docs/protocol.md §9); never sent to a daemon
    ticket: str | None = None


@dataclass(frozen=True)
class TurnStart(Message):
    TYPE: ClassVar[str] = "turn_start"
    turn_id: int
    trigger: str = "vad"


@dataclass(frozen=True)
class TurnEnd(Message):
    TYPE: ClassVar[str] = "turn_end"
    turn_id: int
    reason: str = "silence"


@dataclass(frozen=True)
class Interrupt(Message):
    """Relay → device: stop playing now. Device → relay: the user barged in."""

    TYPE: ClassVar[str] = "interrupt"
    turn_id: int | None = None
    reason: str = "barge_in"


@dataclass(frozen=True)
class Transcript(Message):
    TYPE: ClassVar[str] = "transcript"
    role: Literal["user", "assistant"]
    text: str
    final: bool = True
    turn_id: int | None = None


@dataclass(frozen=True)
class ResponseStart(Message):
    TYPE: ClassVar[str] = "response_start"
    turn_id: int | None = None


@dataclass(frozen=True)
class ResponseEnd(Message):
    TYPE: ClassVar[str] = "response_end"
    turn_id: int | None = None
    reason: str = "end_turn"


@dataclass(frozen=True)
class Error(Message):
    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    retryable: bool = False


@dataclass(frozen=True)
class Ping(Message):
    TYPE: ClassVar[str] = "ping"
    id: int
    #: sender's monotonic clock in ms when sent
    sent_ms: int


@dataclass(frozen=True)
class Pong(Message):
    TYPE: ClassVar[str] = "pong"
    id: int
    #: echoed from the ping, so the pinger computes RTT on its own clock
    ping_sent_ms: int
    #: the ponger's own clock in ms when answering (for clock-offset estimates)
    sent_ms: int = 0


@dataclass(frozen=True)
class Stats(Message):
    """Device → relay: a compact stats snapshot for the fleet view."""

    TYPE: ClassVar[str] = "stats"
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceCall(Message):
    """Relay → device: run one of the device's own functions (docs/protocol.md §12)."""

    TYPE: ClassVar[str] = "device_call"
    id: str
    #: e.g. "timer.set", "timer.list", "timer.cancel"
    name: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceResult(Message):
    """Device → relay: the answer to the :class:`DeviceCall` of the same ``id``."""

    TYPE: ClassVar[str] = "device_result"
    id: str
    ok: bool
    result: dict[str, Any] = field(default_factory=dict)


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Welcome,
        TurnStart,
        TurnEnd,
        Interrupt,
        Transcript,
        ResponseStart,
        ResponseEnd,
        Error,
        Ping,
        Pong,
        Stats,
        DeviceCall,
        DeviceResult,
    )
}


#: scalar field values that ``dataclasses.asdict`` would pass through as they are
_SCALARS = (int, str, float, bool, type(None))


#: One encoder for every message: ``json.dumps`` with these options builds a new
#: JSONEncoder on each call. An idle relay's work is a pong per heartbeat, and on a
#: machine whose caches others share every layer of code run once a minute per
#: device costs (bench row 13).
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
#: json's scanner: one JSON value from an index, (value, end); json.loads wraps it in
#: three Python calls and a regular expression for the whitespace around it.
_scan_json: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _parse_json(text: str | bytes) -> Any:
    """``json.loads(text)``: a str that is one JSON value with nothing around it is
    scanned directly; anything else (bytes, whitespace, extra data, an error) goes
    through ``json.loads``, which says what is wrong exactly as before."""
    if isinstance(text, str):
        try:
            value, end = _scan_json(text, 0)
        except StopIteration:
            pass  # not a JSON value at 0: json.loads raises the error
        else:
            if end == len(text):
                return value
    return json.loads(text)


def encode_message(message: Message) -> str:
    """Serialise a control message to its JSON text."""
    body: dict[str, Any] = {"type": message.TYPE}
    kind: type = type(message)
    values = [(name, getattr(message, name)) for name in dataclass_shape(kind)[1]]
    if all(type(value) in _SCALARS for _, value in values):
        # a flat message (ping, pong, turn_start, ...): what asdict gives, without its
        # recursive deep copy; a pong per heartbeat per idle device (bench row 13)
        body.update(values)
    else:
        body.update(dataclasses.asdict(message))  # type: ignore[call-overload]
    if isinstance(message, Welcome) and message.ticket is None:
        del body["ticket"]  # only browsers get one; keep the daemons' welcome as it was
    return _encode_json(body)


def decode_message(text: str | bytes) -> Message:
    """Parse and validate one control message; raise RemoteProtocolError if malformed.

    Unknown fields are ignored (a newer peer may add optional ones); an unknown
    ``type``, a missing required field or a value of the wrong type is an error.
    """
    # A str of at most MAX_TEXT_BYTES // 4 characters cannot be over the limit in UTF-8:
    # only a longer one is encoded to be measured (a heartbeat is parsed as it came).
    if isinstance(text, bytes) or len(text) > MAX_TEXT_BYTES // 4:
        size = len(text) if isinstance(text, bytes) else len(text.encode())
        if size > MAX_TEXT_BYTES:
            raise RemoteProtocolError(f"control message of {size} bytes is too large")
    try:
        body = _parse_json(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError(f"control message is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RemoteProtocolError("control message is not a JSON object")
    kind = body.get("type")
    if not isinstance(kind, str):
        raise RemoteProtocolError("control message has no string 'type'")
    cls = MESSAGE_TYPES.get(kind)
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {kind!r}")
    quick = _QUICK.get(cls)
    if quick is not None and (message := quick(body)) is not None:
        return message
    try:
        return decode(cls, body, PROTOCOL_POLICY, kind)
    except DecodeError as exc:
        raise RemoteProtocolError(str(exc)) from None


#: Largest integer a message may carry (PROTOCOL_POLICY: what a JSON double holds exactly).
_MAX_INT = 2**53


def _quick_ping(body: dict[str, Any]) -> Message | None:
    """A well-formed ping, or None (the general decoder then says what is wrong)."""
    ping_id, sent_ms = body.get("id"), body.get("sent_ms")
    if (type(ping_id) is int and type(sent_ms) is int
            and -_MAX_INT <= ping_id <= _MAX_INT and -_MAX_INT <= sent_ms <= _MAX_INT):
        return Ping(ping_id, sent_ms)
    return None


def _quick_stats(body: dict[str, Any]) -> Message | None:
    """Well-formed stats, or None (the general decoder then says what is wrong).

    Its ``values`` are any JSON (keys are strings by JSON's own rule): the object that
    json made is taken as it is, not copied key by key through the general decoder."""
    values = body.get("values")
    if type(values) is dict:
        return Stats(values)
    return None


#: Decoders for the messages an idle fleet sends every heartbeat (bench row 13): each
#: answers for a well-formed message only, exactly as :func:`decode` would.
_QUICK: dict[type[Message], Callable[[dict[str, Any]], Message | None]] = {
    Ping: _quick_ping, Stats: _quick_stats}

