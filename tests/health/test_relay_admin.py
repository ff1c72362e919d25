"""The relay admin endpoint and the fleet bookkeeping behind /devices."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from health_support import fetch
from prometheus_client.parser import text_string_to_metric_families

from edgevoice.errors import ConfigError
from edgevoice.health.http import HttpApi
from edgevoice.health.relay import (
    DeviceRecord,
    FleetTracker,
    RelayAdminSettings,
    RelaySnapshot,
    relay_admin_api,
)

ADMIN_TOKEN = "relay-admin-token"
T0 = 1_735_732_800.0  # 2025-01-01T12:00:00Z


class FakeRelay:
    """A relay stand-in whose fleet view is a real FleetTracker."""

    def __init__(self) -> None:
        self.fleet = FleetTracker()
        self.problems: list[str] = []
        self.current = RelaySnapshot(
            version="0.1.0",
            uptime_s=3600.0,
            sessions_active=1,
            sessions_total=7,
            frames_in=50_000,
            frames_out=42_000,
            frames_dropped=12,
            upstream_latency_count=4,
            upstream_latency_sum_s=2.6,
            upstream_errors={"throttled": 2, "timeout": 1},
            auth_failures=5,
        )

    def snapshot(self) -> RelaySnapshot:
        return self.current

    def devices(self) -> list[DeviceRecord]:
        return self.fleet.records()

    def health_problems(self, now: float) -> list[str]:
        return list(self.problems)


def two_devices_one_left(relay: FakeRelay) -> None:
    fleet = relay.fleet
    fleet.connected("kitchen", session_id="s-k1", address="10.0.0.5:40000", at=T0)
    fleet.connected("garage", session_id="s-g1", address="10.0.0.9:41000", at=T0 + 1)
    fleet.stats_received("kitchen", {"rtt_ms": 31, "frames_dropped": 0}, at=T0 + 10)
    fleet.tokens_used("kitchen", input_tokens=120, output_tokens=300)
    fleet.tokens_used("kitchen", input_tokens=30, output_tokens=50, upstream_audio_s=4.5)
    fleet.disconnected("garage", session_id="s-g1", at=T0 + 20)


def serve(
    relay: FakeRelay,
    scenario: Callable[[HttpApi], Awaitable[None]],
    *,
    settings: RelayAdminSettings | None = None,
    token: str | None = None,
) -> None:
    async def main() -> None:
        api = relay_admin_api(relay, settings or RelayAdminSettings(port=0), token)
        await api.start()
        try:
            await scenario(api)
        finally:
            await api.stop()

    asyncio.run(main())


def test_devices_lists_every_device_seen_with_its_state() -> None:
    relay = FakeRelay()
    two_devices_one_left(relay)

    async def scenario(api: HttpApi) -> None:
        reply = await fetch(api.port, "/devices")
        assert reply.status == 200
        assert json.loads(reply.body) == [
            {
                "device_id": "garage",
                "connected": False,
                "last_seen": "2025-01-01T12:00:20+00:00",
                "address": "10.0.0.9:41000",
                "session_id": "s-g1",
                "last_stats": None,
                "connections": 1,
                "nova_input_tokens": 0,
                "nova_output_tokens": 0,
                "upstream_audio_s": 0.0,
            },
            {
                "device_id": "kitchen",
                "connected": True,
                "last_seen": "2025-01-01T12:00:10+00:00",
                "address": "10.0.0.5:40000",
                "session_id": "s-k1",
                "last_stats": {"rtt_ms": 31, "frames_dropped": 0},
                "connections": 1,
                "nova_input_tokens": 150,
                "nova_output_tokens": 350,
                "upstream_audio_s": 4.5,
            },
        ]

    serve(relay, scenario)


def test_a_stale_disconnect_does_not_mark_a_reconnected_device_offline() -> None:
    fleet = FleetTracker()
    fleet.connected("kitchen", session_id="old", address="10.0.0.5:1", at=T0)
    fleet.connected("kitchen", session_id="new", address="10.0.0.5:2", at=T0 + 5)
    fleet.disconnected("kitchen", session_id="old", at=T0 + 6)
    (record,) = fleet.records()
    assert record.connected is True
    assert (record.session_id, record.address, record.connections) == ("new", "10.0.0.5:2", 2)
    fleet.disconnected("kitchen", session_id="new", at=T0 + 7)
    assert fleet.records()[0].connected is False
    # unknown devices are ignored rather than invented
    fleet.stats_received("ghost", {"x": 1}, at=T0)
    fleet.tokens_used("ghost", input_tokens=1, output_tokens=1)
    fleet.disconnected("ghost", session_id="s", at=T0)
    assert [r.device_id for r in fleet.records()] == ["kitchen"]


def test_metrics_cover_sessions_frames_upstream_tokens_and_auth() -> None:
    relay = FakeRelay()
    two_devices_one_left(relay)

    async def scenario(api: HttpApi) -> None:
        reply = await fetch(api.port, "/metrics")
        assert reply.status == 200
        values = {}
        for family in text_string_to_metric_families(reply.body.decode()):
            assert family.documentation, family.name
            for s in family.samples:
                values[(s.name, tuple(sorted(s.labels.items())))] = s.value
        expected = {
            ("edgevoice_relay_build_info", (("version", "0.1.0"),)): 1,
            ("edgevoice_relay_uptime_seconds", ()): 3600,
            ("edgevoice_relay_healthy", ()): 1,
            ("edgevoice_relay_sessions_active", ()): 1,
            ("edgevoice_relay_sessions_total", ()): 7,
            ("edgevoice_relay_devices_connected", ()): 1,
            ("edgevoice_relay_devices_seen", ()): 2,
            ("edgevoice_relay_frames_in_total", ()): 50_000,
            ("edgevoice_relay_frames_out_total", ()): 42_000,
            ("edgevoice_relay_frames_dropped_total", ()): 12,
            ("edgevoice_relay_upstream_latency_seconds_count", ()): 4,
            ("edgevoice_relay_upstream_latency_seconds_sum", ()): 2.6,
            ("edgevoice_relay_upstream_errors_total", (("code", "throttled"),)): 2,
            ("edgevoice_relay_upstream_errors_total", (("code", "timeout"),)): 1,
            ("edgevoice_relay_auth_failures_total", ()): 5,
            ("edgevoice_relay_nova_input_tokens_total", (("device", "kitchen"),)): 150,
            ("edgevoice_relay_nova_output_tokens_total", (("device", "kitchen"),)): 350,
            ("edgevoice_relay_nova_output_tokens_total", (("device", "garage"),)): 0,
            ("edgevoice_relay_upstream_audio_seconds_total", (("device", "kitchen"),)): 4.5,
            ("edgevoice_relay_upstream_audio_seconds_total", (("device", "garage"),)): 0,
        }
        for key, value in expected.items():
            assert values[key] == pytest.approx(value), key

    serve(relay, scenario)


def test_healthz_reports_the_relays_problems() -> None:
    relay = FakeRelay()

    async def scenario(api: HttpApi) -> None:
        assert (await fetch(api.port, "/healthz")).status == 200
        relay.problems = ["upstream failing: 5 errors in 60 s"]
        reply = await fetch(api.port, "/healthz")
        assert reply.status == 503
        assert json.loads(reply.body)["problems"] == ["upstream failing: 5 errors in 60 s"]

    serve(relay, scenario)


def test_admin_endpoint_beyond_loopback_needs_its_token() -> None:
    relay = FakeRelay()
    with pytest.raises(ConfigError, match=r"admin\.token_file"):
        relay_admin_api(relay, RelayAdminSettings(bind="0.0.0.0"), None)

    async def scenario(api: HttpApi) -> None:
        for path in ("/healthz", "/metrics", "/devices"):
            reply = await fetch(api.port, path)
            assert reply.status == 401, path
            assert reply.headers["www-authenticate"].startswith("Bearer")
            assert (await fetch(api.port, path, token=ADMIN_TOKEN)).status == 200, path

    serve(relay, scenario, settings=RelayAdminSettings(bind="0.0.0.0", port=0), token=ADMIN_TOKEN)
