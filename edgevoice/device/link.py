"""The device's link to the relay: connect, hello, stream; reconnect forever.

A thin runner around :class:`edgevoice.protocol.connection.Connection`. It owns the
WebSocket, the reconnect loop (capped exponential backoff with full jitter, asking
:func:`edgevoice.errors.is_retryable` what is worth retrying), the heartbeat (round-trip
time, the device's stats riding along, and a relay that went silent found and left:
:mod:`edgevoice.protocol.heartbeat`), and the device's half of session resume
(``docs/protocol.md`` §7). What the relay says is handed to a :class:`LinkListener`;
what the daemon wants to say goes through ``send`` and ``send_audio``, which never
block (bounded queue, drops counted).

Resume: after a drop the session is *suspended* for ``resume.window_ms``. Meanwhile
``send``/``send_audio`` keep queueing (bounded), the listener hears
``link_suspended`` rather than ``link_down``, and reconnect attempts ask the relay
to resume. On a resumed welcome the link re-sends what the relay missed (from the
journal of what it sent) and then what it queued, in order. A relay that no longer
holds the session, or a window that runs out, ends it: the queue is dropped
(counted) and the listener hears ``link_down``.

websockets' own ``async for ws in connect()`` reconnect is not used because the
daemon must report the next retry delay (``STATUS=reconnecting in 4.2 s``) and keep
retrying, slowly, even after a refused token: a forgotten device must heal once the
operator fixes the relay, without anyone logging into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.protocol import State

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
from edgevoice.protocol.connection import RELIABLE, AudioReceived, Connection, Role
from edgevoice.protocol.heartbeat import Beat, Heartbeat, RelaySilent, stats_every
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
    ResumeRequest,
    Stats,
    Welcome,
    parse_handover_reason,
)
from edgevoice.protocol.replay import OutboundQueue, ReplayJournal, SentFrame
from edgevoice.protocol.session import SESSION_ENDING_CLOSES as _SESSION_ENDING_CLOSES
from edgevoice.protocol.session import (
    Closer,
    LinkState,
    ResumeWindow,
    check_link_transition,
    close_ends_session,
    replay_for,
)
from edgevoice.protocol.wsframes import masked_frames

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumeSettings:
    """Session resume after a short drop (docs/protocol.md §7)."""

    window_ms: int = 10_000
    """After the link drops, the session can be resumed for this long, in milliseconds;
    meanwhile what the device says is queued. 0 turns resume off."""
    buffer_ms: int = 10_000
    """Uplink audio kept after it was sent, to re-send what the relay missed, in milliseconds."""
    attempt_timeout_ms: int = 3_000
    """Connection attempts inside the window give up after this long, in milliseconds,
    so one attempt into a dead route cannot use up the whole window."""
    retry_max_ms: int = 1_000
    """Longest wait between attempts inside the window, in milliseconds."""

    def __post_init__(self) -> None:
        require(0 <= self.window_ms <= 300_000, "window_ms", "must be 0..300000")
        require(1_000 <= self.buffer_ms <= 120_000, "buffer_ms", "must be 1000..120000")
        require(self.attempt_timeout_ms >= 100, "attempt_timeout_ms", "must be >= 100")
        require(self.retry_max_ms >= 50, "retry_max_ms", "must be >= 50")


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
    ping_interval_ms: int = 0
    """WebSocket keepalive pings from the device, this often; 0 (the default): none.
    The protocol heartbeat (every ``heartbeat_interval_ms`` the relay names in its
    welcome, 30 s by default) already finds a relay that went away without closing
    and keeps NAT bindings fresh; a keepalive ping is a second relay wake-up per
    device (docs/protocol.md §6). Set it only to find a dead relay sooner."""
    ping_timeout_ms: int = 20_000
    """A relay that sends nothing at all within this after a heartbeat (or a keepalive
    ping, when on) is given up on: the link closes and reconnects, resuming the session."""
    send_queue_frames: int = 500
    """Audio frames waiting to be sent, also while a drop is being resumed (500 = 10 s);
    the oldest are dropped."""
    stats_interval_s: int = 30
    """Send the compact stats to the relay's fleet view at connect and then with the
    first heartbeat at or after this many seconds since the last; they share the
    heartbeat's write (one relay wake-up for both). 0 = never."""
    backoff: BackoffSettings = field(default_factory=BackoffSettings)
    """Reconnect delays."""
    resume: ResumeSettings = field(default_factory=ResumeSettings)
    """Session resume after a short drop."""

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlparse(self.url)
        # "auto": found on the LAN by mDNS before the link starts (discovery/mdns.py)
        require(self.url == "auto" or (parsed.scheme in ("ws", "wss") and bool(parsed.hostname)),
                "url", "must be ws://host:port/, wss://host:port/ or auto")
        require(self.open_timeout_ms >= 100, "open_timeout_ms", "must be >= 100")
        require(self.ping_interval_ms == 0 or self.ping_interval_ms >= 100,
                "ping_interval_ms", "must be 0 (off) or >= 100")
        require(self.ping_timeout_ms >= 100, "ping_timeout_ms", "must be >= 100")
        require(self.send_queue_frames >= 10, "send_queue_frames", "must be >= 10")
        require(self.stats_interval_s >= 0, "stats_interval_s", "must be >= 0")


class LinkListener(Protocol):
    """What the daemon hears from the link. Called in the event loop.

    The order is: ``link_up`` once connected; after a drop either
    ``link_suspended`` (the session may still be resumed) or ``link_down`` (it is
    gone); while suspended, ``link_suspended`` again after each failed attempt, and
    ``link_down`` once the window runs out; then ``link_up`` again.
    """

    def link_up(self, welcome: Welcome) -> None:
        """Connected. ``welcome.resume.resumed`` says whether the earlier session went
        on (everything queued while suspended is being delivered; keep the turn) or a
        new one began (preceded by ``link_down`` when a resume was refused)."""

    def link_down(self, reason: str, retry_in_s: float | None) -> None:
        """Offline, and no session to resume: whatever was queued is dropped; reset the
        turn, tell the user (offline earcon) and say so in STATUS. ``retry_in_s`` is
        the wait before the next attempt (None: an attempt is under way)."""

    def link_suspended(self, reason: str, retry_in_s: float | None,
                       resume_within_s: float) -> None:
        """The connection dropped but the session can be resumed for another
        ``resume_within_s`` seconds: keep the turn going, ``send``/``send_audio``
        queue. A listener that predates resume gets the old behaviour: link_down."""
        self.link_down(reason, retry_in_s)

    def on_message(self, message: Message) -> None: ...

    def on_audio(self, received: AudioReceived) -> None: ...


#: at most this many queued items go out in one write (a pre-roll burst is 20 frames)
SEND_BATCH_ITEMS = 32
#: After a 4004 (the relay drains: a restart, an upgrade), for this long the link retries
#: at least every ``resume.retry_max_ms``, as for a session the relay holds: a relay
#: restarted by systemd is back within seconds, and by then the exponential backoff had
#: grown to a 2 s ceiling (bench row 6: one restart in 20 waited 1.29 s after the relay
#: listened). A fleet still spreads: every delay is drawn across its whole range.
RELAY_BACK_WITHIN_S = 30.0


def _writable_now(ws: ClientConnection) -> bool:
    """Whether a batch may be written straight to the transport: the connection is open,
    no extension rewrites frames, no fragmented message is in progress, nothing else
    waits to be written and the transport takes data without waiting (flow control).
    Read defensively: any surprise in websockets' internals means websockets' own path."""
    try:
        protocol = ws.protocol
        return (protocol.state is State.OPEN and not protocol.extensions
                and not protocol.expect_continuation_frame and not protocol.writes
                and ws.paused is False and not ws.transport.is_closing())
    except AttributeError:  # pragma: no cover - another websockets version
        return False


async def send_together(ws: ClientConnection, messages: list[str | bytes]) -> None:
    """Send ``messages`` (text and binary WebSocket messages, in order) with one write.

    ``ws.send`` writes each message to the transport on its own, and asyncio's TLS
    transport seals every write into its own record, sent at once (TCP_NODELAY): one
    record and one TCP segment per message. Here the messages are framed together (the
    wire is unchanged: the same WebSocket messages) and handed to the transport joined,
    as one record and, when they fit, one segment.

    Most batches (a capture block's frames, issue 15) are framed by
    :func:`~edgevoice.protocol.wsframes.masked_frames`, without websockets' per-frame
    objects and its send context: when the connection is open and the transport is not
    holding data back. Otherwise websockets' protocol frames them and its send context
    waits for the buffer and raises :class:`ConnectionClosed` as ``ws.send`` would.
    """
    if _writable_now(ws):
        ws.transport.write(masked_frames(messages, os.urandom(4 * len(messages))))
        return
    if len(messages) == 1:
        await ws.send(messages[0])
        return
    async with ws.send_context():
        protocol = ws.protocol
        for message in messages:
            if isinstance(message, str):
                protocol.send_text(message.encode())
            else:
                protocol.send_binary(message)
        pending = protocol.data_to_send()
        data = b"".join(pending)
        if data:
            ws.transport.write(data)
        if any(not chunk for chunk in pending):  # end of stream (never after data frames)
            if ws.transport.can_write_eof():
                ws.transport.write_eof()
            else:
                ws.transport.close()
    # leaving send_context writes whatever else is pending and waits for the buffer


@dataclass
class LinkStats:
    connects: int = 0
    reconnects: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    #: writes to the socket: a batch of queued items (a capture block's frames and any
    #: message queued with them) or a heartbeat (its stats and ping) go in one write,
    #: one TLS record, one TCP segment
    writes: int = 0
    #: protocol heartbeats sent (``ping``), and how many of them carried the stats
    heartbeats: int = 0
    stats_sent: int = 0
    #: heartbeats that went without stats because the stats provider raised
    stats_failed: int = 0
    #: connections given up because nothing came back within ping_timeout_ms of a
    #: heartbeat (a relay that went away without closing)
    heartbeat_timeouts: int = 0
    #: said while offline with no session to resume: dropped
    dropped_offline: int = 0
    rtt_ms: float | None = None
    last_error: str = ""
    #: monotonic time the link last went down (None while up or never up)
    down_since: float | None = None
    #: sessions continued after a drop / resumes the relay refused / windows run out
    resumes: int = 0
    resumes_refused: int = 0
    resumes_expired: int = 0
    #: frames queued while suspended, and re-sent from the journal after a resume
    frames_queued_suspended: int = 0
    frames_replayed: int = 0
    messages_replayed: int = 0
    #: queued frames dropped because the session could not be resumed
    dropped_session_lost: int = 0
    #: frames the relay missed that the journal had already forgotten
    replay_gap_frames: int = 0
    #: how long the last resume took, drop to resumed welcome, in seconds
    last_resume_s: float | None = None


@dataclass(frozen=True)
class _Audio:
    """One uplink Opus packet waiting to be sent."""

    payload: bytes
    timestamp_ms: int
    flags: AudioFlags


#: Close codes from the relay after which there is no session to resume (the
#: session core's rule, shared with the relay: docs/protocol.md §7.2).
SESSION_ENDING_CLOSES = _SESSION_ENDING_CLOSES[Closer.RELAY]


class _SessionEnded(LinkError):
    """The link closed in a way that leaves no session to resume."""


#: What the link asks for when a heartbeat carries the device's stats: the compact
#: stats dict for the relay's fleet view (the daemon's ``compact_stats``).
StatsProvider = Callable[[], dict[str, Any]]


class DeviceLink:
    """Keeps one WebSocket to the relay open, forever, and a session across short drops."""

    def __init__(self, settings: RelaySettings, device_id: str, token: str,
                 listener: LinkListener, *, clock: Clock | None = None,
                 rng: random.Random | None = None,
                 stats: StatsProvider | None = None) -> None:
        self.settings = settings
        self.device_id = device_id
        self._token = token
        self.listener = listener
        self.clock = clock or MonotonicClock()
        self.backoff = Backoff(settings.backoff, rng)
        self.state = LinkState.CONNECTING
        self.stats = LinkStats(down_since=self.clock.now())
        self.next_retry_at: float | None = None
        self._outbox: OutboundQueue[_Audio] = OutboundQueue(settings.send_queue_frames)
        self._journal = ReplayJournal(max(1, settings.resume.buffer_ms // 20))
        self._conn: Connection | None = None
        self._ws: ClientConnection | None = None
        #: the session that may be resumed, and its last connection (for the counters)
        self.session_id: str | None = None
        self._session_conn: Connection | None = None
        #: how long a dropped session may still be resumed (the session core's window)
        self._window = ResumeWindow(settings.resume.window_ms / 1000)
        #: after a 4004 handover: until when send/send_audio queue for the next session
        self._handover_until: float | None = None
        #: after a 4004 (the relay drains to restart or hand over): until when it is
        #: retried at least every resume.retry_max_ms
        self._relay_back_by = 0.0
        self._stopping = False
        self._ping_id = 0
        #: the stats a heartbeat carries every stats_interval_s (None: no stats)
        self._stats_provider = stats
        #: messages received on the current connection (the heartbeat's sign of life)
        self._heard = 0
        host = urllib.parse.urlparse(settings.url).hostname or ""
        if settings.url.startswith("ws://") and not is_loopback(host):
            logger.warning("relay url %s is not encrypted: use wss:// unless a trusted proxy "
                           "or network protects it", settings.url)

    def _to(self, state: LinkState) -> None:
        """Move along the session core's LINK_TRANSITIONS (IllegalTransitionError if not)."""
        check_link_transition(self.state, state)
        if state is not self.state:
            logger.debug("link %s -> %s", self.state.value, state.value)
        self.state = state

    @property
    def connected(self) -> bool:
        return self.state is LinkState.CONNECTED

    @property
    def suspended(self) -> bool:
        """Not connected, but a dropped session can still be resumed (or, after a 4004
        handover, what is said is queued for the next session)."""
        if self._handover_until is not None and not self.connected:
            return self.clock.now() < self._handover_until
        return (not self.connected and self.session_id is not None
                and self._window.is_open(self.clock.now()))

    @property
    def dropped(self) -> int:
        return self._outbox.dropped + self.stats.dropped_offline + self.stats.dropped_session_lost

    @property
    def queued(self) -> int:
        """Items waiting to be sent (audio and control)."""
        return len(self._outbox)

    # --------------------------------------------------------------- sending

    def send(self, message: Message) -> bool:
        """Queue a control message; False (and counted) when offline with no session."""
        if not (self.connected or self.suspended):
            self.stats.dropped_offline += 1
            return False
        self._outbox.put_nowait(message)
        return True

    def send_audio(self, packet: bytes, timestamp_ms: int,
                   flags: AudioFlags = AudioFlags.NONE) -> bool:
        """Queue one uplink Opus packet; False (and counted) when offline with no session."""
        if not self.connected:
            if not self.suspended:
                self.stats.dropped_offline += 1
                return False
            self.stats.frames_queued_suspended += 1
        self._outbox.put_nowait(_Audio(packet, timestamp_ms, flags))
        return True

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        """Connect and reconnect until :meth:`stop`."""
        while not self._stopping:
            self._to(LinkState.CONNECTING)
            session_over = False
            try:
                await self._session()
                reason = self._close_reason()
                retryable = True
                session_over = self._close_ends_session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = self._describe(exc)
                retryable = is_retryable(exc)
                session_over = isinstance(exc, ProtocolError | AuthenticationError
                                          | _SessionEnded)
                self.stats.last_error = reason
            finally:
                self._mark_down()
            if self._stopping:
                break
            if self._close_code_received() == CloseCode.RECONNECT_NOW:
                # a draining relay finished our reply and sent us elsewhere: no backoff,
                # the balancer has a live relay for us now (docs/scale-out.md); with no
                # balancer the same relay is coming back: see RELAY_BACK_WITHIN_S
                self.backoff.reset()
                self._relay_back_by = self.clock.now() + RELAY_BACK_WITHIN_S
                if self._hand_over(reason):
                    continue
                delay: float | None = 0.0
            elif retryable:
                delay = None  # drawn below, once it is known whether the relay is due back
            else:  # keep trying slowly: the operator may fix it on the relay side
                delay = self.backoff.settings.max_ms / 1000
                logger.error("relay refused this device: %s; retrying every %.0f s", reason,
                             delay)
            self._to(LinkState.WAITING)
            now = self.clock.now()
            holding = not session_over and self._hold_session(now)
            retry_max = self.settings.resume.retry_max_ms / 1000
            if delay is None:
                # a relay expected back soon (a session it holds, a drain it announced)
                # is retried at least every retry_max_ms, the delays still spread
                soon = holding or now < self._relay_back_by
                delay = self.backoff.next_delay(retry_max if soon else None)
            if holding:
                delay = min(delay, retry_max)
                left = self._window.left_s(now)
                self.next_retry_at = now + delay
                logger.info("link down: %s; resuming within %.1f s, next attempt in %.1f s",
                            reason, left, delay)
                self.listener.link_suspended(reason, delay, left)
                await self._wait_suspended(delay, reason)
            else:
                if not session_over and self._window.until is not None:
                    # the window ran out during the attempt (a path that swallowed it)
                    # rather than between attempts (_wait_suspended)
                    reason = self._expire_session(reason)
                else:
                    self._end_session(reason)
                self.next_retry_at = now + delay
                logger.info("link down: %s; reconnecting in %.1f s", reason, delay)
                self.listener.link_down(reason, delay)
                await self.clock.sleep(delay)
            self.stats.reconnects += 1
        self._to(LinkState.STOPPED)

    def _hand_over(self, reason: str) -> bool:
        """After 4004 from an idle relay: carry what it did not receive (a turn begun
        as it closed) into the next session, and keep queueing until then."""
        ws = self._ws
        received = ws.protocol.close_rcvd if ws is not None else None
        counts = parse_handover_reason(received.reason) if received is not None else None
        if counts is None:
            return False
        try:
            missed = self._journal.after(*counts).items
        except RemoteProtocolError:
            return False
        carried: list[Message | _Audio] = [
            _Audio(entry.frame.payload, entry.frame.timestamp_ms,
                   entry.frame.flags & ~AudioFlags.REPLAY)
            if isinstance(entry, SentFrame) else entry.message for entry in missed]
        while len(self._outbox):
            carried.append(self._outbox.get_nowait())
        if not carried:  # the usual case: nothing under way, a plain reconnect
            return False
        self._end_session(reason)
        for item in carried:
            self._outbox.put_nowait(item)
        window_s = max(self.settings.resume.window_ms, 1000) / 1000
        self._handover_until = self.clock.now() + window_s
        self._to(LinkState.WAITING)
        self.next_retry_at = self.clock.now()
        logger.info("relay draining: reconnecting at once, carrying %d items it had not "
                    "received", len(carried))
        self.listener.link_suspended(reason, 0.0, window_s)
        self.stats.reconnects += 1
        return True

    def _hold_session(self, now: float) -> bool:
        """Whether the session survives this drop (starting its window if it is new)."""
        if self.session_id is None:
            return False
        return self._window.dropped(now)

    async def _wait_suspended(self, delay: float, reason: str) -> None:
        """Sleep ``delay``; if the window runs out meanwhile, end the session then."""
        now = self.clock.now()
        until_expiry = self._window.left_s(now)
        if delay < until_expiry:
            await self.clock.sleep(delay)
            return
        await self.clock.sleep(max(0.0, until_expiry))
        expired = self._expire_session(reason)
        rest = max(0.0, delay - until_expiry)
        logger.warning("link down: %s", expired)
        self.listener.link_down(expired, rest)
        await self.clock.sleep(rest)

    def _expire_session(self, reason: str) -> str:
        """The resume window ran out: count it, end the session, and say so."""
        window_s = self.settings.resume.window_ms / 1000
        self.stats.resumes_expired += 1
        expired = f"{reason}; session lost after {window_s:.0f} s offline"
        self._end_session(expired)
        return expired

    def _end_session(self, reason: str) -> None:
        """Forget the session: drop what was queued for it (counted) and the journal."""
        lost = self._outbox.audio_queued
        self._outbox.clear()
        self._journal.clear()
        if self.session_id is not None and lost:
            logger.warning("dropped %d queued audio frames: %s", lost, reason)
        self.stats.dropped_session_lost += lost
        self.session_id = None
        self._session_conn = None
        self._window.clear()
        self._handover_until = None

    async def stop(self) -> None:
        """Close the link with going-away and end :meth:`run`."""
        self._stopping = True
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close(CloseCode.GOING_AWAY, "device shutting down")

    def _close_reason(self) -> str:
        ws = self._ws
        if ws is not None and ws.close_code is not None:
            return f"relay closed the link ({ws.close_code} {ws.close_reason or ''}".rstrip() \
                + ")"
        return "relay closed the link"

    def _close_code_received(self) -> int | None:
        """The close code the relay sent on the last connection, if it sent one."""
        received = self._ws.protocol.close_rcvd if self._ws is not None else None
        return received.code if received is not None else None

    def _close_ends_session(self) -> bool:
        return close_ends_session(self._close_code_received(), Closer.RELAY)

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
        if self._conn is not None:
            self._session_conn = self._conn
        self._conn = None
        self._to(LinkState.WAITING)
        if was_up or self.stats.down_since is None:
            self.stats.down_since = self.clock.now()

    def _ssl(self) -> ssl.SSLContext | None:
        if not self.settings.url.startswith("wss://"):
            return None
        context = ssl.create_default_context()  # verification on, hostname checked
        if self.settings.ca_file:
            context.load_verify_locations(self.settings.ca_file)
        return context

    def _new_connection(self) -> tuple[Connection, ResumeRequest | None]:
        old = self._session_conn
        if self.session_id is None or old is None or not self.suspended:
            return Connection(Role.DEVICE), None
        request = ResumeRequest(self.session_id, old.last_received_seq, old.messages_received)
        conn = Connection(Role.DEVICE, next_seq=old.next_seq,
                          last_received_seq=old.last_received_seq,
                          messages_sent=old.messages_sent,
                          messages_received=old.messages_received)
        return conn, request

    async def _session(self) -> None:
        s = self.settings
        conn, resume = self._new_connection()
        timeout_ms = s.open_timeout_ms
        if resume is not None:
            timeout_ms = min(timeout_ms, s.resume.attempt_timeout_ms)
        self._ws = None
        try:
            ws = await connect(
                s.url,
                additional_headers={"Authorization": f"Bearer {self._token}"},
                subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                compression=None,
                open_timeout=timeout_ms / 1000,
                ping_interval=s.ping_interval_ms / 1000 or None,  # 0: the heartbeat's job
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
            await ws.send(conn.start(Hello(device=self.device_id,
                                           software=f"edgevoice/{__version__}",
                                           resume=resume)))
            try:
                first = await asyncio.wait_for(ws.recv(), timeout_ms / 1000)
            except TimeoutError:
                raise LinkError("relay did not answer hello") from None
            try:
                if isinstance(first, bytes):
                    conn.receive_binary(first)
                message = conn.receive_text(first)
            except ProtocolError as exc:
                await ws.close(exc.close_code, str(exc)[:120])
                raise
            if isinstance(message, Error):
                raise _SessionEnded(f"relay refused the session: {message.message}")
            assert isinstance(message, Welcome)
            if resume is not None:
                if message.resume.resumed:
                    await self._replay(ws, conn, message)
                else:
                    self.stats.resumes_refused += 1
                    lost = "the relay no longer held the session (it restarted, or the " \
                           "drop was too long): starting a new one"
                    logger.warning("%s", lost)
                    self._end_session(lost)
                    self.listener.link_down(lost, None)
            elif self.session_id is not None:
                self._end_session("a new session began")
            self.session_id = message.session_id
            self._session_conn = conn
            self._handover_until = None
            self._window.clear()
            self._conn = conn
            self._heard = 0
            self._to(LinkState.CONNECTED)
            self.stats.connects += 1
            self.stats.down_since = None
            self.next_retry_at = None
            self.backoff.reset()
            self._relay_back_by = 0.0
            logger.info("connected to %s (session %s%s)", s.url, message.session_id[:8],
                        ", resumed" if message.resume.resumed else "")
            self.listener.link_up(message)
            tasks = [asyncio.create_task(self._receiver(ws, conn), name="link-receiver"),
                     asyncio.create_task(self._sender(ws, conn), name="link-sender"),
                     asyncio.create_task(self._heartbeat(ws, conn, message),
                                         name="link-heartbeat")]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                        await task
            for task in done:
                failure = task.exception()
                if failure is not None and not isinstance(failure, ConnectionClosed):
                    raise failure

    async def _replay(self, ws: ClientConnection, conn: Connection, welcome: Welcome) -> None:
        """Re-send, flagged REPLAY, what the relay says it did not get."""
        replay = replay_for(self._journal, conn, welcome.resume.last_uplink_seq,
                            welcome.resume.uplink_messages)
        for data in replay.data:
            await ws.send(data)
        self.stats.frames_replayed += replay.frames
        self.stats.messages_replayed += replay.messages
        self.stats.replay_gap_frames += replay.frames_lost
        self.stats.resumes += 1
        if self._window.dropped_at is not None:
            self.stats.last_resume_s = self.clock.now() - self._window.dropped_at
        logger.info("session resumed: re-sent %d frames and %d messages the relay missed"
                    "%s; %d items queued", replay.frames, replay.messages,
                    f" ({replay.frames_lost} no longer held)" if replay.frames_lost else "",
                    len(self._outbox))

    async def _receiver(self, ws: ClientConnection, conn: Connection) -> None:
        try:
            async for data in ws:
                self._heard += 1
                if isinstance(data, str):
                    message = conn.receive_text(data)
                    if isinstance(message, Pong):
                        self.stats.rtt_ms = self.clock.now() * 1000 - message.ping_sent_ms
                    elif isinstance(message, Ping):
                        now_ms = int(self.clock.now() * 1000)
                        await ws.send(conn.send(Pong(message.id, message.sent_ms, now_ms)))
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
        reliable = RELIABLE[Role.DEVICE]
        while True:
            batch = [await self._outbox.get()]
            # What was queued together (the three frames of a 60 ms capture block, a
            # pre-roll burst) leaves together: one write, so over wss:// one TLS record
            # and one TCP segment instead of one per 20 ms frame. Nothing waits for it.
            while len(self._outbox) and len(batch) < SEND_BATCH_ITEMS:
                batch.append(self._outbox.get_nowait())
            # Journal before the socket: if the link dies during the send, a resume
            # re-sends it (the relay drops a duplicate by its sequence number).
            now = self.clock.now()
            wire: list[str | bytes] = []
            frames = 0
            for item in batch:
                if isinstance(item, Message):
                    text = conn.send(item)
                    if type(item) in reliable:
                        self._journal.record_message(conn.messages_sent, item, now)
                    wire.append(text)
                else:
                    frame, data = conn.send_audio(item.payload, item.timestamp_ms, item.flags)
                    self._journal.record_frame(frame, now)
                    wire.append(data)
                    frames += 1
            await send_together(ws, wire)
            self.stats.writes += 1
            self.stats.frames_sent += frames

    async def _heartbeat(self, ws: ClientConnection, conn: Connection, welcome: Welcome) -> None:
        """The protocol heartbeat (docs/protocol.md §6): a ``ping`` every interval the
        relay named, the stats riding along when due (one write), and the relay given
        up on when nothing comes back within ``ping_timeout_ms``."""
        s = self.settings
        interval_ms = welcome.heartbeat_interval_ms
        every = stats_every(interval_ms, s.stats_interval_s) if self._stats_provider else 0
        heartbeat = Heartbeat(interval_ms / 1000, s.ping_timeout_ms / 1000, every,
                              self.clock.now())
        while True:
            action = heartbeat.poll(self.clock.now(), self._heard)
            if isinstance(action, RelaySilent):
                self.stats.heartbeat_timeouts += 1
                reason = f"relay silent for {action.waited_s:.1f} s after a heartbeat"
                logger.warning("%s: closing the link and reconnecting", reason)
                self._abandon(ws, reason)
                raise LinkError(reason)
            if isinstance(action, Beat):
                wire: list[str | bytes] = []
                values = self._stats_values() if action.with_stats else None
                if values is not None:
                    wire.append(conn.send(Stats(values)))
                self._ping_id += 1
                wire.append(conn.send(Ping(self._ping_id, int(self.clock.now() * 1000))))
                await send_together(ws, wire)
                self.stats.writes += 1
                self.stats.heartbeats += 1
                if values is not None:
                    self.stats.stats_sent += 1
                continue
            await self.clock.sleep(max(0.0, heartbeat.wake_at - self.clock.now()))

    def _stats_values(self) -> dict[str, Any] | None:
        """The provider's stats, or None when it fails: the heartbeat goes anyway."""
        assert self._stats_provider is not None
        try:
            return self._stats_provider()
        except Exception:  # any bug in the stats must not stop the heartbeat
            self.stats.stats_failed += 1
            # once with the traceback; then quietly, every heartbeat would repeat it
            log = logger.warning if self.stats.stats_failed == 1 else logger.debug
            log("device stats failed; the heartbeat goes without them", exc_info=True)
            return None

    @staticmethod
    def _abandon(ws: ClientConnection, reason: str) -> None:
        """Drop a connection whose relay stopped answering: a 1011 close frame for its
        log if it is only slow, then the TCP connection at once. A closing handshake
        would only wait ``close_timeout`` for an answer that is not coming."""
        with contextlib.suppress(Exception):
            ws.protocol.fail(CloseCode.INTERNAL_ERROR, reason[:120])
            for data in ws.protocol.data_to_send():
                if data:
                    ws.transport.write(data)
        ws.transport.abort()
