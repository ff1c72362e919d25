"""The relay: accepts devices over WebSockets and connects each to an upstream.

Thin runner around the sans-I/O protocol core. Per device it decodes the uplink
Opus to 16 kHz PCM for the upstream and re-encodes the upstream's 24 kHz reply to
Opus, paced to the device at real time. A device that misbehaves is closed on its
own; nothing it sends can disturb another device's session.

A :class:`DeviceSession` outlives the connection that opened it: when a connection
drops (not closed on purpose by either side), the session is *held* for
``limits.resume_window_ms``. Its upstream stays open and its reply keeps being
queued (bounded); a hello that names the session within the window re-attaches it,
re-sends what the device missed and goes on pacing (``docs/protocol.md`` §7).

:meth:`RelayServer.drain` (SIGTERM) stops accepting, lets each device's turn and
reply finish, then closes it with 4004 so it reconnects at once, through the load
balancer, to another relay (``docs/scale-out.md``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import gc
import http
import logging
import ssl
import time
import uuid
from collections.abc import Callable, Coroutine, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.streams import StreamReader

from edgevoice import __version__
from edgevoice.audio.opus import OpusDecodeError, OpusDecoder, OpusEncoder, OpusSettings
from edgevoice.audio.resample import FrameFifo
from edgevoice.clock import Clock, MonotonicClock
from edgevoice.errors import ProtocolError, RemoteProtocolError
from edgevoice.health.relay import FleetTracker
from edgevoice.protocol.connection import RELIABLE, Connection, Role
from edgevoice.protocol.limits import TokenBucket, UplinkMeter, opus_packet_duration_ms
from edgevoice.protocol.messages import (
    MAX_TEXT_BYTES,
    SUBPROTOCOL,
    TURN_REFUSED_CODE,
    AudioFlags,
    CloseCode,
    DeviceResult,
    Error,
    Hello,
    Interrupt,
    Message,
    Ping,
    Pong,
    ResponseEnd,
    ResponseStart,
    ResumeRequest,
    ResumeResult,
    Stats,
    Transcript,
    TurnEnd,
    TurnStart,
    Welcome,
    decode_message,
    handover_reason,
)
from edgevoice.protocol.replay import OutboundQueue, ReplayJournal
from edgevoice.protocol.session import (
    Closer,
    SessionLifecycle,
    SessionState,
    SessionTable,
    catch_up_after,
    close_ends_session,
    replay_for,
)
from edgevoice.protocol.wsframes import FIN_BINARY, FIN_TEXT, unmasked_frame, whole_frames
from edgevoice.queues import NOTHING_YET, Flag, owned
from edgevoice.relay.admission import REFUSAL_TEXT, LoadLimits, Refusal, TurnAdmission
from edgevoice.relay.auth import FailureLimiter, GuessThrottle
from edgevoice.relay.devicecalls import DeviceCalls
from edgevoice.relay.loop import HeapKeeper, HeapPass
from edgevoice.relay.pacing import SharedTick
from edgevoice.relay.refusals import QuietFilter, RefusalLog
from edgevoice.relay.settings import DOWNLINK_OPUS, LimitsSettings, ListenSettings
from edgevoice.relay.shared import DeviceTokens
from edgevoice.upstream.base import (
    UPSTREAM_OUTPUT_RATE_HZ,
    AudioOutput,
    DeviceContext,
    ResponseEnded,
    ResponseInterrupted,
    ResponseStarted,
    ToolCalled,
    TranscriptReceived,
    Upstream,
    UpstreamFailed,
    UpstreamSession,
    UsageReported,
)
from edgevoice.web.gate import Admission, BrowserGate

logger = logging.getLogger(__name__)

DOWNLINK_FRAME_SAMPLES = UPSTREAM_OUTPUT_RATE_HZ // 50  # 480
DOWNLINK_FRAME_BYTES = DOWNLINK_FRAME_SAMPLES * 2  # s16le
#: Frames the pacer may send ahead of real time, to ride over network jitter.
PACING_LEAD_FRAMES = 3
#: Missing uplink frames concealed with PLC; a longer gap is not worth inventing.
MAX_CONCEALED_FRAMES = 5
#: Reliable messages held for a detached device beyond the paced queue (transcripts,
#: errors); the oldest go first.
MAX_HELD_MESSAGES = 256
#: Longest uplink Opus packet, in milliseconds of audio (the uplink is 20 ms frames).
MAX_UPLINK_PACKET_MS = 20.0
#: Upstream events a session handles before it lets the loop run once on its own
#: (an upstream whose ``events()`` never suspends must not starve other sessions).
#: A queue-fed upstream (DropOldestQueue.get) suspends on each event already.
EVENTS_PER_YIELD = 8
#: Pings one connection may send in a burst (see LimitsSettings.max_pings_per_s).
PING_BURST = UplinkMeter.PING_BURST


@dataclass
class RelayCounters:
    """Relay-wide counters for /metrics."""

    sessions_total: int = 0
    frames_in: int = 0
    frames_out: int = 0
    frames_dropped: int = 0
    frames_concealed: int = 0
    auth_failures: int = 0
    protocol_errors: int = 0
    rate_limited: int = 0
    upstream_errors: dict[str, int] = field(default_factory=dict)
    tool_calls: int = 0
    #: upstream reply latency (turn end -> first reply audio): count and sum in seconds
    upstream_latency_count: int = 0
    upstream_latency_sum_s: float = 0.0
    #: sessions held after a drop / resumed by their device / expired unresumed
    sessions_held: int = 0
    sessions_resumed: int = 0
    sessions_expired: int = 0
    #: downlink frames and messages re-sent after a resume
    frames_replayed: int = 0
    messages_replayed: int = 0
    #: duplicate uplink frames dropped (a device re-sent what had arrived)
    frames_duplicate: int = 0
    #: devices disconnected because they did not read their downlink
    slow_readers: int = 0
    #: devices sent elsewhere (4004) by a drain once their reply was done / still busy
    #: when the drain's time ran out
    drained_idle: int = 0
    drained_busy: int = 0
    #: turns refused because the relay was at capacity, and their audio dropped
    turns_refused: int = 0
    frames_refused: int = 0
    #: connections refused or closed by a limit, by kind (RefusalLog keeps them)
    refusals: dict[str, int] = field(default_factory=dict)


#: What waits in the downlink queue: control messages and (Opus packet, flags).
#: One 20 ms frame of reply PCM (24 kHz s16le) and its flags. It is Opus-encoded only
#: when the pacer sends it: a whole reply handed over at once must not be encoded in one
#: go on the event loop (measured: 27-59 ms stalls at 30 sessions, issue 15).
DownlinkAudio = tuple[bytes, AudioFlags]


class DeviceSession:
    """One device's session: upstream, reply queue and pacer, across its connections.

    The session is *attached* to at most one WebSocket at a time (``ws``/``conn``).
    While detached, the upstream's events keep arriving and are queued; nothing is
    sent. :meth:`serve` runs one connection; the relay decides, when it ends,
    whether to hold the session for a resume or close it.

    Slotted: a relay holds one per connected device, most of them idle (bench row 13);
    a __dict__ of this many attributes was 1.5 KiB of each.
    """

    __slots__ = (
        "_attached",
        "_blocked_since",
        "_expiry",
        "_finished",
        "_held_messages",
        "_pumping",
        "_reading",
        "_refused_turn",
        "_response_first",
        "_sent",
        "_t0",
        "_tasks",
        "_turn_ended_at",
        "_uplink_failure",
        "_uplink_sending",
        "_upstream",
        "_upstream_audio_s",
        "_usage",
        "answer_turn_id",
        "conn",
        "decoder",
        "detached_at",
        "device_id",
        "downlink",
        "encoder",
        "end_reason",
        "fifo",
        "journal",
        "lifecycle",
        "meter",
        "owner",
        "relay",
        "replying",
        "session_id",
        "turn_id",
        "ws",
    )

    def __init__(self, relay: RelayServer, device_id: str, session_id: str,
                 upstream: UpstreamSession | None = None) -> None:
        self.relay = relay
        self.device_id = device_id
        self.session_id = session_id
        #: None until :meth:`start` (the hello's session is in the table before its
        #: upstream is open, so no other hello can slip in meanwhile)
        self._upstream = upstream
        self.lifecycle = SessionLifecycle(f"{device_id}/{session_id[:8]}")
        #: the connection this session belongs to (from its hello on), and the one
        #: attached to it (from the end of its replay on; None while detached)
        self.owner: ServerConnection | None = None
        self.ws: ServerConnection | None = None
        #: the current connection's core, or the last one's while detached (counters)
        self.conn: Connection | None = None
        self.decoder = OpusDecoder(16_000)
        self.encoder = OpusEncoder.from_settings(relay.downlink_opus, UPSTREAM_OUTPUT_RATE_HZ)
        self.fifo = FrameFifo(DOWNLINK_FRAME_SAMPLES)
        limits = relay.limits
        self.downlink: OutboundQueue[DownlinkAudio] = OutboundQueue(
            max(50, limits.downlink_queue_ms // 20), max_control=1024)
        self.journal = ReplayJournal(max(1, limits.resume_buffer_ms // 20))
        self._held_messages: collections.deque[Message] = NOTHING_YET  # until one is held
        self._attached = Flag()
        self.turn_id: int | None = None
        #: a turn refused at capacity (its audio is dropped until its turn_end)
        self._refused_turn: int | None = None
        #: the turn a reply answers: the device's latest, also after its turn_end
        self.answer_turn_id: int | None = None
        #: set when the relay closed the connection for a reason that ends the session
        self.end_reason: str | None = None
        self.detached_at: float | None = None
        self._response_first = True
        self._turn_ended_at: float | None = None
        now = relay.clock.now()
        #: a reply is owed (turn ended) or under way, until its response_end is sent
        self.replying = False
        #: what the device may send: messages, audio time, pings (pure, takes now)
        self.meter = UplinkMeter(max_messages_per_s=limits.max_messages_per_s,
                                 max_audio_ms_per_s=limits.max_audio_ms_per_s,
                                 max_pings_per_s=limits.max_pings_per_s, now=now)
        self._usage = (0, 0)
        self._upstream_audio_s = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        #: downlink pacing (pump_downlink): the current reply's anchor and frames sent,
        #: and since when the connection's send buffer has been full
        self._t0: float | None = None
        self._sent = 0
        self._blocked_since: float | None = None
        self._pumping = False
        self._expiry: asyncio.Task[None] | None = None
        self._finished = False
        #: uplink audio taken where its frame was parsed (:meth:`_take_audio`): the
        #: connection whose receive task waits in recv() with nothing in hand (a
        #: connection being replaced by a resume has its own task, so this names it);
        #: what went wrong with a frame taken there, for the receive task to act on as
        #: it always has; and an upstream send that did not finish at once (later
        #: messages wait for it)
        self._reading: ServerConnection | None = None
        self._uplink_failure: ProtocolError | str | None = None
        self._uplink_sending: asyncio.Task[None] | None = None

    @property
    def attached(self) -> bool:
        return self.ws is not None

    @property
    def closed(self) -> bool:
        return self.lifecycle.closed

    @property
    def busy(self) -> bool:
        """In a turn, or owing the device a reply: a drain waits for it."""
        return self.turn_id is not None or self.replying

    @property
    def public_id(self) -> str:
        """What the fleet view (/devices, logs) shows of the session id: enough to tell
        sessions apart, not enough to resume one (that needs the whole id)."""
        return self.session_id[:8]

    @property
    def upstream(self) -> UpstreamSession:
        if self._upstream is None:
            raise RuntimeError(f"session {self.session_id[:8]} has no upstream yet")
        return self._upstream

    def start(self, upstream: UpstreamSession | None = None) -> None:
        """Start the tasks that live as long as the session (its upstream is open)."""
        if upstream is not None:
            self._upstream = upstream
        self._tasks = [
            asyncio.create_task(self._pump_upstream(), name=f"upstream:{self.device_id}")]

    def _downlink_put(self, item: Message | DownlinkAudio) -> bool:
        """Queue ``item`` for the device and send what is due of the queue now; the
        rest waits for the relay's shared tick (relay/pacing.py). A session has no
        pacer task or timer of its own (issue 15)."""
        queued = self.downlink.put_nowait(item)
        self._kick_downlink()
        return queued

    async def close(self) -> None:
        """End the session: stop its tasks, close the upstream. Idempotent.

        Its table entry is removed first (:meth:`RelayServer.forget`), which moves
        the lifecycle to CLOSED; this only releases what the session holds.
        """
        if self._finished:
            return
        self._finished = True
        self.relay.tick.forget(self)
        if not self.lifecycle.closed:
            self.lifecycle.to(SessionState.CLOSED)
        self._attached.clear()
        current = asyncio.current_task()
        tasks = [t for t in (*self._tasks, self._expiry) if t is not None and t is not current]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._upstream is not None:
            await self._upstream.close()

    # ------------------------------------------------------------ attachment

    def detach(self) -> ServerConnection | None:
        """Stop using the current connection (it dropped, or a resume replaces it)."""
        ws, self.ws = self.ws, None
        self._attached.clear()
        if ws is not None:
            self.detached_at = self.relay.clock.now()
            self.relay.fleet.disconnected(self.device_id, session_id=self.public_id,
                                          at=time.time())
        return ws

    def hold(self, window_s: float) -> None:
        """Keep the detached session for ``window_s`` seconds, then close it."""
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = asyncio.create_task(self._expire_after(window_s),
                                           name=f"resume-window:{self.device_id}")

    async def _expire_after(self, window_s: float) -> None:
        await self.relay.clock.sleep(window_s)
        if not self.attached and not self.closed:
            logger.info("%s: not back within %.0f s; closing its session %s", self.device_id,
                        window_s, self.session_id[:8])
            self.relay.counters.sessions_expired += 1
            self._expiry = None
            await self.relay.forget(self)

    def continue_on(self, conn: Connection) -> ResumeResult:
        """A new connection resumes this session: carry the counters over to ``conn``."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        last = self.conn
        assert last is not None
        conn.continue_session(next_seq=last.next_seq, last_received_seq=last.last_received_seq,
                              messages_sent=last.messages_sent,
                              messages_received=last.messages_received)
        self.conn = conn
        return ResumeResult(True, conn.last_received_seq, conn.messages_received)

    async def serve(self, ws: ServerConnection, conn: Connection,
                    resume: ResumeRequest | None) -> bool:
        """Run one connection until it ends; True if the session may be held for a resume.

        The welcome has been sent. With ``resume``, first re-send what the device
        missed and what was held for it, then attach (the pacer goes on).
        """
        self.conn = conn
        address = str(ws.remote_address[0]) if ws.remote_address else None
        if resume is not None:
            replay = replay_for(self.journal, conn, resume.last_downlink_seq,
                                resume.downlink_messages)
            for data in replay.data:
                await ws.send(data)
            self.relay.counters.frames_replayed += replay.frames
            self.relay.counters.messages_replayed += replay.messages
            # the device may now catch up at once on what it queued while away (§7.4)
            now = self.relay.clock.now()
            messages, audio_ms = catch_up_after(now - (self.detached_at or now),
                                                self.relay.limits.resume_window_ms / 1000)
            self.meter.catch_up(messages, audio_ms)
            logger.info("%s resumed session %s: re-sent %d frames and %d messages%s",
                        self.device_id, self.session_id[:8], replay.frames, replay.messages,
                        f" ({replay.frames_lost} no longer held)" if replay.frames_lost else "")
        while self._held_messages and self.owner is ws:
            message = self._held_messages.popleft()
            await self._transmit(ws, conn, message)
        if self.owner is not ws or not self.relay.table.attached(self):
            return False  # a newer connection resumed the session, or it ended
        self.ws = ws
        self.detached_at = None
        self.relay.fleet.connected(self.device_id, session_id=self.public_id, address=address,
                                   at=time.time())
        self._attached.set()
        self._kick_downlink()  # go on with the reply where it was
        with contextlib.suppress(ConnectionClosed):
            await self._receive(ws, conn)
        if self.end_reason is not None:
            return False
        received = ws.protocol.close_rcvd
        return not close_ends_session(received.code if received else None, Closer.DEVICE)

    # ------------------------------------------------------------------ uplink

    def _end(self, reason: str) -> None:
        """The relay ends this session: out of the table at once, so that no resume
        can reach it while its connection is still closing."""
        self.end_reason = reason
        self.relay.table.remove(self)

    async def _close_for(self, ws: ServerConnection, code: int, reason: str,
                         *, ends_session: bool) -> None:
        if ends_session:
            self._end(reason)
        await ws.close(code, reason[:120])

    async def _receive(self, ws: ServerConnection, conn: Connection) -> None:
        limits = self.relay.limits
        idle_s = 3 * limits.heartbeat_interval_ms / 1000
        clock = self.relay.clock
        idle = IdleWatch(asyncio.get_running_loop(), idle_s, lambda: self.relay.close_in_background(
            ws, CloseCode.IDLE_TIMEOUT, "no message for three heartbeats"))
        guarded = ws if isinstance(ws, GuardedConnection) else None
        if guarded is not None:
            guarded.on_text = functools.partial(self._take_heartbeat, ws, conn, idle)
            guarded.on_binary = functools.partial(self._take_audio, ws, conn, idle)
        try:
            await self._receive_until_closed(ws, conn, idle, clock)
        finally:
            idle.cancel()
            if self._reading is ws:
                self._reading = None
            if guarded is not None:
                guarded.on_text = None
                guarded.on_binary = None

    def _take_heartbeat(self, ws: ServerConnection, conn: Connection, idle: IdleWatch,
                        data: bytes | bytearray | memoryview) -> bool:
        """Answer a ``ping`` or take ``stats`` where the frame was parsed; True if done.

        An idle device's heartbeat (stats and ping in one write) is all it sends; taking
        it here, in the connection's data callback, spares waking the receive task,
        the message queue's future and three coroutines for each message (bench row 13).
        Anything else, and anything wrong (bad UTF-8 or JSON, a limit exceeded, a
        connection closing or not writable), goes the usual way: False, the frame is
        queued, and :meth:`_receive_until_closed` parses it again and acts as it always
        has. Pings and stats need no order with other messages, but one queued before
        them keeps them behind it (GuardedConnection.process_event checks). A whole
        heartbeat write reaches this without websockets' frame parser
        (GuardedConnection._take_frames); a frame declined here goes to it.
        """
        if (self.owner is not ws or self.end_reason is not None or idle.expired
                or self._uplink_failure is not None
                or ws.protocol.state is not State.OPEN or ws.paused):
            return False
        try:
            message = decode_message(bytes(data).decode())
        except (UnicodeDecodeError, ProtocolError):
            return False
        if not isinstance(message, Ping | Stats):
            return False
        now = self.relay.clock.now()
        if self.meter.over(now) is not None:
            return False
        try:
            conn.receive_message(message)
        except ProtocolError:
            return False
        idle.heard()
        if isinstance(message, Stats):
            self.relay.fleet.stats_received(self.device_id, message.values, at=time.time())
            return True
        if self.meter.ping_over(now) is not None:
            return False
        _write_now(ws, conn.send(Pong(message.id, message.sent_ms, int(now * 1000))))
        return True

    def _take_audio(self, ws: ServerConnection, conn: Connection, idle: IdleWatch,
                    data: bytes | bytearray | memoryview) -> bool:
        """Take one uplink audio frame where it was parsed; True if done.

        Per frame, waking the receive task cost a future, the message assembler, a
        task step and two coroutines: most of the relay's own CPU per uplink frame
        (bench row 14). Taken here only while the receive task waits in recv() with
        nothing queued or in hand, so messages keep their order. Every check of the
        slow path runs, in the same order, through the same code
        (:meth:`_uplink_frame`). A frame that fails one is not acted on here: the
        reason is kept, the frame is queued (False), and the receive task, woken by
        it, closes the connection as it always has; every later message queues
        behind it. An upstream send that suspends is finished by a task, and later
        messages wait for it.
        """
        if (self._reading is not ws or self._uplink_failure is not None
                or self._uplink_sending is not None or self.owner is not ws
                or self.end_reason is not None or idle.expired
                or ws.protocol.state is not State.OPEN):
            return False
        idle.heard()
        now = self.relay.clock.now()
        try:
            pieces = self.meter.over(now) or self._uplink_frame(
                conn, data if type(data) is bytes else bytes(data), now)
        except ProtocolError as exc:
            self._uplink_failure = exc
            return False
        if isinstance(pieces, str):
            self._uplink_failure = pieces
            return False
        upstream = self.upstream
        for i, pcm in enumerate(pieces):
            sending = upstream.send_audio(pcm)
            try:
                pending = sending.send(None)
            except StopIteration:
                continue  # done without suspending (every upstream here)
            # it waits for something: a task finishes it and sends the rest, and every
            # later message waits for that task (in the receive task)
            self._uplink_sending = asyncio.ensure_future(
                _finish_upstream_sends(_Suspended(sending, pending), upstream, pieces[i + 1:]))
            break
        return True

    def _uplink_frame(self, conn: Connection, data: bytes, now: float) -> list[bytes] | str:
        """Check and decode one uplink audio message (its message budget already
        taken): the PCM for the upstream, or why it is over the audio budget;
        :class:`ProtocolError` if it is malformed."""
        counters = self.relay.counters
        received = conn.receive_binary(data)
        if received is None:
            counters.frames_duplicate += 1
            return []
        counters.frames_in += 1
        if self.turn_id is None:
            if self._refused_turn is not None:
                counters.frames_refused += 1
                return []
            raise RemoteProtocolError("uplink audio outside a turn")
        payload = received.frame.payload
        duration_ms = opus_packet_duration_ms(payload)
        if duration_ms > MAX_UPLINK_PACKET_MS:
            raise RemoteProtocolError(f"Opus packet of {duration_ms:g} ms; uplink packets "
                                      f"carry at most {MAX_UPLINK_PACKET_MS:g} ms")
        over = self.meter.audio_over(duration_ms, now)
        if over is not None:
            return over
        try:
            pieces = self.decoder.decode_after_gap(payload, received.missing,
                                                   MAX_CONCEALED_FRAMES)
        except OpusDecodeError as exc:
            raise RemoteProtocolError(f"undecodable Opus packet: {exc}") from None
        counters.frames_concealed += len(pieces) - 1
        return pieces

    async def _rate_limited(self, ws: ServerConnection, over: str) -> None:
        self.relay.counters.rate_limited += 1
        self.relay.refusals.refused("rate_limited", f"{self.device_id}: {over}")
        await self._close_for(ws, CloseCode.POLICY_VIOLATION, "rate limit exceeded",
                              ends_session=True)

    async def _protocol_error(self, ws: ServerConnection, conn: Connection,
                              exc: ProtocolError) -> None:
        self.relay.counters.protocol_errors += 1
        logger.info("%s: protocol error, closing: %s", self.device_id, exc)
        self._end(str(exc))
        await self._transmit(ws, conn, Error(code="protocol_error", message=str(exc)[:200]))
        await self._close_for(ws, exc.close_code, str(exc), ends_session=True)

    async def _receive_until_closed(self, ws: ServerConnection, conn: Connection,
                                    idle: IdleWatch, clock: Clock) -> None:
        while True:
            self._reading = ws
            try:
                data = await ws.recv()
            except ConnectionClosed:
                return
            finally:
                if self._reading is ws:
                    self._reading = None
            if self.owner is not ws or idle.expired:
                return  # a resume moved the session to a newer connection, or it idled
            failure, self._uplink_failure = self._uplink_failure, None
            if isinstance(failure, str):  # a frame taken early was over a budget
                await self._rate_limited(ws, failure)
                return
            if failure is not None:  # ... or malformed
                await self._protocol_error(ws, conn, failure)
                return
            if self._uplink_sending is not None:  # keep the order of what follows
                sending, self._uplink_sending = self._uplink_sending, None
                await sending
            idle.heard()
            now = clock.now()
            over = self.meter.over(now)
            if over is not None:
                self.relay.counters.rate_limited += 1
                self.relay.refusals.refused("rate_limited", f"{self.device_id}: {over}")
                await self._close_for(ws, CloseCode.POLICY_VIOLATION, "rate limit exceeded",
                                      ends_session=True)
                return
            try:
                if isinstance(data, str):
                    message = conn.receive_text(data)
                    over = self.meter.ping_over(now) if isinstance(message, Ping) else None
                    if over is not None:
                        self.relay.counters.rate_limited += 1
                        self.relay.refusals.refused("rate_limited", f"{self.device_id}: {over}")
                        await self._close_for(ws, CloseCode.POLICY_VIOLATION,
                                              "ping rate exceeded", ends_session=True)
                        return
                    await self._on_message(ws, conn, message)
                else:
                    pieces = self._uplink_frame(conn, data, now)
                    if isinstance(pieces, str):
                        await self._rate_limited(ws, pieces)
                        return
                    for pcm in pieces:
                        await self.upstream.send_audio(pcm)
            except ProtocolError as exc:
                await self._protocol_error(ws, conn, exc)
                return

    async def _on_message(self, ws: ServerConnection, conn: Connection,
                          message: Message) -> None:
        if isinstance(message, Ping):
            now_ms = int(self.relay.clock.now() * 1000)
            await self._send_bytes(ws, conn.send(Pong(message.id, message.sent_ms, now_ms)))
        elif isinstance(message, TurnStart):
            refusal = self.relay.admit_turn(self)
            if refusal is not None:
                # At capacity: refuse this turn rather than slow every admitted one
                # down; its audio is dropped until its turn_end.
                self._refused_turn = message.turn_id
                self.relay.counters.turns_refused += 1
                await self._send_soon(Error(
                    TURN_REFUSED_CODE, REFUSAL_TEXT[refusal], True))
                return
            self._refused_turn = None
            self.turn_id = self.answer_turn_id = message.turn_id
            await self.upstream.start_turn()
        elif isinstance(message, TurnEnd):
            if message.turn_id == self._refused_turn:
                self._refused_turn = None
            elif message.turn_id == self.turn_id:
                self.turn_id = None
                self.decoder.release()  # the uplink is quiet until the next turn
                self.replying = True
                self._turn_ended_at = self.relay.clock.now()
                await self.upstream.end_turn()
        elif isinstance(message, Interrupt):
            self._drop_downlink()
            await self.upstream.interrupt()
            self._reply_over()
        elif isinstance(message, Stats):
            self.relay.fleet.stats_received(self.device_id, message.values, at=time.time())
        elif isinstance(message, Error):
            logger.warning("%s reports %s: %s", self.device_id, message.code, message.message)
        elif isinstance(message, DeviceResult):
            self.relay.device_calls.resolve(self.device_id, message)

    # ---------------------------------------------------------------- downlink

    def _reply_over(self) -> None:
        self.replying = False
        # Idle until the next turn: give the reply encoder's libopus state back (a relay
        # holding thousands of quiet devices keeps none). The next reply starts afresh,
        # as the device's decoder does at each response_start.
        if not len(self.downlink):
            self.encoder.release()
        self.relay.session_quiet()

    def _drop_downlink(self) -> None:
        self._blocked_since = None
        dropped = self.downlink.clear()
        self.fifo.clear()
        self.relay.counters.frames_dropped += dropped

    def _queue_audio(self, pcm: bytes) -> None:
        fifo = self.fifo
        frames: Iterable[bytes]
        if not len(fifo) and not len(pcm) % DOWNLINK_FRAME_BYTES and type(pcm) is bytes:
            # whole frames and nothing held (an upstream that speaks in 20 ms frames, as
            # the bench's does): the same frames the FIFO would cut, without its copies
            # into and out of an array
            frames = ([pcm] if len(pcm) == DOWNLINK_FRAME_BYTES else
                      [pcm[i:i + DOWNLINK_FRAME_BYTES]
                       for i in range(0, len(pcm), DOWNLINK_FRAME_BYTES)])
        else:
            fifo.push(pcm)
            frames = iter(fifo.pop, None)
        for frame in frames:
            flags = AudioFlags.START if self._response_first else AudioFlags.NONE
            self._response_first = False
            if not self._downlink_put((frame, flags)):
                self.relay.counters.frames_dropped += 1

    @property
    def software(self) -> str:
        """What the device's hello says it runs (``edgevoice/…`` for the daemon)."""
        hello = self.conn.hello if self.conn is not None else None
        return hello.software if hello is not None else ""

    async def send_control(self, message: Message) -> None:
        """Send a control message to the device (a device call), as _send_soon does."""
        await self._send_soon(message)

    async def play_announcement(self, pcm24k: bytes) -> None:
        """Send ``pcm24k`` as a reply of no turn (relay/announce.py waits until quiet)."""
        self.replying = True
        self._response_first = True
        self._downlink_put(ResponseStart(None))
        if pcm24k:
            self._queue_audio(pcm24k)
            for tail in self.fifo.flush():
                self._downlink_put((tail, AudioFlags.END))
        self._downlink_put(ResponseEnd(None, "announcement"))

    async def _send_soon(self, message: Message) -> None:
        """Send a message ahead of the queued reply audio, or hold it while detached."""
        ws, conn = self.ws, self.conn
        if ws is None or conn is None or not self._attached.is_set():
            self._held_messages = owned(self._held_messages)
            self._held_messages.append(message)
            if len(self._held_messages) > MAX_HELD_MESSAGES:
                self._held_messages.popleft()
            return
        await self._transmit(ws, conn, message)

    async def _transmit(self, ws: ServerConnection, conn: Connection,
                        message: Message) -> None:
        """Send one control message on ``ws``, journaling it if it is reliable."""
        await self._send_bytes(ws, self._framed(conn, message, self.relay.clock.now()))

    def _framed(self, conn: Connection, message: Message, now: float) -> str:
        """``message`` as the connection sends it, journaled if it is reliable (a resume
        then re-sends it)."""
        text = conn.send(message)
        if type(message) in RELIABLE[Role.RELAY]:
            self.journal.record_message(conn.messages_sent, message, now)
        return text

    async def _send_bytes(self, ws: ServerConnection, data: str | bytes) -> None:
        """Send, bounded in time: a device that does not read is disconnected."""
        if ws.protocol.state is State.OPEN and not ws.paused:
            _write_now(ws, data)  # room in the send buffer: nothing to wait for
            return
        timeout = self.relay.limits.send_timeout_ms / 1000
        try:
            await asyncio.wait_for(ws.send(data), timeout)
        except TimeoutError:
            self.relay.counters.slow_readers += 1
            self.relay.refusals.refused(
                "slow_reader", f"{self.device_id}: not reading for {timeout:.1f} s")
            # A dead route looks the same as a slow reader: hold the session, in
            # case the device comes back and resumes (4004 is a drop, §7.2).
            with contextlib.suppress(Exception):
                await self._close_for(ws, CloseCode.SLOW_READER, "device is not reading",
                                      ends_session=False)
        except ConnectionClosed:
            pass  # journaled: a resume re-sends it

    async def _pump_upstream(self) -> None:
        counters = self.relay.counters
        handled = 0
        async for event in self.upstream.events():
            if isinstance(event, AudioOutput):
                if self._turn_ended_at is not None:
                    latency = self.relay.clock.now() - self._turn_ended_at
                    counters.upstream_latency_count += 1
                    counters.upstream_latency_sum_s += latency
                    self._turn_ended_at = None
                self._queue_audio(event.pcm)
            elif isinstance(event, ResponseStarted):
                self._response_first = True
                self.replying = True
                self._downlink_put(ResponseStart(self.answer_turn_id))
            elif isinstance(event, ResponseEnded):
                for tail in self.fifo.flush():
                    self._downlink_put((tail, AudioFlags.END))
                self._downlink_put(ResponseEnd(self.answer_turn_id, event.reason))
            elif isinstance(event, ResponseInterrupted):
                self._drop_downlink()
                await self._send_soon(Interrupt(self.answer_turn_id, "barge_in"))
                await self._send_soon(ResponseEnd(self.answer_turn_id, "interrupted"))
                self._reply_over()
            elif isinstance(event, TranscriptReceived):
                logger.debug("%s %s: %s", self.device_id, event.role, event.text)
                await self._send_soon(Transcript(event.role, event.text, event.final,
                                                 self.answer_turn_id))
            elif isinstance(event, UpstreamFailed):
                counters.upstream_errors[event.code] = (
                    counters.upstream_errors.get(event.code, 0) + 1)
                logger.warning("%s: upstream failed (%s): %s", self.device_id, event.code,
                               event.message)
                # after what is queued of a cut reply and its response_end, not before
                self._downlink_put(Error(event.code, event.message, event.retryable))
                self._reply_over()
            elif isinstance(event, UsageReported):
                # the upstream reports session totals; the fleet view adds deltas
                before = self._usage
                self._usage = (event.input_tokens, event.output_tokens)
                audio_before, self._upstream_audio_s = self._upstream_audio_s, event.audio_input_s
                self.relay.fleet.tokens_used(
                    self.device_id, input_tokens=max(0, event.input_tokens - before[0]),
                    output_tokens=max(0, event.output_tokens - before[1]),
                    upstream_audio_s=max(0.0, event.audio_input_s - audio_before))
            elif isinstance(event, ToolCalled):
                counters.tool_calls += 1
            # One session's burst of events must not starve others, but a yield after
            # every event was a second task step per reply frame (bench row 14).
            handled += 1
            if handled >= EVENTS_PER_YIELD:
                handled = 0
                await asyncio.sleep(0)

    def _kick_downlink(self) -> None:
        """Send what is due now; leave the rest to the shared tick."""
        if self.pump_downlink(self.relay.clock.now()):
            self.relay.tick.want(self)

    def pump_downlink(self, now: float) -> bool:
        """Send the queued messages and the reply frames due at ``now``, in order.

        Reply frames leave at real time, up to ``PACING_LEAD_FRAMES`` ahead of it.
        Everything is written without waiting: a connection whose send buffer is full
        keeps its items queued (and is dropped as a slow reader after
        ``limits.send_timeout_ms``), so it never holds up another session's reply.
        True while something waits for a later tick; False when the queue is empty or
        there is no connection to send on (attaching one pumps again).
        """
        if self._finished or self._pumping:
            return False
        ws, conn = self.ws, self.conn
        if ws is None or conn is None or not self._attached.is_set():
            return False
        queue = self.downlink
        if not len(queue):
            return False
        if ws.protocol.state is not State.OPEN:
            return False  # closing: what is queued stays for a resume
        self._pumping = True
        try:
            while len(queue):
                if not self._writable(ws, now):
                    return True
                item = queue.peek()
                if isinstance(item, Message):
                    queue.get_nowait()
                    if isinstance(item, ResponseEnd):
                        self._t0 = None
                    _write_now(ws, self._framed(conn, item, now))
                    if isinstance(item, ResponseEnd) and not len(queue):
                        self._reply_over()
                    continue
                t0 = self._t0
                if t0 is None or now - (t0 + self._sent * 0.02) > 0.2:
                    t0, self._t0, self._sent = now, now, 0  # a reply starts, or fell far behind
                if t0 + (self._sent - PACING_LEAD_FRAMES) * 0.02 > now:
                    return True  # not due yet
                queue.get_nowait()
                pcm, flags = item
                frame, data = conn.send_audio(self.encoder.encode(pcm), self._sent * 20, flags)
                # journal first: if the link dies during the send, a resume re-sends it
                self.journal.record_frame(frame, now)
                self._sent += 1
                self.relay.counters.frames_out += 1
                _write_now(ws, data)
            return False
        finally:
            self._pumping = False

    def _writable(self, ws: ServerConnection, now: float) -> bool:
        """Whether ``ws`` takes a message now; a device that has not read for
        ``send_timeout_ms`` is closed (slow reader, the session held: a dead route looks the
        same as a slow reader)."""
        if not ws.paused:
            self._blocked_since = None
            return True
        timeout = self.relay.limits.send_timeout_ms / 1000
        if self._blocked_since is None:
            self._blocked_since = now
        elif now - self._blocked_since > timeout:
            self._blocked_since = None
            self.relay.counters.slow_readers += 1
            self.relay.refusals.refused(
                "slow_reader", f"{self.device_id}: not reading for {timeout:.1f} s")
            self.relay.close_in_background(ws, CloseCode.SLOW_READER, "device is not reading")
        return False


class _Suspended:
    """A coroutine already run up to its first suspension (where it yielded
    ``pending``), awaitable from a task as if the task had started it."""

    __slots__ = ("_coro", "_pending")

    def __init__(self, coro: Coroutine[Any, Any, None], pending: Any) -> None:
        self._coro = coro
        self._pending = pending

    def __await__(self) -> Generator[Any, Any, None]:
        coro, value = self._coro, self._pending
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # a cancellation, passed on as a task would
                try:
                    value = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    value = coro.send(sent)
                except StopIteration:
                    return


async def _finish_upstream_sends(sending: _Suspended, upstream: UpstreamSession,
                                 rest: list[bytes]) -> None:
    await sending
    for pcm in rest:
        await upstream.send_audio(pcm)


def _forget_handshake(ws: ServerConnection) -> None:
    """Let go of the upgrade's request and response headers once they are checked.

    websockets keeps both for the life of the connection: about 4 KiB of each idle
    device's 26 (tracemalloc, bench row 13), the device's bearer token among them. The
    request object stays (websockets tells the handshake from later frames by it, and its
    parser still refers to it): its headers are emptied in place.
    """
    if ws.request is not None:
        ws.request.headers.clear()
    ws.response = None


def _write_now(ws: ServerConnection, data: str | bytes) -> None:
    """Write one message on an open connection whose send buffer has room, without a
    coroutine: what ``ws.send`` does on its fast path (no fragmented send is ever in
    progress on a relay connection), minus its async context manager and wait. Per reply
    frame per session this was a tenth of the relay's CPU (py-spy, 100 sessions)."""
    protocol = ws.protocol
    try:
        if (protocol.state is State.OPEN and not protocol.expect_continuation_frame
                and not protocol.writes and not protocol.extensions and not protocol.debug):
            # what send_text/send_binary then send_data write, framed here directly: a
            # frame object, its checks and an output buffer per message were most of an
            # idle device's pong (bench row 13) and of each reply frame
            ws.transport.write(unmasked_frame(FIN_TEXT, data.encode()) if isinstance(data, str)
                               else unmasked_frame(FIN_BINARY, data))
            return
        if isinstance(data, str):
            protocol.send_text(data.encode())
        else:
            protocol.send_binary(data)
        ws.send_data()
    except Exception:  # as ws.send does: a failed write ends the connection
        logger.debug("write failed on %s; closing it", ws.id, exc_info=True)
        ws.transport.abort()


class IdleWatch:
    """Calls ``on_idle`` once nothing was heard for ``idle_s`` seconds.

    One timer per connection, re-armed only when it fires early (for what is left
    since the last message), instead of a timeout armed and cancelled around every
    receive: a connection costs about one wake-up per ``idle_s`` whatever it sends.
    """

    __slots__ = ("_handle", "_heard_at", "_idle_s", "_loop", "_on_idle", "expired")

    def __init__(self, loop: asyncio.AbstractEventLoop, idle_s: float,
                 on_idle: Callable[[], None]) -> None:
        self._loop = loop
        self._idle_s = idle_s
        self._on_idle = on_idle
        self._heard_at = loop.time()
        self.expired = False
        self._handle: asyncio.TimerHandle | None = loop.call_at(self._heard_at + idle_s,
                                                                self._check)

    def heard(self) -> None:
        self._heard_at = self._loop.time()

    def _check(self) -> None:
        due = self._heard_at + self._idle_s
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        self._handle = None
        self.expired = True
        self._on_idle()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


#: Where websockets' frame parser waits while it is between two frames with nothing
#: buffered (Protocol.parse asks ``reader.at_eof()`` before each frame); elsewhere it is
#: inside a frame whose header it has read, and only it may take what follows.
_BETWEEN_FRAMES = StreamReader.at_eof.__code__


def _between_frames(parser: Generator[None]) -> bool:
    """Whether websockets' parser waits for the next frame with nothing of it read.

    The server's parser runs the handshake's, which goes on in Protocol.parse, which
    asks ``at_eof()`` before each frame: the innermost generator it waits in says where
    it is. Anything else (a websockets that parses otherwise) is "no": the cheap path is
    then never taken, and websockets parses everything."""
    inner: object = parser
    for _ in range(4):
        waiting = getattr(inner, "gi_yieldfrom", None)
        if waiting is None:
            break
        inner = waiting
    return getattr(inner, "gi_code", None) is _BETWEEN_FRAMES


class GuardedConnection(ServerConnection):
    """A device connection that enforces the relay's limits below the protocol.

    Before the handshake it is *pending* (capped by the relay; the oldest is dropped
    first). Throughout, WebSocket ping frames are metered, and a peer that lets the
    send buffer grow past ``max_write_buffer_bytes`` (it writes, e.g. pings, but does
    not read the answers) is dropped. The device id the token named is kept here,
    on the connection, so nothing outlives a failed upgrade.
    """

    relay: ClassVar[RelayServer]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.device_id: str | None = None
        #: takes a whole text message where it was parsed (True) or leaves it to the
        #: receive task (False); set while a session serves this connection
        self.on_text: Callable[[bytes | bytearray | memoryview], bool] | None = None
        #: the same for a whole binary message (uplink audio)
        self.on_binary: Callable[[bytes | bytearray | memoryview], bool] | None = None
        self._ping_budget = TokenBucket(self.relay.limits.max_pings_per_s,
                                        max(PING_BURST, self.relay.limits.max_pings_per_s),
                                        self.relay.clock.now())
        self._dropped = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.relay._connection_opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay._connection_closed(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        taken = self._take_frames(data) if self.on_binary is not None else 0
        if taken < len(data):
            super().data_received(data[taken:] if taken else data)
        if self._dropped:
            return
        limit = self.relay.limits.max_write_buffer_bytes
        if self.transport.get_write_buffer_size() > limit:
            self.relay.counters.slow_readers += 1
            self.drop("slow_reader", f"send buffer over {limit} bytes: the peer is not reading")

    def _take_frames(self, data: bytes) -> int:
        """Hand the whole text and binary frames ``data`` starts with to :attr:`on_text`
        and :attr:`on_binary` without websockets' frame parser (protocol/wsframes.py);
        how many bytes were taken.

        Only where websockets' parser would take them exactly so: the connection open,
        its parser waiting between two frames with nothing buffered, no fragmented
        message under way, no extension, nothing queued for the receive task (order is
        kept). The first frame that is not a plain text or binary frame, or that its
        callback declines (text: anything but a well-formed ping or stats within the
        limits; binary: audio the receive task must see or judge), and all that follows
        it go to websockets as they came, which parses them as before (and offers a
        declined frame to the callback again, which declines it again).
        """
        if not data:
            return 0
        first = data[0]
        if first != FIN_BINARY and first != FIN_TEXT:
            return 0  # a control frame, the rest of a frame: at once
        protocol = self.protocol
        on_text, on_binary = self.on_text, self.on_binary
        if (on_text is None or on_binary is None or self._dropped
                or protocol.state is not State.OPEN
                # websockets' internals, read defensively: a release without one of
                # them (the range allows 14-17) takes websockets' own path every time
                or getattr(protocol, "current_size", 0) is not None or protocol.extensions
                or getattr(protocol, "max_fragment_size", None) is not None
                or getattr(protocol.reader, "buffer", True)
                or getattr(self.recv_messages, "frames", True)
                or not _between_frames(protocol.parser)):
            return 0
        taken = 0
        for end, first, payload in whole_frames(data, protocol.max_message_size):
            if not (on_binary(payload) if first == FIN_BINARY else on_text(payload)):
                break
            taken = end
        return taken

    def process_event(self, event: Any) -> None:
        if isinstance(event, Frame):
            if (event.opcode is Opcode.PING
                    and not self._ping_budget.take(1.0, self.relay.clock.now())):
                self.relay.counters.rate_limited += 1
                self.drop("ping_flood", f"over {self.relay.limits.max_pings_per_s} pings/s")
                return
            # a whole message, nothing queued before it (its order is kept)
            if event.fin and not self.recv_messages.frames:
                if event.opcode is Opcode.BINARY:
                    if self.on_binary is not None and self.on_binary(event.data):
                        return
                elif (event.opcode is Opcode.TEXT and self.on_text is not None
                        and self.on_text(event.data)):
                    return
        super().process_event(event)

    def drop(self, kind: str, detail: str) -> None:
        """Close the TCP connection at once, without a closing handshake (the peer
        is not reading, so there is no point in writing it a close frame)."""
        if self._dropped:
            return
        self._dropped = True
        address = self.remote_address[0] if self.remote_address else "?"
        self.relay.refusals.refused(kind, f"{self.device_id or address}: {detail}")
        self.transport.abort()


class RelayServer:
    """Accepts devices and gives each its own upstream session."""

    def __init__(self, listen: ListenSettings, limits: LimitsSettings, tokens: DeviceTokens,
                 upstream: Upstream, *, max_failures_per_minute: int = 10,
                 max_failures_per_s: int = 50,
                 clock: Clock | None = None,
                 context_factory: Callable[[str, str], DeviceContext] | None = None,
                 downlink_opus: OpusSettings | None = None,
                 browser: BrowserGate | None = None,
                 fleet: FleetTracker | None = None,
                 limiter: FailureLimiter | None = None) -> None:
        self.listen = listen
        #: serves the browser page and admits browsers by ticket (None: off)
        self.browser = browser
        self.downlink_opus = downlink_opus or DOWNLINK_OPUS
        self.limits = limits
        self.tokens = tokens
        self.upstream = upstream
        self.clock = clock or MonotonicClock()
        self.counters = RelayCounters()
        self.refusals = RefusalLog(self.clock.now)
        self.counters.refusals = self.refusals.counts
        #: fleet view and bad-token limiter: this process's, or shared (relay/shared.py)
        self.fleet = fleet or FleetTracker()
        #: relay -> device function calls (timers; relay/devicecalls.py)
        self.device_calls = DeviceCalls(lambda device_id: self.sessions.get(device_id))
        #: every live session, one per device id (attached, attaching or held)
        self.table: SessionTable[DeviceSession] = SessionTable(limits.max_devices)
        self.started_at = time.time()
        self._throttle = GuessThrottle(max_failures_per_minute, max_failures_per_s,
                                       self.clock.now(), per_address=limiter)
        #: connections open now; those not past their hello yet, oldest first
        self._connections: dict[int, GuardedConnection] = {}
        self._pending: dict[int, GuardedConnection] = {}
        self._server: Server | None = None
        self._closing = False
        #: set by drain(): /healthz fails so balancers send new devices elsewhere
        self.draining = False
        self._quiet = asyncio.Event()
        #: paces every session's reply frames on one timer (relay/pacing.py)
        self.tick = SharedTick(self.clock.now)
        #: whether a new turn fits: the count limit and the loop's measured load
        self.admission = TurnAdmission(
            limits.max_active_turns,
            LoadLimits(limits.overload_lag_ms, limits.overload_cpu_pct / 100),
            self.active_turns, ramp_s=limits.turn_ramp_ms / 1000, now=self.clock.now())
        #: the process's heap, collected and frozen when no turn is in progress
        self.heap = HeapKeeper()
        self._background: set[asyncio.Task[None]] = set()
        self._context_factory = context_factory or (
            lambda device_id, session_id: DeviceContext(device_id, session_id))
        self.websockets_log = logging.getLogger(f"{__name__}.websockets")
        self.log_filter = QuietFilter(self.clock.now)
        self.websockets_log.addFilter(self.log_filter)

    @property
    def sessions(self) -> dict[str, DeviceSession]:
        """Sessions a connection carries (or is about to), by device id."""
        return self.table.in_state(SessionState.ATTACHING, SessionState.ATTACHED)

    @property
    def held(self) -> dict[str, DeviceSession]:
        """Sessions whose connection dropped, held for a resume, by device id."""
        return self.table.in_state(SessionState.HELD)

    @property
    def connections_open(self) -> int:
        return len(self._connections)

    @property
    def connections_pending(self) -> int:
        return len(self._pending)

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        assert self._server is not None
        sockets = self._server.sockets
        return int(sockets[0].getsockname()[1])

    def required_fds(self) -> int:
        """File descriptors the configured limits can use: per device its connection
        and an upstream socket, the pending connections, and some to spare."""
        return 2 * self.limits.max_devices + self.limits.max_pending_connections + 64

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.listen.tls_cert_file is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        assert self.listen.tls_key_file is not None
        context.load_cert_chain(self.listen.tls_cert_file, self.listen.tls_key_file)
        return context

    async def start(self) -> None:
        limits = self.limits
        self._closing = False
        if self._after_full_pass not in gc.callbacks:
            gc.callbacks.append(self._after_full_pass)
        connection_class = type("RelayConnection", (GuardedConnection,), {"relay": self})
        self._server = await serve(
            self._handle,
            self.listen.host,
            self.listen.port,
            ssl=self._ssl_context(),
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            process_request=self._process_request,
            compression=None,
            open_timeout=limits.handshake_timeout_ms / 1000,
            ping_interval=limits.ping_interval_ms / 1000 or None,
            ping_timeout=limits.ping_timeout_ms / 1000,
            close_timeout=2,
            max_size=MAX_TEXT_BYTES,
            # memory per connection: at most 16 whole messages of 16 KiB queued
            max_queue=16,
            server_header=f"edgevoice-relay/{__version__}",
            create_connection=connection_class,
            logger=self.websockets_log,
        )
        logger.info("relay listening on %s:%d (upstream: %s)", self.listen.host, self.port,
                    self.upstream.name)

    async def close(self) -> None:
        """Stop accepting; tell every device we are going away; close every session.

        Sessions do not survive a relay restart: devices come back (1001 says so)
        and start new ones. Bounded by ``shutdown_timeout_ms`` whatever the clients
        or the upstream do: then what is left is dropped.
        """
        server = self._server
        self.admission.close()
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._after_full_pass)
        if server is None:
            return
        self._closing = True
        timeout_s = self.limits.shutdown_timeout_ms / 1000
        self.tick.close()
        server.close(close_connections=True, code=CloseCode.GOING_AWAY,
                     reason="relay shutting down")
        try:
            async with asyncio.timeout(timeout_s):
                await server.wait_closed()
                for session in list(self.table):
                    await self.forget(session)
                for task in list(self._background):
                    with contextlib.suppress(Exception):
                        await task
        except TimeoutError:
            logger.warning("shutdown: gave up waiting after %.1f s; dropping %d connections "
                           "and %d sessions", timeout_s, len(self._connections), len(self.table))
            for connection in list(self._connections.values()):
                connection.transport.abort()
            leftovers: list[asyncio.Task[Any]] = [*self._background]
            for session in list(self.table):
                self.table.remove(session)
                leftovers.append(asyncio.create_task(session.close()))
            for task in leftovers:
                task.cancel()
            await asyncio.wait([*leftovers, asyncio.ensure_future(server.wait_closed())],
                               timeout=1.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.upstream.aclose(), timeout_s)
        self._server = None

    def session_quiet(self) -> None:
        """A session finished a reply: a drain may close it now."""
        self._quiet.set()

    def admit_turn(self, session: DeviceSession) -> Refusal | None:
        """None when ``session`` may start a turn now; else why not (relay/admission.py):
        ``max_active_turns`` other sessions are in a turn or a reply, or the event
        loop is overloaded. Beyond capacity every reply would stutter; refusing the
        newcomer (retryable) keeps the admitted ones whole."""
        active = (self.busy_count(self.limits.max_active_turns, excluding=session)
                  if self.admission.counts_active else 0)
        return self.admission.decide(active, self.clock.now())

    def active_turns(self) -> int:
        """Sessions in a turn or a reply, counted up to ``max_active_turns`` (all of
        them when it is 0): what admission needs to know once a second."""
        return self.busy_count(self.limits.max_active_turns)

    def busy_count(self, limit: int = 0, *, excluding: DeviceSession | None = None) -> int:
        """How many sessions (but ``excluding``) are in a turn or a reply; counting
        stops at ``limit`` when it is > 0 (all admission needs to know)."""
        count = 0
        for session in self.sessions.values():
            if session.busy and session is not excluding:
                count += 1
                if count == limit:
                    break
        return count

    def any_busy(self) -> bool:
        """Whether any session is in a turn or a reply."""
        return self.busy_count(1) > 0

    def _after_full_pass(self, phase: str, info: dict[str, int]) -> None:
        # through the relay, not the keeper itself: a test may swap the keeper
        self.heap.after_full_pass(phase, info)

    def keep_heap(self) -> HeapPass | None:
        """Called every few seconds by the process's main loop: a collection, if one
        is due (relay/loop.py), where no reply waits for it. What it did."""
        return self.heap.check(quiet=not self.any_busy())

    async def drain(self, timeout_s: float) -> tuple[int, int]:
        """Stop accepting; close each device with 4004 once its turn and reply are done.

        Devices still busy after ``timeout_s`` are closed with 4004 all the same.
        Sessions held for a resume are dropped (their device reconnects elsewhere).
        Returns (devices closed idle, devices closed busy). :meth:`close` follows.
        """
        if self._server is None:
            return 0, 0
        self.draining = True
        self._server.close(close_connections=False)  # stop listening, keep connections
        for session in list(self.held.values()):
            await self.forget(session)
        deadline = self.clock.now() + timeout_s
        logger.info("draining: %d devices, %d busy; waiting up to %.1f s for their replies",
                    len(self.sessions), self.busy_count(), timeout_s)
        closing: list[asyncio.Task[None]] = []
        sent: set[DeviceSession] = set()
        while True:
            self._quiet.clear()
            for session in list(self.sessions.values()):
                if session not in sent and not session.busy:
                    self.counters.drained_idle += 1
                    sent.add(session)
                    closing.append(self._send_elsewhere(session, idle=True))
            busy = [s for s in self.sessions.values() if s not in sent]
            left = deadline - self.clock.now()
            if not busy or left <= 0:
                break
            # a reply ending sets _quiet; look again now and then for a turn that just ended
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._quiet.wait(), min(left, 0.25))
        if busy:
            logger.warning("draining: %d devices still busy after %.1f s; closing them",
                           len(busy), timeout_s)
        for session in busy:
            self.counters.drained_busy += 1
            closing.append(self._send_elsewhere(session, idle=False))
        if closing:  # each connection's handler then ends its session
            await asyncio.wait(closing, timeout=3.0)
        return self.counters.drained_idle, self.counters.drained_busy

    def _send_elsewhere(self, session: DeviceSession, *, idle: bool) -> asyncio.Task[None]:
        """Close the session's connection with 4004; its handler then ends the session.

        An idle device is told what was received of it: a turn it began meanwhile is
        not lost but re-sent on its next session (docs/protocol.md §5).
        """
        ws, conn = session.owner, session.conn
        session._end("relay draining")
        if ws is None:
            return asyncio.create_task(self.forget(session))
        reason = handover_reason(conn.last_received_seq, conn.messages_received) \
            if idle and conn is not None else "relay draining: reconnect now"
        return asyncio.create_task(ws.close(CloseCode.RECONNECT_NOW, reason))

    async def forget(self, session: DeviceSession) -> None:
        """End a session: free its device's slot, close its connection and upstream."""
        self.table.remove(session)
        owner, session.owner = session.owner, None
        ws = session.detach()
        for connection in {id(c): c for c in (ws, owner) if c is not None}.values():
            self.close_in_background(connection, CloseCode.SESSION_REPLACED, "session replaced")
        await session.close()

    def _forget_in_background(self, session: DeviceSession) -> None:
        task = asyncio.create_task(self.forget(session), name=f"forget:{session.device_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def close_in_background(self, ws: ServerConnection, code: int, reason: str) -> None:
        """Close a connection without waiting for its (maybe unreachable) peer; callable
        from a callback (a timer)."""
        task = asyncio.create_task(ws.close(code, reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --------------------------------------------------------- connections

    def _connection_opened(self, connection: GuardedConnection) -> None:
        """A TCP connection arrived: pending until its hello; the oldest pending one
        goes when there are too many (a slow-loris holds the oldest)."""
        self._connections[id(connection)] = connection
        self._pending[id(connection)] = connection
        while len(self._pending) > self.limits.max_pending_connections:
            _, oldest = next(iter(self._pending.items()))
            del self._pending[id(oldest)]
            oldest.drop("pending_evicted", f"over {self.limits.max_pending_connections} "
                        "connections without a hello; dropped the oldest")

    def _connection_closed(self, connection: GuardedConnection) -> None:
        self._connections.pop(id(connection), None)
        self._pending.pop(id(connection), None)

    # ----------------------------------------------------------- handshake

    def _reject(self, status: http.HTTPStatus, text: str, **headers: str) -> Response:
        response = Response(status.value, status.phrase, Headers(
            {"Content-Type": "text/plain; charset=utf-8", **headers}), f"{text}\n".encode())
        return response

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        address = str(ws.remote_address[0]) if ws.remote_address else "?"
        now = self.clock.now()
        if self._closing:
            return self._reject(http.HTTPStatus.SERVICE_UNAVAILABLE, "relay shutting down",
                                **{"Retry-After": "10"})
        authorizations = request.headers.get_all("Authorization")
        if len(authorizations) > 1:
            self.counters.auth_failures += 1
            self.refusals.refused("bad_handshake",
                                  f"{address}: {len(authorizations)} Authorization headers")
            return self._reject(http.HTTPStatus.BAD_REQUEST,
                                "send exactly one Authorization header")
        # browsers (docs/protocol.md §9): the page, or a ticket instead of a token
        browser = self.browser.admit(ws, request) if self.browser is not None else None
        if isinstance(browser, Response):
            return browser
        if isinstance(browser, Admission):
            device_id = browser.device_id
        else:
            scheme, _, token = (authorizations[0] if authorizations else "").partition(" ")
            # A valid token is checked first and never refused for what others at its
            # address did (GuessThrottle says why that is safe).
            device_id = self.tokens.verify(token.strip()) if scheme.lower() == "bearer" \
                else None
        if device_id is None:
            self.counters.auth_failures += 1
            if self._throttle.failed(address, now):
                self.refusals.refused("auth_throttled", f"{address}: too many bad tokens")
                return self._reject(http.HTTPStatus.TOO_MANY_REQUESTS,
                                    "too many bad tokens; try again in a minute",
                                    **{"Retry-After": "60"})
            self.refusals.refused("bad_token", f"{address}: missing or unknown token")
            return self._reject(http.HTTPStatus.UNAUTHORIZED, "unknown or missing device token",
                                **{"WWW-Authenticate": 'Bearer realm="edgevoice"'})
        offered = [p.strip() for h in request.headers.get_all("Sec-WebSocket-Protocol")
                   for p in h.split(",")]
        if SUBPROTOCOL not in offered:
            self.refusals.refused("bad_handshake", f"{address}: no {SUBPROTOCOL} subprotocol")
            return self._reject(http.HTTPStatus.BAD_REQUEST,
                                f"offer the WebSocket subprotocol {SUBPROTOCOL}")
        if not self.table.has_room_for(device_id):
            self.refusals.refused("relay_full", f"{device_id}: {len(self.table)} sessions")
            return self._reject(http.HTTPStatus.SERVICE_UNAVAILABLE, "relay is full",
                                **{"Retry-After": "30"})
        if isinstance(ws, GuardedConnection):
            ws.device_id = device_id
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        device_id = ws.device_id if isinstance(ws, GuardedConnection) else None
        if device_id is None:  # cannot happen: process_request ran first
            await ws.close(CloseCode.POLICY_VIOLATION, "not authenticated")
            return
        _forget_handshake(ws)
        conn = Connection(Role.RELAY)
        try:
            first = await asyncio.wait_for(ws.recv(), self.limits.handshake_timeout_ms / 1000)
        except TimeoutError:
            self.refusals.refused("hello_timeout", f"{device_id}: no hello")
            await ws.close(CloseCode.HELLO_TIMEOUT, "no hello")
            return
        except ConnectionClosed:
            return
        try:
            if self._closing:
                await ws.close(CloseCode.GOING_AWAY, "relay shutting down")
                return
            if isinstance(first, bytes):
                conn.receive_binary(first)  # raises: audio before hello
            hello = conn.receive_text(first)
            if not isinstance(hello, Hello):
                raise RemoteProtocolError("expected hello")
            if hello.device != device_id:
                error = RemoteProtocolError(f"hello names {hello.device!r}, token is {device_id!r}")
                error.close_code = CloseCode.POLICY_VIOLATION
                raise error
            session, result = self._apply_hello(device_id, hello, conn, ws)
        except ProtocolError as exc:
            self.counters.protocol_errors += 1
            self.refusals.refused("bad_hello", f"{device_id}: {exc}")
            await ws.close(exc.close_code, str(exc)[:120])
            return
        self._pending.pop(id(ws), None)
        if not result.resumed and not await self._open_upstream(session, ws):
            return
        address = str(ws.remote_address[0]) if ws.remote_address else None
        keep = False
        try:
            await ws.send(conn.accept(Welcome(
                session_id=session.session_id,
                heartbeat_interval_ms=self.limits.heartbeat_interval_ms, resume=result,
                ticket=self.browser.welcome_ticket(ws) if self.browser is not None else None)))
            logger.info("%s connected from %s (session %s%s)", device_id, address,
                        session.session_id[:8], ", resumed" if result.resumed else "")
            keep = await session.serve(ws, conn, hello.resume if result.resumed else None)
        except ConnectionClosed:
            keep = True
        finally:
            if session.owner is ws:
                await self._connection_ended(session, keep)
            logger.info("%s disconnected (code %s)", device_id, ws.close_code)

    def _apply_hello(self, device_id: str, hello: Hello, conn: Connection,
                     ws: ServerConnection) -> tuple[DeviceSession, ResumeResult]:
        """The session this hello continues, or a new one that replaces any older one.

        Synchronous on purpose: the table is read and written with no await between,
        so back-to-back hellos of one device leave exactly one session.
        """
        current = self.table.get(device_id)
        request = hello.resume
        resumable = (request is not None and current is not None and not current.closed
                     and current.session_id == request.session_id and current.conn is not None
                     and self.limits.resume_window_ms > 0)
        if resumable:
            assert current is not None and request is not None
            # a claim of more than was sent is a protocol error (raises)
            current.journal.after(request.last_downlink_seq, request.downlink_messages)
        outcome = self.table.hello(
            device_id, request.session_id if request else None,
            lambda: DeviceSession(self, device_id, uuid.uuid4().hex), may_resume=resumable)
        session = outcome.session
        if outcome.replaced is not None:
            # counted, and logged once a minute: a device (or a stolen token) sending
            # hellos back to back must not write a line each
            self.refusals.refused("session_replaced",
                                  f"{device_id} started a new session; closed its previous one")
            self._forget_in_background(outcome.replaced)
        if not outcome.resumed:
            session.owner = ws
            self.counters.sessions_total += 1
            return session, ResumeResult(resumed=False)
        older = session.detach()
        if older is None and session.owner is not None and session.owner is not ws:
            older = session.owner  # resumed again while re-sending to the previous one
        if older is not None:  # the old connection has not noticed it is dead yet
            logger.info("%s resumed while its old connection was still open; closing it",
                        device_id)
            self.close_in_background(older, CloseCode.SESSION_REPLACED,
                                      "session resumed elsewhere")
        session.owner = ws
        self.counters.sessions_resumed += 1
        return session, session.continue_on(conn)

    async def _open_upstream(self, session: DeviceSession, ws: ServerConnection) -> bool:
        """Open a new session's upstream; False if it failed or the session was
        replaced by a newer hello meanwhile (then nothing of it is kept)."""
        try:
            upstream = await self.upstream.open_session(
                self._context_factory(session.device_id, session.session_id))
        except Exception as exc:
            self.refusals.refused("upstream_open_failed", f"{session.device_id}: {exc}")
            await self.forget(session)
            with contextlib.suppress(Exception):
                await ws.close(CloseCode.INTERNAL_ERROR, "upstream unavailable")
            return False
        if session.closed:  # a newer hello replaced it while the upstream opened
            await upstream.close()
            return False
        session.start(upstream)
        return True

    async def _connection_ended(self, session: DeviceSession, keep: bool) -> None:
        """The session's connection is gone: hold the session for a resume, or close it."""
        session.detach()
        session.owner = None
        window_s = self.limits.resume_window_ms / 1000
        if self.table.dropped(session, hold=keep and window_s > 0 and not self._closing):
            self.counters.sessions_held += 1
            session.hold(window_s)
            logger.info("%s: link dropped; holding session %s for %.0f s", session.device_id,
                        session.session_id[:8], window_s)
        else:
            await session.close()

