"""A dead or silent device is closed by the protocol heartbeat's idle timer alone: the
relay sends no WebSocket keepalive pings of its own by default (bench row 13), so the
idle timer (three heartbeat intervals, close 4003) is what finds it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from edgevoice_dev.testing.harness import hello_device, run, running_relay
from edgevoice_dev.testing.timeouts import scaled
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from edgevoice.config.relay import RelayConfig
from edgevoice.protocol.connection import Connection
from edgevoice.protocol.messages import (
    CloseCode,
    Ping,
    Pong,
)
from edgevoice.relay.settings import LimitsSettings

HEARTBEAT_MS = 200


def test_the_relay_sends_no_keepalive_pings_by_default() -> None:
    assert RelayConfig().limits.ping_interval_ms == 0
    with pytest.raises(ValueError):
        LimitsSettings(ping_interval_ms=50)


async def _hello(port: int, token: str, device: str) -> tuple[ClientConnection, Connection]:
    return await hello_device(port, token, device, scaled(10))


def test_a_silent_device_is_closed_after_three_heartbeats(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path, heartbeat_interval_ms=HEARTBEAT_MS) as relay:
            ws, _ = await _hello(relay.port, relay.tokens.add("d1"), "d1")
            started = time.monotonic()
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), scaled(10))
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == CloseCode.IDLE_TIMEOUT
            # not before three heartbeat intervals of silence
            assert time.monotonic() - started >= 3 * HEARTBEAT_MS / 1000 * 0.9
    run(scenario(), timeout=scaled(30))


def test_a_device_that_heartbeats_stays_connected(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path, heartbeat_interval_ms=HEARTBEAT_MS) as relay:
            ws, conn = await _hello(relay.port, relay.tokens.add("d1"), "d1")
            for ping_id in range(1, 11):  # ten intervals: over three times the idle limit
                await ws.send(conn.send(Ping(ping_id, int(time.monotonic() * 1000))))
                pong = conn.receive_text(await asyncio.wait_for(ws.recv(), scaled(10)))
                assert isinstance(pong, Pong) and pong.id == ping_id
                await asyncio.sleep(HEARTBEAT_MS / 1000)
            await ws.close()
    run(scenario(), timeout=scaled(30))
