"""The relay's shared downlink tick (relay/pacing.py, issue 15): every session's reply
leaves in order at real time, and a session whose device does not read holds up
nobody else's reply."""

from __future__ import annotations

import asyncio
import math
import struct
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

from edgevoice_dev.testing.harness import run
from edgevoice_dev.testing.timeouts import scaled
from websockets.asyncio.server import ServerConnection
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from edgevoice.audio.resample import FrameFifo
from edgevoice.protocol.connection import Connection, Role
from edgevoice.protocol.messages import (
    AudioFlags,
    CloseCode,
    Hello,
    ResponseEnd,
    ResponseStart,
    ResumeResult,
    Welcome,
)
from edgevoice.relay.auth import TokenStore
from edgevoice.relay.pacing import SharedTick
from edgevoice.relay.server import (
    EVENTS_PER_YIELD,
    PACING_LEAD_FRAMES,
    DeviceSession,
    RelayServer,
)
from edgevoice.relay.settings import LimitsSettings, ListenSettings
from edgevoice.upstream.base import ToolCalled, UpstreamEvent, UpstreamSession
from edgevoice.upstream.echo import EchoUpstream

FRAMES = 12
#: 24 kHz s16le: one 20 ms frame
FRAME_BYTES = 480 * 2


class FakeWire:
    """Stands in for a relay's ServerConnection below the session: records what the
    session writes; ``paused`` is a full send buffer (the device is not reading)."""

    def __init__(self) -> None:
        self.paused = False
        self.state = State.OPEN
        self.protocol = self
        self.transport = self
        # what the session may check before framing a message itself (_write_now)
        self.expect_continuation_frame = False
        self.writes: list[bytes] = []
        self.extensions: list[Any] = []
        self.debug = False
        self.id = uuid.uuid4()
        self.written: list[bytes | str] = []
        self.closed_with: tuple[int, str] | None = None
        # the device's end of the wire: what is written is parsed as a client would
        self._device = ClientProtocol(parse_uri("ws://relay/"), state=State.OPEN)

    def send_binary(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def send_text(self, data: bytes) -> None:
        self.written.append(data.decode())

    def write(self, data: bytes) -> None:
        """The transport: whole frames, as the device receives them."""
        self._device.receive_data(data)
        for frame in self._device.events_received():
            assert isinstance(frame, Frame) and frame.fin
            self.written.append(frame.data.decode() if frame.opcode is Opcode.TEXT
                                else bytes(frame.data))

    def send_data(self) -> None:
        pass

    async def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)


def reply_pcm(frames: int) -> bytes:
    return struct.pack(f"<{480 * frames}h", *(int(3000 * math.sin(0.05 * i))
                                              for i in range(480 * frames)))


def attached_session(relay: RelayServer, device: str) -> tuple[DeviceSession, FakeWire,
                                                               Connection]:
    """A session attached to a FakeWire, and the device's end of the protocol."""
    session = DeviceSession(relay, device, uuid.uuid4().hex)
    device_conn, relay_conn = Connection(Role.DEVICE), Connection(Role.RELAY)
    relay_conn.receive_text(device_conn.start(Hello(device=device, software="test")))
    device_conn.receive_text(relay_conn.accept(Welcome(
        session_id=session.session_id, heartbeat_interval_ms=10_000,
        resume=ResumeResult(False))))
    wire = FakeWire()
    session.ws, session.conn = cast(ServerConnection, wire), relay_conn
    session._attached.set()
    return session, wire, device_conn


def frames_of(wire: FakeWire, conn: Connection) -> list[tuple[int, int]]:
    """(seq, timestamp ms) of each audio frame written, in order; checks the text too."""
    out = []
    for data in wire.written:
        if isinstance(data, bytes):
            received = conn.receive_binary(data)
            assert received is not None
            out.append((received.frame.seq, received.frame.timestamp_ms))
        else:
            conn.receive_text(data)
    return out


async def within(seconds: float, done: Callable[[], bool]) -> None:
    """Return once ``done()``, or after ``seconds`` (the caller's assert then says what)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not done() and loop.time() < deadline:  # noqa: ASYNC110 (polls the relay's state)
        await asyncio.sleep(0.005)


def relay_for(tmp_path: Path, **limits: Any) -> RelayServer:
    return RelayServer(ListenSettings(host="127.0.0.1", port=0), LimitsSettings(**limits),
                       TokenStore(tmp_path / "tokens.json"), EchoUpstream())


def test_a_device_that_does_not_read_holds_up_nobody_and_gets_its_reply_in_order_later(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        relay = relay_for(tmp_path)
        stalled, stalled_wire, stalled_conn = attached_session(relay, "stalled")
        fine, fine_wire, fine_conn = attached_session(relay, "fine")
        stalled_wire.paused = True
        for session in (stalled, fine):
            session._downlink_put(ResponseStart(1))
            session._queue_audio(reply_pcm(FRAMES))  # the whole reply at once
            for tail in session.fifo.flush():
                session._downlink_put((tail, AudioFlags.END))
            session._downlink_put(ResponseEnd(1, "completed"))
        # handed over at once, only the lead leaves at once; the rest at real time
        assert len(frames_of(fine_wire, fine_conn)) == PACING_LEAD_FRAMES + 1
        fine_wire.written.clear()
        assert stalled_wire.written == []
        await within(scaled(5), lambda: not len(fine.downlink))
        assert len(fine.downlink) == 0, "the reading device's reply waited for the other"
        fine_frames = frames_of(fine_wire, fine_conn)
        assert [seq for seq, _ in fine_frames] == list(range(PACING_LEAD_FRAMES + 1, FRAMES))
        assert [ts for _, ts in fine_frames] == [20 * s for s in
                                                 range(PACING_LEAD_FRAMES + 1, FRAMES)]
        assert isinstance(fine_wire.written[-1], str) and "response_end" in fine_wire.written[-1]
        # nothing was written to the stalled device, nothing of its reply was lost
        assert stalled_wire.written == [] and stalled.downlink.audio_queued == FRAMES
        stalled_wire.paused = False
        await within(scaled(5), lambda: not len(stalled.downlink))
        assert [seq for seq, _ in frames_of(stalled_wire, stalled_conn)] == list(range(FRAMES))
        assert not stalled.replying and len(relay.tick) == 0  # the tick stops when done
        assert relay.counters.slow_readers == 0
    run(scenario(), timeout=scaled(20))


def test_a_device_that_never_reads_is_closed_as_a_slow_reader(tmp_path: Path) -> None:
    async def scenario() -> None:
        relay = relay_for(tmp_path, send_timeout_ms=100)
        session, wire, _ = attached_session(relay, "deaf")
        wire.paused = True
        session._queue_audio(reply_pcm(4))
        await within(scaled(5), lambda: wire.closed_with is not None)
        assert wire.closed_with is not None and wire.closed_with[0] == CloseCode.SLOW_READER
        assert relay.counters.slow_readers == 1 and wire.written == []
        assert session.downlink.audio_queued == 4  # kept, in case the device resumes
        await session.close()
        assert len(relay.tick) == 0
    run(scenario(), timeout=scaled(20))


class Recorder:
    def __init__(self, name: str, rounds: int, calls: list[str], fail: bool = False) -> None:
        self.name, self.rounds, self.calls, self.fail = name, rounds, calls, fail

    def pump_downlink(self, now: float) -> bool:
        self.calls.append(self.name)
        if self.fail:
            raise RuntimeError("a bug in one session")
        self.rounds -= 1
        return self.rounds > 0


def test_the_tick_calls_waiting_senders_in_order_survives_a_failing_one_and_then_stops(
        ) -> None:
    async def scenario() -> None:
        calls: list[str] = []
        tick = SharedTick(asyncio.get_running_loop().time, period_s=0.001)
        for recorder in (Recorder("a", 3, calls), Recorder("bug", 1, calls, fail=True),
                         Recorder("b", 1, calls)):
            tick.want(recorder)
            tick.want(recorder)  # idempotent
        await within(scaled(5), lambda: not len(tick))
        assert calls == ["a", "bug", "b", "a", "a"]
        ticks = tick.ticks
        await asyncio.sleep(0.02)
        assert tick.ticks == ticks == 3  # no wake-ups while nobody waits
    run(scenario(), timeout=scaled(10))


class GreedyUpstreamSession:
    """An upstream whose ``events()`` hands over a burst without ever suspending."""

    def __init__(self, events: int) -> None:
        self.burst = events

    async def events(self) -> AsyncIterator[UpstreamEvent]:
        for _ in range(self.burst):
            yield ToolCalled("lookup", True, 1.0)

    async def close(self) -> None:
        pass


def test_a_burst_of_upstream_events_that_never_suspends_lets_other_sessions_run(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        relay = relay_for(tmp_path)
        session, _, _ = attached_session(relay, "greedy")
        seen: list[int] = []
        loop = asyncio.get_running_loop()
        session.start(cast(UpstreamSession, GreedyUpstreamSession(10 * EVENTS_PER_YIELD)))
        loop.call_soon(lambda: seen.append(relay.counters.tool_calls))  # after its first step
        await within(scaled(5), lambda: relay.counters.tool_calls == 10 * EVENTS_PER_YIELD)
        assert relay.counters.tool_calls == 10 * EVENTS_PER_YIELD
        assert seen and seen[0] <= EVENTS_PER_YIELD, f"the loop waited for {seen} events"
        await session.close()
    run(scenario(), timeout=scaled(10))


def test_reply_audio_is_cut_into_the_same_frames_whatever_the_upstream_hands_over(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        relay = relay_for(tmp_path)
        session, wire, _ = attached_session(relay, "cuts")
        wire.paused = True  # keep everything queued, to read it back
        pcm = reply_pcm(12)
        step = FRAME_BYTES
        # whole frames, several at once, nothing, a ragged piece, whole frames again
        # (held behind the ragged rest), and the tail
        sizes = [step, 3 * step, 0, step + 100, step, step - 100, 2 * step, 3 * step + 8]
        chunks, at = [], 0
        for size in sizes:
            chunks.append(pcm[at:at + size])
            at += size
        assert at == len(pcm) + 8 and len(chunks[-1]) == 3 * step
        for chunk in chunks:
            session._queue_audio(chunk)
        reference = FrameFifo(FRAME_BYTES // 2)
        reference.push(pcm)
        expected = list(iter(reference.pop, None))
        queued = []
        while len(session.downlink):
            item = session.downlink.get_nowait()
            assert isinstance(item, tuple)
            queued.append(item)
        assert [frame for frame, _ in queued] == expected
        assert [flags for _, flags in queued] == [AudioFlags.START] + [AudioFlags.NONE] * 11
        assert len(session.fifo) == 0
        await session.close()
    run(scenario(), timeout=scaled(10))
