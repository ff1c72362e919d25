"""The Nova Sonic upstream: runs :class:`~edgevoice.nova.session.SessionCore` against Bedrock.

:class:`NovaUpstream` is what the relay instantiates for ``upstream: nova``; each
device gets a :class:`NovaSession` implementing
:class:`~edgevoice.upstream.base.UpstreamSession`. All decisions live in the core;
this module only carries out its actions:

* one task per stream: open it (with a deadline), then read Nova's events, parse
  them (:mod:`edgevoice.nova.events`) and hand them to the core;
* one writer per stream, fed by a bounded queue, so ``send_audio`` never waits on
  the network; the queue drops its oldest item when full, and counts it. Audio events
  that wait in it together (a capture block's frames, which a device sends in one
  write, or audio held while the stream opened) leave as one ``audioInput`` event of
  up to ``MAX_COALESCED_AUDIO_BYTES``: the SDK's cost is per event (JSON, event-stream
  framing, signing), not per byte;
* one ticker per session that calls :meth:`SessionCore.tick` every 20 ms while a
  stream is open (silence filling, rotation, idle close) and sleeps otherwise;
* tools run in their own tasks through the :class:`~edgevoice.tools.registry.ToolRegistry`,
  with the configured timeout.

Closing a stream sends ``contentEnd``, ``promptEnd`` and ``sessionEnd``, closes the
input, and only then stops reading output (after Nova's last usage events, or
``drain_timeout_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Final

from edgevoice.clock import Clock, MonotonicClock
from edgevoice.nova import events as nova
from edgevoice.nova.client import BedrockStreamOpener, NovaStream, StreamOpener
from edgevoice.nova.faults import OPEN_TIMEOUT, Fault
from edgevoice.nova.session import (
    FRAME_BYTES,
    FRAME_S,
    AbortStream,
    Action,
    CloseStream,
    Emit,
    OpenStream,
    RunTool,
    SendAudio,
    SendEvents,
    SessionCore,
    SessionState,
    SessionStats,
)
from edgevoice.nova.settings import NovaSettings
from edgevoice.queues import DropOldestQueue
from edgevoice.tools.registry import ToolRegistry, build_registry
from edgevoice.upstream.base import DeviceContext, UpstreamEvent

__all__ = ["NovaSession", "NovaSettings", "NovaUpstream"]

logger = logging.getLogger(__name__)

#: Events waiting for the relay; a reply is many audio chunks, and Nova is faster
#: than real time, so this is generous. Overflow drops the oldest (counted).
EVENT_QUEUE_SIZE: Final = 4096
#: How long an aborted stream may take to end its output before its reader is cancelled.
ABORT_GRACE_S: Final = 1.0
#: Input events per stream beyond the held audio: the first events (history can be
#: a few hundred) plus 10 s of live audio should the network slow down.
OUTBOX_MARGIN: Final = 1000


#: The most audio one coalesced ``audioInput`` event carries: 100 ms of 16 kHz s16le.
MAX_COALESCED_AUDIO_BYTES: Final = 5 * FRAME_BYTES


class _Audio:
    """Outbox item: one frame of an audio content block, kept as raw PCM so that the
    writer can join it with the frames queued behind it and encode them once."""

    __slots__ = ("content_name", "pcm", "prompt_name")

    def __init__(self, prompt_name: str, content_name: str, pcm: bytes) -> None:
        self.prompt_name = prompt_name
        self.content_name = content_name
        self.pcm = pcm

    def joins(self, other: _Audio) -> bool:
        """Whether ``other`` continues the same audio content block."""
        return self.content_name == other.content_name and self.prompt_name == other.prompt_name


class _Close:
    """Outbox marker: close the input stream after everything before it."""


_CLOSE: Final = _Close()


class _StreamRunner:
    """The I/O of one Nova stream."""

    def __init__(self, session: NovaSession, stream_id: int) -> None:
        self.session = session
        self.stream_id = stream_id
        # Room for everything held while the stream opened, flushed at once, so a
        # slow start never pushes the stream's first events out of the queue.
        held = round(session.settings.pending_audio_max_s / FRAME_S)
        self.outbox: DropOldestQueue[bytes | _Audio | _Close] = DropOldestQueue(
            held + OUTBOX_MARGIN)
        self.task: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._writer_error: BaseException | None = None
        self._closing = False
        self._aborted = False
        self._drain_expired = False
        self._drain_timer: asyncio.TimerHandle | None = None
        self._reported_drops = 0

    def start(self, prelude: tuple[nova.Event, ...]) -> None:
        self._put(prelude)
        self.task = asyncio.get_running_loop().create_task(
            self._run(), name=f"nova-stream-{self.stream_id}"
        )

    def send(self, events: tuple[nova.Event, ...]) -> None:
        if not self._closing:
            self._put(events)

    def send_audio(self, prompt_name: str, content_name: str, frames: tuple[bytes, ...]) -> None:
        if self._closing:
            return
        for pcm in frames:
            self.outbox.put_nowait(_Audio(prompt_name, content_name, pcm))
        self._report_drops()

    def close(self, events: tuple[nova.Event, ...]) -> None:
        if self._closing:
            return
        self._put(events)
        self.outbox.put_nowait(_CLOSE)
        self._closing = True
        self._drain_timer = asyncio.get_running_loop().call_later(
            self.session.settings.drain_timeout_s + 1.0, self._expire
        )

    def abort(self) -> None:
        """Give the stream up: send nothing more, end our input, stop reading soon.

        The reading task is not cancelled at once: a cancelled read leaves the CRT
        transport resolving a cancelled future from its own thread. Ending the input
        makes the service end the output; after ``ABORT_GRACE_S`` the task is
        cancelled anyway. Whatever arrives meanwhile is ignored.
        """
        if self._aborted:
            return
        self._aborted = True
        self._closing = True
        self.outbox.clear()
        self.outbox.put_nowait(_CLOSE)
        task = self.task
        if task is not None and not task.done() and task is not asyncio.current_task():
            if self._drain_timer is not None:
                self._drain_timer.cancel()
            self._drain_timer = asyncio.get_running_loop().call_later(ABORT_GRACE_S, self._expire)

    def _expire(self) -> None:
        # Nova did not end its output after our sessionEnd: stop reading anyway.
        self._drain_expired = True
        if self.task is not None:
            self.task.cancel()

    def _put(self, events: tuple[nova.Event, ...]) -> None:
        for event in events:
            self.outbox.put_nowait(nova.encode_event(event))
        self._report_drops()

    def _report_drops(self) -> None:
        if self.outbox.dropped > self._reported_drops:
            logger.warning(
                "nova stream %d: network too slow, dropped %d input events so far",
                self.stream_id,
                self.outbox.dropped,
            )
            self._reported_drops = self.outbox.dropped

    async def _write(self, stream: NovaStream) -> None:
        try:
            while True:
                item = await self.outbox.get()
                if isinstance(item, _Close):
                    await stream.close_input()
                    return
                await stream.send(item if isinstance(item, bytes) else self._coalesced(item))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._writer_error = exc
            if not self._closing and self.task is not None:
                self.task.cancel()

    def _coalesced(self, first: _Audio) -> bytes:
        """``first`` with the frames of the same content waiting right behind it, as one
        encoded ``audioInput`` event of up to ``MAX_COALESCED_AUDIO_BYTES`` (what waits
        beyond that goes in the next one). Nothing waits for more: only what is queued now."""
        outbox = self.outbox
        self.session.core.stats.audio_events_sent += 1
        pieces = [first.pcm]
        size = len(first.pcm)
        while len(outbox):
            nxt = outbox.peek()
            if (not isinstance(nxt, _Audio) or not first.joins(nxt)
                    or size + len(nxt.pcm) > MAX_COALESCED_AUDIO_BYTES):
                break
            outbox.get_nowait()
            pieces.append(nxt.pcm)
            size += len(nxt.pcm)
        pcm = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        return nova.encode_event(nova.audio_input(first.prompt_name, first.content_name, pcm))

    async def _run(self) -> None:
        session = self.session
        opener = session.upstream.opener
        timeout_s = session.settings.open_timeout_s
        stream: NovaStream | None = None
        try:
            async with asyncio.timeout(timeout_s):
                stream = await opener.open()
                self._writer = asyncio.get_running_loop().create_task(self._write(stream))
                await stream.wait_open()
            session.apply(
                session.core.stream_opened(
                    self.stream_id,
                    session.now(),
                    credentials_expire_in_s=getattr(stream, "credentials_expire_in_s", None),
                )
            )
            while True:
                payload = await stream.receive()
                if payload is None:
                    break
                if self._aborted:
                    continue  # drained to its end, not acted on
                event = nova.parse_output_event(payload)
                session.apply(session.core.output_event(self.stream_id, event, session.now()))
        except asyncio.CancelledError:
            if self._aborted:
                return  # given up on purpose; the core has forgotten it
            if self._drain_expired:
                session.apply(session.core.stream_ended(self.stream_id, session.now()))
            elif self._writer_error is not None:
                self._failed(opener.fault(self._writer_error))
            else:
                raise
        except TimeoutError:
            self._failed(Fault(OPEN_TIMEOUT, f"no response within {timeout_s:g} s"))
        except Exception as exc:
            if not self._aborted:
                self._failed(opener.fault(exc))
        else:
            if not self._aborted:
                session.apply(session.core.stream_ended(self.stream_id, session.now()))
        finally:
            if self._drain_timer is not None:
                self._drain_timer.cancel()
            if self._writer is not None:
                self._writer.cancel()
                with contextlib.suppress(BaseException):
                    await self._writer
            if stream is not None:
                await stream.close()
            session.forget_stream(self.stream_id, self)

    def _failed(self, fault: Fault) -> None:
        session = self.session
        session.apply(session.core.stream_failed(self.stream_id, fault, session.now()))


class NovaSession:
    """One device's conversation with Nova Sonic (an ``UpstreamSession``)."""

    def __init__(self, upstream: NovaUpstream, context: DeviceContext) -> None:
        self.upstream = upstream
        self.context = context
        # The device's own prompt, voice and tools, if relay.yaml gives it any.
        self.settings = upstream.settings.for_device(context.device_id)
        self.tool_names = upstream.settings.tools_for(context.device_id)
        specs = upstream.tools.specs()
        if self.tool_names is not None:
            offered = set(self.tool_names)
            specs = [spec for spec in specs if _tool_name(spec) in offered]
        self.core = SessionCore(
            self.settings,
            tool_specs=tuple(specs),
            debug_name=context.device_id,
        )
        # The conversation so far, when relays keep it beyond a session (a relay died,
        # or the device moved to another: docs/scale-out.md); sent with the first stream.
        for line in context.history:
            self.core.history.add("USER" if line.role == "user" else "ASSISTANT", line.text)
        self._events: DropOldestQueue[UpstreamEvent | None] = DropOldestQueue(EVENT_QUEUE_SIZE)
        self._streams: dict[int, _StreamRunner] = {}
        self._tools: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._ticker: asyncio.Task[None] | None = None
        self._closed = False
        self._reported_event_drops = 0

    # --- UpstreamSession ----------------------------------------------------------

    async def start_turn(self) -> None:
        self.apply(self.core.start_turn(self.now()))

    async def send_audio(self, pcm: bytes) -> None:
        self.apply(self.core.audio_in(pcm, self.now()))

    async def end_turn(self) -> None:
        self.apply(self.core.end_turn(self.now()))

    async def interrupt(self) -> None:
        self.apply(self.core.interrupt(self.now()))

    async def events(self) -> AsyncIterator[UpstreamEvent]:
        while True:
            event = await self._events.get()
            if event is None:
                return
            yield event

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.apply(self.core.close(self.now()))
        for task in list(self._tools):
            task.cancel()
        runners = [r.task for r in self._streams.values() if r.task is not None]
        if runners:
            # Every runner ends by itself: drained, expired or failed.
            _, pending = await asyncio.wait(
                runners, timeout=self.settings.open_timeout_s + self.settings.drain_timeout_s + 2
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        await asyncio.gather(*self._tools, return_exceptions=True)
        self._events.put_nowait(None)
        self.upstream.forget(self)
        logger.info(
            "nova session %s closed: %d streams, %d rotations, %d resumes",
            self.context.device_id,
            self.core.stats.streams_opened,
            self.core.stats.rotations,
            self.core.stats.resumes,
        )

    # --- for the runner and tests ---------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self.core.state

    @property
    def stats(self) -> SessionStats:
        return self.core.stats

    @property
    def events_dropped(self) -> int:
        return self._events.dropped

    def now(self) -> float:
        return self.upstream.clock.now()

    def apply(self, actions: list[Action]) -> None:
        """Carry out the core's actions. Never blocks."""
        for action in actions:
            match action:
                case Emit(event=event):
                    self._events.put_nowait(event)
                case SendEvents(stream_id=sid, events=events):
                    runner = self._streams.get(sid)
                    if runner is not None:
                        runner.send(events)
                case SendAudio(stream_id=sid):
                    runner = self._streams.get(sid)
                    if runner is not None:
                        runner.send_audio(action.prompt_name, action.content_name, action.frames)
                case OpenStream(stream_id=sid, events=events):
                    runner = _StreamRunner(self, sid)
                    self._streams[sid] = runner
                    runner.start(events)
                case CloseStream(stream_id=sid, events=events):
                    runner = self._streams.get(sid)
                    if runner is not None:
                        runner.close(events)
                case AbortStream(stream_id=sid):
                    runner = self._streams.get(sid)
                    if runner is not None:
                        runner.abort()
                case RunTool():
                    task = asyncio.get_running_loop().create_task(self._run_tool(action))
                    self._tools.add(task)
                    task.add_done_callback(self._tools.discard)
        if self._events.dropped > self._reported_event_drops:
            logger.warning(
                "nova session %s: the relay is not reading; dropped %d events so far",
                self.context.device_id,
                self._events.dropped,
            )
            self._reported_event_drops = self._events.dropped
        if self._ticker is None and not self._closed:
            self._ticker = asyncio.get_running_loop().create_task(
                self._tick_loop(), name=f"nova-ticker-{self.context.device_id}"
            )
        self._wake.set()

    def forget_stream(self, stream_id: int, runner: _StreamRunner) -> None:
        if self._streams.get(stream_id) is runner:
            del self._streams[stream_id]

    async def _tick_loop(self) -> None:
        clock = self.upstream.clock
        while not self._closed:
            deadline = self.core.next_deadline(clock.now())
            if deadline is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            delay = deadline - clock.now()
            if delay > 0:
                await clock.sleep(delay)
            if not self._closed:
                self.apply(self.core.tick(clock.now()))

    async def _run_tool(self, action: RunTool) -> None:
        started = time.monotonic()
        if self.tool_names is not None and action.name not in self.tool_names:
            # Not offered to this device: the model gets an error result, not the tool.
            ok, result = False, json.dumps({"error": f"unknown tool {action.name!r}"})
        else:
            ok, result = await self.upstream.tools.run(
                action.name, action.arguments, self.context, self.settings.tool_timeout_s
            )
        duration_ms = (time.monotonic() - started) * 1000
        self.apply(
            self.core.tool_finished(
                action.stream_id,
                action.tool_use_id,
                action.name,
                ok,
                result,
                duration_ms,
                self.now(),
            )
        )


def _tool_name(spec: dict[str, object]) -> str:
    inner = spec.get("toolSpec")
    return str(inner.get("name", "")) if isinstance(inner, dict) else ""


class NovaUpstream:
    """The ``nova`` upstream: Amazon Nova Sonic over Bedrock bidirectional streaming.

    ``tools`` defaults to the registry ``settings.tools`` describes. ``opener`` is a
    seam for tests; by default the official SDK is used, and constructing this
    without it installed raises ``UpstreamError("nova_sdk_missing")``.
    """

    name = "nova"

    def __init__(
        self,
        settings: NovaSettings | None = None,
        tools: ToolRegistry | None = None,
        clock: Clock | None = None,
        *,
        opener: StreamOpener | None = None,
    ) -> None:
        self.settings = settings or NovaSettings()
        self.tools = tools if tools is not None else build_registry(self.settings.tools)
        self.clock: Clock = clock or MonotonicClock()
        self.opener: StreamOpener = opener or BedrockStreamOpener(self.settings)
        self._sessions: set[NovaSession] = set()
        for warning in self.settings.warnings():
            logger.warning("nova: %s", warning)
        unknown = {
            name
            for own in self.settings.devices.values()
            for name in own.tools or ()
            if name not in self.tools.names()
        }
        if unknown:
            logger.warning(
                "nova: devices name tools the relay does not have: %s", ", ".join(sorted(unknown))
            )

    async def open_session(self, context: DeviceContext) -> NovaSession:
        session = NovaSession(self, context)
        self._sessions.add(session)
        logger.info(
            "nova session for device %s (model %s, voice %s, %d tools)",
            context.device_id,
            self.settings.model_id,
            session.settings.voice_id,
            len(session.core.tool_specs),
        )
        return session

    def upstream_audio_s(self) -> dict[str, float]:
        """Seconds of audio sent to Nova per connected device (for /metrics)."""
        totals: dict[str, float] = {}
        for session in self._sessions:
            device = session.context.device_id
            totals[device] = totals.get(device, 0.0) + session.stats.upstream_audio_s
        return totals

    def forget(self, session: NovaSession) -> None:
        self._sessions.discard(session)

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    async def aclose(self) -> None:
        await asyncio.gather(*(s.close() for s in list(self._sessions)), return_exceptions=True)
        await self.opener.aclose()
