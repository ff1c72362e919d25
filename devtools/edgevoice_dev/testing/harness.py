"""Run a relay and devices in-process on 127.0.0.1, for tests, the demo and benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect

from edgevoice.config.model import DeviceConfig
from edgevoice.config.relay import RelayConfig
from edgevoice.protocol.connection import Connection, Role
from edgevoice.protocol.messages import MAX_TEXT_BYTES, SUBPROTOCOL, Hello
from edgevoice.relay.app import build_server
from edgevoice.relay.auth import AuthSettings
from edgevoice.relay.server import RelayServer
from edgevoice.relay.settings import LimitsSettings, ListenSettings

T = TypeVar("T")


@contextlib.asynccontextmanager
async def running_relay(tmp_path: Path, config: RelayConfig | None = None,
                        **limits: Any) -> AsyncIterator[RelayServer]:
    """A relay on 127.0.0.1 with a free port and its token file under ``tmp_path``."""
    base = config or RelayConfig()
    config = replace(base, listen=replace(base.listen, host="127.0.0.1", port=0),
                     auth=replace(base.auth, tokens_file=str(tmp_path / "tokens.json")),
                     limits=replace(base.limits, **limits) if limits else base.limits)
    server = build_server(config)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def device_config(url: str, device_id: str, base: DeviceConfig | None = None,
                  **sections: Any) -> DeviceConfig:
    """A device config pointing at ``url``."""
    base = base or DeviceConfig()
    return replace(base, device_id=device_id, relay=replace(base.relay, url=url), **sections)


def run(coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
    """Run ``coro`` in a fresh event loop with an overall timeout."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


__all__ = ["AuthSettings", "LimitsSettings", "ListenSettings", "device_config", "run",
           "running_relay"]


async def hello_device(port: int, token: str, device: str,
                       timeout_s: float = 10) -> tuple[ClientConnection, Connection]:
    """A raw protocol device on a relay at 127.0.0.1:``port``: connected without
    WebSocket keepalives, its hello sent and the welcome read."""
    ws = await connect(f"ws://127.0.0.1:{port}/",
                       additional_headers={"Authorization": f"Bearer {token}"},
                       subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                       compression=None, max_size=MAX_TEXT_BYTES, proxy=None,
                       ping_interval=None)
    conn = Connection(Role.DEVICE)
    await ws.send(conn.start(Hello(device=device, software="test")))
    conn.receive_text(await asyncio.wait_for(ws.recv(), timeout_s))
    return ws, conn
