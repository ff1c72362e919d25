"""Row 2's second reference: the leanest Python program doing the device's codec work.

Row 2 compares the device with the codec floor (libopus and soxr alone, timed
in-process). This measures what no Python design of the device can go below at the
same cadence: a process whose asyncio loop wakes once per 60 ms capture block, measures
each 20 ms frame's level (a detector needs that much), Opus-encodes the frames the
device sent, writes each block's packets to a TCP socket in one write (2-byte length
prefixes, no WebSocket framing), and decodes the reply packets the other end sends to
48 kHz into a buffer. Nothing else: no protocol, no state machine, no playback pacing,
no file, no health, no logs.

``python -m edgevoice_dev.bench.lean serve --port P --reply RAW`` is the other end: it
reads and discards, and sends reply packets (24 kHz Opus, 20 ms) in ``REPLY_MS`` bursts
at real time. ``python -m edgevoice_dev.bench.lean client --port P --speech WAV
--seconds S --up-per-s U --down-per-s D`` runs the lean device for S seconds, sending
U frames a second, and prints a ``done`` JSON event with its CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys
import time
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgevoice.audio.base import CAPTURE_FRAME_BYTES, CAPTURE_RATE_HZ, FRAME_MS
from edgevoice.audio.level import pcm_dbfs
from edgevoice.audio.opus import OpusDecoder, OpusEncoder, OpusSettings
from edgevoice.audio.sounddevice_io import DEFAULT_CAPTURE_BLOCK_MS
from edgevoice.relay.settings import DOWNLINK_OPUS
from edgevoice_dev.bench.plan import OUTPUT_RATE_HZ, REPLY_MS, Workspace
from edgevoice_dev.bench.proc import emit, python_module

#: frames per capture block, as the device's default audio.capture_block_ms (60 ms)
FRAMES_PER_BLOCK = DEFAULT_CAPTURE_BLOCK_MS // FRAME_MS
#: the 2-byte length before each packet on the lean loops' sockets
LENGTH = struct.Struct(">H")
_REPLY_RATE_HZ = 24_000


@dataclass(frozen=True)
class LeanRun:
    cpu_s: float
    window_s: float
    up_frames: int
    down_frames: int

    @property
    def pct(self) -> float:
        return 100 * self.cpu_s / self.window_s if self.window_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"cpu_s": round(self.cpu_s, 4), "window_s": round(self.window_s, 2),
                "up_frames": self.up_frames, "down_frames": self.down_frames,
                "pct_of_core": round(self.pct, 3)}


def take_packets(buf: bytes) -> tuple[list[bytes], bytes]:
    """The whole length-prefixed packets at the start of ``buf``, and what is left."""
    packets = []
    at, end = 0, len(buf)
    while end - at >= 2:
        size = LENGTH.unpack_from(buf, at)[0]
        if end - at - 2 < size:
            break
        packets.append(buf[at + 2:at + 2 + size])
        at += 2 + size
    return packets, buf[at:]


class _Receiver(asyncio.Protocol):
    """Length-prefixed Opus packets in, decoded to the output rate, kept in a buffer."""

    def __init__(self, decoder: OpusDecoder) -> None:
        self._decoder = decoder
        self._pending = b""
        self.played = bytearray()
        self.packets = 0

    def data_received(self, data: bytes) -> None:
        packets, self._pending = take_packets(self._pending + data)
        for packet in packets:
            self.played += self._decoder.decode(packet)
        self.packets += len(packets)
        if len(self.played) > 1 << 20:
            self.played.clear()


async def _client(port: int, speech: str, seconds: float, up_per_s: float) -> LeanRun:
    with wave.open(speech) as w:
        pcm = w.readframes(w.getnframes())
    frames = [pcm[i:i + CAPTURE_FRAME_BYTES]
              for i in range(0, len(pcm) - CAPTURE_FRAME_BYTES + 1, CAPTURE_FRAME_BYTES)]
    # the floor's settings: the device's uplink encoder, the reply decoded to 48 kHz
    encoder = OpusEncoder.from_settings(OpusSettings(), CAPTURE_RATE_HZ)
    decoder = OpusDecoder(OUTPUT_RATE_HZ)
    loop = asyncio.get_running_loop()
    transport, receiver = await loop.create_connection(lambda: _Receiver(decoder),
                                                       "127.0.0.1", port)
    share = up_per_s * FRAME_MS / 1000  # of the frames captured, the ones sent
    credit, index, sent, block = 0.0, 0, 0, 0
    block_s = FRAMES_PER_BLOCK * FRAME_MS / 1000
    start, cpu0, packets0 = loop.time(), time.process_time(), receiver.packets
    while (now := loop.time()) - start < seconds:
        block += 1
        await asyncio.sleep(max(0.0, start + block * block_s - now))
        parts = []
        for _ in range(FRAMES_PER_BLOCK):
            frame = frames[index % len(frames)]
            index += 1
            pcm_dbfs(frame)  # the level a detector needs, once per frame
            credit += share
            if credit >= 1.0:
                credit -= 1.0
                packet = encoder.encode(frame)
                parts.append(LENGTH.pack(len(packet)) + packet)
        if parts:
            transport.write(b"".join(parts))
            sent += len(parts)
    cpu_s, window_s = time.process_time() - cpu0, loop.time() - start
    transport.close()
    return LeanRun(cpu_s, window_s, sent, receiver.packets - packets0)


async def _serve(port: int, reply: bytes, down_per_s: float) -> None:
    encoder = OpusEncoder.from_settings(DOWNLINK_OPUS, _REPLY_RATE_HZ)  # as the relay
    size = _REPLY_RATE_HZ * FRAME_MS // 1000 * 2
    packets = [encoder.encode(reply[i:i + size]) for i in range(0, len(reply) - size + 1, size)]
    burst = REPLY_MS // FRAME_MS
    # a burst of one reply's frames at real time, then a pause: down_per_s on average
    cycle = max(burst, round(burst * 1000 / FRAME_MS / max(down_per_s, 1e-3)))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def down() -> None:
            loop = asyncio.get_running_loop()
            start, k = loop.time(), 0
            while True:
                k += 1
                await asyncio.sleep(max(0.0, start + k * FRAME_MS / 1000 - loop.time()))
                if k % cycle < burst:
                    packet = packets[k % len(packets)]
                    writer.write(LENGTH.pack(len(packet)) + packet)

        task = asyncio.create_task(down())
        try:
            while await reader.read(65536):
                pass
        finally:
            task.cancel()
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    emit({"event": "listening", "port": server.sockets[0].getsockname()[1]})
    async with server:
        await server.serve_forever()


async def measure_lean(ws: Workspace, seconds: float, up_per_s: float,
                       down_per_s: float) -> LeanRun:
    """Run the lean device against its own server for ``seconds``; its CPU and frames."""
    server = await ws.spawn("lean-server", python_module(
        "edgevoice_dev.bench.lean", "serve", "--port", "0", "--reply", str(ws.reply_path),
        "--down-per-s", f"{down_per_s:.3f}"))
    try:
        port = int((await server.event("listening", 30))["port"])
        client = await ws.spawn("lean-client", python_module(
            "edgevoice_dev.bench.lean", "client", "--port", str(port), "--speech",
            str(ws.fixture.path), "--seconds", f"{seconds:.1f}", "--up-per-s",
            f"{up_per_s:.3f}"))
        done = await client.event("done", seconds + 60)
        await client.stop()
    finally:
        await server.stop()
    return LeanRun(float(done["cpu_s"]), float(done["window_s"]), int(done["up_frames"]),
                   int(done["down_frames"]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--reply", required=True, help="24 kHz s16le mono reply audio")
    serve.add_argument("--down-per-s", type=float, default=7.0)
    client = sub.add_parser("client")
    client.add_argument("--port", type=int, required=True)
    client.add_argument("--speech", required=True, help="16 kHz mono WAV")
    client.add_argument("--seconds", type=float, default=30.0)
    client.add_argument("--up-per-s", type=float, default=45.0)
    args = parser.parse_args(argv)
    if args.role == "serve":
        with open(args.reply, "rb") as f:
            reply = f.read()
        asyncio.run(_serve(args.port, reply, args.down_per_s))
        return 0
    run = asyncio.run(_client(args.port, args.speech, args.seconds, args.up_per_s))
    emit({"event": "done", **run.as_dict()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
