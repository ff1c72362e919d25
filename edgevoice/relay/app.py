"""Runs the relay process: config → token store → upstream → server, until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from edgevoice.config.model import RelayConfig
from edgevoice.relay.auth import TokenStore
from edgevoice.relay.server import RelayServer
from edgevoice.upstream.base import Upstream
from edgevoice.upstream.echo import EchoUpstream

logger = logging.getLogger(__name__)


def build_upstream(config: RelayConfig) -> Upstream:
    """The upstream named in the config."""
    kind = config.upstream.kind
    if kind == "echo":
        return EchoUpstream(config.upstream.echo)
    raise NotImplementedError(f"upstream {kind!r} is not available in this build")


def build_server(config: RelayConfig) -> RelayServer:
    return RelayServer(config.listen, config.limits, TokenStore(config.auth.tokens_file),
                       build_upstream(config),
                       max_failures_per_minute=config.auth.max_failures_per_minute)


async def run_relay(config: RelayConfig) -> None:
    server = build_server(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        logger.info("stopping: telling devices we are going away")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await server.close()
