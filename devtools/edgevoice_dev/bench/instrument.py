"""Device-side timestamps for the latency and barge-in benchmarks, from the outside.

:class:`BenchObserver` is a :class:`~edgevoice.device.observer.DeviceObserver` on
the real, unchanged daemon: it notes (daemon clock: ``time.monotonic``) when each
uplink frame enters the send path, when each reply starts, and when audio is pushed
into the playback buffer or flushed from it. :class:`PacedSink` pulls 20 ms blocks
at real time like a sound card and notes whether each block held any audio;
:class:`SilentSource` is a microphone in a silent room.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgevoice.audio.base import CAPTURE_FRAME_BYTES, FRAME_MS, SourceStats, frame_samples
from edgevoice.audio.playback import PlaybackBuffer
from edgevoice.device.observer import DeviceObserver
from edgevoice.protocol.messages import Welcome


@dataclass
class DeviceLog:
    """Monotonic timestamps the device side contributes to the hop measurements."""

    #: per turn: when each uplink frame entered the send path (before Opus encoding)
    uplink: list[list[float]] = field(default_factory=list)
    #: per turn: whether each frame was pre-roll (released in a burst at speech start)
    preroll: list[list[bool]] = field(default_factory=list)
    #: per response: (time, samples) of each push into the playback buffer
    pushes: list[list[tuple[float, int]]] = field(default_factory=list)
    #: when the relay's interrupt message was handed to the daemon
    interrupts: list[float] = field(default_factory=list)
    #: when the playback buffer was flushed
    flushes: list[float] = field(default_factory=list)
    #: (time, reply samples) of every block the sink pulled (earcons not counted)
    pulls: list[tuple[float, int]] = field(default_factory=list)
    link_ups: list[float] = field(default_factory=list)
    output_rate_hz: int = 0
    #: the playback buffer's counters at the end (underruns, prefill)
    playback: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"uplink": self.uplink, "preroll": self.preroll, "pushes": self.pushes,
                "interrupts": self.interrupts, "flushes": self.flushes, "pulls": self.pulls,
                "link_ups": self.link_ups, "output_rate_hz": self.output_rate_hz,
                "playback": self.playback}


class BenchObserver(DeviceObserver):
    """Writes the daemon's events into a :class:`DeviceLog`."""

    def __init__(self, log: DeviceLog) -> None:
        self.log = log

    def link_up(self, welcome: Welcome, at: float) -> None:
        self.log.link_ups.append(at)

    def turn_begun(self, turn_id: int, trigger: str, at: float) -> None:
        self.log.uplink.append([])
        self.log.preroll.append([])

    def uplink_frame(self, entered_at: float, *, sent: bool, preroll: bool) -> None:
        if sent and self.log.uplink:
            self.log.uplink[-1].append(entered_at)
            self.log.preroll[-1].append(preroll)

    def response_started(self, at: float) -> None:
        self.log.pushes.append([])

    def remote_interrupt(self, at: float) -> None:
        self.log.interrupts.append(at)

    def playback_pushed(self, samples: int, at: float) -> None:
        if self.log.pushes:
            self.log.pushes[-1].append((at, samples))

    def playback_flushed(self, at: float) -> None:
        self.log.flushes.append(at)


class PacedSink:
    """An AudioSink that pulls one 20 ms block every 20 ms and notes what it got."""

    def __init__(self, rate_hz: int, log: DeviceLog) -> None:
        self.name = f"paced:{rate_hz}"
        self.sample_rate_hz = rate_hz
        self._log = log
        self._task: asyncio.Task[None] | None = None

    def prepare(self) -> None:
        """Always pulling: nothing to get ready."""

    async def open(self, buffer: PlaybackBuffer) -> None:
        self._task = asyncio.create_task(self._pace(buffer), name=self.name)

    async def _pace(self, buffer: PlaybackBuffer) -> None:
        block = np.zeros(frame_samples(self.sample_rate_hz), dtype=np.int16)
        start = time.monotonic()
        k = 0
        while True:
            k += 1
            delay = start + k * FRAME_MS / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            before = buffer.stats.played_samples
            buffer.pull_into(block)
            # reply samples only: an earcon mixed in is not the answer
            self._log.pulls.append((time.monotonic(), buffer.stats.played_samples - before))

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class SilentSource:
    """An AudioSource of digital silence at real time: a microphone in a quiet room."""

    def __init__(self) -> None:
        self.name = "silence"
        self.stats = SourceStats()
        self._start = 0.0
        self._count = 0
        self._frame = bytes(CAPTURE_FRAME_BYTES)

    async def open(self) -> None:
        self._start = time.monotonic()
        self._count = 0
        self.stats.opens += 1

    async def read(self) -> bytes:
        self._count += 1
        delay = self._start + self._count * FRAME_MS / 1000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        self.stats.frames_captured += 1
        self.stats.last_frame_at = time.monotonic()
        return self._frame

    async def close(self) -> None:
        pass
