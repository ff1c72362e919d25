"""Admission control, and codec state that only busy sessions hold (issue 15).

Beyond ``max_active_turns`` a new turn is refused with a retryable ``relay_busy`` error
while the admitted ones are answered in full; a quiet session keeps no libopus state.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from edgevoice_dev.testing.harness import run, running_relay
from websockets.asyncio.client import ClientConnection, connect

from edgevoice.audio.opus import OpusEncoder
from edgevoice.protocol.connection import Connection, Role
from edgevoice.protocol.messages import (
    SUBPROTOCOL,
    AudioFlags,
    Error,
    Hello,
    Message,
    ResponseEnd,
    ResponseStart,
    TurnEnd,
    TurnStart,
)
from edgevoice.relay.server import RelayServer


class Device:
    """A protocol-speaking device over a real WebSocket, with a real Opus encoder."""

    def __init__(self, relay: RelayServer, name: str) -> None:
        self.relay, self.name = relay, name
        self.conn = Connection(Role.DEVICE)
        self.encoder = OpusEncoder()
        self.ws: ClientConnection | None = None
        self.ts = 0

    async def open(self) -> None:
        token = self.relay.tokens.add(self.name)
        self.ws = await connect(f"ws://127.0.0.1:{self.relay.port}/",
                                subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                                additional_headers={"Authorization": f"Bearer {token}"},
                                proxy=None)
        await self.ws.send(self.conn.start(Hello(device=self.name)))
        self.conn.receive_text(await self.ws.recv())  # welcome

    async def send(self, message: Message) -> None:
        assert self.ws is not None
        await self.ws.send(self.conn.send(message))

    async def speak(self, frames: int) -> None:
        assert self.ws is not None
        t = np.arange(320 * frames) / 16_000
        pcm = (8000 * np.sin(2 * np.pi * 300 * t)).astype("<i2").tobytes()
        for k in range(frames):
            packet = self.encoder.encode(pcm[640 * k : 640 * (k + 1)])
            _, data = self.conn.send_audio(packet, self.ts, AudioFlags.START if k == 0
                                           else AudioFlags.NONE)
            self.ts += 20
            await self.ws.send(data)

    async def next_message(self, timeout_s: float = 10) -> Message:
        """The next control message (audio frames are counted and skipped)."""
        assert self.ws is not None
        while True:
            data = await asyncio.wait_for(self.ws.recv(), timeout_s)
            if isinstance(data, bytes):
                self.conn.receive_binary(data)
                continue
            return self.conn.receive_text(data)

    async def reply(self) -> tuple[Message, ...]:
        """Messages up to and including the response_end."""
        out: list[Message] = []
        while not out or not isinstance(out[-1], ResponseEnd):
            out.append(await self.next_message())
        return tuple(out)


def test_a_turn_beyond_capacity_is_refused_and_the_admitted_one_is_answered(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path, max_active_turns=1) as relay:
            a, b = Device(relay, "a"), Device(relay, "b")
            await a.open()
            await b.open()
            await a.send(TurnStart(1))
            await a.speak(10)
            # b asks while a is in its turn: refused, retryable, connection kept
            await b.send(TurnStart(1))
            error = await b.next_message()
            assert isinstance(error, Error) and error.code == "relay_busy" and error.retryable
            await b.speak(10)  # what it said anyway is dropped, not a protocol error
            await b.send(TurnEnd(1, "silence"))
            await a.send(TurnEnd(1, "silence"))
            reply = await a.reply()
            assert any(isinstance(m, ResponseStart) for m in reply)
            assert isinstance(reply[-1], ResponseEnd) and reply[-1].reason == "end_turn"
            assert relay.counters.turns_refused == 1 and relay.counters.frames_refused == 10
            # a is answered and idle again: b's next turn is admitted and answered
            await asyncio.sleep(0.2)
            await b.send(TurnStart(2))
            await b.speak(10)
            await b.send(TurnEnd(2, "silence"))
            reply = await b.reply()
            assert any(isinstance(m, ResponseStart) for m in reply)
            assert relay.counters.turns_refused == 1
            assert set(relay.sessions) == {"a", "b"}  # nobody was disconnected

    run(scenario())


def test_a_quiet_session_holds_no_codec_state(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as relay:
            a = Device(relay, "a")
            await a.open()
            session = relay.sessions["a"]
            # connected, never talked: no libopus state at all
            assert not session.decoder.allocated and not session.encoder.allocated
            await a.send(TurnStart(1))
            await a.speak(10)
            await asyncio.sleep(0.2)
            assert session.decoder.allocated
            await a.send(TurnEnd(1, "silence"))
            await a.reply()
            await asyncio.sleep(0.2)
            # answered: both given back until the next turn
            assert not session.decoder.allocated and not session.encoder.allocated

    run(scenario())
