"""A small HTTP/1.1 server for the health and admin endpoints, and its exposure rule.

It is deliberately small: the device is a Pi Zero 2 W, so asyncio streams carry one
request per connection (``Connection: close``), parsed by h11 (the sans-I/O HTTP/1.1
parser), with hard limits on what a client may send, how long it may take, and how
many connections it may hold (see :class:`HttpApi`). Handlers are
``async (Request) -> Response`` callables keyed by ``(method, path)``.

The exposure rule, shared by the device endpoint and the relay's admin endpoint:

* bound to a loopback address (``127.0.0.0/8``, ``::1``, ``localhost``) a token is
  optional. Without one every route is open to local processes. With one, read-only
  requests (``GET``/``HEAD``) stay open so local tooling can scrape without a secret,
  but every other method (the ``POST`` actions that start or stop a turn) needs it:
  configuring a token says "not every local user may drive the microphone";
* bound to anything else a token is required for every route, and the server refuses
  to start without one (:func:`validate_exposure`, :class:`HttpApi`);
* a request that presents a wrong token is refused even on an open route, so a
  misconfigured scraper finds out at once instead of working by accident.

Tokens are compared as SHA-256 digests with :func:`hmac.compare_digest`; the server
only ever holds the digest, and neither the token nor the ``Authorization`` header is
logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import json
import logging
import os
import re
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import h11

from edgevoice.config.base import require
from edgevoice.errors import ConfigError
from edgevoice.tokens import digest_matches, hash_token

logger = logging.getLogger(__name__)

#: Most bytes a request line plus headers may take.
MAX_HEAD_BYTES = 8 * 1024
#: Most bytes a request body may take.
MAX_BODY_BYTES = 64 * 1024
#: Seconds a client has to send its request line and headers. Short: a client on a
#: LAN sends its head in one packet, and a slow one only holds a connection slot.
HEAD_TIMEOUT_S = 2.0
#: Seconds a client has to send its whole request (head and body).
READ_TIMEOUT_S = 5.0
#: Seconds a handler may take before the client gets a 503.
HANDLER_TIMEOUT_S = 5.0
#: Seconds to wait for a client to close after its response (see HttpApi._linger).
LINGER_S = 1.0
#: Connections held at once (bounded memory and fds).
MAX_CONNECTIONS = 64
#: Connections held at once from one client address.
MAX_CONNECTIONS_PER_ADDRESS = 8

_SAFE_METHODS = frozenset({"GET", "HEAD"})
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Obsolete line folding (a header line starting with blanks) is a classic
# request-smuggling vector: h11 unfolds it, this server refuses it.
_FOLDED_LINE = re.compile(rb"\n[ \t]")
# Control characters other than horizontal tab have no business in a header value.
_BAD_VALUE_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HEAD_END = re.compile(rb"\r?\n\r?\n")


@dataclass(frozen=True)
class Request:
    """One parsed HTTP request."""

    method: str
    #: percent-decoded path, without the query string
    path: str
    query: Mapping[str, str]
    #: header names in lower case; repeated headers joined with ", "
    headers: Mapping[str, str]
    body: bytes
    #: "host:port" of the client
    peer: str


@dataclass(frozen=True)
class Response:
    """What a handler answers. ``Content-Length`` and ``Connection`` are added for it."""

    status: int
    content_type: str = "text/plain; charset=utf-8"
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    #: a streamed body instead of ``body`` (server-sent events): sent as it comes, with
    #: no Content-Length, until it ends, the client goes or does not read in time
    stream: Callable[[], AsyncIterator[bytes]] | None = field(default=None, compare=False)


Handler = Callable[[Request], Awaitable[Response]]
Routes = Mapping[tuple[str, str], Handler]


def json_response(status: int, payload: object) -> Response:
    """A JSON response (UTF-8, compact)."""
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(status, "application/json", body)


def health_response(problems: list[str]) -> Response:
    """The ``/healthz`` answer: 200 ``{"status":"ok"}`` or 503 with the problems."""
    if problems:
        return json_response(503, {"status": "unhealthy", "problems": problems})
    return json_response(200, {"status": "ok"})


def _error(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(
        status,
        "application/json",
        json.dumps({"error": message}).encode(),
        headers,
    )


# --------------------------------------------------------------------------- exposure


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a socket reachable from this machine only.

    Host names other than ``localhost`` count as exposed: what they resolve to can
    change, and guessing wrong would open an unauthenticated endpoint.
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Exposable(Protocol):
    """Settings that say where an endpoint listens (HealthSettings, RelayAdminSettings)."""

    @property
    def bind(self) -> str: ...

    @property
    def port(self) -> int: ...


def _exposure_error(bind: str, key: str, source: str) -> ConfigError:
    return ConfigError(
        source,
        key,
        f"bind {bind!r} is reachable beyond this machine, so a token is required: "
        "write one to a file readable only by the service (for example "
        "`openssl rand -hex 32`) and point this setting at it, or bind 127.0.0.1",
    )


def validate_exposure(
    settings: Exposable,
    token: str | None,
    *,
    key: str = "health.token_file",
    source: str = "config",
) -> None:
    """Raise :class:`ConfigError` if ``settings.bind`` is beyond loopback without a token.

    Settings cannot check this in ``__post_init__``: they only know the token's file,
    not whether it exists and holds a token. ``key`` and ``source`` name the setting
    and config file in the message.
    """
    if not token and not is_loopback(settings.bind):
        raise _exposure_error(settings.bind, key, source)


def load_token(path: str | os.PathLike[str], *, key: str = "health.token_file") -> str:
    """Read a token file: the first line, stripped. Raises :class:`ConfigError`.

    Warns (without the token) when others can read the file, because whoever can
    read it can drive the endpoint.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        mode = p.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), key, f"cannot read the token file: {exc}") from exc
    lines = text.strip().splitlines()
    token = lines[0].strip() if lines else ""
    if not token:
        raise ConfigError(str(p), key, "the token file is empty")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("token file %s is readable by others: chmod 600 it", p)
    return token


@dataclass(frozen=True)
class HealthSettings:
    """Where the device's health endpoint listens, and when it reports a problem."""

    bind: str = "127.0.0.1"
    """Address to listen on. Beyond loopback (e.g. 0.0.0.0) a token_file is required."""
    port: int = 8765
    """TCP port of the health endpoint."""
    token_file: str | None = None
    """File holding the bearer token (never put the token itself in the YAML)."""
    no_audio_after_s: float = 5.0
    """/healthz is unhealthy when no microphone frame arrived for this long."""
    relay_unreachable_after_s: float = 30.0
    """/healthz is unhealthy when the relay has been unreachable for this long."""
    watchdog_late_after_s: float = 15.0
    """/healthz is unhealthy when the systemd watchdog was last fed this long ago."""

    def __post_init__(self) -> None:
        require(bool(self.bind.strip()), "bind", "must not be empty")
        require(0 <= self.port <= 65535, "port", "must be 0..65535")
        require(self.no_audio_after_s > 0, "no_audio_after_s", "must be > 0")
        require(self.relay_unreachable_after_s > 0, "relay_unreachable_after_s", "must be > 0")
        require(self.watchdog_late_after_s > 0, "watchdog_late_after_s", "must be > 0")


# --------------------------------------------------------------------------- server


class _HttpError(Exception):
    """A request the server refuses before any handler sees it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


#: What the client is told for each status h11 suggests (its own messages may quote
#: the request, Authorization header included: they are never sent or logged).
_PARSE_ERRORS = {431: "request head too large", 505: "only HTTP/1.0 and HTTP/1.1 are served"}


class ConnState(enum.Enum):
    """Where one connection is. READING and LINGERING ones may be evicted."""

    READING = "reading"
    """Waiting for the request (head or body): nothing has been asked of the server."""
    SERVING = "serving"
    """A handler runs or the response is being written."""
    LINGERING = "lingering"
    """Answered; waiting a moment for the client to close."""


EVICTABLE = frozenset({ConnState.READING, ConnState.LINGERING})


@dataclass(eq=False)
class _Conn:
    host: str
    opened_at: float
    writer: asyncio.StreamWriter
    state: ConnState = ConnState.READING


class HttpApi:
    """Serves ``routes`` over HTTP/1.1 on ``bind_host:port`` (port 0 picks a free one).

    ``token_sha256`` is :func:`hash_token` of the bearer token, or None for no token;
    see the module docstring for when it is required. Construction raises
    :class:`ConfigError` when ``bind_host`` is beyond loopback and there is no token.

    Requests are parsed by h11 (sans I/O); one request per connection. Slow clients
    cannot starve the operator: at most ``max_connections`` connections are held, at
    most ``max_per_address`` from one address, and when either cap is reached a new
    connection takes the slot of the oldest one that has not yet sent its request (or
    was already answered) instead of being refused; only when every held connection
    is being served does a new one get 503. A request head must arrive within
    ``head_timeout_s`` (408 otherwise).
    """

    def __init__(
        self,
        routes: Routes,
        bind_host: str = "127.0.0.1",
        port: int = 0,
        token_sha256: str | None = None,
        *,
        read_timeout_s: float = READ_TIMEOUT_S,
        head_timeout_s: float = HEAD_TIMEOUT_S,
        handler_timeout_s: float = HANDLER_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        max_per_address: int = MAX_CONNECTIONS_PER_ADDRESS,
        name: str = "health",
    ) -> None:
        if token_sha256 is not None:
            token_sha256 = token_sha256.lower()
            if not _SHA256_HEX.fullmatch(token_sha256):
                raise ValueError("token_sha256 must be 64 hex digits (see hash_token)")
        if max_connections < 1 or max_per_address < 1:
            raise ValueError("connection caps must be >= 1")
        self._loopback = is_loopback(bind_host)
        if token_sha256 is None and not self._loopback:
            raise _exposure_error(bind_host, f"{name}.token_file", "config")
        self._routes = dict(routes)
        self._allowed: dict[str, list[str]] = {}
        for method, path in self._routes:
            self._allowed.setdefault(path, []).append(method)
        self._bind_host = bind_host
        self._requested_port = port
        self._token_sha256 = token_sha256
        self._read_timeout_s = read_timeout_s
        self._head_timeout_s = min(head_timeout_s, read_timeout_s)
        self._handler_timeout_s = handler_timeout_s
        self._max_connections = max_connections
        self._max_per_address = max_per_address
        self._name = name
        self._server: asyncio.Server | None = None
        #: every connection task (stop() waits for them)
        self._tasks: set[asyncio.Task[None]] = set()
        #: the connections holding a slot
        self._conns: set[_Conn] = set()
        self._stopping = False
        #: requests refused with 401 (a wrong or missing token)
        self.auth_failures = 0
        #: connections closed to make room for a newer one (slow or idle clients)
        self.evicted = 0
        #: connections answered 503 because every slot was being served
        self.refused = 0
        #: requests that took longer than the head or read timeout (408)
        self.timed_out = 0

    @classmethod
    def from_settings(
        cls,
        routes: Routes,
        settings: Exposable,
        token: str | None,
        *,
        name: str,
        source: str = "config",
    ) -> HttpApi:
        """An API listening where ``settings`` say, guarded by ``token`` (plain text).

        Raises :class:`ConfigError` naming ``{name}.token_file`` in ``source`` when the
        settings expose it beyond loopback without a token.
        """
        validate_exposure(settings, token, key=f"{name}.token_file", source=source)
        return cls(
            routes, settings.bind, settings.port, hash_token(token) if token else None, name=name
        )

    @property
    def port(self) -> int:
        """The port actually bound (useful after asking for port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the server is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def connections(self) -> int:
        """Connections holding a slot now."""
        return len(self._conns)

    async def start(self) -> None:
        """Bind and start serving. Raises OSError if the address is taken."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._serve, self._bind_host,
                                                  self._requested_port)
        logger.info(
            "%s endpoint listening on %s:%d (%s)",
            self._name,
            self._bind_host,
            self.port,
            "token required" if self._token_sha256 else "no token",
        )

    async def stop(self) -> None:
        """Stop listening and drop the connections still open. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()
        self._stopping = False
        logger.info("%s endpoint stopped", self._name)

    # ---------------------------------------------------------------- admission

    def _admit(self, host: str) -> bool:
        """Make room for a connection from ``host``; False when there is none."""
        same = [c for c in self._conns if c.host == host]
        if len(same) >= self._max_per_address and not self._evict_oldest(same):
            return False
        return len(self._conns) < self._max_connections or self._evict_oldest(self._conns)

    def _evict_oldest(self, conns: Iterable[_Conn]) -> bool:
        candidates = [c for c in conns if c.state in EVICTABLE]
        if not candidates:
            return False
        victim = min(candidates, key=lambda c: c.opened_at)
        self._conns.discard(victim)
        victim.writer.transport.abort()  # its task sees the reset and ends quietly
        self.evicted += 1
        logger.debug("%s: closed an idle connection from %s to make room", self._name,
                     victim.host)
        return True

    # ---------------------------------------------------------------- per connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = _peer_name(writer)
        conn: _Conn | None = None
        try:
            host = peer.rpartition(":")[0]
            if not self._admit(host):
                self.refused += 1
                await self._send(writer, _error(503, "too many connections"), head_only=False)
            else:
                conn = _Conn(host, asyncio.get_running_loop().time(), writer)
                self._conns.add(conn)
                await self._serve_one(reader, writer, peer, conn)
                conn.state = ConnState.LINGERING
            await self._linger(reader, writer)
        except (ConnectionError, TimeoutError):
            pass  # the client went away (or was evicted); nothing to answer
        except asyncio.CancelledError:
            # asyncio's stream server reports a cancelled connection task as an
            # unhandled error, so a connection that stop() ends finishes quietly.
            if not self._stopping:
                raise
        finally:
            self._tasks.discard(task)
            if conn is not None:
                self._conns.discard(conn)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), LINGER_S)

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then discard what the client still sends for a moment.

        Closing a socket with unread input makes the kernel send a reset, which can
        destroy the response before the client reads it; refused requests (413,
        431, 503) leave exactly such input behind.
        """
        if writer.can_write_eof():
            writer.write_eof()
        discarded = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER_S):
                while discarded < MAX_BODY_BYTES:
                    chunk = await reader.read(4096)
                    if not chunk:
                        break
                    discarded += len(chunk)

    async def _serve_one(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str,
        conn: _Conn,
    ) -> None:
        try:
            request = await self._read_request(reader, peer)
        except TimeoutError:
            self.timed_out += 1
            await self._send(writer, _error(408, "request not received in time"), head_only=False)
            return
        except _HttpError as exc:
            logger.debug("%s: bad request: %s", peer, exc.message)
            await self._send(writer, _error(exc.status, exc.message), head_only=False)
            return
        if request is None:
            return  # connected and left without a byte
        conn.state = ConnState.SERVING
        response = await self._respond(request)
        logger.debug("%s %s %s -> %d", peer, request.method, request.path, response.status)
        await self._send(writer, response, head_only=request.method == "HEAD")

    async def _respond(self, request: Request) -> Response:
        denied = self._check_auth(request)
        if denied is not None:
            self.auth_failures += 1
            return denied
        method = "GET" if request.method == "HEAD" else request.method
        handler = self._routes.get((method, request.path))
        if handler is None:
            allowed = self._allowed.get(request.path)
            if allowed is None:
                return _error(404, "no such path")
            allow = ", ".join(sorted(set(allowed) | ({"HEAD"} if "GET" in allowed else set())))
            return _error(405, "method not allowed", (("Allow", allow),))
        try:
            return await asyncio.wait_for(handler(request), self._handler_timeout_s)
        except TimeoutError:
            logger.warning("%s handler for %s timed out", self._name, request.path)
            return _error(503, "handler timed out")
        except Exception:
            logger.exception("%s handler for %s failed", self._name, request.path)
            return _error(500, "internal error")

    def _check_auth(self, request: Request) -> Response | None:
        """None when the request may proceed, else the 401 to send."""
        presented = request.headers.get("authorization")
        if self._token_sha256 is None:
            return None
        if presented is None:
            if self._loopback and request.method in _SAFE_METHODS:
                return None
            return _unauthorized("a bearer token is required")
        scheme, _, credentials = presented.partition(" ")
        credentials = credentials.strip()
        if scheme.lower() != "bearer" or not credentials:
            return _unauthorized("use the Bearer scheme")
        if not digest_matches(credentials, self._token_sha256):
            return _unauthorized("invalid token")
        return None

    async def _read_request(self, reader: asyncio.StreamReader, peer: str) -> Request | None:
        """The request, parsed by h11 within the head and read timeouts; None when the
        client left without sending a byte. Raises _HttpError or TimeoutError."""
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        received = bytearray()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._read_timeout_s
        try:
            async with asyncio.timeout(self._head_timeout_s):
                event = await self._next_event(parser, reader, received)
        except _HttpError:
            if _head_size(received) > MAX_HEAD_BYTES:  # whatever else is wrong with it
                raise _HttpError(431, _PARSE_ERRORS[431]) from None
            raise
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request)
        if _head_size(received) > MAX_HEAD_BYTES:
            raise _HttpError(431, _PARSE_ERRORS[431])
        if _FOLDED_LINE.search(received, 0, _head_size(received)):
            raise _HttpError(400, "folded header lines are not accepted")
        if event.http_version not in (b"1.0", b"1.1"):
            raise _HttpError(505, _PARSE_ERRORS[505])
        try:
            method = event.method.decode("ascii")
            target = event.target.decode("ascii")
            pairs = [(n.decode("ascii"), v.decode("ascii")) for n, v in event.headers]
        except UnicodeDecodeError as exc:
            raise _HttpError(400, "non-ASCII bytes in the request head") from exc
        if not target.startswith("/"):
            raise _HttpError(400, "the request target must be a path")
        if any(_BAD_VALUE_CHARS.search(value) for _name, value in pairs):
            raise _HttpError(400, "control characters in a header value")
        headers: dict[str, str] = {}
        for name, value in pairs:  # h11 gives names in lower case
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if "transfer-encoding" in headers:
            raise _HttpError(501, "chunked bodies are not supported; send Content-Length")
        try:
            length = int(headers.get("content-length", "0"))  # h11 checked each is digits
        except ValueError:  # repeated: "5, 5"
            raise _HttpError(400, "malformed Content-Length") from None
        if length > MAX_BODY_BYTES:
            raise _HttpError(413, f"body larger than {MAX_BODY_BYTES} bytes")
        body = bytearray()
        async with asyncio.timeout_at(deadline):
            while True:
                event = await self._next_event(parser, reader, None)
                if isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:  # pragma: no cover - h11 sends Data then EndOfMessage
                    raise _HttpError(400, "malformed request body")
        parts = urlsplit(target)
        return Request(
            method=method,
            path=unquote(parts.path),
            query=dict(parse_qsl(parts.query)),
            headers=headers,
            body=bytes(body),
            peer=peer,
        )

    async def _next_event(self, parser: h11.Connection, reader: asyncio.StreamReader,
                          received: bytearray | None) -> object:
        """h11's next event, reading as it needs; ``received`` collects the head's bytes."""
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                raise _HttpError(status, _PARSE_ERRORS.get(status, "malformed request")) \
                    from None
            if event is not h11.NEED_DATA:
                return event
            data = await reader.read(4096)
            if received is not None:
                received += data
                if _head_size(received) > MAX_HEAD_BYTES:
                    raise _HttpError(431, _PARSE_ERRORS[431])
            parser.receive_data(data)  # b"": the client closed its side

    async def _send(
        self, writer: asyncio.StreamWriter, response: Response, *, head_only: bool
    ) -> None:
        reason = _reason(response.status)
        lines = [
            f"HTTP/1.1 {response.status} {reason}",
            f"Content-Type: {response.content_type}",
            *([] if response.stream else [f"Content-Length: {len(response.body)}"]),
            "Connection: close",
            "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff",
        ]
        lines.extend(f"{name}: {value}" for name, value in response.headers)
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        writer.write(head if head_only else head + response.body)
        await asyncio.wait_for(writer.drain(), self._read_timeout_s)
        if response.stream is not None and not head_only and not self._stopping:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the
            # cancellation stop() sends, and a stream would then never end
            async for chunk in response.stream():
                writer.write(chunk)
                async with asyncio.timeout(self._read_timeout_s):
                    await writer.drain()

def _head_size(received: bytes | bytearray) -> int:
    """Bytes of the request head in ``received`` (all of it while the head is open)."""
    end = _HEAD_END.search(received)
    return end.end() if end else len(received)


def _unauthorized(message: str) -> Response:
    return _error(401, message, (("WWW-Authenticate", 'Bearer realm="edgevoice"'),))


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Status"


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "?"
