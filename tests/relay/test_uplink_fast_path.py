"""Uplink audio taken where its frame is parsed (relay/server.py DeviceSession._take_audio,
issue 15, bench row 14): every frame the slow path would refuse is still refused, with
the same error, close code and counter, and costs only its own connection; good
frames reach the upstream in order, also when the upstream's send suspends."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import cast

import pytest
from edgevoice_dev.testing.harness import hello_device, run
from edgevoice_dev.testing.timeouts import scaled
from test_pacing import FakeWire, attached_session
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from edgevoice.audio.opus import OpusEncoder, OpusSettings
from edgevoice.protocol.connection import Connection
from edgevoice.protocol.messages import (
    AUDIO_HEADER,
    MAX_TEXT_BYTES,
    PROTOCOL_VERSION,
    AudioKind,
    CloseCode,
    Error,
    TurnEnd,
    TurnStart,
)
from edgevoice.relay.auth import TokenStore
from edgevoice.relay.server import IdleWatch, RelayServer
from edgevoice.relay.settings import LimitsSettings, ListenSettings
from edgevoice.upstream.base import DeviceContext, UpstreamEvent

#: what the upstream saw, in order: ("audio", bytes of PCM, sent outside any task) or
#: ("end", ...)
Seen = list[tuple[str, int, bool]]


class RecordingSession:
    def __init__(self, seen: Seen, suspend: bool) -> None:
        self.seen, self.suspend = seen, suspend
        self._closed = asyncio.Event()

    async def start_turn(self) -> None:
        self.seen.append(("start", 0, asyncio.current_task() is None))

    async def send_audio(self, pcm: bytes) -> None:
        outside = asyncio.current_task() is None
        if self.suspend:
            await asyncio.sleep(0.001)  # an upstream whose send waits for its socket
        self.seen.append(("audio", len(pcm), outside))

    async def end_turn(self) -> None:
        self.seen.append(("end", 0, asyncio.current_task() is None))

    async def interrupt(self) -> None:
        pass

    async def events(self) -> AsyncIterator[UpstreamEvent]:
        await self._closed.wait()
        return
        yield  # an async generator that never yields an event

    async def close(self) -> None:
        self._closed.set()


class RecordingUpstream:
    name = "recording"

    def __init__(self, suspend: bool = False) -> None:
        self.suspend = suspend
        self.seen: dict[str, Seen] = {}

    async def open_session(self, context: DeviceContext) -> RecordingSession:
        return RecordingSession(self.seen.setdefault(context.device_id, []), self.suspend)

    async def aclose(self) -> None:
        pass


def packets(n: int) -> list[bytes]:
    encoder = OpusEncoder.from_settings(OpusSettings())
    return [encoder.encode(struct.pack("<320h", *([(i * 37) % 2000 - 1000] * 320)))
            for i in range(n)]


def raw_frame(seq: int, payload: bytes, *, version: int = PROTOCOL_VERSION,
              kind: int = AudioKind.UPLINK, flags: int = 0) -> bytes:
    return AUDIO_HEADER.pack(version, kind, flags, seq, seq * 20) + payload


async def closed_with(ws: ClientConnection, conn: Connection) -> tuple[int | None, list[str]]:
    """Read until the relay closes; its close code and the errors it sent first."""
    errors = []
    with contextlib.suppress(ConnectionClosed):
        while True:
            data = await asyncio.wait_for(ws.recv(), scaled(10))
            if isinstance(data, str):
                message = conn.receive_text(data)
                if isinstance(message, Error):
                    errors.append(message.code)
    return ws.close_code, errors


@contextlib.asynccontextmanager
async def started_relay(tmp_path: Path, upstream: RecordingUpstream | None = None,
                        **limits: int) -> AsyncIterator[tuple[RelayServer, RecordingUpstream]]:
    """A relay on 127.0.0.1 whose upstream records what reaches it; closed after."""
    upstream = upstream if upstream is not None else RecordingUpstream()
    relay = RelayServer(ListenSettings(host="127.0.0.1", port=0), LimitsSettings(**limits),
                        TokenStore(tmp_path / "tokens.json"), upstream)
    await relay.start()
    try:
        yield relay, upstream
    finally:
        await relay.close()


async def until(condition: Callable[[], object], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + scaled(10)
    while not condition():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.005)


def test_good_frames_are_taken_where_parsed_in_order_with_the_turn(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started_relay(tmp_path) as (relay, upstream):
            ws, conn = await hello_device(relay.port, relay.tokens.add("good"), "good",
                                          scaled(10))
            await ws.send(conn.send(TurnStart(1)))
            for packet in packets(20):
                await ws.send(conn.send_audio(packet, 0)[1])
                await asyncio.sleep(0.002)
            await ws.send(conn.send(TurnEnd(1, "silence")))
            seen = upstream.seen.setdefault("good", [])
            await until(lambda: seen and seen[-1][0] == "end", "the turn never ended")
            assert [kind for kind, _, _ in seen] == ["start"] + ["audio"] * 20 + ["end"]
            assert all(n == 640 for kind, n, _ in seen if kind == "audio")
            # taken where parsed (no task), not by the receive task
            assert sum(outside for kind, _, outside in seen if kind == "audio") >= 15
            assert relay.counters.frames_in == 20 and relay.counters.protocol_errors == 0
            await ws.close()
    run(scenario(), timeout=scaled(30))


def test_an_upstream_send_that_suspends_keeps_every_frame_and_the_order(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        upstream = RecordingUpstream(suspend=True)
        async with started_relay(tmp_path, upstream) as (relay, _):
            ws, conn = await hello_device(relay.port, relay.tokens.add("slow"), "slow",
                                          scaled(10))
            await ws.send(conn.send(TurnStart(1)))
            for packet in packets(30):  # back to back: they arrive while sends wait
                ws.protocol.send_binary(conn.send_audio(packet, 0)[1])
            ws.protocol.send_text(conn.send(TurnEnd(1, "silence")).encode())
            ws.send_data()
            seen = upstream.seen.setdefault("slow", [])
            await until(lambda: seen and seen[-1][0] == "end", "the turn never ended")
            assert [kind for kind, _, _ in seen] == ["start"] + ["audio"] * 30 + ["end"]
            await ws.close()
    run(scenario(), timeout=scaled(30))


BAD: dict[str, tuple[Callable[[bytes], bytes], int, str]] = {
    # name: (frame after two good ones (seq 0, 1), close code, counter that counts it)
    "wrong version": (lambda p: raw_frame(2, p, version=PROTOCOL_VERSION + 1),
                      CloseCode.PROTOCOL_ERROR, "protocol_errors"),
    "downlink kind": (lambda p: raw_frame(2, p, kind=AudioKind.DOWNLINK),
                      CloseCode.PROTOCOL_ERROR, "protocol_errors"),
    "unknown flags": (lambda p: raw_frame(2, p, flags=0x80), CloseCode.PROTOCOL_ERROR,
                      "protocol_errors"),
    "header only": (lambda p: raw_frame(2, b""), CloseCode.PROTOCOL_ERROR, "protocol_errors"),
    "120 ms packet": (lambda p: raw_frame(2, bytes([0x0B << 3 | 1]) + bytes(40)),
                      CloseCode.PROTOCOL_ERROR, "protocol_errors"),
    "zero-frame packet": (lambda p: raw_frame(2, bytes([0x0B << 3 | 3, 0])),
                          CloseCode.PROTOCOL_ERROR, "protocol_errors"),
    # two 10 ms SILK frames of equal size need an even length after the TOC byte
    "undecodable": (lambda p: raw_frame(2, bytes([0 << 3 | 1, 1, 2, 3])),
                    CloseCode.PROTOCOL_ERROR, "protocol_errors"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_frame_closes_only_its_connection_as_the_slow_path_did(
        tmp_path: Path, case: str) -> None:
    make, code, counter = BAD[case]

    async def scenario() -> None:
        async with started_relay(tmp_path) as (relay, upstream):
            good, good_conn = await hello_device(relay.port, relay.tokens.add("good"),
                                                 "good", scaled(10))
            bad, bad_conn = await hello_device(relay.port, relay.tokens.add("bad"), "bad",
                                               scaled(10))
            for ws, conn in ((good, good_conn), (bad, bad_conn)):
                await ws.send(conn.send(TurnStart(1)))
            good_packets = packets(2)
            for packet in good_packets:
                await bad.send(bad_conn.send_audio(packet, 0)[1])
            await asyncio.sleep(0.05)  # the receive task waits again: the cheap path
            # the bad frame, and a good one and a turn end written behind it
            bad.protocol.send_binary(make(good_packets[0]))
            bad.protocol.send_binary(raw_frame(3, good_packets[1]))
            bad.protocol.send_text(bad_conn.send(TurnEnd(1, "silence")).encode())
            bad.send_data()
            closed, errors = await closed_with(bad, bad_conn)
            assert closed == code and errors == ["protocol_error"]
            assert getattr(relay.counters, counter) == 1
            seen = upstream.seen.get("bad", [])
            assert [kind for kind, _, _ in seen] == ["start", "audio", "audio"], \
                "something behind the bad frame was acted on"
            assert "bad" not in relay.sessions and "bad" not in relay.held
            # the other device was not disturbed
            await good.send(good_conn.send_audio(good_packets[0], 0)[1])
            await until(lambda: len(upstream.seen.get("good", [])) == 2, "good frame lost")
            assert "good" in relay.sessions
            await good.close()
    run(scenario(), timeout=scaled(30))


def test_audio_outside_a_turn_is_refused_where_parsed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started_relay(tmp_path) as (relay, upstream):
            ws, conn = await hello_device(relay.port, relay.tokens.add("early"), "early",
                                          scaled(10))
            await asyncio.sleep(0.05)
            await ws.send(conn.send_audio(packets(1)[0], 0)[1])
            closed, errors = await closed_with(ws, conn)
            assert closed == CloseCode.PROTOCOL_ERROR and errors == ["protocol_error"]
            assert relay.counters.protocol_errors == 1 and relay.counters.frames_in == 1
            assert upstream.seen.get("early", []) == []
    run(scenario(), timeout=scaled(30))


def test_duplicates_are_counted_and_an_audio_flood_is_closed_for_policy(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started_relay(tmp_path, max_audio_ms_per_s=1000,
                                 max_messages_per_s=1000) as (relay, upstream):
            ws, conn = await hello_device(relay.port, relay.tokens.add("flood"), "flood",
                                          scaled(10))
            await ws.send(conn.send(TurnStart(1)))
            good = packets(1)[0]
            await ws.send(raw_frame(0, good))
            await asyncio.sleep(0.05)
            await ws.send(raw_frame(0, good))  # a duplicate: counted, not passed on
            await until(lambda: relay.counters.frames_duplicate == 1, "duplicate not counted")
            # 20 ms packets far faster than real time: over 1 s of audio a second (2 s
            # burst, 100 packets)
            sent = 0
            with contextlib.suppress(ConnectionClosed):
                for seq in range(1, 400):
                    await ws.send(raw_frame(seq, good))
                    sent += 1
                    if seq % 20 == 0:
                        await asyncio.sleep(0.001)
            closed, _ = await closed_with(ws, conn)
            assert closed == CloseCode.POLICY_VIOLATION
            assert relay.counters.rate_limited == 1 and relay.counters.protocol_errors == 0
            audio = [kind for kind, _, _ in upstream.seen["flood"] if kind == "audio"]
            # what the budget allowed reached the upstream; nothing after the refused one
            assert 100 <= len(audio) < min(sent, 200), (len(audio), sent)
            assert relay.refusals.counts.get("rate_limited") == 1
    run(scenario(), timeout=scaled(30))


def test_only_the_connection_whose_receive_task_waits_has_frames_taken_early(
        tmp_path: Path) -> None:
    """A resume can leave an older connection's receive task waiting in recv() while
    the new connection's task is busy with a message: a frame on the new connection must
    then wait its turn, not be taken because *a* task of the session is reading."""

    async def scenario() -> None:
        relay = RelayServer(ListenSettings(host="127.0.0.1", port=0), LimitsSettings(),
                            TokenStore(tmp_path / "tokens.json"), RecordingUpstream())
        session, wire, device_conn = attached_session(relay, "moved")
        seen: Seen = []
        session._upstream = RecordingSession(seen, suspend=False)
        session.owner = cast(ServerConnection, wire)
        session.turn_id = 1
        idle = IdleWatch(asyncio.get_running_loop(), 60, lambda: None)
        assert session.conn is not None
        frames = [device_conn.send_audio(p, 0)[1] for p in packets(2)]
        older = cast(ServerConnection, FakeWire())
        session._reading = older  # the replaced connection's task, still in recv()
        assert not session._take_audio(session.owner, session.conn, idle, frames[0])
        assert seen == [] and relay.counters.frames_in == 0
        session._reading = session.owner  # the current connection's task waits
        assert session._take_audio(session.owner, session.conn, idle, frames[0])
        assert [kind for kind, _, _ in seen] == ["audio"] and relay.counters.frames_in == 1
        idle.cancel()
    run(scenario(), timeout=scaled(10))


# --- audio frames taken without websockets' frame parser (GuardedConnection._take_frames)


def _binary(*payloads: bytes, fin: bool = True, opcode: Opcode = Opcode.BINARY) -> bytes:
    """Masked frames as a device's websockets would write them (not sent)."""
    return b"".join(Frame(opcode, p, fin).serialize(mask=True, extensions=[])
                    for p in payloads)


async def _talking(relay: RelayServer, device: str) -> tuple[ClientConnection, Connection]:
    ws, conn = await hello_device(relay.port, relay.tokens.add(device), device, scaled(10))
    await ws.send(conn.send(TurnStart(1)))
    await asyncio.sleep(0.05)  # the turn has started, the receive task waits in recv()
    return ws, conn


def _audio_seen(upstream: RecordingUpstream, device: str) -> list[int]:
    return [n for kind, n, _ in upstream.seen.get(device, []) if kind == "audio"]


def test_whole_audio_frames_are_taken_without_websockets_parser(tmp_path: Path) -> None:
    # Fails if a websockets release parses otherwise (the cheap path is then never
    # taken, silently: bench rows 4 and 14 would show it, this says why).
    async def scenario() -> None:
        async with started_relay(tmp_path) as (relay, upstream):
            ws, conn = await _talking(relay, "d1")
            (server_side,) = relay._connections.values()
            good = packets(4)
            data = _binary(*(conn.send_audio(p, 0)[1] for p in good[:2]))
            assert server_side._take_frames(data) == len(data)
            assert _audio_seen(upstream, "d1") == [640, 640]
            # a cut frame is not taken; with its rest, websockets completes it
            data = _binary(*(conn.send_audio(p, 0)[1] for p in good[2:]))
            assert server_side._take_frames(data[:3]) == 0
            server_side.data_received(data[:3])
            assert server_side._take_frames(data[3:]) == 0
            server_side.data_received(data[3:])
            await until(lambda: len(_audio_seen(upstream, "d1")) == 4, "audio lost")
            assert relay.counters.frames_in == 4 and relay.counters.protocol_errors == 0
            await ws.close()
    run(scenario(), timeout=scaled(30))


def test_audio_cut_across_writes_reaches_the_upstream_whole_and_in_order(
        tmp_path: Path) -> None:
    # The relay's parser is inside a frame after the first piece: what follows must
    # go to it, not be taken as the start of a frame.
    async def scenario() -> None:
        async with started_relay(tmp_path) as (relay, upstream):
            ws, conn = await _talking(relay, "d1")
            good = packets(2)
            cuts = (1, 2, 5, 6, 7, 20)  # 2 and 6: the parser waits with nothing buffered
            for i, cut in enumerate(cuts):
                data = _binary(*(conn.send_audio(p, 0)[1] for p in good))
                ws.transport.write(data[:cut])
                await asyncio.sleep(0.05)
                ws.transport.write(data[cut:])
                want = 2 * (i + 1)
                await until(lambda: len(_audio_seen(upstream, "d1")) == want,  # noqa: B023
                            f"audio cut at {cut} lost")
            assert relay.counters.frames_in == 2 * len(cuts)
            assert relay.counters.frames_duplicate == 0
            assert relay.counters.protocol_errors == 0
            await ws.close()
    run(scenario(), timeout=scaled(30))


def test_the_rest_of_a_binary_frame_is_never_taken_for_a_frame_of_its_own(
        tmp_path: Path) -> None:
    # A binary frame whose payload holds the bytes of a whole audio frame, sent in two
    # pieces cut where the relay's parser waits for the payload with nothing buffered:
    # the second piece starts like a frame but is payload. As a message it is no audio
    # frame (its version byte is 0x82), so the device is closed (1002) and the audio
    # inside it never reaches the upstream.
    async def scenario() -> None:
        async with started_relay(tmp_path) as (relay, upstream):
            ws, conn = await _talking(relay, "d1")
            inner = _binary(conn.send_audio(packets(1)[0], 0)[1])
            assert inner[0] == 0x82 and len(inner) < 126
            outer = bytes([0x82, 0x80 | len(inner)]) + b"\0\0\0\0" + inner  # mask 0
            ws.transport.write(outer[:6])
            await asyncio.sleep(0.1)
            ws.transport.write(outer[6:])
            closed, errors = await closed_with(ws, conn)
            assert closed == CloseCode.PROTOCOL_ERROR and errors == ["protocol_error"]
            assert _audio_seen(upstream, "d1") == []
    run(scenario(), timeout=scaled(30))


def test_binary_frames_websockets_must_judge_still_reach_it(tmp_path: Path) -> None:
    # each behind an audio frame the cheap path takes: an oversized binary frame (1009),
    # an unmasked one (1002), one with a reserved bit (1002); a fragmented audio message
    # and a ping between two audio frames are taken by websockets, in order
    async def scenario() -> None:
        async with started_relay(tmp_path) as (relay, upstream):
            good = packets(3)
            big, big_conn = await _talking(relay, "big")
            big.transport.write(_binary(big_conn.send_audio(good[0], 0)[1],
                                        bytes(MAX_TEXT_BYTES + 1)))
            assert (await closed_with(big, big_conn))[0] == CloseCode.MESSAGE_TOO_BIG

            bare, bare_conn = await _talking(relay, "bare")
            bare.transport.write(_binary(bare_conn.send_audio(good[0], 0)[1]) + Frame(
                Opcode.BINARY, bare_conn.send_audio(good[1], 0)[1]).serialize(
                    mask=False, extensions=[]))
            assert (await closed_with(bare, bare_conn))[0] == CloseCode.PROTOCOL_ERROR

            rsv, rsv_conn = await _talking(relay, "rsv")
            odd = bytearray(_binary(rsv_conn.send_audio(good[1], 0)[1]))
            odd[0] |= 0x40  # RSV1: an extension nobody negotiated
            rsv.transport.write(_binary(rsv_conn.send_audio(good[0], 0)[1]) + bytes(odd))
            assert (await closed_with(rsv, rsv_conn))[0] == CloseCode.PROTOCOL_ERROR
            for device in ("big", "bare", "rsv"):  # only what came before the bad frame
                assert _audio_seen(upstream, device) == [640], device

            parts, parts_conn = await _talking(relay, "parts")
            first, second, third = (parts_conn.send_audio(p, 0)[1] for p in good)
            parts.transport.write(
                _binary(first)
                + _binary(second[:10], fin=False)
                + _binary(second[10:], opcode=Opcode.CONT)
                + _binary(b"are you there?", opcode=Opcode.PING)
                + _binary(third))
            await until(lambda: len(_audio_seen(upstream, "parts")) == 3, "audio lost")
            assert relay.counters.protocol_errors == 0
            assert await parts.ping() is not None  # still open, answering
            await parts.close()
            assert "parts" in relay.sessions or "parts" in relay.held
    run(scenario(), timeout=scaled(30))
