"""Device events for peripherals: a hook command per state change, and a live stream.

Every change of the user-visible state (idle, listening, thinking, speaking, muted,
follow_up, error, offline) and a few moments that are not states (``timer_ringing``)
become one :class:`DeviceEvent`, published by :class:`EventHub`. The hub is a
:class:`~edgevoice.device.status.StateDisplay`, so the daemon's state presenter tells
it like it tells the LED. Two consumers read it, each through its own bounded queue
(the oldest event is dropped and counted when a consumer falls behind, never the
event loop):

* :class:`HookRunner` runs the configured command once per event, one at a time and
  in order, with the event in its environment (``EDGEVOICE_STATE``,
  ``EDGEVOICE_PREVIOUS_STATE``, ``EDGEVOICE_EVENT``, ``EDGEVOICE_EVENT_SEQ``,
  ``EDGEVOICE_DEVICE_ID``); a command that runs past ``timeout_ms`` is killed; failures
  are counted, never raised. An LED ring's driver is a script.
* :func:`sse_stream` serves the same events as server-sent events on the device's
  health port (``GET /events``, under the health endpoint's token rule).

Publishing does no I/O: it appends to deques and wakes waiters.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from edgevoice.config.base import require
from edgevoice.feedback.states import DeviceState
from edgevoice.health.http import Handler, Request, Response

logger = logging.getLogger(__name__)

#: Seconds between SSE comment lines that keep an idle stream (and proxies) alive.
SSE_KEEPALIVE_S = 15.0


@dataclass(frozen=True)
class HookSettings:
    """A command run on each device state change (for LED rings and other peripherals)."""

    command: tuple[str, ...] = ()
    """Program and arguments, run without a shell; empty: no hook. The event is in its
    environment: EDGEVOICE_STATE, EDGEVOICE_PREVIOUS_STATE, EDGEVOICE_EVENT,
    EDGEVOICE_EVENT_SEQ, EDGEVOICE_DEVICE_ID."""
    timeout_ms: int = 2_000
    """Kill a hook still running after this long (counted as a failure)."""
    max_queued: int = 32
    """Events waiting for the hook; beyond it the oldest is dropped (counted)."""

    def __post_init__(self) -> None:
        require(100 <= self.timeout_ms <= 60_000, "timeout_ms", "must be 100..60000")
        require(1 <= self.max_queued <= 1_000, "max_queued", "must be 1..1000")


@dataclass(frozen=True)
class DeviceEvent:
    """One thing a peripheral may follow."""

    seq: int
    #: ``state`` (a DeviceState changed) or the name of a moment (``timer_ringing``)
    kind: str
    #: the device state after the event
    state: str
    previous: str
    device_id: str
    #: wall-clock seconds (for the consumer's logs; ordering is by ``seq``)
    wall_time: float

    def as_dict(self) -> dict[str, object]:
        return {"seq": self.seq, "event": self.kind, "state": self.state,
                "previous": self.previous, "device_id": self.device_id,
                "time": round(self.wall_time, 3)}

    def environment(self) -> dict[str, str]:
        return {"EDGEVOICE_STATE": self.state, "EDGEVOICE_PREVIOUS_STATE": self.previous,
                "EDGEVOICE_EVENT": self.kind, "EDGEVOICE_EVENT_SEQ": str(self.seq),
                "EDGEVOICE_DEVICE_ID": self.device_id}


@dataclass
class Subscription:
    """One consumer's bounded queue of events."""

    max_queued: int
    events: collections.deque[DeviceEvent] = field(default_factory=collections.deque)
    dropped: int = 0
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, event: DeviceEvent) -> None:
        if len(self.events) >= self.max_queued:
            self.events.popleft()
            self.dropped += 1
        self.events.append(event)
        self._wake.set()

    async def get(self) -> DeviceEvent:
        while not self.events:
            self._wake.clear()
            await self._wake.wait()
        return self.events.popleft()


class EventHub:
    """Publishes device events to its subscribers (a StateDisplay for the presenter)."""

    def __init__(self, device_id: str, wall_clock: Callable[[], float] = time.time) -> None:
        self.device_id = device_id
        self.wall_clock = wall_clock
        self.state = ""
        self.seq = 0
        self.subscribers: list[Subscription] = []
        #: the last events, for a consumer that connects later
        self.recent: collections.deque[DeviceEvent] = collections.deque(maxlen=16)

    def subscribe(self, max_queued: int = 64) -> Subscription:
        sub = Subscription(max_queued)
        self.subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self.subscribers:
            self.subscribers.remove(sub)

    def set_state(self, state: DeviceState) -> None:
        if str(state) != self.state:
            self._publish("state", str(state))

    def moment(self, kind: str) -> None:
        """Publish a moment that is not a state change (``timer_ringing``)."""
        self._publish(kind, self.state)

    def _publish(self, kind: str, state: str) -> None:
        self.seq += 1
        event = DeviceEvent(self.seq, kind, state, self.state, self.device_id,
                            self.wall_clock())
        self.state = state
        self.recent.append(event)
        logger.debug("device event %d: %s %s", event.seq, kind, state)
        for sub in self.subscribers:
            sub.put(event)


@dataclass
class HookCounters:
    runs: int = 0
    failures: int = 0
    timeouts: int = 0
    dropped: int = 0


class HookRunner:
    """Runs the hook command for each event, in order, one at a time."""

    def __init__(self, settings: HookSettings, hub: EventHub) -> None:
        self.settings = settings
        self.sub = hub.subscribe(settings.max_queued)
        self.counters = HookCounters()

    async def run(self) -> None:
        while True:
            event = await self.sub.get()
            self.counters.dropped = self.sub.dropped
            await self.run_one(event)

    async def run_one(self, event: DeviceEvent) -> bool:
        """Run the command for ``event``; whether it exited 0 in time."""
        self.counters.runs += 1
        env = {**os.environ, **event.environment()}
        try:
            process = await asyncio.create_subprocess_exec(
                *self.settings.command, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        except OSError as exc:
            self.counters.failures += 1
            logger.warning("event hook cannot start %r: %s", self.settings.command[0], exc)
            return False
        try:
            async with asyncio.timeout(self.settings.timeout_ms / 1000):
                code = await process.wait()
        except TimeoutError:
            self.counters.failures += 1
            self.counters.timeouts += 1
            process.kill()
            await process.wait()
            logger.warning("event hook killed after %d ms (state %s)",
                           self.settings.timeout_ms, event.state)
            return False
        if code != 0:
            self.counters.failures += 1
            logger.warning("event hook exited %d (state %s)", code, event.state)
            return False
        return True


def sse_frame(event: DeviceEvent) -> bytes:
    """One server-sent event: ``id``, ``event`` and one JSON ``data`` line."""
    data = json.dumps(event.as_dict(), separators=(",", ":"))
    return f"id: {event.seq}\nevent: {event.kind}\ndata: {data}\n\n".encode()


async def sse_stream(hub: EventHub, keepalive_s: float = SSE_KEEPALIVE_S
                     ) -> AsyncIterator[bytes]:
    """The hub's events as SSE, starting with the current state, until cancelled."""
    sub = hub.subscribe()
    try:
        yield b"retry: 2000\n\n"
        if hub.recent:
            yield sse_frame(hub.recent[-1])
        while True:
            try:
                async with asyncio.timeout(keepalive_s):
                    event = await sub.get()
            except TimeoutError:
                yield b": keepalive\n\n"
                continue
            yield sse_frame(event)
    finally:
        hub.unsubscribe(sub)


def event_stream_handler(hub: EventHub) -> Handler:
    """The ``GET /events`` route of the health endpoint."""

    async def handle(request: Request) -> Response:
        return Response(200, "text/event-stream; charset=utf-8",
                        stream=lambda: sse_stream(hub))

    return handle
