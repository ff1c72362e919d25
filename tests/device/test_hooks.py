"""Device events: the hook command and the health port's server-sent events."""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from edgevoice_dev.testing.harness import run, running_relay

from edgevoice.audio.wavio import WavSink, WavSource
from edgevoice.clock import MonotonicClock
from edgevoice.config.base import SettingError
from edgevoice.config.model import DeviceConfig
from edgevoice.device.app import WaitingForSoundCard
from edgevoice.device.daemon import DeviceDaemon, TurnTimeline
from edgevoice.device.health_source import DaemonHealth
from edgevoice.device.hooks import EventHub, HookRunner, HookSettings
from edgevoice.feedback.states import DeviceState
from edgevoice.health import exposition
from edgevoice.health.device import device_health_api, device_metrics
from edgevoice.health.http import HealthSettings

#: appends "<seq> <event> <previous>-><state>" to the file named in argv[1]
RECORDER = ("import os, sys; e = os.environ; open(sys.argv[1], 'a').write("
            "f\"{e['EDGEVOICE_EVENT_SEQ']} {e['EDGEVOICE_EVENT']} "
            "{e['EDGEVOICE_PREVIOUS_STATE']}->{e['EDGEVOICE_STATE']}\\n\")")


def test_settings_are_checked() -> None:
    with pytest.raises(SettingError, match="timeout_ms"):
        HookSettings(command=("true",), timeout_ms=5)


def test_hub_publishes_changes_only_and_a_slow_consumer_loses_the_oldest() -> None:
    hub = EventHub("d1", wall_clock=lambda: 1.0)
    sub = hub.subscribe(max_queued=3)
    for state in (DeviceState.OFFLINE, DeviceState.IDLE, DeviceState.IDLE,
                  DeviceState.LISTENING, DeviceState.THINKING, DeviceState.SPEAKING):
        hub.set_state(state)
    hub.moment("timer_ringing")
    assert [(e.seq, e.kind, e.state) for e in sub.events] == [
        (4, "state", "thinking"), (5, "state", "speaking"), (6, "timer_ringing", "speaking")]
    assert sub.dropped == 3
    assert sub.events[0].environment()["EDGEVOICE_PREVIOUS_STATE"] == "listening"


def test_failing_slow_and_missing_hooks_are_counted_and_never_stall_the_loop(
        tmp_path: Path) -> None:
    async def scenario() -> tuple[list[bool], int]:
        hub = EventHub("d1")
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        beat = asyncio.create_task(ticker())
        results = []
        for command in ((sys.executable, "-c", "raise SystemExit(3)"),
                        (sys.executable, "-c", "import time; time.sleep(30)"),
                        (str(tmp_path / "no-such-hook"),),
                        (sys.executable, "-c", "pass")):
            runner = HookRunner(HookSettings(command=command, timeout_ms=500), hub)
            hub.set_state(DeviceState.LISTENING if len(results) % 2 else DeviceState.IDLE)
            results.append(await runner.run_one(await runner.sub.get()))
            if command[-1].endswith("sleep(30)"):
                assert runner.counters.timeouts == 1
            assert runner.counters.failures == (0 if results[-1] else 1)
        beat.cancel()
        return results, ticks

    results, ticks = run(scenario())
    assert results == [False, False, False, True]
    assert ticks > 10  # the loop kept turning while a hook hung for its whole timeout


def test_a_hook_receives_every_state_of_a_real_echo_turn_in_order(
        tmp_path: Path, speech_wav: Path) -> None:
    log = tmp_path / "hook.log"

    async def scenario() -> tuple[TurnTimeline, list[str], list[str]]:
        async with running_relay(tmp_path) as server:
            token = server.tokens.add("kitchen")
            base = DeviceConfig()
            config = replace(
                base, device_id="kitchen",
                relay=replace(base.relay, url=f"ws://127.0.0.1:{server.port}/"),
                hooks=HookSettings(command=(sys.executable, "-c", RECORDER, str(log))))
            done: asyncio.Future[TurnTimeline] = asyncio.get_running_loop().create_future()
            daemon = DeviceDaemon(config, token, WavSource(speech_wav, realtime=True),
                                  WavSink(tmp_path / "reply.wav", realtime=False),
                                  on_turn_done=lambda t: done.done() or done.set_result(t),
                                  capture_after_link=True)
            published = daemon.events.subscribe(max_queued=100)
            task = asyncio.create_task(daemon.run())
            turn = await asyncio.wait_for(done, 40)
            for _ in range(200):  # the hook runs after the fact: wait for it to catch up
                lines = log.read_text().splitlines() if log.exists() else []
                if len(lines) == daemon.events.seq and lines[-1].endswith("->idle"):
                    break
                await asyncio.sleep(0.05)
            daemon.stop()
            await task
            assert daemon.hooks is not None
            assert daemon.hooks.counters.failures == 0
            assert daemon.hooks.counters.dropped == 0
            expected = [f"{e.seq} {e.kind} {e.previous}->{e.state}" for e in published.events]
            snapshot = DaemonHealth(daemon, HealthSettings()).snapshot()
            return turn, expected, log.read_text().splitlines(), snapshot

    turn, expected, got, snapshot = run(scenario(), timeout=90)
    # the counts reach /stats and /metrics
    assert snapshot.hooks == {"runs": len(got), "failures": 0, "timeouts": 0, "dropped": 0}
    metrics = exposition.metrics_response(device_metrics(snapshot, [])).body.decode()
    assert f'edgevoice_hook_events_total{{outcome="runs"}} {len(got)}.0' in metrics
    assert turn.outcome == "completed"
    assert got == expected  # every event, once, in order
    states = [line.rpartition("->")[2] for line in got]
    # the turn's states appear in this order (offline at start, idle again at the end)
    order = ["offline", "idle", "listening", "thinking", "speaking", "idle"]
    it = iter(states)
    assert all(any(s == want for s in it) for want in order), states


def test_events_stream_on_the_health_port_under_its_token_rule(tmp_path: Path) -> None:
    async def read_events(port: int, headers: str, count: int
                          ) -> tuple[str, list[dict[str, object]]]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /events HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        events: list[dict[str, object]] = []
        if " 200 " in head.splitlines()[0]:
            while len(events) < count:
                block = (await reader.readuntil(b"\n\n")).decode()
                for line in block.splitlines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))
        writer.close()
        return head, events

    async def scenario() -> None:
        hub = EventHub("d1")
        hub.set_state(DeviceState.IDLE)

        # /events needs no daemon: the source the device serves before it has one
        waiting = WaitingForSoundCard("d1", MonotonicClock())
        api = device_health_api(waiting, HealthSettings(bind="127.0.0.1", port=0),
                                "secret-token", events=hub)
        await api.start()
        try:
            refused, _ = await read_events(api.port, "Authorization: Bearer wrong\r\n", 0)
            assert refused.startswith("HTTP/1.1 401")
            reading = asyncio.create_task(
                read_events(api.port, "Authorization: Bearer secret-token\r\n", 3))
            for _ in range(1000):  # until the stream is open (it reports idle first)
                if hub.subscribers:
                    break
                await asyncio.sleep(0.01)
            hub.set_state(DeviceState.LISTENING)
            hub.moment("timer_ringing")
            head, events = await asyncio.wait_for(reading, 10)
            assert "text/event-stream" in head and "Content-Length" not in head
            assert [(e["event"], e["state"]) for e in events] == [
                ("state", "idle"), ("state", "listening"), ("timer_ringing", "listening")]
            # loopback and a GET: open without a token, like /stats
            head, events = await read_events(api.port, "", 1)
            assert head.startswith("HTTP/1.1 200") and events[0]["state"] == "listening"
            # a stream still open does not hold the endpoint's stop
            reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
            writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.wait_for(api.stop(), 5)
            assert await asyncio.wait_for(reader.read(), 5) is not None
            writer.close()
        finally:
            await api.stop()

    run(scenario())


@pytest.fixture
def speech_wav() -> Path:
    from edgevoice.demo import bundled_speech
    return bundled_speech()
