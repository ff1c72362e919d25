"""Small doubles for the daemon's seams: a link that records, an observer that records."""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from edgevoice.backoff import BackoffSettings
from edgevoice.device.link import DeviceLink, LinkListener, RelaySettings, StatsProvider
from edgevoice.device.observer import DeviceObserver
from edgevoice.device.records import TurnTimeline
from edgevoice.protocol.messages import AudioFlags, Message, Welcome

FRAME_BYTES = 640  # 20 ms at 16 kHz, s16le mono


def silence() -> bytes:
    return bytes(FRAME_BYTES)


def tone(dbfs: float = -12.0, hz: float = 440.0, index: int = 0) -> bytes:
    amplitude = 32767 * 10 ** (dbfs / 20)
    samples = [int(amplitude * math.sin(2 * math.pi * hz * (index * 320 + n) / 16000))
               for n in range(320)]
    return struct.pack("<320h", *samples)


@dataclass
class RecordingLink:
    """Satisfies LinkPort (and LinkView): takes everything while up, nothing while down."""

    connected: bool = True
    suspended: bool = False
    messages: list[Message] = field(default_factory=list)
    audio: list[tuple[bytes, int, AudioFlags]] = field(default_factory=list)

    def send(self, message: Message) -> bool:
        if not (self.connected or self.suspended):
            return False
        self.messages.append(message)
        return True

    def send_audio(self, packet: bytes, timestamp_ms: int,
                   flags: AudioFlags = AudioFlags.NONE) -> bool:
        if not (self.connected or self.suspended):
            return False
        self.audio.append((packet, timestamp_ms, flags))
        return True

    def of(self, kind: type[Message]) -> list[Message]:
        return [m for m in self.messages if isinstance(m, kind)]


@dataclass
class RecordingObserver(DeviceObserver):
    events: list[tuple[object, ...]] = field(default_factory=list)
    closed: list[TurnTimeline] = field(default_factory=list)

    def link_up(self, welcome: Welcome, at: float) -> None:
        self.events.append(("link_up", welcome.session_id, at))

    def turn_begun(self, turn_id: int, trigger: str, at: float) -> None:
        self.events.append(("turn_begun", turn_id, trigger, at))

    def uplink_frame(self, entered_at: float, *, sent: bool, preroll: bool) -> None:
        self.events.append(("uplink_frame", sent, preroll))

    def response_started(self, at: float) -> None:
        self.events.append(("response_started", at))

    def remote_interrupt(self, at: float) -> None:
        self.events.append(("remote_interrupt", at))

    def playback_pushed(self, samples: int, at: float) -> None:
        self.events.append(("playback_pushed", samples))

    def playback_flushed(self, at: float) -> None:
        self.events.append(("playback_flushed", at))

    def turn_closed(self, turn: TurnTimeline) -> None:
        self.closed.append(turn)

    def names(self) -> list[object]:
        return [e[0] for e in self.events]


#: reconnect quickly in tests
FAST_BACKOFF = BackoffSettings(initial_ms=50, max_ms=200)


@contextlib.asynccontextmanager
async def running_link(url: str, token: str, listener: LinkListener, *,
                       stats: StatsProvider | None = None,
                       **settings: Any) -> AsyncIterator[DeviceLink]:
    """A real DeviceLink for device ``d1`` running against ``url``; stopped after."""
    link = DeviceLink(RelaySettings(url=url, backoff=FAST_BACKOFF, **settings), "d1", token,
                      listener, stats=stats)
    task = asyncio.create_task(link.run())
    try:
        yield link
    finally:
        await link.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
