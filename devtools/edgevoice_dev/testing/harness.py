"""Run a relay and devices in-process on 127.0.0.1, for tests, the demo and benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from edgevoice.config.model import DeviceConfig
from edgevoice.config.relay import RelayConfig
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
