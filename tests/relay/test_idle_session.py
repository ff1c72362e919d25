"""An idle session costs the relay as little as possible (issue 15, bench row 13):
no task or timer of its own paces its replies; the relay's one shared tick does,
and only while a reply waits."""

from __future__ import annotations

import asyncio
import math
import struct
from pathlib import Path

from edgevoice_dev.testing.harness import run, running_relay
from edgevoice_dev.testing.timeouts import scaled
from websockets.asyncio.client import connect

from edgevoice.audio.opus import OpusEncoder
from edgevoice.protocol.connection import Connection, Role
from edgevoice.protocol.messages import (
    MAX_TEXT_BYTES,
    SUBPROTOCOL,
    AudioFlags,
    Hello,
    ResponseEnd,
    TurnEnd,
    TurnStart,
)


def pacers(device: str) -> int:
    return sum(1 for t in asyncio.all_tasks()
               if t.get_name() == f"downlink:{device}" and not t.done())


def test_a_session_never_has_a_pacer_task_and_its_reply_arrives_on_the_shared_tick(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as relay:
            token = relay.tokens.add("d1")
            async with connect(f"ws://127.0.0.1:{relay.port}/",
                               additional_headers={"Authorization": f"Bearer {token}"},
                               subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                               compression=None, max_size=MAX_TEXT_BYTES,
                               proxy=None) as ws:
                conn = Connection(Role.DEVICE)
                await ws.send(conn.start(Hello(device="d1", software="test")))
                conn.receive_text(await asyncio.wait_for(ws.recv(), scaled(10)))
                await asyncio.sleep(0.3)
                assert pacers("d1") == 0 and len(relay.tick) == 0
                encoder = OpusEncoder()
                await ws.send(conn.send(TurnStart(1)))
                for k in range(10):
                    pcm = struct.pack("<320h", *(int(5000 * math.sin(0.2 * (k * 320 + i)))
                                                 for i in range(320)))
                    _, data = conn.send_audio(encoder.encode(pcm), k * 20,
                                              AudioFlags.START if k == 0 else AudioFlags.NONE)
                    await ws.send(data)
                await ws.send(conn.send(TurnEnd(1)))
                frames = 0
                while True:  # the echo's reply, paced by the pacer it started
                    data = await asyncio.wait_for(ws.recv(), scaled(10))
                    if isinstance(data, bytes):
                        frames += conn.receive_binary(data) is not None
                    elif isinstance(conn.receive_text(data), ResponseEnd):
                        break
                assert frames >= 10 and pacers("d1") == 0
                # the echo hands its reply over at once: the tick paced it, then stopped
                assert relay.tick.ticks > 0 and len(relay.tick) == 0
    run(scenario(), timeout=scaled(30))
