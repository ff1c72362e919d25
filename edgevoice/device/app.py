"""Runs the device daemon process: config → audio → daemon, until SIGTERM.

Also the process-level duties around the daemon: sd_notify (READY, STATUS,
WATCHDOG, STOPPING), the health endpoint, and signals (SIGTERM/SIGINT stop,
SIGUSR1 starts a turn so any other program can start one).

A board may boot before its sound card is there (a USB card still enumerating, a
HAT whose overlay is missing). The daemon cannot be built without the speaker (its
rate sizes the playback path), so the process waits for it first: the health
endpoint answers 503 with the reason, STATUS says "waiting for sound card ...", the
start timeout is extended while the loop is healthy, and PortAudio is re-scanned
with backoff. Waiting is not failing: no exit, so no restart loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgevoice import __version__
from edgevoice.audio.sounddevice_io import open_sink, open_source
from edgevoice.backoff import Backoff, BackoffSettings
from edgevoice.clock import Clock, MonotonicClock
from edgevoice.config.model import DeviceConfig
from edgevoice.device.daemon import DeviceDaemon, device_identity, read_token
from edgevoice.device.health_source import DaemonHealth
from edgevoice.device.hooks import EventHub
from edgevoice.errors import AudioDeviceError
from edgevoice.health.device import DeviceHealthSource, DeviceSnapshot, device_health_api
from edgevoice.health.http import load_token
from edgevoice.service.notify import LoopLagProbe, SystemdNotifier, WatchdogSettings
from edgevoice.triggers.base import Trigger

if TYPE_CHECKING:
    from edgevoice.logs import NativeStderr

logger = logging.getLogger(__name__)


def build_triggers(config: DeviceConfig) -> list[Trigger]:
    """The button and wake word ``turn.start`` names (barge-in is built by the daemon)."""
    triggers: list[Trigger] = []
    ways = config.turn.ways
    if "button" in ways:
        from edgevoice.triggers.button import ButtonTrigger
        triggers.append(ButtonTrigger(config.triggers.button))
    if "wake" in ways:
        from edgevoice.triggers.wake import WakeWordTrigger
        triggers.append(WakeWordTrigger(config.triggers.wake))
    return triggers


def build_daemon(config: DeviceConfig, config_file: str, **kwargs: Any) -> DeviceDaemon:
    token = read_token(config, config_file)
    source = open_source(config.audio.input, queue_frames=config.audio.capture_queue_frames,
                         block_ms=config.audio.capture_block_ms)
    sink = open_sink(config.audio.output, rate_hz=config.audio.output_rate_hz,
                     park_after_ms=config.audio.speaker_park_after_ms or None,
                     block_ms=config.audio.speaker_block_ms)
    display = None
    if config.feedback.led_enabled:
        from edgevoice.feedback.led import LedController
        display = LedController(config.feedback)
    return DeviceDaemon(config, token, source, sink, triggers=build_triggers(config),
                        display=display, **kwargs)


class WaitingForSoundCard:
    """The health source while there is no daemon yet: always unhealthy, with the reason."""

    def __init__(self, device_id: str, clock: Clock) -> None:
        self.device_id = device_id
        self.clock = clock
        self.started_at = clock.now()
        self.reason = "waiting for sound card"

    def snapshot(self) -> DeviceSnapshot:
        return DeviceSnapshot(version=__version__,
                              uptime_s=round(self.clock.now() - self.started_at, 1),
                              device_id=self.device_id, state="waiting for sound card",
                              link_state="not started")

    def health_problems(self, now: float) -> list[str]:
        return [self.reason]

    def request_turn(self) -> bool:
        return False

    def request_interrupt(self) -> bool:
        return False

    def volume(self) -> float | None:
        return None

    def set_volume(self, volume: float) -> bool:
        return False


class CurrentHealth:
    """Forwards to the waiting source, then to the daemon once it exists; adds what
    the sound libraries printed on stderr (counted by :mod:`edgevoice.logs`)."""

    def __init__(self, source: DeviceHealthSource,
                 native_counts: Callable[[], dict[str, int]] = dict) -> None:
        self.source = source
        self.native_counts = native_counts

    def snapshot(self) -> DeviceSnapshot:
        return dataclasses.replace(self.source.snapshot(),
                                   audio_library_messages=self.native_counts())

    def health_problems(self, now: float) -> list[str]:
        return self.source.health_problems(now)

    def request_turn(self) -> bool:
        return self.source.request_turn()

    def request_interrupt(self) -> bool:
        return self.source.request_interrupt()

    def volume(self) -> float | None:
        return self.source.volume()

    def set_volume(self, volume: float) -> bool:
        return self.source.set_volume(volume)


class AudioLiveness:
    """The watchdog's audio probe: when capture last showed life.

    Waiting for a sound card (or reopening one) is deliberate, not a hang: the
    probe then reports "now", so the event-loop probe alone decides and systemd
    keeps extending the start timeout instead of killing a patient daemon. A stream
    that opened but has not delivered its first frame counts from when it opened,
    so a healthy start never looks stalled.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.daemon: DeviceDaemon | None = None
        self._opened_at: float | None = None

    def __call__(self) -> float:
        now = self.clock.now()
        daemon = self.daemon
        if daemon is None or daemon.audio_problem is not None:
            self._opened_at = None
            return now
        last = daemon.source.stats.last_frame_at
        if last > 0:
            return last
        if self._opened_at is None:
            self._opened_at = now
        return self._opened_at


def rescan_sound_cards() -> None:
    """Make PortAudio enumerate the sound cards again (it does so only when
    initialised): a card plugged in after start becomes visible. Only while no
    stream is open, i.e. before the daemon exists."""
    sd = sys.modules.get("sounddevice")
    if sd is None:
        return  # not imported yet: the first use enumerates afresh
    with contextlib.suppress(Exception):
        sd._terminate()
    with contextlib.suppress(Exception):
        sd._initialize()


async def wait_for_daemon(config: DeviceConfig, config_file: str, notifier: SystemdNotifier,
                          waiting: WaitingForSoundCard, stopped: asyncio.Event,
                          clock: Clock, **kwargs: Any) -> DeviceDaemon | None:
    """Build the daemon, waiting with backoff while its sound card is missing.

    None when asked to stop while waiting.
    """
    backoff = Backoff(BackoffSettings(initial_ms=500, max_ms=config.audio.reopen_max_ms,
                                      min_ms=200))
    logged = ""
    while not stopped.is_set():
        try:
            return build_daemon(config, config_file, **kwargs)
        except AudioDeviceError as exc:
            delay = backoff.next_delay()
            waiting.reason = f"waiting for sound card: {exc}"
            notifier.status(f"{waiting.reason}; retrying in {delay:.1f} s")
            if waiting.reason != logged:  # once per distinct reason, not per attempt
                logged = waiting.reason
                logger.warning("event=waiting_for_sound_card reason=%r retry_in_s=%.1f",
                               str(exc), delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopped.wait(), delay)
        rescan_sound_cards()
    return None


def loop_probe(notifier: SystemdNotifier, settings: WatchdogSettings) -> LoopLagProbe:
    """The event-loop probe the systemd watchdog reads, started only when systemd
    asked for a watchdog: nothing else reads it, and each of its turns wakes an idle
    device (issue 15). Its period is a quarter of ``loop_stall_after_s``: a healthy
    loop shows life several times within that, without the default's two turns a
    second."""
    probe = LoopLagProbe(period_s=min(1.0, max(0.5, settings.loop_stall_after_s / 4)))
    if notifier.enabled and notifier.policy.enabled:
        probe.start()
    return probe


async def run_device(config: DeviceConfig, config_file: str, *,
                     native: NativeStderr | None = None) -> None:
    clock = MonotonicClock()
    notifier = SystemdNotifier(settings=config.watchdog)
    health_token = (load_token(config.health.token_file) if config.health.token_file
                    else None)
    device_id = device_identity(config, read_token(config, config_file), config_file)
    waiting = WaitingForSoundCard(device_id, clock)
    current = CurrentHealth(waiting, native.counts if native is not None else dict)
    events = EventHub(device_id)  # state changes: hook command and GET /events
    api = device_health_api(current, config.health, health_token, source_file=config_file,
                            events=events)
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    daemon: DeviceDaemon | None = None

    def stop() -> None:
        stopped.set()
        if daemon is not None:
            daemon.stop()

    def turn() -> None:
        if daemon is not None:
            daemon.request_turn("signal")

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGUSR1, turn)
    probe = loop_probe(notifier, config.watchdog)
    audio_alive = AudioLiveness(clock)
    watchdog = notifier.watchdog_task(probe, audio_alive)
    await api.start()  # it logs where it listens
    try:
        if config.relay.url == "auto":  # find the relay on the LAN first (mDNS)
            from edgevoice.discovery.mdns import find_relay_url
            url = await find_relay_url(config.discovery, stopped, notifier.status)
            if url is None:
                return
            config = dataclasses.replace(config, relay=dataclasses.replace(config.relay,
                                                                           url=url))
        daemon = await wait_for_daemon(
            config, config_file, notifier, waiting, stopped, clock,
            on_state=notifier.status, on_ready=lambda status: notifier.ready(status),
            events=events)
        if daemon is not None:
            current.source = DaemonHealth(daemon, config.health, lambda: notifier.last_ping_at)
            audio_alive.daemon = daemon
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
