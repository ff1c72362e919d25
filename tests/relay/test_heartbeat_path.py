"""The relay's side of an idle device's heartbeat (stats and ping in one write), on its
cheap path (issue 15, bench row 13): what a device sends wrong is still found, and
costs only that device its connection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

from edgevoice_dev.testing.harness import hello_device, run, running_relay
from edgevoice_dev.testing.timeouts import scaled
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from edgevoice.protocol.connection import Connection, Role
from edgevoice.protocol.messages import (
    MAX_TEXT_BYTES,
    SUBPROTOCOL,
    CloseCode,
    Error,
    Hello,
    Ping,
    Pong,
    Stats,
    TurnStart,
)
from edgevoice.relay.auth import TokenStore
from edgevoice.relay.server import RelayServer
from edgevoice.relay.settings import LimitsSettings, ListenSettings
from edgevoice.upstream.base import DeviceContext
from edgevoice.upstream.echo import EchoSession, EchoSettings, EchoUpstream


async def _hello(relay: RelayServer, device: str) -> tuple[ClientConnection, Connection]:
    """``device`` connected with a token of its own, past hello/welcome."""
    return await hello_device(relay.port, relay.tokens.add(device), device, scaled(10))


def _heartbeat(ws: ClientConnection, conn: Connection, ping_id: int,
                     stats: str) -> None:
    """Stats and ping in one write, as the daemon's link sends them."""
    ping = conn.send(Ping(ping_id, int(time.monotonic() * 1000)))
    ws.protocol.send_text(stats.encode())
    ws.protocol.send_text(ping.encode())
    ws.send_data()


def test_malformed_stats_close_only_that_device_with_one_clear_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as relay:
            good, good_conn = await _hello(relay, "good")
            bad, bad_conn = await _hello(relay, "bad")
            _heartbeat(good, good_conn, 1, good_conn.send(Stats({"rtt_ms": 1.5})))
            pong = good_conn.receive_text(await asyncio.wait_for(good.recv(), scaled(10)))
            assert isinstance(pong, Pong) and pong.id == 1
            _heartbeat(bad, bad_conn, 1, json.dumps({"type": "stats", "values": [1]}))
            error = bad_conn.receive_text(await asyncio.wait_for(bad.recv(), scaled(10)))
            assert isinstance(error, Error) and error.code == "protocol_error"
            assert "stats.values" in error.message and "expected an object" in error.message
            try:  # nothing else: no pong for the ping behind the bad stats
                extra = await asyncio.wait_for(bad.recv(), scaled(10))
                raise AssertionError(f"sent after the error: {extra!r}")
            except ConnectionClosed as closed:
                assert closed.rcvd is not None
                assert closed.rcvd.code == CloseCode.PROTOCOL_ERROR
            # the other device's session is untouched, its stats are in the fleet view
            _heartbeat(good, good_conn, 2, good_conn.send(Stats({"rtt_ms": 2.5})))
            pong = good_conn.receive_text(await asyncio.wait_for(good.recv(), scaled(10)))
            assert isinstance(pong, Pong) and pong.id == 2
            record = relay.fleet.record("good")
            assert record is not None and record.connected
            assert record.last_stats == {"rtt_ms": 2.5}
            await good.close()
    run(scenario(), timeout=scaled(30))


class SlowStartSession(EchoSession):
    """An upstream whose turn takes its time to start (a cold Nova stream)."""

    def __init__(self, settings: EchoSettings, context: DeviceContext,
                 release: asyncio.Event) -> None:
        super().__init__(settings, context)
        self.release = release

    async def start_turn(self) -> None:
        await self.release.wait()
        await super().start_turn()


class SlowStartUpstream(EchoUpstream):
    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def open_session(self, context: DeviceContext) -> EchoSession:
        return SlowStartSession(self.settings, context, self.release)


def test_a_heartbeat_is_answered_while_the_session_waits_on_its_upstream(
        tmp_path: Path) -> None:
    # The pong does not wait for the receive task: while a turn's start waits on the
    # upstream, the device's heartbeat is still answered (its answer timeout is 20 s).
    async def scenario() -> None:
        upstream = SlowStartUpstream()
        relay = RelayServer(ListenSettings(host="127.0.0.1", port=0), LimitsSettings(),
                            TokenStore(tmp_path / "tokens.json"), upstream)
        await relay.start()
        try:
            ws, conn = await _hello(relay, "d1")
            await ws.send(conn.send(TurnStart(1)))
            await asyncio.sleep(0.2)  # the receive task is now waiting in start_turn
            _heartbeat(ws, conn, 1, conn.send(Stats({"rtt_ms": 4.0})))
            pong = conn.receive_text(await asyncio.wait_for(ws.recv(), scaled(5)))
            assert isinstance(pong, Pong) and pong.id == 1
            record = relay.fleet.record("d1")
            assert record is not None and record.last_stats == {"rtt_ms": 4.0}
            upstream.release.set()
            await ws.close()
        finally:
            upstream.release.set()
            await relay.close()
    run(scenario(), timeout=scaled(30))


def test_pings_over_the_limit_close_only_that_device(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path, max_pings_per_s=2) as relay:
            good, good_conn = await _hello(relay, "good")
            flood, flood_conn = await _hello(relay, "flood")
            for ping_id in range(1, 40):  # the burst is 10 pings
                flood.protocol.send_text(flood_conn.send(Ping(ping_id, 0)).encode())
            flood.send_data()
            code = None
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await asyncio.wait_for(flood.recv(), scaled(10))
            assert flood.protocol.close_rcvd is not None
            code = flood.protocol.close_rcvd.code
            assert code == CloseCode.POLICY_VIOLATION
            assert relay.counters.rate_limited >= 1
            _heartbeat(good, good_conn, 1, good_conn.send(Stats({})))
            pong = good_conn.receive_text(await asyncio.wait_for(good.recv(), scaled(10)))
            assert isinstance(pong, Pong) and pong.id == 1
            await good.close()
    run(scenario(), timeout=scaled(30))


def test_by_default_devices_heartbeat_every_minute_with_their_stats(tmp_path: Path) -> None:
    # The trade of docs/protocol.md §6: one relay wake-up a minute per idle device (bench
    # row 13), a silent device closed after three minutes, a dead relay found by the
    # device within a minute plus its answer timeout.
    from edgevoice.device.link import RelaySettings
    from edgevoice.protocol.heartbeat import stats_every
    from edgevoice.protocol.messages import Welcome

    async def scenario() -> None:
        async with running_relay(tmp_path) as relay:
            ws = await connect(f"ws://127.0.0.1:{relay.port}/",
                               additional_headers={
                                   "Authorization": f"Bearer {relay.tokens.add('d1')}"},
                               subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                               compression=None, max_size=MAX_TEXT_BYTES, proxy=None,
                               ping_interval=None)
            conn = Connection(Role.DEVICE)
            await ws.send(conn.start(Hello(device="d1", software="test")))
            welcome = conn.receive_text(await asyncio.wait_for(ws.recv(), scaled(10)))
            assert isinstance(welcome, Welcome)
            assert welcome.heartbeat_interval_ms == 60_000
            device = RelaySettings()
            assert stats_every(welcome.heartbeat_interval_ms, device.stats_interval_s) == 1
            assert (welcome.heartbeat_interval_ms + device.ping_timeout_ms) / 1000 == 80
            await ws.close()
    run(scenario(), timeout=scaled(30))


# --- heartbeats taken without websockets' frame parser (GuardedConnection._take_frames)


def _raw(ws: ClientConnection, *texts: str | bytes) -> bytes:
    """Masked text frames as a device's websockets would write them (not sent)."""
    out = b""
    for text in texts:
        payload = text.encode() if isinstance(text, str) else text
        out += Frame(Opcode.TEXT, payload).serialize(mask=True, extensions=[])
    return out


def _write(ws: ClientConnection, *texts: str | bytes) -> None:
    """Write masked text frames in one piece, under websockets' writer."""
    ws.transport.write(_raw(ws, *texts))


async def _pong(ws: ClientConnection, conn: Connection, ping_id: int) -> None:
    pong = conn.receive_text(await asyncio.wait_for(ws.recv(), scaled(10)))
    assert isinstance(pong, Pong) and pong.id == ping_id


async def _closed_with(ws: ClientConnection) -> int | None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), scaled(10))
    return ws.protocol.close_rcvd.code if ws.protocol.close_rcvd is not None else None


def test_a_heartbeat_cut_across_writes_is_parsed_whole(tmp_path: Path) -> None:
    # The relay's parser is inside a frame after the first piece: what follows must
    # go to it, not be taken as the start of a frame.
    async def scenario() -> None:
        async with running_relay(tmp_path) as relay:
            ws, conn = await _hello(relay, "d1")
            data = _raw(ws, conn.send(Stats({"rtt_ms": 3.0})), conn.send(Ping(1, 0)))
            for cut in (1, 2, 5, 6, 7):  # 2 and 6: the parser waits with nothing buffered
                ws.transport.write(data[:cut])
                await asyncio.sleep(0.05)
                ws.transport.write(data[cut:])
                await _pong(ws, conn, 1)
                data = _raw(ws, conn.send(Stats({"rtt_ms": float(cut)})), conn.send(Ping(1, 0)))
            record = relay.fleet.record("d1")
            assert record is not None and record.last_stats == {"rtt_ms": 6.0}
            assert relay.counters.protocol_errors == 0
            await ws.close()
    run(scenario(), timeout=scaled(30))


def test_a_malformed_message_after_a_heartbeat_in_the_same_write_closes_only_it(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as relay:
            good, good_conn = await _hello(relay, "good")
            bad, bad_conn = await _hello(relay, "bad")
            _write(bad, bad_conn.send(Stats({"rtt_ms": 7.0})), bad_conn.send(Ping(1, 0)),
                   "{not json", bad_conn.send(Ping(2, 0)))
            await _pong(bad, bad_conn, 1)  # what came before it was answered
            error = bad_conn.receive_text(await asyncio.wait_for(bad.recv(), scaled(10)))
            assert isinstance(error, Error) and error.code == "protocol_error"
            assert await _closed_with(bad) == CloseCode.PROTOCOL_ERROR  # no pong 2
            record = relay.fleet.record("bad")
            assert record is not None and record.last_stats == {"rtt_ms": 7.0}
            _heartbeat(good, good_conn, 1, good_conn.send(Stats({})))
            await _pong(good, good_conn, 1)
            await good.close()
    run(scenario(), timeout=scaled(30))


def test_frames_websockets_must_judge_still_reach_it(tmp_path: Path) -> None:
    # an oversized text frame (1009), an unmasked one (1002), a fragmented message (taken
    # whole by websockets, in order), each behind a ping the cheap path may take
    async def scenario() -> None:
        async with running_relay(tmp_path) as relay:
            big, big_conn = await _hello(relay, "big")
            _write(big, big_conn.send(Ping(1, 0)),
                   b'{"type":"stats","values":{"x":"' + b"a" * MAX_TEXT_BYTES + b'"}}')
            assert await _closed_with(big) == CloseCode.MESSAGE_TOO_BIG

            bare, bare_conn = await _hello(relay, "bare")
            bare.transport.write(_raw(bare, bare_conn.send(Ping(1, 0))) + Frame(
                Opcode.TEXT, bare_conn.send(Ping(2, 0)).encode()).serialize(
                    mask=False, extensions=[]))
            assert await _closed_with(bare) == CloseCode.PROTOCOL_ERROR

            parts, parts_conn = await _hello(relay, "parts")
            stats = parts_conn.send(Stats({"rtt_ms": 9.0})).encode()
            parts.transport.write(
                Frame(Opcode.TEXT, stats[:10], fin=False).serialize(mask=True, extensions=[])
                + Frame(Opcode.CONT, stats[10:]).serialize(mask=True, extensions=[])
                + _raw(parts, parts_conn.send(Ping(1, 0))))
            await _pong(parts, parts_conn, 1)
            record = relay.fleet.record("parts")
            assert record is not None and record.last_stats == {"rtt_ms": 9.0}
            await parts.close()
    run(scenario(), timeout=scaled(30))


def test_the_rest_of_a_frame_is_never_taken_for_a_frame_of_its_own(tmp_path: Path) -> None:
    # A text frame whose payload holds the bytes of a whole ping frame, sent in two
    # pieces cut where the relay's parser waits for the payload with nothing buffered:
    # the second piece starts like a frame but is payload. The message is not UTF-8, so
    # the device is closed (1007), and the ping inside it is never answered.
    async def scenario() -> None:
        async with running_relay(tmp_path) as relay:
            ws, conn = await _hello(relay, "d1")
            inner = _raw(ws, conn.send(Ping(1, 0)))
            assert inner[0] == 0x81
            outer = bytes([0x81, 0x80 | len(inner)]) + b"\0\0\0\0" + inner  # mask 0
            ws.transport.write(outer[:6])
            await asyncio.sleep(0.1)
            ws.transport.write(outer[6:])
            assert await _closed_with(ws) == 1007  # invalid frame payload data (RFC 6455)
    run(scenario(), timeout=scaled(30))


def test_a_whole_heartbeat_is_taken_without_websockets_parser(tmp_path: Path) -> None:
    # Fails if a websockets release parses otherwise (the cheap path is then never
    # taken, silently: bench row 13 would show it, this says why).
    async def scenario() -> None:
        async with running_relay(tmp_path) as relay:
            ws, conn = await _hello(relay, "d1")
            await asyncio.sleep(0.1)  # the relay has taken the hello and serves
            (server_side,) = relay._connections.values()
            data = _raw(ws, conn.send(Stats({"rtt_ms": 2.0})), conn.send(Ping(1, 0)))
            assert server_side._take_frames(data) == len(data)
            await _pong(ws, conn, 1)
            record = relay.fleet.record("d1")
            assert record is not None and record.last_stats == {"rtt_ms": 2.0}
            # a cut frame is not taken; with its rest, websockets completes it
            assert server_side._take_frames(data[:3]) == 0
            server_side.data_received(data[:3])
            assert server_side._take_frames(data[3:]) == 0
            server_side.data_received(data[3:])
            await _pong(ws, conn, 1)
            await ws.close()
    run(scenario(), timeout=scaled(30))
