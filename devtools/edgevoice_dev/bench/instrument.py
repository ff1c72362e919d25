"""Device-side timestamps for the latency and barge-in benchmarks, from the outside.

The daemon has no timing hooks yet, so :class:`InstrumentedDaemon` subclasses it and
notes (``time.monotonic``) when each uplink frame enters the send path, when each
reply starts, and when its playback buffer (:class:`TimedPlaybackBuffer`) is pushed
to or flushed. :class:`PacedSink` pulls 20 ms blocks at real time like a sound card
and notes whether each block held any audio; :class:`SilentSource` is a microphone
in a silent room. Nothing here changes what the daemon does.
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
from edgevoice.device.daemon import DeviceDaemon
from edgevoice.device.turn import BeginTurn
from edgevoice.protocol.messages import Interrupt, Message, ResponseStart, Welcome


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

    def as_dict(self) -> dict[str, Any]:
        return {"uplink": self.uplink, "preroll": self.preroll, "pushes": self.pushes,
                "interrupts": self.interrupts, "flushes": self.flushes, "pulls": self.pulls,
                "link_ups": self.link_ups, "output_rate_hz": self.output_rate_hz}


class TimedPlaybackBuffer(PlaybackBuffer):
    """A PlaybackBuffer that notes when audio is pushed into it and when it is flushed."""

    def __init__(self, log: DeviceLog, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bench_log = log

    def push(self, pcm: bytes | bytearray | memoryview) -> None:
        super().push(pcm)
        if self.bench_log.pushes:
            self.bench_log.pushes[-1].append((time.monotonic(), len(pcm) // 2))

    def flush(self) -> int:
        discarded = super().flush()
        self.bench_log.flushes.append(time.monotonic())
        return discarded


class InstrumentedDaemon(DeviceDaemon):
    """The device daemon, unchanged, with timestamps taken around it."""

    def __init__(self, *args: Any, bench_log: DeviceLog, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bench_log = bench_log
        bench_log.output_rate_hz = self.sink.sample_rate_hz
        audio = self.config.audio
        self.playback = TimedPlaybackBuffer(
            bench_log, self.sink.sample_rate_hz, prefill_ms=audio.playback_prefill_ms,
            max_ms=audio.playback_max_ms, on_event=self._playback_event_threadsafe)
        self._in_preroll = False

    def _begin_turn(self, command: BeginTurn, now: float) -> None:
        self.bench_log.uplink.append([])
        self.bench_log.preroll.append([])
        self._in_preroll = True
        try:
            super()._begin_turn(command, now)
        finally:
            self._in_preroll = False

    def _send_frame(self, pcm: bytes, now: float) -> None:
        entered = time.monotonic()
        sent = self.counters.frames_sent
        super()._send_frame(pcm, now)
        if self.counters.frames_sent > sent and self.bench_log.uplink:
            self.bench_log.uplink[-1].append(entered)
            self.bench_log.preroll[-1].append(self._in_preroll)

    def link_up(self, welcome: Welcome) -> None:
        self.bench_log.link_ups.append(time.monotonic())
        super().link_up(welcome)

    def on_message(self, message: Message) -> None:
        if isinstance(message, ResponseStart):
            self.bench_log.pushes.append([])
        elif isinstance(message, Interrupt):
            self.bench_log.interrupts.append(time.monotonic())
        super().on_message(message)


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
