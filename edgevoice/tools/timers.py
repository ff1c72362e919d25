"""Timer tools: the model sets, lists and cancels timers that live on the device.

The timers themselves are on the device (:mod:`edgevoice.device.timers`), so they
ring even when the relay is unreachable when they are due; these tools only reach
them, through ``DeviceContext.call_device`` (a ``device_call`` message,
docs/protocol.md §12). A device that is offline, or has no timers (the browser
page), gets an error result the model can say.
"""

from __future__ import annotations

from typing import Any

from edgevoice.errors import ToolError
from edgevoice.tools.registry import Tool
from edgevoice.upstream.base import DeviceContext

#: Seconds to wait for the device's answer (under the registry's tool timeout).
DEVICE_CALL_TIMEOUT_S = 4.0


async def _call(ctx: DeviceContext, name: str, args: dict[str, Any]) -> dict[str, Any]:
    if ctx.call_device is None:
        return {"error": "this relay cannot reach the device's timers"}
    try:
        return await ctx.call_device(name, args, DEVICE_CALL_TIMEOUT_S)
    except ToolError as exc:
        return {"error": str(exc)}


def timer_tools() -> list[Tool]:
    """``set_timer``, ``list_timers``, ``cancel_timer`` (an ``edgevoice.tools`` entry point)."""

    async def set_timer(args: dict[str, Any], ctx: DeviceContext) -> dict[str, Any]:
        seconds = args["seconds"]
        return await _call(ctx, "timer.set",
                           {"seconds": seconds, "label": str(args.get("label") or "")})

    async def list_timers(args: dict[str, Any], ctx: DeviceContext) -> dict[str, Any]:
        return await _call(ctx, "timer.list", {})

    async def cancel_timer(args: dict[str, Any], ctx: DeviceContext) -> dict[str, Any]:
        return await _call(ctx, "timer.cancel", {"id": str(args.get("id") or ""),
                                                 "label": str(args.get("label") or "")})

    return [
        Tool("set_timer",
             "Set a timer on the user's device; it rings there when the time is up, even "
             "if the network is down. Give the duration in seconds (5 minutes = 300) and "
             "a short label if the user named one ('pasta').",
             {"type": "object", "properties": {
                 "seconds": {"type": "integer", "description": "duration in seconds"},
                 "label": {"type": "string"}}, "required": ["seconds"]},
             set_timer),
        Tool("list_timers",
             "List the timers running on the user's device with the seconds left on each.",
             {"type": "object", "properties": {}, "required": []},
             list_timers),
        Tool("cancel_timer",
             "Cancel a timer on the user's device by its id or label; with neither, "
             "cancel every timer.",
             {"type": "object", "properties": {
                 "id": {"type": "string"}, "label": {"type": "string"}}, "required": []},
             cancel_timer),
    ]
