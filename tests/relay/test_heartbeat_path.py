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


async def _hello(port: int, token: str, device: str) -> tuple[ClientConnection, Connection]:
    return await hello_device(port, token, device, scaled(10))


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
            good, good_conn = await _hello(relay.port, relay.tokens.add("good"), "good")
            bad, bad_conn = await _hello(relay.port, relay.tokens.add("bad"), "bad")
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
            ws, conn = await _hello(relay.port, relay.tokens.add("d1"), "d1")
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
            good, good_conn = await _hello(relay.port, relay.tokens.add("good"), "good")
            flood, flood_conn = await _hello(relay.port, relay.tokens.add("flood"), "flood")
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
