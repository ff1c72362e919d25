"""Runs the device daemon process: config → audio → daemon, until SIGTERM.

Also the process-level duties around the daemon: sd_notify (READY, STATUS,
WATCHDOG, STOPPING), the health endpoint, and signals (SIGTERM/SIGINT stop,
SIGUSR1 starts a turn so any other program can start one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from edgevoice.audio.sounddevice_io import open_sink, open_source
from edgevoice.config.model import DeviceConfig
from edgevoice.device.daemon import DeviceDaemon, read_token
from edgevoice.device.health_source import DaemonHealth
from edgevoice.health.device import device_health_api
from edgevoice.health.http import load_token
from edgevoice.service.notify import LoopLagProbe, SystemdNotifier, capture_probe
from edgevoice.triggers.base import Trigger

logger = logging.getLogger(__name__)


def build_triggers(config: DeviceConfig) -> list[Trigger]:
    """The button and wake word the config enables (barge-in is built by the daemon)."""
    triggers: list[Trigger] = []
    if config.triggers.button.enabled:
        from edgevoice.triggers.button import ButtonTrigger
        triggers.append(ButtonTrigger(config.triggers.button))
    if config.triggers.wake.enabled:
        from edgevoice.triggers.wake import WakeWordTrigger
        triggers.append(WakeWordTrigger(config.triggers.wake))
    return triggers


def build_daemon(config: DeviceConfig, config_file: str, **kwargs: Any) -> DeviceDaemon:
    token = read_token(config, config_file)
    source = open_source(config.audio.input, queue_frames=config.audio.capture_queue_frames)
    sink = open_sink(config.audio.output, rate_hz=config.audio.output_rate_hz)
    display = None
    if config.feedback.led_enabled:
        from edgevoice.feedback.led import LedController
        display = LedController(config.feedback)
    return DeviceDaemon(config, token, source, sink, triggers=build_triggers(config),
                        display=display, **kwargs)


async def run_device(config: DeviceConfig, config_file: str) -> None:
    notifier = SystemdNotifier(settings=config.watchdog)
    health_token = (load_token(config.health.token_file) if config.health.token_file
                    else None)
    daemon = build_daemon(config, config_file, on_state=notifier.status,
                          on_ready=lambda status: notifier.ready(status))
    health = DaemonHealth(daemon, config.health, lambda: notifier.last_ping_at)
    api = device_health_api(health, config.health, health_token, source_file=config_file)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    loop.add_signal_handler(signal.SIGUSR1, lambda: daemon.request_turn("signal"))
    probe = LoopLagProbe()
    probe.start()
    watchdog = notifier.watchdog_task(probe, capture_probe(daemon.source))
    await api.start()
    logger.info("health endpoint on %s:%d", config.health.bind, api.port)
    try:
        await daemon.run()
    finally:
        notifier.stopping("stopping")
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        probe.stop()
        await api.stop()
        notifier.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
