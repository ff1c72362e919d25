"""What the device queues together leaves in one write (one TLS record, one segment).

A real DeviceLink against a real relay on 127.0.0.1: the frames of a 60 ms capture
block, queued at once, must go out in one socket write and arrive as separate,
ordered protocol frames (the wire protocol is unchanged).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from device_support import running_link
from edgevoice_dev.testing.harness import run, running_relay
from edgevoice_dev.testing.timeouts import scaled

from edgevoice.audio.opus import OpusEncoder
from edgevoice.device.link import DeviceLink
from edgevoice.protocol.connection import AudioReceived
from edgevoice.protocol.messages import AudioFlags, Message, TurnStart, Welcome
from edgevoice.relay.server import RelayServer


class Listener:
    def __init__(self) -> None:
        self.up = asyncio.Event()

    def link_up(self, welcome: Welcome) -> None:
        self.up.set()

    def link_suspended(self, reason: str) -> None: ...

    def link_resumed(self, welcome: Welcome) -> None: ...

    def link_down(self, reason: str, error: object) -> None: ...

    def on_message(self, message: Message) -> None: ...

    def on_audio(self, received: AudioReceived) -> None: ...


@contextlib.asynccontextmanager
async def _linked(relay: RelayServer) -> AsyncIterator[DeviceLink]:
    """A device link to ``relay``, up and past its first heartbeat; stopped after."""
    listener = Listener()
    async with running_link(f"ws://127.0.0.1:{relay.port}/", relay.tokens.add("d1"),
                            listener) as link:  # type: ignore[arg-type]
        await asyncio.wait_for(listener.up.wait(), scaled(10))
        await asyncio.sleep(0.2)  # the hello's heartbeat ping has gone out
        yield link


async def _frames_in(relay: RelayServer, n: int) -> None:
    """Until ``relay`` has taken ``n`` audio frames (or a while has passed)."""
    for _ in range(int(scaled(5) / 0.01)):
        if relay.counters.frames_in >= n:
            return
        await asyncio.sleep(0.01)


def packets(n: int) -> list[bytes]:
    encoder = OpusEncoder()
    return [encoder.encode(struct.pack("<320h", *(int(6000 * math.sin(0.1 * (k * 320 + i)))
                                                  for i in range(320)))) for k in range(n)]


def test_a_capture_blocks_frames_go_out_in_one_write_and_arrive_in_order(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as relay, _linked(relay) as link:
            writes_before = link.stats.writes
            frames = packets(6)
            link.send(TurnStart(1))
            for k in range(3):  # one capture block: queued in one go
                link.send_audio(frames[k], k * 20,
                                AudioFlags.START if k == 0 else AudioFlags.NONE)
            await _frames_in(relay, 3)
            assert relay.counters.frames_in == 3
            assert link.stats.frames_sent == 3
            assert link.stats.writes - writes_before == 1  # TurnStart + 3 frames
            # the next block, queued later, is its own write, frames still in order
            for k in range(3, 6):
                link.send_audio(frames[k], k * 20)
            await _frames_in(relay, 6)
            assert relay.counters.frames_in == 6
            assert link.stats.writes - writes_before == 2
            session = relay.sessions["d1"]
            assert session.conn is not None and session.conn.last_received_seq == 5
            assert session.conn.missing == 0
    run(scenario(), timeout=scaled(30))


def test_client_frames_are_what_a_server_parses_back() -> None:
    """The device frames its batches itself: each must read back, as the relay's
    websockets reads it, as the same message (masked, every length encoding)."""
    from websockets.frames import Frame, Opcode
    from websockets.streams import StreamReader

    from edgevoice.protocol.wsframes import masked_frames

    messages: list[str | bytes] = ['{"type":"turn.start"}', b"", bytes(range(125)) * 1,
                                   b"\x01" * 126, b"\x02" * 65535, b"\x03" * 65536]
    masks = bytes(range(1, 4 * len(messages) + 1))
    wire = masked_frames(messages, masks)
    reader = StreamReader()
    reader.feed_data(wire)
    reader.feed_eof()
    for message in messages:
        parser = Frame.parse(reader.read_exact, mask=True, max_size=None)
        try:
            next(parser)
            raise AssertionError("a frame was cut short")
        except StopIteration as done:
            frame = done.value
        assert frame.fin and not (frame.rsv1 or frame.rsv2 or frame.rsv3)
        if isinstance(message, str):
            assert frame.opcode is Opcode.TEXT and frame.data.decode() == message
        else:
            assert frame.opcode is Opcode.BINARY and frame.data == message
    assert not reader.buffer  # nothing more than the frames


def test_a_batch_skips_websockets_frames_unless_the_transport_holds_data_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fast path: an open connection's batch is framed without websockets' Frame
    objects; a paused transport (flow control) goes through websockets' send context,
    which waits for the buffer to drain, and still delivers everything in order."""
    from websockets.frames import Frame

    serialized: list[int] = []
    original = Frame.serialize

    def counting(self: Frame, **kwargs: object) -> bytes:
        serialized.append(self.opcode.value)
        return original(self, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Frame, "serialize", counting)

    async def scenario() -> None:
        async with running_relay(tmp_path) as relay, _linked(relay) as link:
            frames = packets(6)
            serialized.clear()
            link.send(TurnStart(1))
            for k in range(3):
                link.send_audio(frames[k], k * 20,
                                AudioFlags.START if k == 0 else AudioFlags.NONE)
            await _frames_in(relay, 3)
            assert relay.counters.frames_in == 3
            assert serialized == []  # no websockets Frame for an open connection
            ws = link._ws
            assert ws is not None
            ws.pause_writing()  # the transport's buffer is full: flow control
            writes = link.stats.writes
            for k in range(3, 6):
                link.send_audio(frames[k], k * 20)
            await asyncio.sleep(0.2)
            assert serialized == [2, 2, 2]  # websockets' own path framed them ...
            assert link.stats.writes == writes  # ... and waits for the buffer to drain
            ws.resume_writing()
            await _frames_in(relay, 6)
            assert relay.counters.frames_in == 6
            session = relay.sessions["d1"]
            assert session.conn is not None and session.conn.last_received_seq == 5
            assert session.conn.missing == 0
    run(scenario(), timeout=scaled(30))
