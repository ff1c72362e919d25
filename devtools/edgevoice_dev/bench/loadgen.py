"""The load generator: N simulated devices against one relay, from one process.

``python -m edgevoice_dev.bench.loadgen --url ws://... --tokens FILE --clients N`` opens
N real WebSocket connections speaking ``edgevoice.v1`` (through the shared
sans-I/O :class:`~edgevoice.protocol.connection.Connection`), starts one turn on
each and streams real Opus frames (speech encoded once, up front, with the device's
encoder settings) at real time, each device at its own phase of the 20 ms period,
while reading the relay's downlink. It notes when every uplink frame was sent and
every downlink frame arrived, prints ``streaming``, ``measure_start`` and
``measure_end`` events, and writes its timestamps to ``--record``.

Downlink Opus is counted, not decoded: the load generator stands in for the
network side of many devices, and decoding would only eat the core it shares
with nobody but itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from edgevoice.audio.base import CAPTURE_FRAME_BYTES
from edgevoice.audio.opus import OpusEncoder, OpusSettings
from edgevoice.audio.wavio import load_wav
from edgevoice.config.model import AudioSettings
from edgevoice.device.link import RelaySettings, send_together
from edgevoice.protocol.connection import Connection, Role
from edgevoice.protocol.heartbeat import Beat, Heartbeat, RelaySilent, stats_every
from edgevoice.protocol.messages import (
    MAX_TEXT_BYTES,
    SUBPROTOCOL,
    TURN_REFUSED_CODE,
    AudioFlags,
    Error,
    Hello,
    Ping,
    ResponseEnd,
    ResponseStart,
    Stats,
    TurnEnd,
    TurnStart,
    Welcome,
)
from edgevoice.relay.settings import LimitsSettings
from edgevoice_dev.bench.proc import emit, pin_to_cpu

logger = logging.getLogger(__name__)

FRAME_S = 0.02
#: the daemon's capture block: the uplink frames it sends in one write, by default
CAPTURE_BLOCK_MS = AudioSettings().capture_block_ms


@dataclass
class ClientLog:
    device: str
    sent: list[float] = field(default_factory=list)
    received: list[float] = field(default_factory=list)
    #: how late each send was against its schedule (s)
    late: list[float] = field(default_factory=list)
    closed: str = ""
    #: --conversation: per answered turn, when each reply frame arrived
    replies: list[list[float]] = field(default_factory=list)
    #: --conversation: turns started, and turns the relay refused (relay_busy)
    turns: int = 0
    refused: int = 0
    turn_over: asyncio.Event = field(default_factory=asyncio.Event)
    #: the relay refused the turn being spoken: stop streaming it, as the daemon does
    turn_refused: bool = False
    #: messages received (an idle device's heartbeat counts them as signs of life)
    heard: int = 0


async def _receive_turns(ws: ClientConnection, conn: Connection, log: ClientLog) -> None:
    """The downlink of a conversing device: replies frame by frame, and refusals."""
    current: list[float] | None = None
    async for data in ws:
        now = time.monotonic()
        if isinstance(data, bytes):
            if current is not None:
                current.append(now)
            continue
        message = conn.receive_text(data)
        if isinstance(message, ResponseStart):
            current = []
        elif isinstance(message, ResponseEnd):
            if current is not None:
                log.replies.append(current)
            current = None
            log.turn_over.set()
        elif isinstance(message, Error):
            if message.code == TURN_REFUSED_CODE:
                log.refused += 1
                log.turn_refused = True
            log.turn_over.set()


def _audio_block(conn: Connection, packets: list[bytes], frames: range,
                 offset: int = 0) -> list[str | bytes]:
    """Frames ``frames`` of a turn (20 ms each, the first one flagged START) as the
    messages of one write; frame k carries ``packets[(offset + k) % len(packets)]``."""
    n = len(packets)
    return [conn.send_audio(packets[(offset + k) % n], k * 20,
                            AudioFlags.START if k == 0 else AudioFlags.NONE)[1]
            for k in frames]


async def _converse(ws: ClientConnection, conn: Connection, packets: list[bytes], start: float,
                    until: float, log: ClientLog, speech_s: float, pause_s: float,
                    block: int = 1) -> None:
    """Speak ``speech_s``, wait for the answer, pause ``pause_s``; again until ``until``.
    ``block``: frames sent together in one write, as the daemon sends a capture block's."""
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    turn = 0
    frames = int(speech_s / FRAME_S)
    while time.monotonic() + speech_s < until:
        turn += 1
        log.turns += 1
        log.turn_over.clear()
        log.turn_refused = False
        await ws.send(conn.send(TurnStart(turn_id=turn, trigger="vad")))
        t0 = time.monotonic()
        for first in range(0, frames, block):
            if log.turn_refused:
                break  # the daemon ends a refused turn at once (turn_end "refused")
            last = min(frames, first + block) - 1
            due = t0 + last * FRAME_S  # the block's last frame is in: it leaves
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            log.late.append(time.monotonic() - due)
            await send_together(ws, _audio_block(conn, packets, range(first, last + 1),
                                                 turn * frames))
        if log.turn_refused:
            await ws.send(conn.send(TurnEnd(turn, "refused")))
            # the user hears the error cue and tries again after the rest of the turn
            await asyncio.sleep(max(0.0, t0 + speech_s - time.monotonic()))
        else:
            await ws.send(conn.send(TurnEnd(turn, "silence")))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(log.turn_over.wait(), 30)
        await asyncio.sleep(pause_s)


def encode_speech(path: str, frames: int = 250) -> list[bytes]:
    """``frames`` Opus packets of the speech in ``path``, with the device's settings."""
    pcm = load_wav(path)
    encoder = OpusEncoder.from_settings(OpusSettings())
    packets = []
    for i in range(frames):
        start = (i * CAPTURE_FRAME_BYTES) % max(CAPTURE_FRAME_BYTES, len(pcm) - CAPTURE_FRAME_BYTES)
        packets.append(encoder.encode(pcm[start: start + CAPTURE_FRAME_BYTES]))
    return packets


async def open_device(url: str, device: str,
                      token: str) -> tuple[ClientConnection, Connection, int]:
    """A device's connection, as the daemon's link opens it (its WebSocket keepalive
    settings: none by default); the heartbeat interval the relay asked for, in ms."""
    device_link = RelaySettings()
    ws = await connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                       subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                       compression=None, max_size=MAX_TEXT_BYTES, proxy=None,
                       open_timeout=30, ping_interval=device_link.ping_interval_ms / 1000 or None,
                       ping_timeout=device_link.ping_timeout_ms / 1000)
    conn = Connection(Role.DEVICE)
    await ws.send(conn.start(Hello(device=device, software="edgevoice-loadgen")))
    welcome = conn.receive_text(await asyncio.wait_for(ws.recv(), 30))
    heartbeat_ms = (welcome.heartbeat_interval_ms if isinstance(welcome, Welcome)
                    else LimitsSettings().heartbeat_interval_ms)
    return ws, conn, heartbeat_ms


async def receive_counting(ws: ClientConnection, log: ClientLog) -> None:
    received = log.received
    async for data in ws:
        log.heard += 1
        if isinstance(data, bytes):
            received.append(time.monotonic())


async def _stream(ws: ClientConnection, conn: Connection, packets: list[bytes], start: float,
                  until: float, log: ClientLog, block: int = 1) -> None:
    """One turn streamed until ``until``, ``block`` frames to a write (see _converse)."""
    await ws.send(conn.send(TurnStart(turn_id=1, trigger="api")))
    first = 0
    while True:
        last = first + block - 1
        due = start + last * FRAME_S
        if due >= until:
            return
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        now = time.monotonic()
        log.late.append(now - due)
        log.sent.extend([now] * block)
        await send_together(ws, _audio_block(conn, packets, range(first, last + 1)))
        first = last + 1


async def hold_idle(ws: ClientConnection, conn: Connection, start: float, heartbeat_ms: int,
                until: float, log: ClientLog) -> None:
    """An idle device: no turn, only what the daemon's link sends while nobody talks,
    from ``start`` (its connect, spread) until ``until``: the protocol heartbeat every
    ``heartbeat_ms`` with the fleet stats riding in the same write when due, on the
    link's own schedule (:class:`~edgevoice.protocol.heartbeat.Heartbeat` with the
    device's default settings), and no WebSocket keepalive unless those set one."""
    device_link = RelaySettings()
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    heartbeat = Heartbeat(heartbeat_ms / 1000, device_link.ping_timeout_ms / 1000,
                          stats_every(heartbeat_ms, device_link.stats_interval_s),
                          time.monotonic())
    ping_id = 0
    while True:
        now = time.monotonic()
        action = heartbeat.poll(now, log.heard)
        if isinstance(action, RelaySilent):
            raise TimeoutError(f"relay silent for {action.waited_s:.1f} s after a heartbeat")
        if isinstance(action, Beat):
            wire: list[str | bytes] = []
            if action.with_stats:
                wire.append(conn.send(Stats(IDLE_STATS)))
            ping_id += 1
            wire.append(conn.send(Ping(ping_id, int(now * 1000))))
            await send_together(ws, wire)
            continue
        if heartbeat.wake_at >= until:
            break
        await asyncio.sleep(max(0.0, heartbeat.wake_at - time.monotonic()))
    await asyncio.sleep(max(0.0, until - time.monotonic()))


#: what an idle daemon's compact stats look like (device/daemon.py compact_stats)
IDLE_STATS: dict[str, Any] = {
    "version": "0", "timezone": "UTC", "uptime_s": 3600.0, "state": "idle", "rtt_ms": 1.2,
    "reconnects": 0, "frames_captured": 180000, "frames_dropped": 0, "frames_sent": 0,
    "underruns": 0, "turns": 0, "noise_floor_dbfs": -62.5, "audio_problem": None,
}


async def run(args: argparse.Namespace, tokens: dict[str, str],
              packets: list[bytes]) -> dict[str, Any]:
    """Connect, stream, measure; the timestamps of every client."""
    devices = sorted(tokens)[: args.clients]
    logs = {d: ClientLog(d) for d in devices}
    links: dict[str, tuple[ClientConnection, Connection]] = {}
    heartbeats: dict[str, int] = {}  # ms, as each welcome said
    failures: list[str] = []
    # Connect in small batches, as a fleet coming online would, not all in one burst.
    for i in range(0, len(devices), 20):
        batch = devices[i:i + 20]
        opened = await asyncio.gather(*(open_device(args.url, d, tokens[d]) for d in batch),
                                      return_exceptions=True)
        for device, result in zip(batch, opened, strict=True):
            if isinstance(result, BaseException):
                failures.append(f"{device}: {result}")
            else:
                links[device] = result[:2]
                heartbeats[device] = result[2]
    stream_start = time.monotonic() + 0.2
    measure_start = stream_start + args.warmup
    measure_end = measure_start + args.measure
    until = measure_end + 0.3
    emit({"event": "streaming", "clients": len(links), "failures": failures[:5],
          "t": stream_start})
    if args.conversation:
        receivers = [asyncio.create_task(_receive_turns(ws, conn, logs[d]))
                     for d, (ws, conn) in links.items()]
    else:
        receivers = [asyncio.create_task(receive_counting(ws, logs[d]))
                     for d, (ws, _) in links.items()]
    block = args.block_ms // 20
    # --idle: connected devices nobody talks to: hold the connections, send nothing
    cycle = args.speech_s + args.reply_s + args.pause_s
    # idle devices' heartbeats spread over the interval, as devices coming online at
    # random times would send them
    senders = [asyncio.create_task(hold_idle(
        ws, conn, stream_start + heartbeats[d] / 1000 * i / max(1, len(links)), heartbeats[d],
        until, logs[d])) if args.idle else
               asyncio.create_task(_converse(ws, conn, packets,
                                             stream_start + cycle * i / max(1, len(links)),
                                             until, logs[d], args.speech_s, args.pause_s,
                                             block))
               if args.conversation else
               asyncio.create_task(_stream(ws, conn, packets,
                                           stream_start + FRAME_S * block * i
                                           / max(1, len(links)), until, logs[d], block))
               for i, (d, (ws, conn)) in enumerate(links.items())]

    async def mark(name: str, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        emit({"event": name, "t": time.monotonic()})

    markers = [asyncio.create_task(mark("measure_start", measure_start)),
               asyncio.create_task(mark("measure_end", measure_end))]
    outcomes = await asyncio.gather(*senders, return_exceptions=True)
    for device, outcome in zip(links, outcomes, strict=True):
        if isinstance(outcome, ConnectionClosed):
            logs[device].closed = f"closed by the relay: {outcome}"
        elif isinstance(outcome, BaseException):
            logs[device].closed = f"{type(outcome).__name__}: {outcome}"
    await asyncio.gather(*markers)
    await asyncio.sleep(0.3)  # the last downlink frames are still on their way
    for task in receivers:
        task.cancel()
    await asyncio.gather(*(ws.close() for ws, _ in links.values()), return_exceptions=True)
    for task in receivers:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    # its own CPU over the window is read from /proc by whoever runs it (convcap.py)
    return {
        "clients": len(links), "connect_failures": failures,
        "devices": {d: {"sent": log.sent, "received": log.received, "late": log.late,
                        "closed": log.closed, "replies": log.replies, "turns": log.turns,
                        "refused": log.refused} for d, log in logs.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgevoice_dev.bench.loadgen")
    p.add_argument("--url", required=True)
    p.add_argument("--tokens", required=True, help="JSON object: device id -> token")
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--speech", required=True, help="speech WAV the devices stream")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--measure", type=float, default=5.0)
    p.add_argument("--record", required=True)
    p.add_argument("--cpu", type=int)
    p.add_argument("--conversation", action="store_true",
                   help="each device speaks --speech-s, waits for the reply, pauses --pause-s")
    p.add_argument("--speech-s", type=float, default=3.0)
    p.add_argument("--reply-s", type=float, default=3.0,
                   help="length of the upstream's replies (to spread the devices' phases)")
    p.add_argument("--pause-s", type=float, default=2.0)
    p.add_argument("--block-ms", type=int, default=CAPTURE_BLOCK_MS,
                   help="audio sent in writes of this many ms (a multiple of 20), as the "
                   "daemon sends what one capture block brought (audio.capture_block_ms)")
    p.add_argument("--idle", action="store_true",
                   help="connect and hold the connections without talking, sending what an "
                   "idle daemon does: the protocol's heartbeat with its stats (an idle fleet)")
    args = p.parse_args(argv)
    if args.block_ms < 20 or args.block_ms % 20:
        p.error(f"--block-ms {args.block_ms}: a multiple of 20, at least 20")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    pin_to_cpu(args.cpu)
    tokens: dict[str, str] = json.loads(Path(args.tokens).read_text())
    record = asyncio.run(run(args, tokens, encode_speech(args.speech)))
    Path(args.record).write_text(json.dumps(record))
    emit({"event": "done", "t": time.monotonic()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
