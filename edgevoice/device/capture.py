"""Capture: open the microphone, read 20 ms frames, reopen it with backoff when it fails."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from edgevoice.audio.base import AudioSource, BatchingSource
from edgevoice.backoff import Backoff, BackoffSettings
from edgevoice.clock import Clock
from edgevoice.device.records import DeviceCounters
from edgevoice.device.status import StatusBoard
from edgevoice.errors import AudioDeviceError

logger = logging.getLogger(__name__)


class CaptureLoop:
    """Feeds every captured frame to ``on_frame``; survives a microphone that comes and
    goes (problem and retry shown in the status); returns at the end of a finite
    source, after calling ``on_eof``."""

    def __init__(self, source: AudioSource, clock: Clock, status: StatusBoard,
                 counters: DeviceCounters, on_frame: Callable[[bytes], None], *,
                 reopen_max_ms: int, on_eof: Callable[[], None] | None = None,
                 start_after: asyncio.Event | None = None) -> None:
        self.source = source
        self.clock = clock
        self.status = status
        self.counters = counters
        self.on_frame = on_frame
        self.on_eof = on_eof
        self.start_after = start_after
        self.backoff = Backoff(BackoffSettings(initial_ms=500, max_ms=reopen_max_ms,
                                               min_ms=200))

    def catch_up(self) -> int:
        """Hand ``on_frame`` every frame the source holds already (a batching source
        holds quiet frames back while the daemon waits for speech), so that what
        follows (a button press, a request) comes after them, as it did in time.
        Returns how many; a device error is left for :meth:`run` to meet."""
        source = self.source
        if not isinstance(source, BatchingSource):
            return 0
        n = 0
        with contextlib.suppress(AudioDeviceError):
            while (frame := source.read_nowait()) is not None:
                self.on_frame(frame)
                n += 1
        return n

    async def run(self) -> None:
        if self.start_after is not None:
            await self.start_after.wait()
        while True:
            try:
                await self.source.open()
                self.backoff.reset()
                self.status.audio_opened()
                while True:
                    frame = await self.source.read()
                    self.on_frame(frame)
            except EOFError:
                logger.info("audio source %s ended", self.source.name)
                if self.on_eof is not None:
                    self.on_eof()
                return
            except AudioDeviceError as exc:
                delay = self.backoff.next_delay()
                problem = f"microphone unavailable: {exc}"
                self.status.audio_failed(problem)
                self.counters.audio_reopens += 1
                logger.warning("%s; reopening in %.1f s", problem, delay)
                self.status.set(f"{problem}; retrying in {delay:.1f} s")
                with contextlib.suppress(Exception):
                    await self.source.close()
                await self.clock.sleep(delay)
