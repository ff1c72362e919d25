"""Runs the device daemon process: config → audio → daemon, until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from edgevoice.audio.sounddevice_io import open_sink, open_source
from edgevoice.config.model import DeviceConfig
from edgevoice.device.daemon import DeviceDaemon, read_token

logger = logging.getLogger(__name__)


def build_daemon(config: DeviceConfig, config_file: str, **kwargs: object) -> DeviceDaemon:
    token = read_token(config, config_file)
    source = open_source(config.audio.input)
    sink = open_sink(config.audio.output, rate_hz=config.audio.output_rate_hz)
    return DeviceDaemon(config, token, source, sink, **kwargs)  # type: ignore[arg-type]


async def run_device(config: DeviceConfig, config_file: str) -> None:
    daemon = build_daemon(config, config_file)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    try:
        await daemon.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
