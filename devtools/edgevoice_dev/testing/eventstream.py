"""The AWS event-stream binary framing (``application/vnd.amazon.eventstream``), sans I/O.

Bedrock's bidirectional stream carries every Nova Sonic event inside these frames.
The SDK has its own codec; this one exists so the fake Bedrock endpoint
(:mod:`edgevoice_dev.testing.fake_bedrock`) can speak the wire format without borrowing
the SDK's private modules, and so tests can build exact, or exactly broken, frames.

A message is::

    prelude   total length (uint32) | headers length (uint32) | prelude CRC32 (uint32)
    headers   repeated: name length (uint8) | name (utf-8) | type (uint8) | value
    payload   the remaining bytes
    trailer   message CRC32 (uint32) over everything before it

Both CRCs are the IEEE CRC32 of :func:`zlib.crc32`. Header values are typed; the
types edgevoice needs are strings, byte arrays, timestamps (signed milliseconds
since the epoch) and the integer family, all decoded to plain Python values.
"""

from __future__ import annotations

import datetime
import struct
import uuid
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

#: Bedrock refuses larger frames; a decoder that sees a bigger one is being fed garbage.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_HEADERS_BYTES = 128 * 1024
_PRELUDE = struct.Struct(">III")
_PRELUDE_BYTES = _PRELUDE.size
_MIN_MESSAGE_BYTES = _PRELUDE_BYTES + 4

# Header value type tags of the format.
_TRUE, _FALSE, _BYTE, _SHORT, _INT, _LONG, _BYTES, _STRING, _TIMESTAMP, _UUID = range(10)

HeaderValue = bool | int | bytes | str | datetime.datetime | uuid.UUID


class EventStreamError(ValueError):
    """Bytes that are not a valid event-stream message (bad length, CRC or header)."""


@dataclass(frozen=True)
class Message:
    """One event-stream message: typed headers and an opaque payload."""

    headers: Mapping[str, HeaderValue] = field(default_factory=dict)
    payload: bytes = b""


def _encode_header_value(value: HeaderValue) -> bytes:
    # bool before int: bool is a subclass of int.
    if isinstance(value, bool):
        return bytes([_TRUE if value else _FALSE])
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return bytes([_INT]) + struct.pack(">i", value)
        return bytes([_LONG]) + struct.pack(">q", value)
    if isinstance(value, bytes):
        return bytes([_BYTES]) + struct.pack(">H", len(value)) + value
    if isinstance(value, str):
        raw = value.encode("utf-8")
        return bytes([_STRING]) + struct.pack(">H", len(raw)) + raw
    if isinstance(value, datetime.datetime):
        millis = round(value.timestamp() * 1000)
        return bytes([_TIMESTAMP]) + struct.pack(">q", millis)
    if isinstance(value, uuid.UUID):
        return bytes([_UUID]) + value.bytes
    raise TypeError(f"unsupported header value type: {type(value).__name__}")


def encode_headers(headers: Mapping[str, HeaderValue]) -> bytes:
    """The header block of a message, in the order given."""
    out = bytearray()
    for name, value in headers.items():
        raw_name = name.encode("utf-8")
        if not 0 < len(raw_name) < 256:
            raise ValueError(f"header name must be 1..255 bytes: {name!r}")
        out.append(len(raw_name))
        out += raw_name
        out += _encode_header_value(value)
    return bytes(out)


def encode_message(message: Message) -> bytes:
    """The complete wire bytes of ``message``."""
    headers = encode_headers(message.headers)
    total = _PRELUDE_BYTES + len(headers) + len(message.payload) + 4
    if total > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {total} bytes exceeds {MAX_MESSAGE_BYTES}")
    prelude = struct.pack(">II", total, len(headers))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + headers + message.payload
    return body + struct.pack(">I", zlib.crc32(body))


def decode_headers(data: bytes) -> dict[str, HeaderValue]:
    """Parse a header block; raise :class:`EventStreamError` if it is malformed."""
    headers: dict[str, HeaderValue] = {}
    pos = 0
    end = len(data)

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > end:
            raise EventStreamError("header block truncated")
        chunk = data[pos : pos + n]
        pos += n
        return chunk

    while pos < end:
        name_len = take(1)[0]
        if name_len == 0:
            raise EventStreamError("empty header name")
        try:
            name = take(name_len).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EventStreamError("header name is not utf-8") from exc
        kind = take(1)[0]
        value: HeaderValue
        if kind == _TRUE:
            value = True
        elif kind == _FALSE:
            value = False
        elif kind == _BYTE:
            value = struct.unpack(">b", take(1))[0]
        elif kind == _SHORT:
            value = struct.unpack(">h", take(2))[0]
        elif kind == _INT:
            value = struct.unpack(">i", take(4))[0]
        elif kind == _LONG:
            value = struct.unpack(">q", take(8))[0]
        elif kind == _BYTES:
            value = take(struct.unpack(">H", take(2))[0])
        elif kind == _STRING:
            try:
                value = take(struct.unpack(">H", take(2))[0]).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise EventStreamError(f"header {name!r} is not utf-8") from exc
        elif kind == _TIMESTAMP:
            millis = struct.unpack(">q", take(8))[0]
            try:
                value = datetime.datetime.fromtimestamp(millis / 1000, tz=datetime.UTC)
            except (OverflowError, OSError, ValueError) as exc:
                raise EventStreamError(f"header {name!r} timestamp out of range") from exc
        elif kind == _UUID:
            value = uuid.UUID(bytes=take(16))
        else:
            raise EventStreamError(f"header {name!r} has unknown type {kind}")
        headers[name] = value
    return headers


class MessageDecoder:
    """Feed it bytes as they arrive; iterate the complete messages they finish.

    Any framing error is final: the decoder refuses further input, because after
    a bad length or CRC there is no way to find the next frame boundary.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._failed: EventStreamError | None = None

    def feed(self, data: bytes) -> Iterator[Message]:
        """Add ``data``; yield every message now complete."""
        if self._failed is not None:
            raise self._failed
        self._buffer += data
        while True:
            try:
                message = self._next()
            except EventStreamError as exc:
                self._failed = exc
                raise
            if message is None:
                return
            yield message

    @property
    def pending_bytes(self) -> int:
        """Bytes received but not yet part of a complete message."""
        return len(self._buffer)

    def _next(self) -> Message | None:
        buf = self._buffer
        if len(buf) < _PRELUDE_BYTES:
            return None
        total, headers_len, prelude_crc = _PRELUDE.unpack_from(buf)
        if zlib.crc32(bytes(buf[:8])) != prelude_crc:
            raise EventStreamError("prelude CRC mismatch")
        if total < _MIN_MESSAGE_BYTES or total > MAX_MESSAGE_BYTES:
            raise EventStreamError(f"message length {total} out of range")
        if headers_len > MAX_HEADERS_BYTES or headers_len > total - _MIN_MESSAGE_BYTES:
            raise EventStreamError(f"headers length {headers_len} out of range")
        if len(buf) < total:
            return None
        frame = bytes(buf[:total])
        del buf[:total]
        (message_crc,) = struct.unpack_from(">I", frame, total - 4)
        if zlib.crc32(frame[:-4]) != message_crc:
            raise EventStreamError("message CRC mismatch")
        headers = decode_headers(frame[_PRELUDE_BYTES : _PRELUDE_BYTES + headers_len])
        payload = frame[_PRELUDE_BYTES + headers_len : -4]
        return Message(headers=headers, payload=payload)


def decode_message(data: bytes) -> Message:
    """Decode exactly one complete message; raise if ``data`` is anything else."""
    decoder = MessageDecoder()
    messages = list(decoder.feed(data))
    if len(messages) != 1 or decoder.pending_bytes:
        raise EventStreamError("expected exactly one complete message")
    return messages[0]
