"""The relay's scan for whole text frames (protocol/wsframes.py), against frames made by
websockets itself: it takes exactly what websockets' parser would take as whole final
text frames, and stops at anything else."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from edgevoice.protocol.wsframes import FIN_BINARY, FIN_TEXT, unmasked_frame, whole_text_frames


def _masked(opcode: Opcode, payload: bytes, *, fin: bool = True) -> bytes:
    return Frame(opcode, payload, fin).serialize(mask=True, extensions=[])


def _frames(data: bytes, max_size: int | None) -> list[tuple[int, bytes]]:
    return list(whole_text_frames(data, max_size))


def test_frames_after_the_one_a_caller_stops_at_are_not_unmasked() -> None:
    # The relay stops at a frame its cheap path does not take and hands it, and all
    # after it, to websockets: those are never unmasked here (lazy scan).
    frames = [_masked(Opcode.TEXT, b'{"type":"ping","id":%d,"sent_ms":5}' % k)
              for k in range(3)]
    scan = whole_text_frames(b"".join(frames), 16_384)
    end, payload = next(scan)
    assert end == len(frames[0]) and payload.endswith(b'"id":0,"sent_ms":5}')
    assert scan.gi_frame is not None and scan.gi_frame.f_locals["pos"] == 0  # paused
    scan.close()


def test_a_heartbeat_write_gives_both_payloads_and_where_each_ends() -> None:
    stats = b'{"type":"stats","values":{"rtt_ms":1.5}}'
    ping = b'{"type":"ping","id":1,"sent_ms":5}'
    first = _masked(Opcode.TEXT, stats)
    data = first + _masked(Opcode.TEXT, ping)
    assert _frames(data, 16384) == [(len(first), stats), (len(data), ping)]


@given(st.binary(max_size=70_000))
def test_any_length_up_to_the_limit_round_trips(payload: bytes) -> None:
    data = _masked(Opcode.TEXT, payload)
    taken = _frames(data, 16_384)
    if len(payload) <= 16_384:
        assert taken == [(len(data), payload)]
    else:  # left to websockets, which refuses it (1009)
        assert taken == []


def test_scanning_stops_at_the_first_frame_that_is_not_a_plain_text_frame() -> None:
    text = _masked(Opcode.TEXT, b'{"type":"ping","id":1,"sent_ms":5}')
    for other in (
        _masked(Opcode.BINARY, b"\x01\x02\x03\x04"),
        _masked(Opcode.PING, b""),
        _masked(Opcode.CLOSE, b"\x03\xe8"),
        _masked(Opcode.TEXT, b"part", fin=False),  # a fragmented message
        _masked(Opcode.CONT, b"rest"),
        bytes([0x81 | 0x40]) + _masked(Opcode.TEXT, b"x")[1:],  # an extension's bit (RSV1)
        Frame(Opcode.TEXT, b"unmasked").serialize(mask=False, extensions=[]),
    ):
        assert _frames(other + text, 16_384) == []
        assert _frames(text + other + text, 16_384) == [(len(text), b'{"type":"ping",'
                                                                   b'"id":1,"sent_ms":5}')]


def test_a_frame_cut_short_is_left_whole_to_websockets() -> None:
    frame = _masked(Opcode.TEXT, os.urandom(300))  # a 16-bit length
    for cut in range(len(frame)):
        assert _frames(frame[:cut], 16_384) == []
    assert _frames(frame + frame[:9], 16_384) == [(len(frame), frame_payload(frame))]


def test_a_64_bit_length_is_never_taken() -> None:
    frame = _masked(Opcode.TEXT, b"a" * 70_000)
    assert frame[1] & 0x7F == 127
    assert _frames(frame, None) == []


def frame_payload(frame: bytes) -> bytes:
    """The unmasked payload of one whole masked frame with a 16-bit length."""
    length = int.from_bytes(frame[2:4], "big")
    mask = frame[4:8]
    return bytes(b ^ mask[i % 4] for i, b in enumerate(frame[8:8 + length]))


@given(st.binary(max_size=70_000), st.sampled_from([Opcode.TEXT, Opcode.BINARY]))
def test_the_relay_frames_what_it_writes_as_websockets_does(payload: bytes,
                                                            opcode: Opcode) -> None:
    first = FIN_TEXT if opcode is Opcode.TEXT else FIN_BINARY
    assert unmasked_frame(first, payload) == Frame(opcode, payload).serialize(
        mask=False, extensions=[])
