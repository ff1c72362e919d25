"""The load generator sends uplink audio as the daemon does: a capture block's frames
in one write (rows 4, 14 and 15 price the relay for a fleet of real devices)."""

from __future__ import annotations

import asyncio
import time

from edgevoice_dev.bench import loadgen
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from edgevoice.config.model import AudioSettings
from edgevoice.protocol.connection import Connection, Role
from edgevoice.protocol.messages import SUBPROTOCOL, AudioFrame, Hello, Welcome


def _open_device() -> Connection:
    device, relay = Connection(Role.DEVICE), Connection(Role.RELAY)
    relay.receive_text(device.start(Hello(device="load-0")))
    device.receive_text(relay.accept(Welcome(session_id="s")))
    return device


async def _stream_blocks(block: int, seconds: float) -> tuple[list[int], list[str | bytes], int]:
    """Stream for ``seconds`` with ``block`` frames a write to a real WebSocket server:
    the sizes of the client's transport writes, what the server received, frames sent."""
    received: list[str | bytes] = []
    done = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            received.append(message)
        done.set()

    async with serve(handler, "127.0.0.1", 0, subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                     compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}/", compression=None,
                           subprotocols=[SUBPROTOCOL]) as ws:  # type: ignore[list-item]
            writes: list[int] = []
            write = ws.transport.write

            def counting(data: bytes | bytearray | memoryview) -> None:
                writes.append(len(data))
                write(data)

            ws.transport.write = counting  # type: ignore[method-assign]
            log = loadgen.ClientLog("load-0")
            start = time.monotonic()
            await loadgen._stream(ws, _open_device(), [bytes([8]) * 40] * 7, start,
                                  start + seconds, log, block)
            streamed = writes[:]  # not the close frame that follows
        await asyncio.wait_for(done.wait(), 5)
    return streamed, received, len(log.sent)


def test_a_capture_blocks_frames_leave_in_one_write_in_order() -> None:
    writes, received, sent = asyncio.run(_stream_blocks(3, 0.25))
    # the turn_start, then blocks due at 40, 100, 160 and 220 ms (the block after them
    # would be due at 280 ms, past the end)
    assert sent == 12 and len(writes) == 1 + 4
    audio = [AudioFrame.decode(m) for m in received if isinstance(m, bytes)]
    assert [f.seq for f in audio] == list(range(12))
    assert [f.timestamp_ms for f in audio] == [20 * k for k in range(12)]


def test_one_frame_a_write_when_asked() -> None:
    writes, received, sent = asyncio.run(_stream_blocks(1, 0.1))
    assert sent == 5 and len(writes) == 1 + 5
    assert sum(isinstance(m, bytes) for m in received) == 5


def test_the_default_block_is_the_daemons_capture_block() -> None:
    assert loadgen.CAPTURE_BLOCK_MS == AudioSettings().capture_block_ms == 60
