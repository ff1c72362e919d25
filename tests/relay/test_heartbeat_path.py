"""The relay's side of an idle device's heartbeat (stats and ping in one write), on its
cheap path (issue 15, bench row 13): what a device sends wrong is still found, and
costs only that device its connection."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from edgevoice_dev.testing.harness import run, running_relay
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
)


async def _hello(port: int, token: str, device: str) -> tuple[ClientConnection, Connection]:
    ws = await connect(f"ws://127.0.0.1:{port}/",
                       additional_headers={"Authorization": f"Bearer {token}"},
                       subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                       compression=None, max_size=MAX_TEXT_BYTES, proxy=None,
                       ping_interval=None)
    conn = Connection(Role.DEVICE)
    await ws.send(conn.start(Hello(device=device, software="test")))
    conn.receive_text(await asyncio.wait_for(ws.recv(), scaled(10)))
    return ws, conn


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
