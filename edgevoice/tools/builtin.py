"""The tools every relay offers: the date and time where the device is, and its status."""

from __future__ import annotations

import datetime
import zoneinfo
from collections.abc import Callable, Mapping
from typing import Any

from edgevoice.tools.registry import Tool
from edgevoice.upstream.base import DeviceContext

Now = Callable[[], datetime.datetime]


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def current_time_tool(now: Now = _utc_now) -> Tool:
    """``current_time``: the date and time in the device's time zone.

    ``now`` returns an aware datetime; tests pass a fixed one.
    """

    async def handler(args: dict[str, Any], ctx: DeviceContext) -> dict[str, Any]:
        note = None
        try:
            zone: datetime.tzinfo = zoneinfo.ZoneInfo(ctx.timezone)
            zone_name = ctx.timezone
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            # A misconfigured device still gets an answer, marked as UTC.
            zone, zone_name = datetime.UTC, "UTC"
            note = f"unknown time zone {ctx.timezone!r}; this is UTC"
        local = now().astimezone(zone)
        result: dict[str, Any] = {
            "timezone": zone_name,
            "iso": local.isoformat(timespec="seconds"),
            "date": f"{local:%A} {local.day} {local:%B %Y}",
            "time": f"{local:%H:%M}",
            "utc_offset": local.strftime("%z"),
        }
        if note:
            result["note"] = note
        return result

    return Tool(
        name="current_time",
        description=(
            "Get the current date, day of the week and time where the user's device is. "
            "Use it whenever the user asks about the time, the date or the day."
        ),
        input_schema={"type": "object", "properties": {}, "required": []},
        handler=handler,
    )


def _json_safe(value: object) -> object:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def device_status_tool() -> Tool:
    """``device_status``: the device's own latest stats (link, audio, uptime...)."""

    async def handler(args: dict[str, Any], ctx: DeviceContext) -> dict[str, Any]:
        return {"device_id": ctx.device_id, "status": _json_safe(ctx.status())}

    return Tool(
        name="device_status",
        description=(
            "Get the status of the user's voice device: connection quality, audio "
            "statistics and uptime. Use it when the user asks how the device is doing."
        ),
        input_schema={"type": "object", "properties": {}, "required": []},
        handler=handler,
    )


def builtin_tools() -> list[Tool]:
    """The built-in tools, fresh instances."""
    return [current_time_tool(), device_status_tool()]
