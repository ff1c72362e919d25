"""The device health endpoint over a fake daemon, through a real HTTP client."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable

import pytest
from health_support import fetch
from prometheus_client.parser import text_string_to_metric_families

from edgevoice.clock import FakeClock
from edgevoice.errors import ConfigError
from edgevoice.health.device import (
    RECENT_TURNS,
    DeviceSnapshot,
    TurnRecord,
    describe_problems,
    device_health_api,
    device_metrics,
    stats_document,
)
from edgevoice.health.exposition import render
from edgevoice.health.http import HealthSettings, HttpApi
from edgevoice.health.system import SystemStats, ThrottleFlags

TOKEN = "device-health-token"


def turn(n: int, **kwargs: object) -> TurnRecord:
    fields: dict[str, object] = {
        "turn_id": n,
        "trigger": "button",
        "started_at": "2025-01-01T12:00:00+00:00",
        "trigger_to_first_uplink_ms": 21.0,
        "first_uplink_to_first_downlink_ms": 640.0,
        "first_downlink_to_playback_ms": 45.0,
        "playback_ms": 2300.0,
        "total_ms": 3400.0,
        "outcome": "completed",
    }
    fields.update(kwargs)
    return TurnRecord(**fields)  # type: ignore[arg-type]


def busy_snapshot() -> DeviceSnapshot:
    return DeviceSnapshot(
        version="0.1.0",
        uptime_s=123.5,
        device_id="kitchen",
        state="idle",
        link_state="connected",
        session_id="s-1",
        relay_rtt_ms=38.0,
        reconnects=2,
        frames_captured=6000,
        frames_sent=900,
        frames_received=1100,
        frames_dropped=3,
        playback_underruns=1,
        input_level_dbfs=-52.5,
        noise_floor_dbfs=-61.0,
        turns_total=25,
        turns=(*(turn(n) for n in range(24)), turn(24, playback_ms=None, outcome="error")),
        system=SystemStats(
            cpu_percent=7.5,
            cpu_seconds=12.25,
            rss_bytes=41_000_000,
            open_fds=17,
            soc_temp_c=51.2,
            throttling=ThrottleFlags.from_bits(0x50000),
            thread_cpu_seconds={"event_loop": 9.5, "mic": 1.25, "speaker": 1.0,
                                "ended": 0.5},
        ),
    )


class FakeDevice:
    """A daemon stand-in: a fixed snapshot, settable problems, counted actions."""

    def __init__(self, snapshot: DeviceSnapshot) -> None:
        self.current = snapshot
        self.problems: list[str] = []
        self.problem_times: list[float] = []
        self.accept_turns = True
        self.turns_requested = 0
        self.interrupts_requested = 0

    def snapshot(self) -> DeviceSnapshot:
        return self.current

    def health_problems(self, now: float) -> list[str]:
        self.problem_times.append(now)
        return list(self.problems)

    def request_turn(self) -> bool:
        self.turns_requested += 1
        return self.accept_turns

    def request_interrupt(self) -> bool:
        self.interrupts_requested += 1
        return False


def serve(
    device: FakeDevice,
    scenario: Callable[[HttpApi], Awaitable[None]],
    *,
    settings: HealthSettings | None = None,
    token: str | None = None,
    clock: FakeClock | None = None,
) -> None:
    async def main() -> None:
        api = device_health_api(
            device, settings or HealthSettings(port=0), token, clock=clock or FakeClock()
        )
        await api.start()
        try:
            await scenario(api)
        finally:
            await api.stop()

    asyncio.run(main())


# --------------------------------------------------------------------------- /healthz


def test_healthz_ok_then_unhealthy_with_reasons() -> None:
    device = FakeDevice(busy_snapshot())
    clock = FakeClock(500.0)

    async def scenario(api: HttpApi) -> None:
        reply = await fetch(api.port, "/healthz")
        assert (reply.status, json.loads(reply.body)) == (200, {"status": "ok"})
        device.problems = ["no audio for 12 s", "relay unreachable for 40 s"]
        reply = await fetch(api.port, "/healthz")
        assert reply.status == 503
        assert json.loads(reply.body) == {
            "status": "unhealthy",
            "problems": ["no audio for 12 s", "relay unreachable for 40 s"],
        }

    serve(device, scenario, clock=clock)
    assert device.problem_times == [500.0, 500.0]  # asked with the injected clock's time


# --------------------------------------------------------------------------- /stats


def test_stats_is_the_snapshot_as_json() -> None:
    device = FakeDevice(busy_snapshot())
    device.problems = ["watchdog late: last fed 20 s ago"]

    async def scenario(api: HttpApi) -> None:
        reply = await fetch(api.port, "/stats")
        assert reply.status == 200
        assert reply.headers["content-type"] == "application/json"
        stats = json.loads(reply.body)
        assert stats["version"] == "0.1.0"
        assert stats["uptime_s"] == 123.5
        assert stats["link_state"] == "connected"
        assert stats["relay_rtt_ms"] == 38.0
        assert stats["reconnects"] == 2
        assert (stats["frames_captured"], stats["frames_sent"], stats["frames_dropped"]) == (
            6000,
            900,
            3,
        )
        assert stats["playback_underruns"] == 1
        assert (stats["input_level_dbfs"], stats["noise_floor_dbfs"]) == (-52.5, -61.0)
        assert stats["system"]["cpu_percent"] == 7.5
        assert stats["system"]["rss_bytes"] == 41_000_000
        assert stats["system"]["soc_temp_c"] == 51.2
        assert stats["system"]["throttling"]["under_voltage_occurred"] is True
        assert stats["system"]["throttling"]["under_voltage"] is False
        assert stats["healthy"] is False
        assert stats["problems"] == ["watchdog late: last fed 20 s ago"]
        turns = stats["turns"]
        assert len(turns) == RECENT_TURNS
        assert [t["turn_id"] for t in turns] == list(range(5, 25))
        assert turns[-1] == {
            "turn_id": 24,
            "trigger": "button",
            "started_at": "2025-01-01T12:00:00+00:00",
            "trigger_to_first_uplink_ms": 21.0,
            "first_uplink_to_first_downlink_ms": 640.0,
            "first_downlink_to_playback_ms": 45.0,
            "playback_ms": None,
            "total_ms": 3400.0,
            "outcome": "error",
        }

    serve(device, scenario)


def test_stats_of_a_fresh_daemon_turns_infinities_into_null() -> None:
    snapshot = DeviceSnapshot(version="0.1.0", uptime_s=0.0, input_level_dbfs=-math.inf)
    document = stats_document(snapshot, [])
    assert document["input_level_dbfs"] is None
    assert document["relay_rtt_ms"] is None
    assert document["turns"] == []
    assert document["healthy"] is True
    json.dumps(document, allow_nan=False)  # strict JSON


# --------------------------------------------------------------------------- /metrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_are_prometheus_text_with_units_in_names() -> None:
    device = FakeDevice(busy_snapshot())

    async def scenario(api: HttpApi) -> None:
        reply = await fetch(api.port, "/metrics")
        assert reply.status == 200
        assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = reply.body.decode()
        values = samples(text)
        assert values[("edgevoice_build_info", (("version", "0.1.0"),))] == 1
        assert values[("edgevoice_uptime_seconds", ())] == 123.5
        assert values[("edgevoice_healthy", ())] == 1
        assert values[("edgevoice_link_up", ())] == 1
        assert values[("edgevoice_link_state", (("state", "connected"),))] == 1
        assert values[("edgevoice_relay_rtt_seconds", ())] == pytest.approx(0.038)
        assert values[("edgevoice_reconnects_total", ())] == 2
        assert values[("edgevoice_frames_captured_total", ())] == 6000
        assert values[("edgevoice_frames_sent_total", ())] == 900
        assert values[("edgevoice_frames_received_total", ())] == 1100
        assert values[("edgevoice_frames_dropped_total", ())] == 3
        assert values[("edgevoice_playback_underruns_total", ())] == 1
        assert values[("edgevoice_input_level_dbfs", ())] == -52.5
        assert values[("edgevoice_noise_floor_dbfs", ())] == -61.0
        assert values[("edgevoice_turns_total", ())] == 25
        assert values[("edgevoice_last_turn_seconds", (("stage", "total"),))] == 3.4
        assert values[
            ("edgevoice_last_turn_seconds", (("stage", "first_uplink_to_first_downlink"),))
        ] == pytest.approx(0.64)
        # the last turn never played: that stage is absent, not zero
        assert ("edgevoice_last_turn_seconds", (("stage", "playback"),)) not in values
        assert values[("edgevoice_process_cpu_seconds_total", ())] == 12.25
        # where it went: which thread (a board's own answer to "what costs CPU here")
        assert values[("edgevoice_thread_cpu_seconds_total", (("thread", "event_loop"),))] \
            == 9.5
        assert values[("edgevoice_thread_cpu_seconds_total", (("thread", "speaker"),))] == 1.0
        assert values[("edgevoice_process_resident_memory_bytes", ())] == 41_000_000
        assert values[("edgevoice_process_open_fds", ())] == 17
        assert values[("edgevoice_soc_temperature_celsius", ())] == 51.2
        assert values[("edgevoice_soc_throttled", (("flag", "under_voltage"),))] == 0
        assert values[("edgevoice_soc_throttled_since_boot", (("flag", "under_voltage"),))] == 1
        assert values[("edgevoice_soc_throttled_since_boot", (("flag", "freq_capped"),))] == 0
        # every family documents itself and says its type
        families = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
        helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP")]
        assert families and sorted(families) == sorted(helps)
        assert all(name.startswith("edgevoice_") for name in families)

    serve(device, scenario)


def test_metrics_leave_out_what_is_unknown_and_report_unhealthy() -> None:
    snapshot = DeviceSnapshot(version="0.1.0", uptime_s=1.0, link_state="backoff")
    text = render(device_metrics(snapshot, ["no audio for 6 s"]))
    values = samples(text.decode())
    assert values[("edgevoice_healthy", ())] == 0
    assert values[("edgevoice_link_up", ())] == 0
    assert values[("edgevoice_link_state", (("state", "backoff"),))] == 1
    names = {name for name, _ in values}
    for absent in (
        "edgevoice_relay_rtt_seconds",
        "edgevoice_input_level_dbfs",
        "edgevoice_last_turn_seconds",
        "edgevoice_soc_temperature_celsius",
        "edgevoice_soc_throttled",
        "edgevoice_process_cpu_seconds_total",
        "edgevoice_thread_cpu_seconds_total",
        "edgevoice_wake_detections_total",  # no wake word configured
        "edgevoice_wake_frames_total",
    ):
        assert absent not in names


def test_metrics_show_the_wake_word_and_what_its_quiet_gate_kept_from_the_models() -> None:
    snapshot = DeviceSnapshot(version="0.1.0", uptime_s=1.0, wake={
        "frames": 3000, "detections": 2, "frames_gated": 2600, "frames_replayed": 150,
        "gate_openings": 3})
    values = samples(render(device_metrics(snapshot, [])).decode())
    assert values[("edgevoice_wake_detections_total", ())] == 2
    assert values[("edgevoice_wake_frames_total", (("kind", "heard"),))] == 3000
    assert values[("edgevoice_wake_frames_total", (("kind", "gated"),))] == 2600
    assert values[("edgevoice_wake_frames_total", (("kind", "replayed"),))] == 150
    assert values[("edgevoice_wake_gate_openings_total", ())] == 3


# --------------------------------------------------------------------------- actions


def test_trigger_and_interrupt_on_loopback_without_token() -> None:
    device = FakeDevice(busy_snapshot())

    async def scenario(api: HttpApi) -> None:
        reply = await fetch(api.port, "/trigger", method="POST")
        assert (reply.status, json.loads(reply.body)) == (202, {"accepted": True})
        device.accept_turns = False
        reply = await fetch(api.port, "/trigger", method="POST")
        assert reply.status == 409
        assert json.loads(reply.body)["accepted"] is False
        assert (await fetch(api.port, "/interrupt", method="POST")).status == 409
        assert (await fetch(api.port, "/trigger")).status == 405

    serve(device, scenario)
    assert (device.turns_requested, device.interrupts_requested) == (2, 1)


def test_trigger_needs_the_token_when_one_is_configured() -> None:
    device = FakeDevice(busy_snapshot())

    async def scenario(api: HttpApi) -> None:
        assert (await fetch(api.port, "/trigger", method="POST")).status == 401
        assert (await fetch(api.port, "/interrupt", method="POST")).status == 401
        assert (await fetch(api.port, "/trigger", method="POST", token="nope")).status == 401
        assert device.turns_requested == 0  # refused before reaching the daemon
        assert (await fetch(api.port, "/trigger", method="POST", token=TOKEN)).status == 202
        assert device.turns_requested == 1
        # reads stay open on loopback
        assert (await fetch(api.port, "/stats")).status == 200

    serve(device, scenario, token=TOKEN)


def test_exposed_endpoint_without_token_refuses_to_start() -> None:
    with pytest.raises(ConfigError, match=r"health\.token_file"):
        device_health_api(FakeDevice(busy_snapshot()), HealthSettings(bind="0.0.0.0"), None)


def test_exposed_endpoint_requires_the_token_everywhere() -> None:
    device = FakeDevice(busy_snapshot())

    async def scenario(api: HttpApi) -> None:
        for path in ("/healthz", "/stats", "/metrics"):
            assert (await fetch(api.port, path)).status == 401, path
            assert (await fetch(api.port, path, token=TOKEN)).status == 200, path
        assert (await fetch(api.port, "/trigger", method="POST")).status == 401

    serve(device, scenario, settings=HealthSettings(bind="0.0.0.0", port=0), token=TOKEN)


# --------------------------------------------------------------------------- problems


def test_describe_problems() -> None:
    settings = HealthSettings(
        no_audio_after_s=5, relay_unreachable_after_s=30, watchdog_late_after_s=15
    )
    healthy = describe_problems(
        100.0, settings, last_audio_at=99.98, relay_down_since=None, last_watchdog_at=98.0
    )
    assert healthy == []
    # within the limits: a short relay outage is not yet a problem
    assert (
        describe_problems(
            100.0, settings, last_audio_at=96.0, relay_down_since=75.0, last_watchdog_at=None
        )
        == []
    )
    assert describe_problems(
        100.0, settings, last_audio_at=88.0, relay_down_since=60.0, last_watchdog_at=80.0
    ) == ["no audio for 12 s", "relay unreachable for 40 s", "watchdog late: last fed 20 s ago"]
