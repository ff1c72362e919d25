"""The device process's event-loop probe: it runs only for a systemd watchdog."""

from __future__ import annotations

import asyncio
import os

import pytest

from edgevoice.device.app import loop_probe
from edgevoice.service.notify import SystemdNotifier, WatchdogSettings


def started(environ: dict[str, str], monkeypatch: pytest.MonkeyPatch,
            settings: WatchdogSettings) -> tuple[bool, float]:
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)

    async def main() -> tuple[bool, float]:
        probe = loop_probe(SystemdNotifier(settings=settings), settings)
        try:
            return probe() > 0, probe.period_s  # a started probe has turned "on time"
        finally:
            probe.stop()

    return asyncio.run(main())


def test_without_a_watchdog_the_probe_never_wakes_the_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert started({}, monkeypatch, WatchdogSettings()) == (False, 1.0)
    # a service manager without WatchdogSec= asks for no keep-alives either
    assert started({"NOTIFY_SOCKET": "/run/nothing"}, monkeypatch,
                   WatchdogSettings())[0] is False


def test_under_a_systemd_watchdog_it_turns_several_times_per_stall_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"NOTIFY_SOCKET": "/run/nothing", "WATCHDOG_USEC": "30000000",
           "WATCHDOG_PID": str(os.getpid())}
    assert started(env, monkeypatch, WatchdogSettings()) == (True, 1.0)
    assert started(env, monkeypatch, WatchdogSettings(loop_stall_after_s=2.0)) == (True, 0.5)
