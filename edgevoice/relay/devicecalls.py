"""Relay → device function calls (``device_call`` / ``device_result``, protocol §12).

A tool that must run on the device (timers) calls :meth:`DeviceCalls.call`: it sends
a ``device_call`` to the device's live session and waits for the ``device_result``
of the same id, within a timeout. Every failure is a :class:`DeviceCallError` whose
text the tool hands to the model: the device is not connected, it is a device
without such functions (the browser page), or it did not answer in time.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from edgevoice.errors import ToolError
from edgevoice.protocol.messages import DeviceCall, DeviceResult, Message

logger = logging.getLogger(__name__)

#: Most calls in flight to one device (a model calls one tool at a time).
MAX_PENDING_PER_DEVICE = 8


class DeviceCallError(ToolError):
    """A device call could not be made or was not answered; ``str()`` is for the model."""


class CallableSession(Protocol):
    """What a device session offers a device call (DeviceSession has these)."""

    @property
    def software(self) -> str: ...

    async def send_control(self, message: Message) -> None: ...


class DeviceCalls:
    """Pending device calls of one relay, by device and call id."""

    def __init__(self, sessions: Callable[[str], CallableSession | None]) -> None:
        self._sessions = sessions
        self._pending: dict[tuple[str, str], asyncio.Future[DeviceResult]] = {}
        self._ids = itertools.count(1)
        self.answered = 0
        self.timed_out = 0

    def resolve(self, device_id: str, result: DeviceResult) -> None:
        """A ``device_result`` arrived from ``device_id``."""
        future = self._pending.pop((device_id, result.id), None)
        if future is None:
            logger.info("%s answered unknown or late device call %r", device_id, result.id)
            return
        if not future.done():
            future.set_result(result)

    async def call(self, device_id: str, name: str, args: Mapping[str, Any],
                   timeout_s: float) -> dict[str, Any]:
        """Run ``name`` on the device; its result, or :class:`DeviceCallError`."""
        session = self._sessions(device_id)
        if session is None:
            raise DeviceCallError("the device is not connected to the relay right now")
        if not session.software.startswith("edgevoice/"):
            raise DeviceCallError("this device cannot do that (it has no timers)")
        if sum(1 for d, _ in self._pending if d == device_id) >= MAX_PENDING_PER_DEVICE:
            raise DeviceCallError("the device is busy with other requests; try again")
        call_id = f"c{next(self._ids)}"
        future: asyncio.Future[DeviceResult] = asyncio.get_running_loop().create_future()
        self._pending[(device_id, call_id)] = future
        try:
            await session.send_control(DeviceCall(call_id, name, dict(args)))
            async with asyncio.timeout(timeout_s):
                result = await future
        except TimeoutError:
            self.timed_out += 1
            raise DeviceCallError("the device did not answer in time") from None
        finally:
            self._pending.pop((device_id, call_id), None)
        self.answered += 1
        if not result.ok:
            raise DeviceCallError(str(result.result.get("error") or "the device refused"))
        return dict(result.result)
