"""Whole masked WebSocket data frames at the start of received bytes (RFC 6455 §5.2).

Pure: bytes in, the frames' payloads out. The relay (``relay/server.py``
GuardedConnection) uses it to take an idle device's heartbeat (its ``stats`` and
``ping``, two small text frames in one write) and each uplink audio frame (one binary
frame a write, 50 a second while a device talks) without waking websockets' generator
based frame parser, which was a third of the relay's CPU per heartbeat (bench row 13)
and its largest cost per uplink frame after the codec (bench row 4's profile).

It also frames what the relay writes (:func:`unmasked_frame`), as websockets would.

Only the plainest frames are taken: final (not fragmented), no reserved bits (no
extension), text or binary, masked (a client's frames must be), a 7- or 16-bit length
no larger than the connection's limit, all of it present. Scanning stops at the first
frame that is anything else (or is cut short); the caller hands that frame and what
follows to websockets, which parses it, and rejects what is wrong, as it always has.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

try:  # websockets' C helper, as its own frame parser uses
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

#: first header byte of a final, unextended text frame (FIN, RSV1-3 clear, opcode 1)
FIN_TEXT = 0x81
#: the same for a binary frame (opcode 2)
FIN_BINARY = 0x82
#: the second header byte's MASK bit: a client masks every frame (RFC 6455 §5.3)
MASKED = 0x80
_LENGTH_16 = 126
_LENGTH_64 = 127


def whole_frames(data: bytes, max_size: int | None) -> Iterator[tuple[int, int, bytes]]:
    """The plain text and binary frames ``data`` starts with, as (offset just past the
    frame, its first header byte: :data:`FIN_TEXT` or :data:`FIN_BINARY`, unmasked
    payload), in order; nothing when the first is not one. ``max_size``: the largest
    payload taken (a larger frame is left to websockets, which refuses it).

    Lazy: a frame is unmasked only when the caller asks for it, so a caller that stops
    at a frame it will not take (and hands the rest to websockets) unmasks nothing
    after it."""
    pos, end_of_data = 0, len(data)
    while end_of_data - pos >= 6:  # 2 header bytes and the 4-byte mask, at least
        first = data[pos]
        if first != FIN_BINARY and first != FIN_TEXT:
            break
        second = data[pos + 1]
        if not second & MASKED:
            break
        length = second & 0x7F
        start = pos + 6
        if length == _LENGTH_16:
            start = pos + 8
            if end_of_data < start:
                break
            length = (data[pos + 2] << 8) | data[pos + 3]
        elif length == _LENGTH_64:
            break  # far beyond any message of the protocol (websockets refuses it)
        if max_size is not None and length > max_size:
            break
        end = start + length
        if end > end_of_data:
            break
        yield end, first, apply_mask(data[start:end], data[start - 4:start])
        pos = end


_HEAD_16 = struct.Struct("!BBH")
_HEAD_64 = struct.Struct("!BBQ")


def frame_header(first_byte: int, length: int, mask_bit: int = 0) -> bytes:
    """A frame's header up to its masking key: ``first_byte`` (FIN_TEXT, FIN_BINARY),
    then the shortest length encoding that fits ``length``, with ``mask_bit`` (0 for a
    server's frames, :data:`MASKED` for a client's) in the second byte."""
    if length < _LENGTH_16:
        return bytes((first_byte, mask_bit | length))
    if length < 65536:
        return _HEAD_16.pack(first_byte, mask_bit | _LENGTH_16, length)
    return _HEAD_64.pack(first_byte, mask_bit | _LENGTH_64, length)


def unmasked_frame(first_byte: int, payload: bytes) -> bytes:
    """One whole frame as a server sends it (not masked): ``first_byte`` (FIN_TEXT,
    FIN_BINARY), the shortest length that fits, ``payload``; the bytes websockets'
    ``Frame.serialize`` makes for it, without its frame object, checks and buffer."""
    return frame_header(first_byte, len(payload)) + payload


def masked_frames(messages: Sequence[str | bytes], masks: bytes) -> bytes:
    """``messages`` as unfragmented, masked client frames, back to back: the bytes
    websockets' protocol writes for each, without its frame objects (the device's
    uplink batches). ``masks`` holds 4 random bytes per message, each frame's key."""
    out = bytearray()
    for i, message in enumerate(messages):
        if isinstance(message, str):
            data, first_byte = message.encode(), FIN_TEXT
        else:
            data, first_byte = message, FIN_BINARY
        mask = masks[4 * i:4 * i + 4]
        out += frame_header(first_byte, len(data), MASKED)
        out += mask
        out += apply_mask(data, mask)
    return bytes(out)
