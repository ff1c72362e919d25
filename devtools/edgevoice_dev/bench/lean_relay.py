"""Row 14's second reference: the leanest Python relay doing the relay's codec work.

Row 14 asks for a relay session to cost at most 1.3x the codec floor (a 16 kHz Opus
decode and a 24 kHz encode per 20 ms of speech and reply). This measures what a Python
relay costs when it does nothing else, under row 14's conversational pattern: one
asyncio server; each connection sends 3 s of speech as length-prefixed Opus packets,
three per 60 ms write, and the relay decodes each; after the turn's last packet it
encodes a 3 s reply at 24 kHz, one frame per session per 20 ms, all sessions on one
shared tick, one write per frame; the device pauses 2 s after the reply and speaks
again. No WebSocket, no protocol messages, no upstream, no admission, no metrics.

``python -m edgevoice_dev.bench.lean_relay serve --reply RAW [--cpu N]`` is the relay;
``python -m edgevoice_dev.bench.lean_relay load --port P --clients N --speech WAV
--warmup S --measure S [--cpu N]`` is its load (each device at its own phase of the
8 s cycle). The load prints ``measure_start`` and ``measure_end`` JSON events (the
latter with the whole replies received so far), so the bench reads the relay's CPU over
the window, as row 14 does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgevoice.audio.base import CAPTURE_FRAME_BYTES, CAPTURE_RATE_HZ, FRAME_MS
from edgevoice.audio.opus import OpusDecoder, OpusEncoder, OpusSettings
from edgevoice.relay.settings import DOWNLINK_OPUS
from edgevoice_dev.bench.lean import FRAMES_PER_BLOCK, LENGTH, take_packets
from edgevoice_dev.bench.plan import Workspace
from edgevoice_dev.bench.proc import Child, cpu_seconds, emit, pin_to_cpu, python_module

SPEECH_FRAMES = 150  # 3 s
REPLY_FRAMES = 150  # 3 s
PAUSE_S = 2.0
CYCLE_S = (SPEECH_FRAMES + REPLY_FRAMES) * FRAME_MS / 1000 + PAUSE_S
_END_OF_TURN = LENGTH.pack(0)
_REPLY_RATE_HZ = 24_000
_BLOCK = FRAMES_PER_BLOCK  # packets per uplink write (one capture block's)


@dataclass(frozen=True)
class LeanRelayRun:
    clients: int
    cpu_pct: float
    window_s: float
    #: whole replies the devices received by the window's end
    replies: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"clients": self.clients, "cpu_pct": round(self.cpu_pct, 2),
                "window_s": round(self.window_s, 2), "replies": self.replies}


class _Session(asyncio.Protocol):
    """One device at the lean relay: decode what it says, answer when it stops."""

    def __init__(self, relay: _Relay) -> None:
        self._relay = relay
        self._decoder = OpusDecoder(CAPTURE_RATE_HZ)
        self._encoder = OpusEncoder.from_settings(DOWNLINK_OPUS, _REPLY_RATE_HZ)
        self._pending = b""
        self.transport: asyncio.Transport | None = None
        self.reply_left = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay.replying.discard(self)

    def data_received(self, data: bytes) -> None:
        packets, self._pending = take_packets(self._pending + data)
        for packet in packets:
            if packet:
                self._decoder.decode(packet)
            else:  # the turn ended: answer it
                self.reply_left = REPLY_FRAMES
                self._relay.replying.add(self)

    def send_reply_frame(self, pcm: bytes) -> bool:
        """Encode and write one reply frame; False once the reply is done."""
        packet = self._encoder.encode(pcm)
        if self.transport is not None:
            self.transport.write(LENGTH.pack(len(packet)) + packet)
        self.reply_left -= 1
        return self.reply_left > 0


class _Relay:
    def __init__(self, reply: bytes) -> None:
        size = _REPLY_RATE_HZ * FRAME_MS // 1000 * 2
        self._frames = [reply[i:i + size] for i in range(0, len(reply) - size + 1, size)]
        self.replying: set[_Session] = set()

    async def tick(self) -> None:
        """One shared 20 ms tick: a reply frame for every session answering."""
        loop = asyncio.get_running_loop()
        start, k = loop.time(), 0
        frames = self._frames
        while True:
            k += 1
            await asyncio.sleep(max(0.0, start + k * FRAME_MS / 1000 - loop.time()))
            pcm = frames[k % len(frames)]
            done = [s for s in self.replying if not s.send_reply_frame(pcm)]
            for session in done:
                self.replying.discard(session)


async def _serve(reply: bytes) -> None:
    relay = _Relay(reply)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Session(relay), "127.0.0.1", 0, backlog=1024)
    ticker = asyncio.create_task(relay.tick())
    emit({"event": "listening", "port": server.sockets[0].getsockname()[1]})
    try:
        async with server:
            await server.serve_forever()
    finally:
        ticker.cancel()


class _Device(asyncio.Protocol):
    """One simulated device: counts the reply frames it is sent."""

    #: whole replies received, all devices of this process together
    replies = 0

    def __init__(self) -> None:
        self._pending = b""
        self.reply_frames = 0
        self.reply_done = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        packets, self._pending = take_packets(self._pending + data)
        self.reply_frames += len(packets)
        if self.reply_frames >= REPLY_FRAMES:
            self.reply_frames -= REPLY_FRAMES
            _Device.replies += 1
            self.reply_done.set()


async def _device(port: int, packets: list[bytes], phase_s: float) -> None:
    loop = asyncio.get_running_loop()
    transport, device = await loop.create_connection(_Device, "127.0.0.1", port)
    assert isinstance(transport, asyncio.Transport)
    await asyncio.sleep(phase_s)
    index = 0
    block_s = _BLOCK * FRAME_MS / 1000
    while True:
        start = loop.time()
        for block in range(SPEECH_FRAMES // _BLOCK):
            await asyncio.sleep(max(0.0, start + (block + 1) * block_s - loop.time()))
            parts = []
            for _ in range(_BLOCK):
                packet = packets[index % len(packets)]
                index += 1
                parts.append(LENGTH.pack(len(packet)) + packet)
            transport.write(b"".join(parts))
        device.reply_done.clear()
        transport.write(_END_OF_TURN)
        await device.reply_done.wait()
        await asyncio.sleep(PAUSE_S)


async def _load(port: int, clients: int, speech: str, warmup_s: float, measure_s: float) -> None:
    with wave.open(speech) as w:
        pcm = w.readframes(w.getnframes())
    encoder = OpusEncoder.from_settings(OpusSettings(), CAPTURE_RATE_HZ)
    packets = [encoder.encode(pcm[i:i + CAPTURE_FRAME_BYTES])
               for i in range(0, min(len(pcm), 500 * CAPTURE_FRAME_BYTES) - CAPTURE_FRAME_BYTES
                              + 1, CAPTURE_FRAME_BYTES)]
    tasks = [asyncio.create_task(_device(port, packets, CYCLE_S * i / clients))
             for i in range(clients)]
    await asyncio.sleep(warmup_s)
    emit({"event": "measure_start", "t": time.monotonic()})
    await asyncio.sleep(measure_s)
    emit({"event": "measure_end", "t": time.monotonic(), "replies": _Device.replies})
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await task


async def measure_lean_relay(ws: Workspace, clients: int, warmup_s: float, measure_s: float,
                             relay_cpu: int, load_cpu: int) -> LeanRelayRun:
    """The lean relay's CPU, % of its core, over a window of ``clients`` conversing."""
    relay = await ws.spawn(f"lean-relay-{clients}", python_module(
        "edgevoice_dev.bench.lean_relay", "serve", "--reply", str(ws.reply_path),
        "--cpu", str(relay_cpu)))
    load: Child | None = None
    try:
        port = int((await relay.event("listening", 30))["port"])
        load = await ws.spawn(f"lean-relay-load-{clients}", python_module(
            "edgevoice_dev.bench.lean_relay", "load", "--port", str(port), "--clients",
            str(clients), "--speech", str(ws.fixture.path), "--warmup", f"{warmup_s:g}",
            "--measure", f"{measure_s:g}", "--cpu", str(load_cpu)))
        await load.event("measure_start", 60 + warmup_s)
        cpu0, t0 = cpu_seconds(relay.pid), time.monotonic()
        end = await load.event("measure_end", 60 + measure_s)
        cpu1, t1 = cpu_seconds(relay.pid), time.monotonic()
    finally:
        if load is not None:
            await load.stop()
        await relay.stop()
    return LeanRelayRun(clients, 100 * (cpu1 - cpu0) / (t1 - t0), t1 - t0, int(end["replies"]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--reply", required=True, help="24 kHz s16le mono reply audio")
    serve.add_argument("--cpu", type=int)
    load = sub.add_parser("load")
    load.add_argument("--port", type=int, required=True)
    load.add_argument("--clients", type=int, default=150)
    load.add_argument("--speech", required=True, help="16 kHz mono WAV")
    load.add_argument("--warmup", type=float, default=8.0)
    load.add_argument("--measure", type=float, default=24.0)
    load.add_argument("--cpu", type=int)
    args = parser.parse_args(argv)
    pin_to_cpu(args.cpu)
    if args.role == "serve":
        with open(args.reply, "rb") as f:
            reply = f.read()
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(reply))
        return 0
    asyncio.run(_load(args.port, args.clients, args.speech, args.warmup, args.measure))
    return 0


if __name__ == "__main__":
    sys.exit(main())
