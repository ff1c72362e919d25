"""Bytes on the wire: a counting TCP proxy and a WebSocket frame classifier.

Every protocol in the bandwidth comparison runs over a real TCP connection on
127.0.0.1 through :class:`CountingProxy`, which counts the TCP payload bytes (not IP
or TCP headers) in each direction. For WebSocket connections a
:class:`WebSocketTally` is also fed each direction's bytes: it skips the HTTP
upgrade and splits what follows into frames, so audio (binary frames) and control
(text frames, pings) are counted apart, framing overhead included.

:class:`WebSocketTally` is pure (bytes in, counts out) and is tested without sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

#: WebSocket opcodes (RFC 6455, section 5.2).
OPCODE_TEXT = 0x1
OPCODE_BINARY = 0x2
OPCODE_CLOSE = 0x8
OPCODE_PING = 0x9
OPCODE_PONG = 0xA


def client_frame_bytes(payload_bytes: int) -> int:
    """Size on the wire of one unfragmented, masked (client to server) frame."""
    header = 2 if payload_bytes < 126 else 4 if payload_bytes < 65536 else 10
    return header + 4 + payload_bytes


@dataclass
class FrameTally:
    """Frames of one opcode: how many, and their size on the wire (header included)."""

    frames: int = 0
    wire_bytes: int = 0
    payload_bytes: int = 0


class WebSocketTally:
    """Counts one direction of a WebSocket connection, frame by frame.

    ``http_first``: the stream starts with an HTTP/1.1 upgrade request or response,
    counted as ``handshake_bytes``. Binary frames are also logged with the time they
    completed, so a caller can count the frames inside a time window.
    """

    def __init__(self, *, http_first: bool = True) -> None:
        self._buffer = bytearray()
        self._in_http = http_first
        self.handshake_bytes = 0
        self.total_bytes = 0
        self.by_opcode: dict[int, FrameTally] = {}
        #: completion time of each binary frame, in order
        self.binary_times: list[float] = []

    def feed(self, data: bytes, now: float) -> None:
        self.total_bytes += len(data)
        self._buffer += data
        if self._in_http:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.handshake_bytes = end + 4
            del self._buffer[: end + 4]
            self._in_http = False
        while True:
            size = self._frame_size()
            if size is None or len(self._buffer) < size[0]:
                return
            total, payload = size
            opcode = self._buffer[0] & 0x0F
            tally = self.by_opcode.setdefault(opcode, FrameTally())
            tally.frames += 1
            tally.wire_bytes += total
            tally.payload_bytes += payload
            if opcode == OPCODE_BINARY:
                self.binary_times.append(now)
            del self._buffer[:total]

    def _frame_size(self) -> tuple[int, int] | None:
        """(frame size on the wire, payload size) of the frame at the buffer's head."""
        buf = self._buffer
        if len(buf) < 2:
            return None
        masked = bool(buf[1] & 0x80)
        length = buf[1] & 0x7F
        header = 2
        if length == 126:
            if len(buf) < 4:
                return None
            length = int.from_bytes(buf[2:4], "big")
            header = 4
        elif length == 127:
            if len(buf) < 10:
                return None
            length = int.from_bytes(buf[2:10], "big")
            header = 10
        if masked:
            header += 4
        return header + length, length

    def tally(self, opcode: int) -> FrameTally:
        return self.by_opcode.get(opcode, FrameTally())

    @property
    def control_bytes(self) -> int:
        """Everything after the handshake that is not a binary (audio) frame."""
        return self.total_bytes - self.handshake_bytes - self.tally(OPCODE_BINARY).wire_bytes

    def binary_frames_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.binary_times if start <= t < end)


@dataclass
class ProxiedConnection:
    """One client connection through the proxy: bytes each way, and their tallies."""

    opened_at: float
    up_bytes: int = 0  # client -> server
    down_bytes: int = 0  # server -> client
    up: WebSocketTally | None = None
    down: WebSocketTally | None = None
    closed: bool = False


@dataclass
class CountingProxy:
    """A TCP proxy on 127.0.0.1 that counts what passes, connection by connection."""

    target_port: int
    websocket: bool = False
    connections: list[ProxiedConnection] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    @property
    def up_bytes(self) -> int:
        return sum(c.up_bytes for c in self.connections)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        record = ProxiedConnection(opened_at=loop.time())
        if self.websocket:
            record.up, record.down = WebSocketTally(), WebSocketTally()
        self.connections.append(record)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            record.closed = True
            return
        for w in (writer, up_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:  # the proxy must not add Nagle delays of its own
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tasks = [asyncio.create_task(self._pump(reader, up_writer, record, upward=True)),
                 asyncio.create_task(self._pump(up_reader, writer, record, upward=False))]
        self._tasks.update(tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                self._tasks.discard(task)
            for w in (writer, up_writer):
                w.close()
            record.closed = True

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    record: ProxiedConnection, *, upward: bool) -> None:
        loop = asyncio.get_running_loop()
        tally = record.up if upward else record.down
        while True:
            data = await reader.read(65536)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            now = loop.time()
            if upward:
                record.up_bytes += len(data)
            else:
                record.down_bytes += len(data)
            if tally is not None:
                tally.feed(data, now)
            writer.write(data)
            await writer.drain()
