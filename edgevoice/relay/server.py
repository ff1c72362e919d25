"""The relay: accepts devices over WebSockets and connects each to an upstream.

Thin runner around the sans-I/O protocol core. Per device it decodes the uplink
Opus to 16 kHz PCM for the upstream and re-encodes the upstream's 24 kHz reply to
Opus, paced to the device at real time. A device that misbehaves is closed on its
own; nothing it sends can disturb another device's session.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from edgevoice import __version__
from edgevoice.audio.opus import OpusDecodeError, OpusDecoder, OpusEncoder
from edgevoice.audio.resample import FrameFifo
from edgevoice.clock import Clock, MonotonicClock
from edgevoice.errors import ProtocolError, RemoteProtocolError
from edgevoice.health.relay import FleetTracker
from edgevoice.protocol.connection import Connection, Role
from edgevoice.protocol.messages import (
    MAX_TEXT_BYTES,
    SUBPROTOCOL,
    AudioFlags,
    CloseCode,
    Error,
    Hello,
    Interrupt,
    Message,
    Ping,
    Pong,
    ResponseEnd,
    ResponseStart,
    Stats,
    Transcript,
    TurnEnd,
    TurnStart,
    Welcome,
)
from edgevoice.queues import DropOldestQueue
from edgevoice.relay.auth import FailureLimiter, TokenStore
from edgevoice.relay.settings import LimitsSettings, ListenSettings
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

logger = logging.getLogger(__name__)

DOWNLINK_FRAME_SAMPLES = UPSTREAM_OUTPUT_RATE_HZ // 50  # 480
#: Frames the pacer may send ahead of real time, to ride over network jitter.
PACING_LEAD_FRAMES = 3
#: Missing uplink frames concealed with PLC; a longer gap is not worth inventing.
MAX_CONCEALED_FRAMES = 5


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


class DeviceSession:
    """One connected device: its protocol core, upstream session and downlink pacer."""

    def __init__(self, relay: RelayServer, ws: ServerConnection, conn: Connection,
                 device_id: str, session_id: str, upstream: UpstreamSession) -> None:
        self.relay = relay
        self.ws = ws
        self.conn = conn
        self.device_id = device_id
        self.session_id = session_id
        self.upstream = upstream
        self.decoder = OpusDecoder(16_000)
        self.encoder = OpusEncoder(sample_rate_hz=UPSTREAM_OUTPUT_RATE_HZ, bitrate_bps=32_000)
        self.fifo = FrameFifo(DOWNLINK_FRAME_SAMPLES)
        limits = relay.limits
        self.downlink: DropOldestQueue[Message | tuple[bytes, AudioFlags]] = DropOldestQueue(
            max(50, limits.downlink_queue_ms // 20))
        self.turn_id: int | None = None
        self._response_first = True
        self._turn_ended_at: float | None = None
        self._window_start = 0.0
        self._window_count = 0
        self._usage = (0, 0)

    # ------------------------------------------------------------------ uplink

    async def run(self) -> None:
        tasks = [asyncio.create_task(self._pump_upstream(), name=f"upstream:{self.device_id}"),
                 asyncio.create_task(self._pace_downlink(), name=f"downlink:{self.device_id}")]
        try:
            await self._receive()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self.upstream.close()

    async def _receive(self) -> None:
        limits = self.relay.limits
        idle_s = 3 * limits.heartbeat_interval_ms / 1000
        clock = self.relay.clock
        while True:
            try:
                data = await asyncio.wait_for(self.ws.recv(), idle_s)
            except TimeoutError:
                await self.ws.close(CloseCode.IDLE_TIMEOUT, "no message for three heartbeats")
                return
            except ConnectionClosed:
                return
            now = clock.now()
            if now - self._window_start >= 1.0:
                self._window_start, self._window_count = now, 0
            self._window_count += 1
            if self._window_count > limits.max_messages_per_s:
                self.relay.counters.rate_limited += 1
                logger.warning("%s: over %d messages/s, closing", self.device_id,
                               limits.max_messages_per_s)
                await self.ws.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
                return
            try:
                if isinstance(data, str):
                    await self._on_message(self.conn.receive_text(data))
                else:
                    await self._on_audio(data)
            except ProtocolError as exc:
                self.relay.counters.protocol_errors += 1
                logger.info("%s: protocol error, closing: %s", self.device_id, exc)
                with contextlib.suppress(ConnectionClosed):
                    await self.ws.send(self.conn.send(
                        Error(code="protocol_error", message=str(exc)[:200])))
                await self.ws.close(exc.close_code, str(exc)[:120])
                return

    async def _on_audio(self, data: bytes) -> None:
        received = self.conn.receive_binary(data)
        if received is None:
            return
        counters = self.relay.counters
        counters.frames_in += 1
        if self.turn_id is None:
            raise RemoteProtocolError("uplink audio outside a turn")
        for _ in range(min(received.missing, MAX_CONCEALED_FRAMES)):
            counters.frames_concealed += 1
            await self.upstream.send_audio(self.decoder.conceal())
        try:
            pcm = self.decoder.decode(received.frame.payload)
        except OpusDecodeError as exc:
            raise RemoteProtocolError(f"undecodable Opus packet: {exc}") from None
        await self.upstream.send_audio(pcm)

    async def _on_message(self, message: Message) -> None:
        if isinstance(message, Ping):
            now_ms = int(self.relay.clock.now() * 1000)
            await self.ws.send(self.conn.send(Pong(message.id, message.sent_ms, now_ms)))
        elif isinstance(message, TurnStart):
            self.turn_id = message.turn_id
            await self.upstream.start_turn()
        elif isinstance(message, TurnEnd):
            if message.turn_id == self.turn_id:
                self.turn_id = None
                self._turn_ended_at = self.relay.clock.now()
                await self.upstream.end_turn()
        elif isinstance(message, Interrupt):
            self._drop_downlink()
            await self.upstream.interrupt()
        elif isinstance(message, Stats):
            self.relay.fleet.stats_received(self.device_id, message.values, at=time.time())
        elif isinstance(message, Error):
            logger.warning("%s reports %s: %s", self.device_id, message.code, message.message)

    # ---------------------------------------------------------------- downlink

    def _drop_downlink(self) -> None:
        dropped = self.downlink.clear()
        self.fifo.clear()
        self.relay.counters.frames_dropped += dropped

    def _queue_audio(self, pcm: bytes) -> None:
        self.fifo.push(pcm)
        while (frame := self.fifo.pop()) is not None:
            flags = AudioFlags.START if self._response_first else AudioFlags.NONE
            self._response_first = False
            if self.downlink.put_nowait((self.encoder.encode(frame), flags)) is not None:
                self.relay.counters.frames_dropped += 1

    async def _pump_upstream(self) -> None:
        counters = self.relay.counters
        try:
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
                    self.downlink.put_nowait(ResponseStart(self.turn_id))
                elif isinstance(event, ResponseEnded):
                    for tail in self.fifo.flush():
                        self.downlink.put_nowait((self.encoder.encode(tail), AudioFlags.END))
                    self.downlink.put_nowait(ResponseEnd(self.turn_id, event.reason))
                elif isinstance(event, ResponseInterrupted):
                    self._drop_downlink()
                    await self._send_now(Interrupt(self.turn_id, "barge_in"))
                    await self._send_now(ResponseEnd(self.turn_id, "interrupted"))
                elif isinstance(event, TranscriptReceived):
                    logger.debug("%s %s: %s", self.device_id, event.role, event.text)
                    await self._send_now(Transcript(event.role, event.text, event.final,
                                                    self.turn_id))
                elif isinstance(event, UpstreamFailed):
                    counters.upstream_errors[event.code] = (
                        counters.upstream_errors.get(event.code, 0) + 1)
                    logger.warning("%s: upstream failed (%s): %s", self.device_id, event.code,
                                   event.message)
                    await self._send_now(Error(event.code, event.message, event.retryable))
                elif isinstance(event, UsageReported):
                    # the upstream reports session totals; the fleet view adds deltas
                    before = self._usage
                    self._usage = (event.input_tokens, event.output_tokens)
                    self.relay.fleet.tokens_used(
                        self.device_id, input_tokens=max(0, event.input_tokens - before[0]),
                        output_tokens=max(0, event.output_tokens - before[1]))
                elif isinstance(event, ToolCalled):
                    counters.tool_calls += 1
        except ConnectionClosed:
            pass

    async def _send_now(self, message: Message) -> None:
        await asyncio.wait_for(self.ws.send(self.conn.send(message)),
                               self.relay.limits.send_timeout_ms / 1000)

    async def _pace_downlink(self) -> None:
        clock = self.relay.clock
        send_timeout = self.relay.limits.send_timeout_ms / 1000
        t0: float | None = None
        sent = 0
        try:
            while True:
                item = await self.downlink.get()
                if isinstance(item, Message):
                    if isinstance(item, ResponseEnd):
                        t0 = None
                    await asyncio.wait_for(self.ws.send(self.conn.send(item)), send_timeout)
                    continue
                payload, flags = item
                now = clock.now()
                if t0 is None or now - (t0 + sent * 0.02) > 0.2:
                    t0, sent = now, 0  # start of a reply, or fell far behind: re-anchor
                due = t0 + (sent - PACING_LEAD_FRAMES) * 0.02
                if due > now:
                    await clock.sleep(due - now)
                _, data = self.conn.send_audio(payload, int(sent * 20), flags)
                sent += 1
                await asyncio.wait_for(self.ws.send(data), send_timeout)
                self.relay.counters.frames_out += 1
        except TimeoutError:
            logger.warning("%s: not reading for %.1f s, disconnecting", self.device_id,
                           send_timeout)
            await self.ws.close(CloseCode.POLICY_VIOLATION, "device is not reading")
        except ConnectionClosed:
            pass


class RelayServer:
    """Accepts devices and gives each its own upstream session."""

    def __init__(self, listen: ListenSettings, limits: LimitsSettings, tokens: TokenStore,
                 upstream: Upstream, *, max_failures_per_minute: int = 10,
                 clock: Clock | None = None,
                 context_factory: Callable[[str, str], DeviceContext] | None = None) -> None:
        self.listen = listen
        self.limits = limits
        self.tokens = tokens
        self.upstream = upstream
        self.clock = clock or MonotonicClock()
        self.counters = RelayCounters()
        self.fleet = FleetTracker()
        self.sessions: dict[str, DeviceSession] = {}
        self.started_at = time.time()
        self._limiter = FailureLimiter(max_failures_per_minute)
        self._authenticated: dict[int, str] = {}
        self._server: Server | None = None
        self._context_factory = context_factory or (
            lambda device_id, session_id: DeviceContext(device_id, session_id))

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        assert self._server is not None
        sockets = self._server.sockets
        return int(sockets[0].getsockname()[1])

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.listen.tls_cert_file is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        assert self.listen.tls_key_file is not None
        context.load_cert_chain(self.listen.tls_cert_file, self.listen.tls_key_file)
        return context

    async def start(self) -> None:
        limits = self.limits
        self._server = await serve(
            self._handle,
            self.listen.host,
            self.listen.port,
            ssl=self._ssl_context(),
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            process_request=self._process_request,
            compression=None,
            open_timeout=limits.handshake_timeout_ms / 1000,
            ping_interval=limits.ping_interval_ms / 1000,
            ping_timeout=limits.ping_timeout_ms / 1000,
            close_timeout=2,
            max_size=MAX_TEXT_BYTES,
            max_queue=64,
            server_header=f"edgevoice-relay/{__version__}",
        )
        logger.info("relay listening on %s:%d (upstream: %s)", self.listen.host, self.port,
                    self.upstream.name)

    async def close(self) -> None:
        """Stop accepting; tell every device we are going away; close the upstream."""
        if self._server is None:
            return
        self._server.close(close_connections=False)
        for session in list(self.sessions.values()):
            with contextlib.suppress(Exception):
                await session.ws.close(CloseCode.GOING_AWAY, "relay shutting down")
        await self._server.wait_closed()
        await self.upstream.aclose()
        self._server = None

    # ----------------------------------------------------------- handshake

    def _reject(self, status: http.HTTPStatus, text: str, **headers: str) -> Response:
        response = Response(status.value, status.phrase, Headers(
            {"Content-Type": "text/plain; charset=utf-8", **headers}), f"{text}\n".encode())
        return response

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        address = str(ws.remote_address[0]) if ws.remote_address else "?"
        now = self.clock.now()
        if self._limiter.blocked(address, now):
            return self._reject(http.HTTPStatus.TOO_MANY_REQUESTS,
                                "too many bad tokens; try again in a minute",
                                **{"Retry-After": "60"})
        authorization = request.headers.get("Authorization", "")
        scheme, _, token = authorization.partition(" ")
        device_id = self.tokens.verify(token.strip()) if scheme.lower() == "bearer" else None
        if device_id is None:
            self.counters.auth_failures += 1
            self._limiter.record_failure(address, now)
            logger.info("refused a device from %s: missing or unknown token", address)
            return self._reject(http.HTTPStatus.UNAUTHORIZED, "unknown or missing device token",
                                **{"WWW-Authenticate": 'Bearer realm="edgevoice"'})
        offered = [p.strip() for h in request.headers.get_all("Sec-WebSocket-Protocol")
                   for p in h.split(",")]
        if SUBPROTOCOL not in offered:
            return self._reject(http.HTTPStatus.BAD_REQUEST,
                                f"offer the WebSocket subprotocol {SUBPROTOCOL}")
        if len(self.sessions) >= self.limits.max_devices and device_id not in self.sessions:
            return self._reject(http.HTTPStatus.SERVICE_UNAVAILABLE, "relay is full",
                                **{"Retry-After": "30"})
        self._authenticated[id(ws)] = device_id
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        device_id = self._authenticated.pop(id(ws), None)
        if device_id is None:  # cannot happen: process_request ran first
            await ws.close(CloseCode.POLICY_VIOLATION, "not authenticated")
            return
        conn = Connection(Role.RELAY)
        try:
            first = await asyncio.wait_for(ws.recv(), self.limits.handshake_timeout_ms / 1000)
        except TimeoutError:
            await ws.close(CloseCode.HELLO_TIMEOUT, "no hello")
            return
        except ConnectionClosed:
            return
        try:
            if isinstance(first, bytes):
                conn.receive_binary(first)  # raises: audio before hello
            hello = conn.receive_text(first)
            if not isinstance(hello, Hello):
                raise RemoteProtocolError("expected hello")
            if hello.device != device_id:
                error = RemoteProtocolError(f"hello names {hello.device!r}, token is {device_id!r}")
                error.close_code = CloseCode.POLICY_VIOLATION
                raise error
        except ProtocolError as exc:
            self.counters.protocol_errors += 1
            logger.info("%s: bad handshake: %s", device_id, exc)
            await ws.close(exc.close_code, str(exc)[:120])
            return
        previous = self.sessions.get(device_id)
        if previous is not None:
            logger.info("%s connected again; closing its previous connection", device_id)
            await previous.ws.close(CloseCode.SESSION_REPLACED, "session replaced")
        session_id = uuid.uuid4().hex
        upstream = await self.upstream.open_session(self._context_factory(device_id, session_id))
        session = DeviceSession(self, ws, conn, device_id, session_id, upstream)
        address = str(ws.remote_address[0]) if ws.remote_address else None
        self.fleet.connected(device_id, session_id=session_id, address=address, at=time.time())
        self.sessions[device_id] = session
        self.counters.sessions_total += 1
        try:
            await ws.send(conn.accept(Welcome(
                session_id=session_id, heartbeat_interval_ms=self.limits.heartbeat_interval_ms)))
            logger.info("%s connected from %s (session %s)", device_id, address, session_id[:8])
            await session.run()
        except ConnectionClosed:
            pass
        finally:
            if self.sessions.get(device_id) is session:
                del self.sessions[device_id]
            self.fleet.disconnected(device_id, session_id=session_id, at=time.time())
            logger.info("%s disconnected (code %s)", device_id, ws.close_code)
