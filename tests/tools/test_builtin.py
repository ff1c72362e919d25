"""The built-in tools: local date and time, device status."""

from __future__ import annotations

import asyncio
import datetime
import json

from edgevoice.tools.builtin import builtin_tools, current_time_tool, device_status_tool
from edgevoice.tools.registry import ToolRegistry
from edgevoice.upstream.base import DeviceContext

# A Saturday, 13:30 UTC: 15:30 in Berlin (summer time), 09:30 in New York.
FIXED = datetime.datetime(2025, 6, 14, 13, 30, 5, tzinfo=datetime.UTC)


def call(tool_registry: ToolRegistry, name: str, ctx: DeviceContext) -> dict[str, object]:
    ok, text = asyncio.run(tool_registry.run(name, "{}", ctx, 1.0))
    assert ok, text
    result = json.loads(text)
    assert isinstance(result, dict)
    return result


def test_current_time_is_in_the_devices_time_zone() -> None:
    registry = ToolRegistry([current_time_tool(now=lambda: FIXED)])
    berlin = call(registry, "current_time", DeviceContext("d", "s", timezone="Europe/Berlin"))
    assert berlin == {
        "timezone": "Europe/Berlin",
        "iso": "2025-06-14T15:30:05+02:00",
        "date": "Saturday 14 June 2025",
        "time": "15:30",
        "utc_offset": "+0200",
    }
    new_york = call(registry, "current_time", DeviceContext("d", "s", timezone="America/New_York"))
    assert new_york["time"] == "09:30"
    assert new_york["utc_offset"] == "-0400"


def test_unknown_time_zone_falls_back_to_utc_with_a_note() -> None:
    registry = ToolRegistry([current_time_tool(now=lambda: FIXED)])
    result = call(registry, "current_time", DeviceContext("d", "s", timezone="Mars/Olympus"))
    assert result["timezone"] == "UTC"
    assert result["time"] == "13:30"
    assert "Mars/Olympus" in str(result["note"])


def test_device_status_reports_the_devices_stats_json_safe() -> None:
    stats = {"rtt_ms": 12.5, "link": "up", "since": FIXED, "drops": (1, 2)}
    ctx = DeviceContext("kitchen", "s", status=lambda: stats)
    result = call(ToolRegistry([device_status_tool()]), "device_status", ctx)
    assert result == {
        "device_id": "kitchen",
        "status": {
            "rtt_ms": 12.5,
            "link": "up",
            "since": "2025-06-14 13:30:05+00:00",
            "drops": [1, 2],
        },
    }


def test_builtins_have_distinct_names() -> None:
    assert [t.name for t in builtin_tools()] == ["current_time", "device_status"]
