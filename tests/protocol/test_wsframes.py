"""The relay's scan for whole data frames (protocol/wsframes.py), against frames made by
websockets itself: it takes exactly what websockets' parser would take as whole final
text and binary frames, and stops at anything else."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st
from websockets.exceptions import PayloadTooBig, ProtocolError
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from edgevoice.protocol.wsframes import FIN_BINARY, FIN_TEXT, unmasked_frame, whole_frames


def _masked(opcode: Opcode, payload: bytes, *, fin: bool = True) -> bytes:
    return Frame(opcode, payload, fin).serialize(mask=True, extensions=[])


def _frames(data: bytes, max_size: int | None) -> list[tuple[int, int, bytes]]:
    return list(whole_frames(data, max_size))


def test_frames_after_the_one_a_caller_stops_at_are_not_unmasked() -> None:
    # The relay stops at a frame its cheap path does not take and hands it, and all
    # after it, to websockets: those are never unmasked here (lazy scan).
    frames = [_masked(Opcode.BINARY, b"audio %d" % k) for k in range(3)]
    scan = whole_frames(b"".join(frames), 16_384)
    end, first, payload = next(scan)
    assert (end, first, payload) == (len(frames[0]), FIN_BINARY, b"audio 0")
    assert scan.gi_frame is not None and scan.gi_frame.f_locals["pos"] == 0  # paused
    scan.close()


def test_a_heartbeat_write_gives_both_payloads_and_where_each_ends() -> None:
    stats = b'{"type":"stats","values":{"rtt_ms":1.5}}'
    ping = b'{"type":"ping","id":1,"sent_ms":5}'
    first = _masked(Opcode.TEXT, stats)
    data = first + _masked(Opcode.TEXT, ping)
    assert _frames(data, 16384) == [(len(first), FIN_TEXT, stats),
                                         (len(data), FIN_TEXT, ping)]


def test_an_audio_frame_and_a_message_after_it_in_one_write() -> None:
    audio = bytes(range(12)) + os.urandom(60)
    first = _masked(Opcode.BINARY, audio)
    data = first + _masked(Opcode.TEXT, b'{"type":"turn_end"}')
    assert _frames(data, 16384) == [(len(first), FIN_BINARY, audio),
                                         (len(data), FIN_TEXT, b'{"type":"turn_end"}')]


@given(st.binary(max_size=70_000), st.sampled_from([Opcode.TEXT, Opcode.BINARY]))
def test_any_length_up_to_the_limit_round_trips(payload: bytes, opcode: Opcode) -> None:
    data = _masked(opcode, payload)
    taken = _frames(data, 16_384)
    if len(payload) <= 16_384:
        assert taken == [(len(data), data[0], payload)]
    else:  # left to websockets, which refuses it (1009)
        assert taken == []


def test_scanning_stops_at_the_first_frame_that_is_not_a_plain_data_frame() -> None:
    text = _masked(Opcode.TEXT, b'{"type":"ping","id":1,"sent_ms":5}')
    audio = _masked(Opcode.BINARY, b"\x01\x02\x03\x04")
    for other in (
        _masked(Opcode.PING, b""),
        _masked(Opcode.PONG, b"x"),
        _masked(Opcode.CLOSE, b"\x03\xe8"),
        _masked(Opcode.TEXT, b"part", fin=False),  # a fragmented message
        _masked(Opcode.BINARY, b"part", fin=False),
        _masked(Opcode.CONT, b"rest"),
        bytes([0x81 | 0x40]) + _masked(Opcode.TEXT, b"x")[1:],  # an extension's bit (RSV1)
        bytes([0x82 | 0x10]) + _masked(Opcode.BINARY, b"x")[1:],  # RSV3
        Frame(Opcode.TEXT, b"unmasked").serialize(mask=False, extensions=[]),
        Frame(Opcode.BINARY, b"unmasked").serialize(mask=False, extensions=[]),
    ):
        for plain in (text, audio):
            assert _frames(other + plain, 16_384) == []
            assert [end for end, _, _ in _frames(plain + other + plain, 16_384)] == [
                len(plain)]


def test_a_frame_cut_short_is_left_whole_to_websockets() -> None:
    for opcode in (Opcode.TEXT, Opcode.BINARY):
        frame = _masked(opcode, os.urandom(300))  # a 16-bit length
        for cut in range(len(frame)):
            assert _frames(frame[:cut], 16_384) == []
        assert _frames(frame + frame[:9], 16_384) == [
            (len(frame), frame[0], frame_payload(frame))]


def test_a_64_bit_length_is_never_taken() -> None:
    frame = _masked(Opcode.BINARY, b"a" * 70_000)
    assert frame[1] & 0x7F == 127
    assert _frames(frame, None) == []


def frame_payload(frame: bytes) -> bytes:
    """The unmasked payload of one whole masked frame with a 16-bit length."""
    length = int.from_bytes(frame[2:4], "big")
    mask = frame[4:8]
    return bytes(b ^ mask[i % 4] for i, b in enumerate(frame[8:8 + length]))


# --- against websockets' own serializer and parser, on any sequence of frames

_PAYLOAD = st.one_of(st.binary(max_size=130),
                     st.integers(min_value=120, max_value=70_000).map(lambda n: b"\x5a" * n))


@st.composite
def _wire_frame(draw: st.DrawFn) -> bytes:
    """One frame as a client could write it: any opcode, FIN, reserved bits, masked
    or not; serialized by websockets."""
    opcode = draw(st.sampled_from(list(Opcode)))
    control = opcode in (Opcode.PING, Opcode.PONG, Opcode.CLOSE)
    payload = draw(st.binary(max_size=125) if control else _PAYLOAD)
    if opcode is Opcode.CLOSE:
        payload = b"\x03\xe8" + payload[:100] if payload else b""
    fin = True if control else draw(st.booleans())
    data = bytearray(Frame(opcode, payload, fin).serialize(mask=draw(st.booleans()),
                                                           extensions=[]))
    data[0] |= draw(st.sampled_from([0, 0, 0, 0x40, 0x20, 0x10]))  # RSV1-3, now and then
    return bytes(data)


def _websockets_takes(data: bytes, max_size: int | None) -> list[tuple[int, int, bytes]]:
    """The leading whole final text and binary frames, as websockets' own parser (a
    server's, no extension) reads them; it stops where it would refuse or wait."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    taken: list[tuple[int, int, bytes]] = []
    pos = 0
    while True:
        parser = Frame.parse(reader.read_exact, mask=True, max_size=max_size, extensions=[])
        try:
            next(parser)
            raise AssertionError("the parser waits with the end of data fed")
        except StopIteration as parsed:
            frame: Frame = parsed.value
        except (ProtocolError, PayloadTooBig, EOFError):
            return taken  # refused (or cut short): websockets judges it
        if not frame.fin or frame.opcode not in (Opcode.TEXT, Opcode.BINARY):
            return taken  # fragments and control frames: websockets handles them
        if data[pos + 1] & 0x7F == 127:
            return taken  # a 64-bit length: never taken (larger than any message)
        end = len(data) - len(reader.buffer)
        taken.append((end, data[pos], frame.data))
        pos = end


@given(st.lists(_wire_frame(), max_size=6), st.integers(min_value=0, max_value=8),
       st.sampled_from([None, 0, 4, 125, 126, 1300, 16_384, 65_535]))
def test_it_takes_what_websockets_parses_as_whole_data_frames(
        frames: list[bytes], cut_back: int, max_size: int | None) -> None:
    data = b"".join(frames)
    data = data[:max(0, len(data) - cut_back)]  # the last frame cut short, at times
    assert _frames(data, max_size) == _websockets_takes(data, max_size)


@given(st.binary(max_size=70_000), st.sampled_from([Opcode.TEXT, Opcode.BINARY]))
def test_the_relay_frames_what_it_writes_as_websockets_does(payload: bytes,
                                                            opcode: Opcode) -> None:
    first = FIN_TEXT if opcode is Opcode.TEXT else FIN_BINARY
    assert unmasked_frame(first, payload) == Frame(opcode, payload).serialize(
        mask=False, extensions=[])
