"""Fixtures for relay + device tests on 127.0.0.1 with WAV audio."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from edgevoice.config.model import RelayConfig
from edgevoice.relay.app import build_server
from edgevoice.relay.auth import AuthSettings
from edgevoice.relay.server import RelayServer
from edgevoice.relay.settings import LimitsSettings, ListenSettings


@contextlib.asynccontextmanager
async def running_relay(tmp_path: Path, **limits: int) -> AsyncIterator[RelayServer]:
    config = RelayConfig(listen=ListenSettings(host="127.0.0.1", port=0),
                         auth=AuthSettings(tokens_file=str(tmp_path / "tokens.json")),
                         limits=replace(LimitsSettings(), **limits))
    server = build_server(config)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
def speech_wav() -> Path:
    from edgevoice.demo import bundled_speech
    return bundled_speech()


def run(coro: object, timeout: float = 60) -> object:
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]
