"""Upstreams the benchmarks plug into a real relay, each recording when audio passes.

They implement :class:`edgevoice.upstream.base.Upstream` like ``echo`` and ``nova``
do, so the relay runs its ordinary code paths. Every one of them logs, per device
session, when each 20 ms uplink frame was handed to it and when it handed over each
20 ms frame of reply audio (``time.monotonic``, which is one clock for every
process on the machine, so a device process can be compared with it).

* :class:`ReplyUpstream` answers each turn with a short spoken reply streamed at
  real time, one 20 ms frame at a time, as a speech model does.
* :class:`LoopbackUpstream` answers every uplink frame with a 20 ms reply frame at
  once: a full-duplex stream both ways, so the relay transcodes Opus in both
  directions (the capacity test).
* :class:`BargeInUpstream` starts replies on its own and interrupts each of them
  part-way (the barge-in test).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from edgevoice.queues import DropOldestQueue
from edgevoice.upstream.base import (
    UPSTREAM_OUTPUT_RATE_HZ,
    AudioOutput,
    DeviceContext,
    ResponseEnded,
    ResponseInterrupted,
    ResponseStarted,
    UpstreamEvent,
)

logger = logging.getLogger(__name__)

#: bytes in one 20 ms frame of 24 kHz mono s16le
REPLY_FRAME_BYTES = UPSTREAM_OUTPUT_RATE_HZ // 50 * 2
FRAME_S = 0.02

Notify = Callable[[dict[str, Any]], None]


@dataclass
class SessionLog:
    """What one device session handed the upstream and was handed back, and when."""

    opened_at: float
    #: per turn: when each uplink frame reached the upstream
    turns: list[list[float]] = field(default_factory=list)
    #: per response: when each 20 ms reply frame was handed to the relay
    responses: list[list[float]] = field(default_factory=list)
    #: when each ResponseInterrupted was handed to the relay
    interrupts: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"opened_at": self.opened_at, "turns": self.turns,
                "responses": self.responses, "interrupts": self.interrupts}


class ReplyPacer:
    """Hands every session's reply frames over at real time on one timer.

    A real upstream's reply audio arrives on its own connection; nothing in the relay
    process wakes per frame per session to produce it. A task sleeping 20 ms per frame
    per session did, and that was the bench's cost counted as the relay's (2 % of the
    relay profile, bench row 14). Each frame is still handed to the relay as its own
    event, at most ``period_s`` after it is due, so the relay does the same work. The
    streams wait in a heap by their next frame's due time: a tick touches only the
    streams that are due, and the timer runs only while a stream is.
    """

    def __init__(self, period_s: float = 0.005) -> None:
        self.period_s = period_s
        #: session -> (its state: [next frame due (monotonic s), frames left], done)
        self._streams: dict[_RecordingSession, tuple[list[float], asyncio.Future[None]]] = {}
        #: (due, tie-break, session, its state when pushed); stale entries are skipped
        self._due: list[tuple[float, int, _RecordingSession, list[float]]] = []
        self._pushed = 0
        self._handle: asyncio.TimerHandle | None = None

    def start(self, session: _RecordingSession, frames: int) -> asyncio.Future[None]:
        """Stream ``frames`` frames of ``session``'s reply from now; done when sent."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state = [time.monotonic(), float(frames)]
        self._streams[session] = (state, done)
        self._advance(session, state, done, state[0])  # the first frame is due now
        self._arm()
        return done

    def cancel(self, session: _RecordingSession, done: asyncio.Future[None]) -> None:
        """Stop the stream that ``done`` belongs to (not a newer one of ``session``)."""
        current = self._streams.get(session)
        if current is not None and current[1] is done:
            del self._streams[session]

    def _advance(self, session: _RecordingSession, state: list[float],
                 done: asyncio.Future[None], now: float) -> None:
        """Emit what is due of one stream; queue it again for its next frame."""
        while state[1] > 0 and state[0] <= now:
            session._emit_frame()
            state[0] += FRAME_S
            state[1] -= 1
        if state[1] > 0:
            self._pushed += 1
            heapq.heappush(self._due, (state[0], self._pushed, session, state))
            return
        del self._streams[session]
        if not done.done():
            done.set_result(None)

    def _arm(self) -> None:
        if self._handle is None and self._due:
            delay = max(self.period_s, self._due[0][0] - time.monotonic())
            self._handle = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._handle = None
        now = time.monotonic()
        due = self._due
        while due and due[0][0] <= now:
            _, _, session, state = heapq.heappop(due)
            current = self._streams.get(session)
            if current is not None and current[0] is state:  # not cancelled or restarted
                self._advance(session, state, current[1], now)
        self._arm()


class _Closed:
    pass


_CLOSED = _Closed()


class _RecordingSession:
    """Shared plumbing: an event queue, a log, and a task for scripted replies."""

    def __init__(self, log: SessionLog, reply: bytes, pacer: ReplyPacer | None = None) -> None:
        self.log = log
        self._pacer = pacer or ReplyPacer()
        self._reply = reply or bytes(REPLY_FRAME_BYTES)
        self._reply_pos = 0
        self._events: DropOldestQueue[UpstreamEvent | _Closed] = DropOldestQueue(4096)
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def _next_reply_frame(self) -> bytes:
        reply = self._reply
        if self._reply_pos + REPLY_FRAME_BYTES > len(reply):
            self._reply_pos = 0
        frame = reply[self._reply_pos: self._reply_pos + REPLY_FRAME_BYTES]
        self._reply_pos += REPLY_FRAME_BYTES
        return frame

    def _emit_frame(self) -> None:
        if self.log.responses:
            self.log.responses[-1].append(time.monotonic())
        self._events.put_nowait(AudioOutput(self._next_reply_frame()))

    def _start_response(self) -> None:
        self.log.responses.append([])
        self._events.put_nowait(ResponseStarted())

    async def _stream(self, frames: int) -> None:
        """Emit ``frames`` reply frames at real time (due times from the start)."""
        done = self._pacer.start(self, frames)
        try:
            await done
        finally:
            self._pacer.cancel(self, done)

    def _cancel_task(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def start_turn(self) -> None:
        self.log.turns.append([])

    async def send_audio(self, pcm: bytes) -> None:
        if self.log.turns:
            self.log.turns[-1].append(time.monotonic())

    async def end_turn(self) -> None:
        pass

    async def interrupt(self) -> None:
        self._cancel_task()

    async def events(self) -> AsyncIterator[UpstreamEvent]:
        while True:
            item = await self._events.get()
            if isinstance(item, _Closed):
                return
            yield item

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._cancel_task()
            self._events.put_nowait(_CLOSED)


class _RecordingUpstream:
    """Keeps every session's log, by device, for the runner to write out."""

    name = "bench"

    def __init__(self, reply: bytes, notify: Notify | None = None) -> None:
        self.reply = reply
        self.notify = notify
        self.logs: dict[str, list[SessionLog]] = {}
        #: paces every session's reply frames (one timer for the process)
        self.pacer = ReplyPacer()

    def _log_for(self, context: DeviceContext) -> SessionLog:
        log = SessionLog(opened_at=time.monotonic())
        self.logs.setdefault(context.device_id, []).append(log)
        if self.notify is not None:
            self.notify({"event": "session", "device": context.device_id,
                         "t": log.opened_at})
        return log

    def dump(self) -> dict[str, list[dict[str, Any]]]:
        return {device: [log.as_dict() for log in logs] for device, logs in self.logs.items()}

    async def aclose(self) -> None:
        pass


class ReplySession(_RecordingSession):
    def __init__(self, log: SessionLog, reply: bytes, reply_frames: int,
                 pacer: ReplyPacer | None = None) -> None:
        super().__init__(log, reply, pacer)
        self.reply_frames = reply_frames

    async def end_turn(self) -> None:
        self._cancel_task()
        self._task = asyncio.create_task(self._respond())

    async def _respond(self) -> None:
        self._start_response()
        await self._stream(self.reply_frames)
        self._events.put_nowait(ResponseEnded())


class ReplyUpstream(_RecordingUpstream):
    """Answers each turn with ``reply_ms`` of speech, streamed at real time."""

    def __init__(self, reply: bytes, reply_ms: int = 600, notify: Notify | None = None) -> None:
        super().__init__(reply, notify)
        self.reply_frames = max(1, reply_ms // 20)

    async def open_session(self, context: DeviceContext) -> ReplySession:
        return ReplySession(self._log_for(context), self.reply, self.reply_frames, self.pacer)


class LoopbackSession(_RecordingSession):
    def __init__(self, log: SessionLog, reply: bytes) -> None:
        super().__init__(log, reply)
        self._start_response()

    async def start_turn(self) -> None:
        if not self.log.turns:  # one long turn: the load generator never ends it
            self.log.turns.append([])

    async def send_audio(self, pcm: bytes) -> None:
        await super().send_audio(pcm)
        self._emit_frame()


class LoopbackUpstream(_RecordingUpstream):
    """Returns one 20 ms reply frame for every uplink frame, at once."""

    async def open_session(self, context: DeviceContext) -> LoopbackSession:
        return LoopbackSession(self._log_for(context), self.reply)


class BargeInSession(_RecordingSession):
    def __init__(self, log: SessionLog, reply: bytes, trials: int, rng: random.Random,
                 notify: Notify | None, pacer: ReplyPacer | None = None) -> None:
        super().__init__(log, reply, pacer)
        self._task = asyncio.create_task(self._script(trials, rng, notify))

    async def _script(self, trials: int, rng: random.Random, notify: Notify | None) -> None:
        await asyncio.sleep(1.0)  # let the device settle after connecting
        for _ in range(trials):
            self._start_response()
            await self._stream(int(rng.uniform(0.25, 0.45) / FRAME_S))
            self.log.interrupts.append(time.monotonic())
            self._events.put_nowait(ResponseInterrupted())
            await asyncio.sleep(rng.uniform(0.3, 0.4))
        if notify is not None:
            notify({"event": "bargein_done", "trials": trials, "t": time.monotonic()})

    async def interrupt(self) -> None:
        pass  # the script carries on: the device only interrupts what it plays


class BargeInUpstream(_RecordingUpstream):
    """Starts ``trials`` replies of its own and interrupts each 250-450 ms into it."""

    def __init__(self, reply: bytes, trials: int, notify: Notify | None = None,
                 seed: int = 5) -> None:
        super().__init__(reply, notify)
        self.trials = trials
        self.rng = random.Random(seed)

    async def open_session(self, context: DeviceContext) -> BargeInSession:
        return BargeInSession(self._log_for(context), self.reply, self.trials, self.rng,
                              self.notify, self.pacer)

