"""Timers on the device: set through the relay, ring offline, survive a restart."""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from edgevoice_dev.testing.harness import run, running_relay

from edgevoice.audio.wavio import WavSink, WavSource
from edgevoice.config.model import DeviceConfig
from edgevoice.device.daemon import DeviceDaemon
from edgevoice.device.observer import DeviceObserver
from edgevoice.device.timers import DeviceTimers, Timer, TimerBook, TimerError, TimerSettings
from edgevoice.tools.registry import ToolRegistry
from edgevoice.tools.timers import timer_tools
from edgevoice.upstream.base import DeviceContext


def test_book_sets_lists_cancels_and_pops_what_is_due() -> None:
    book = TimerBook()
    tea = book.set(300, "tea", now=1000.0)
    book.set(60, "eggs", now=1000.0)
    assert [t["label"] for t in book.listing(now=1010.0)] == ["eggs", "tea"]
    assert book.listing(now=1010.0)[0]["seconds_left"] == 50
    with pytest.raises(TimerError):
        book.set(0, "", now=1000.0)
    with pytest.raises(TimerError, match="no timer"):
        book.cancel(label="pasta")
    assert book.cancel(label="EGGS")[0].label == "eggs"
    assert book.pop_due(now=1299.0, late_max_s=60) == ([], [])
    assert book.pop_due(now=1301.0, late_max_s=60) == ([tea], [])
    book.set(10, "old", now=0.0)
    assert book.pop_due(now=5000.0, late_max_s=60)[1][0].label == "old"


class Earcons(DeviceObserver):
    def __init__(self) -> None:
        self.kinds: list[str] = []

    def earcon_played(self, kind: str, at: float) -> None:
        self.kinds.append(kind)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_for(tmp_path: Path, url: str, token: str, speech_wav: Path,
               observer: DeviceObserver) -> DeviceDaemon:
    base = DeviceConfig()
    config = replace(base, device_id="kitchen", relay=replace(base.relay, url=url),
                     timers=TimerSettings(state_file=str(tmp_path / "state" / "timers.json")))
    return DeviceDaemon(config, token, WavSource(speech_wav, realtime=True, loop=True),
                        WavSink(tmp_path / "out.wav", realtime=True),
                        observers=[observer])


def test_a_timer_set_through_the_relay_rings_while_the_relay_is_gone(
        tmp_path: Path, speech_wav: Path) -> None:
    heard = Earcons()

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], list[str], bool, list[str]]:
        async with running_relay(tmp_path) as server:
            token = server.tokens.add("kitchen")
            daemon = daemon_for(tmp_path, f"ws://127.0.0.1:{server.port}/", token, speech_wav,
                                heard)
            moments = daemon.events.subscribe(100)
            task = asyncio.create_task(daemon.run())
            for _ in range(200):
                if "kitchen" in server.sessions:
                    break
                await asyncio.sleep(0.05)
            tools = ToolRegistry(timer_tools())
            ctx = DeviceContext("kitchen", "s", call_device=lambda n, a, t:
                                server.device_calls.call("kitchen", n, a, t))
            _, text = await tools.run("set_timer", json.dumps({"seconds": 2, "label": "tea"}),
                                      ctx, 5.0)
            _, listed = await tools.run("list_timers", "{}", ctx, 5.0)
        # the relay is closed now: the device is offline when the timer falls due
        for _ in range(100):
            if "timer" in heard.kinds:
                break
            await asyncio.sleep(0.05)
        offline = not daemon.link.connected
        assert daemon.timer_counters() == {"pending": 0, "rung": 1, "missed": 0}
        daemon.stop()
        await task
        kinds = [e.kind for e in moments.events]
        return json.loads(text), json.loads(listed), heard.kinds, offline, kinds

    set_result, listed, kinds, offline, events = run(scenario(), timeout=60)
    assert set_result["timer"]["label"] == "tea" and set_result["timer"]["seconds_left"] == 2
    assert [t["label"] for t in listed["timers"]] == ["tea"]
    assert "timer" in kinds and offline
    assert "timer_ringing" in events
    assert json.loads((tmp_path / "state" / "timers.json").read_text())["timers"] == []


def test_a_timer_survives_a_daemon_restart_and_rings_with_no_relay(
        tmp_path: Path, speech_wav: Path) -> None:
    heard = Earcons()

    async def scenario() -> list[str]:
        async with running_relay(tmp_path) as server:
            token = server.tokens.add("kitchen")
            first = daemon_for(tmp_path, f"ws://127.0.0.1:{server.port}/", token, speech_wav,
                               DeviceObserver())
            task = asyncio.create_task(first.run())
            for _ in range(200):
                if "kitchen" in server.sessions:
                    break
                await asyncio.sleep(0.05)
            result = await server.device_calls.call("kitchen", "timer.set",
                                                    {"seconds": 1, "label": "eggs"}, 5.0)
            assert result["timer"]["label"] == "eggs"
            first.stop()
            await task
        await asyncio.sleep(1.5)  # it falls due while no daemon runs
        second = daemon_for(tmp_path, f"ws://127.0.0.1:{free_port()}/", token, speech_wav,
                            heard)
        assert second.timers is not None and second.timers.book.timers  # read back
        task = asyncio.create_task(second.run())
        for _ in range(100):
            if "timer" in heard.kinds:
                break
            await asyncio.sleep(0.05)
        second.stop()
        await task
        return heard.kinds

    assert "timer" in run(scenario(), timeout=60)


def test_too_late_timers_do_not_ring_and_a_broken_file_is_survived(tmp_path: Path) -> None:
    path = tmp_path / "timers.json"
    settings = TimerSettings(state_file=str(path), late_ring_max_s=60)
    now = [1000.0]
    rung: list[Timer] = []
    timers = DeviceTimers(settings, rung.append, wall_clock=lambda: now[0])
    timers.call("timer.set", {"seconds": 5, "label": "soon"})
    timers.call("timer.set", {"seconds": 100, "label": "later"})
    now[0] = 1104.0  # "soon" is 99 s late: missed; "later" is 4 s late: rings
    again = DeviceTimers(settings, rung.append, wall_clock=lambda: now[0])

    async def one_pass() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await again.run()

    run(one_pass())
    assert [t.label for t in rung] == ["later"] and again.missed == 1
    path.write_text("{not json")
    assert DeviceTimers(settings, rung.append).book.timers == {}
    with pytest.raises(TimerError, match="no function"):
        again.call("timer.explode", {})


@pytest.fixture
def speech_wav() -> Path:
    from edgevoice.demo import bundled_speech
    return bundled_speech()
