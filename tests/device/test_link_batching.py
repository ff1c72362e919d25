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
from pathlib import Path

from edgevoice_dev.testing.harness import run, running_relay
from edgevoice_dev.testing.timeouts import scaled

from edgevoice.audio.opus import OpusEncoder
from edgevoice.backoff import BackoffSettings
from edgevoice.device.link import DeviceLink, RelaySettings
from edgevoice.protocol.connection import AudioReceived
from edgevoice.protocol.messages import AudioFlags, Message, TurnStart, Welcome


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


def packets(n: int) -> list[bytes]:
    encoder = OpusEncoder()
    return [encoder.encode(struct.pack("<320h", *(int(6000 * math.sin(0.1 * (k * 320 + i)))
                                                  for i in range(320)))) for k in range(n)]


def test_a_capture_blocks_frames_go_out_in_one_write_and_arrive_in_order(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as relay:
            token = relay.tokens.add("d1")
            listener = Listener()
            link = DeviceLink(RelaySettings(url=f"ws://127.0.0.1:{relay.port}/",
                                            backoff=BackoffSettings(initial_ms=100)),
                              "d1", token, listener)  # type: ignore[arg-type]
            task = asyncio.create_task(link.run())
            try:
                await asyncio.wait_for(listener.up.wait(), scaled(10))
                await asyncio.sleep(0.2)  # the hello's heartbeat ping has gone out
                writes_before = link.stats.writes
                frames = packets(6)
                link.send(TurnStart(1))
                for k in range(3):  # one capture block: queued in one go
                    link.send_audio(frames[k], k * 20,
                                    AudioFlags.START if k == 0 else AudioFlags.NONE)
                for _ in range(int(scaled(5) / 0.01)):
                    if relay.counters.frames_in >= 3:
                        break
                    await asyncio.sleep(0.01)
                assert relay.counters.frames_in == 3
                assert link.stats.frames_sent == 3
                assert link.stats.writes - writes_before == 1  # TurnStart + 3 frames
                # the next block, queued later, is its own write, frames still in order
                for k in range(3, 6):
                    link.send_audio(frames[k], k * 20)
                for _ in range(int(scaled(5) / 0.01)):
                    if relay.counters.frames_in >= 6:
                        break
                    await asyncio.sleep(0.01)
                assert relay.counters.frames_in == 6
                assert link.stats.writes - writes_before == 2
                session = relay.sessions["d1"]
                assert session.conn is not None and session.conn.last_received_seq == 5
                assert session.conn.missing == 0
            finally:
                await link.stop()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    run(scenario(), timeout=scaled(30))
