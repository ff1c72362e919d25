"""The device's link to the relay: connect, hello, stream; reconnect forever.

A thin runner around :class:`edgevoice.protocol.connection.Connection`. It owns the
WebSocket, the reconnect loop (capped exponential backoff with full jitter, asking
:func:`edgevoice.errors.is_retryable` what is worth retrying) and the heartbeats
that measure round-trip time. What the relay says is handed to a
:class:`LinkListener`; what the daemon wants to say goes through ``send`` and
``send_audio``, which never block (bounded queue, drops counted).

websockets' own ``async for ws in connect()`` reconnect is not used because the
daemon must report the next retry delay (``STATUS=reconnecting in 4.2 s``) and keep
retrying, slowly, even after a refused token: a forgotten device must heal once the
operator fixes the relay, without anyone logging into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import ssl
import urllib.parse
from dataclasses import dataclass, field
from typing import Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from edgevoice import __version__
from edgevoice.backoff import Backoff, BackoffSettings
from edgevoice.clock import Clock, MonotonicClock
from edgevoice.config.base import require
from edgevoice.errors import (
    AuthenticationError,
    LinkError,
    ProtocolError,
    RemoteProtocolError,
    is_retryable,
)
from edgevoice.health.http import is_loopback
from edgevoice.protocol.connection import AudioReceived, Connection, Role
from edgevoice.protocol.messages import (
    MAX_TEXT_BYTES,
    SUBPROTOCOL,
    AudioFlags,
    CloseCode,
    Error,
    Hello,
    Message,
    Ping,
    Pong,
    Welcome,
)
from edgevoice.queues import DropOldestQueue

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelaySettings:
    """How the device reaches its relay."""

    url: str = "ws://127.0.0.1:8780/"
    """Relay address: wss://host:port/ (TLS, verified) or ws:// on loopback or a trusted LAN."""
    token_file: str | None = None
    """File holding this device's token. Empty: $CREDENTIALS_DIRECTORY/device-token
    (systemd LoadCredential), then /etc/edgevoice/device.token."""
    ca_file: str | None = None
    """Extra CA bundle (PEM) to trust for wss://, e.g. a private CA. Verification stays on."""
    open_timeout_ms: int = 10_000
    """Give up on a connection attempt (TCP + TLS + upgrade + welcome) after this long."""
    ping_interval_ms: int = 20_000
    """WebSocket keepalive interval; keep it equal to the relay's."""
    ping_timeout_ms: int = 20_000
    """Close the link when a keepalive ping is not answered within this."""
    send_queue_frames: int = 500
    """Messages queued towards the relay (500 = 10 s of audio); the oldest are dropped."""
    stats_interval_s: int = 30
    """Push a compact stats message to the relay this often (0 = never)."""
    backoff: BackoffSettings = field(default_factory=BackoffSettings)
    """Reconnect delays."""

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlparse(self.url)
        require(parsed.scheme in ("ws", "wss") and bool(parsed.hostname), "url",
                "must be ws://host:port/ or wss://host:port/")
        require(self.open_timeout_ms >= 100, "open_timeout_ms", "must be >= 100")
        require(self.ping_interval_ms >= 100, "ping_interval_ms", "must be >= 100")
        require(self.ping_timeout_ms >= 100, "ping_timeout_ms", "must be >= 100")
        require(self.send_queue_frames >= 10, "send_queue_frames", "must be >= 10")
        require(self.stats_interval_s >= 0, "stats_interval_s", "must be >= 0")


class LinkState(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    WAITING = "waiting"  # backing off before the next attempt
    STOPPED = "stopped"


class LinkListener(Protocol):
    """What the daemon hears from the link. Called in the event loop."""

    def link_up(self, welcome: Welcome) -> None: ...

    def link_down(self, reason: str, retry_in_s: float | None) -> None: ...

    def on_message(self, message: Message) -> None: ...

    def on_audio(self, received: AudioReceived) -> None: ...


@dataclass
class LinkStats:
    connects: int = 0
    reconnects: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    dropped_offline: int = 0
    rtt_ms: float | None = None
    last_error: str = ""
    #: monotonic time the link last went down (None while up or never up)
    down_since: float | None = None


class DeviceLink:
    """Keeps one WebSocket to the relay open, forever."""

    def __init__(self, settings: RelaySettings, device_id: str, token: str,
                 listener: LinkListener, *, clock: Clock | None = None,
                 rng: random.Random | None = None) -> None:
        self.settings = settings
        self.device_id = device_id
        self._token = token
        self.listener = listener
        self.clock = clock or MonotonicClock()
        self.backoff = Backoff(settings.backoff, rng)
        self.state = LinkState.CONNECTING
        self.stats = LinkStats(down_since=self.clock.now())
        self.next_retry_at: float | None = None
        self._queue: DropOldestQueue[Message | tuple[bytes, int, AudioFlags]] = DropOldestQueue(
            settings.send_queue_frames)
        self._conn: Connection | None = None
        self._ws: ClientConnection | None = None
        self._stopping = False
        self._ping_id = 0
        host = urllib.parse.urlparse(settings.url).hostname or ""
        if settings.url.startswith("ws://") and not is_loopback(host):
            logger.warning("relay url %s is not encrypted: use wss:// unless a trusted proxy "
                           "or network protects it", settings.url)

    @property
    def connected(self) -> bool:
        return self.state is LinkState.CONNECTED

    @property
    def dropped(self) -> int:
        return self._queue.dropped + self.stats.dropped_offline

    # --------------------------------------------------------------- sending

    def send(self, message: Message) -> bool:
        """Queue a control message; False (and counted) when the link is down."""
        if not self.connected:
            self.stats.dropped_offline += 1
            return False
        self._queue.put_nowait(message)
        return True

    def send_audio(self, packet: bytes, timestamp_ms: int,
                   flags: AudioFlags = AudioFlags.NONE) -> bool:
        """Queue one uplink Opus packet; False (and counted) when the link is down."""
        if not self.connected:
            self.stats.dropped_offline += 1
            return False
        self._queue.put_nowait((packet, timestamp_ms, flags))
        return True

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        """Connect and reconnect until :meth:`stop`."""
        while not self._stopping:
            self.state = LinkState.CONNECTING
            try:
                await self._session()
                reason = "relay closed the link"
                if self._ws is not None and self._ws.close_code is not None:
                    reason = f"relay closed the link ({self._ws.close_code} " \
                             f"{self._ws.close_reason or ''})".rstrip(" )") + ")"
                retryable = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = self._describe(exc)
                retryable = is_retryable(exc)
                self.stats.last_error = reason
            finally:
                self._mark_down()
            if self._stopping:
                break
            if retryable:
                delay = self.backoff.next_delay()
            else:  # keep trying slowly: the operator may fix it on the relay side
                delay = self.backoff.settings.max_ms / 1000
                logger.error("relay refused this device: %s; retrying every %.0f s", reason,
                             delay)
            self.state = LinkState.WAITING
            self.next_retry_at = self.clock.now() + delay
            logger.info("link down: %s; reconnecting in %.1f s", reason, delay)
            self.listener.link_down(reason, delay)
            await self.clock.sleep(delay)
            self.stats.reconnects += 1
        self.state = LinkState.STOPPED

    async def stop(self) -> None:
        """Close the link with going-away and end :meth:`run`."""
        self._stopping = True
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close(CloseCode.GOING_AWAY, "device shutting down")

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, InvalidStatus):
            status = exc.response.status_code
            if status == 401:
                return "token rejected (HTTP 401): check the device token and the relay's list"
            if status == 429:
                return "relay is rate-limiting this address (HTTP 429)"
            return f"relay answered HTTP {status}"
        if isinstance(exc, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted: {exc.verify_message}"
        if isinstance(exc, ConnectionRefusedError):
            return "relay unreachable: connection refused"
        if isinstance(exc, TimeoutError):
            return "relay unreachable: timed out"
        if isinstance(exc, OSError):
            return f"relay unreachable: {exc.strerror or exc}"
        return str(exc) or type(exc).__name__

    def _mark_down(self) -> None:
        was_up = self._conn is not None and self.state is LinkState.CONNECTED
        self._conn = None
        self._ws = None
        self._queue.clear()
        if was_up or self.stats.down_since is None:
            self.stats.down_since = self.clock.now()

    def _ssl(self) -> ssl.SSLContext | None:
        if not self.settings.url.startswith("wss://"):
            return None
        context = ssl.create_default_context()  # verification on, hostname checked
        if self.settings.ca_file:
            context.load_verify_locations(self.settings.ca_file)
        return context

    async def _session(self) -> None:
        s = self.settings
        try:
            ws = await connect(
                s.url,
                additional_headers={"Authorization": f"Bearer {self._token}"},
                subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                compression=None,
                open_timeout=s.open_timeout_ms / 1000,
                ping_interval=s.ping_interval_ms / 1000,
                ping_timeout=s.ping_timeout_ms / 1000,
                close_timeout=2,
                max_size=MAX_TEXT_BYTES,
                ssl=self._ssl(),
                proxy=None,
                user_agent_header=f"edgevoice/{__version__}",
            )
        except InvalidStatus as exc:
            if exc.response.status_code == 401:
                raise AuthenticationError(self._describe(exc)) from exc
            raise
        self._ws = ws
        async with ws:
            conn = Connection(Role.DEVICE)
            await ws.send(conn.start(Hello(device=self.device_id,
                                           software=f"edgevoice/{__version__}")))
            try:
                first = await asyncio.wait_for(ws.recv(), s.open_timeout_ms / 1000)
            except TimeoutError:
                raise LinkError("relay did not answer hello") from None
            if isinstance(first, bytes):
                conn.receive_binary(first)
            message = conn.receive_text(first)
            if isinstance(message, Error):
                raise LinkError(f"relay refused the session: {message.message}")
            assert isinstance(message, Welcome)
            self._conn = conn
            self.state = LinkState.CONNECTED
            self.stats.connects += 1
            self.stats.down_since = None
            self.next_retry_at = None
            self.backoff.reset()
            self._queue.clear()
            logger.info("connected to %s (session %s)", s.url, message.session_id[:8])
            self.listener.link_up(message)
            tasks = [asyncio.create_task(self._sender(ws, conn)),
                     asyncio.create_task(self._heartbeat(ws, conn, message))]
            try:
                await self._receiver(ws, conn)
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                        await task

    async def _receiver(self, ws: ClientConnection, conn: Connection) -> None:
        try:
            async for data in ws:
                if isinstance(data, str):
                    message = conn.receive_text(data)
                    if isinstance(message, Pong):
                        self.stats.rtt_ms = self.clock.now() * 1000 - message.ping_sent_ms
                    elif isinstance(message, Ping):
                        now_ms = int(self.clock.now() * 1000)
                        self._queue.put_nowait(Pong(message.id, message.sent_ms, now_ms))
                    else:
                        self.listener.on_message(message)
                else:
                    received = conn.receive_binary(data)
                    if received is not None:
                        self.stats.frames_received += 1
                        self.listener.on_audio(received)
        except ProtocolError as exc:
            logger.warning("relay broke the protocol: %s", exc)
            await ws.close(exc.close_code, str(exc)[:120])
            raise RemoteProtocolError(str(exc)) from exc

    async def _sender(self, ws: ClientConnection, conn: Connection) -> None:
        while True:
            item = await self._queue.get()
            if isinstance(item, Message):
                await ws.send(conn.send(item))
            else:
                packet, timestamp_ms, flags = item
                _, data = conn.send_audio(packet, timestamp_ms, flags)
                await ws.send(data)
                self.stats.frames_sent += 1

    async def _heartbeat(self, ws: ClientConnection, conn: Connection, welcome: Welcome) -> None:
        interval = welcome.heartbeat_interval_ms / 1000
        while True:
            self._ping_id += 1
            self._queue.put_nowait(Ping(self._ping_id, int(self.clock.now() * 1000)))
            await self.clock.sleep(interval)
