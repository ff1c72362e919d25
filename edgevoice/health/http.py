"""A small HTTP/1.1 server for the health and admin endpoints, and its exposure rule.

It is deliberately tiny: the device is a Pi Zero 2 W, so the standard library's
asyncio streams carry one request per connection (``Connection: close``), with hard
limits on what a client may send and how long it may take. Handlers are
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
import ipaddress
import json
import logging
import os
import re
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

from edgevoice.config.base import require
from edgevoice.errors import ConfigError
from edgevoice.tokens import digest_matches, hash_token

logger = logging.getLogger(__name__)

#: Most bytes a request line plus headers may take.
MAX_HEAD_BYTES = 8 * 1024
#: Most bytes a request body may take.
MAX_BODY_BYTES = 64 * 1024
#: Seconds a client has to send its whole request.
READ_TIMEOUT_S = 5.0
#: Seconds a handler may take before the client gets a 503.
HANDLER_TIMEOUT_S = 5.0
#: Seconds to wait for a client to close after its response (see HttpApi._linger).
LINGER_S = 1.0
#: Connections served at once; more are answered 503 straight away (bounded memory).
MAX_CONNECTIONS = 16

_SAFE_METHODS = frozenset({"GET", "HEAD"})
_TOKEN_CHARS = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rf"({_TOKEN_CHARS}) (\S+) HTTP/(\d)\.(\d)")
_HEADER_LINE = re.compile(rf"({_TOKEN_CHARS}):[ \t]*(.*?)[ \t]*")
# Control characters other than horizontal tab have no business in a header value.
_BAD_VALUE_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


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


class HttpApi:
    """Serves ``routes`` over HTTP/1.1 on ``bind_host:port`` (port 0 picks a free one).

    ``token_sha256`` is :func:`hash_token` of the bearer token, or None for no token;
    see the module docstring for when it is required. Construction raises
    :class:`ConfigError` when ``bind_host`` is beyond loopback and there is no token.
    """

    def __init__(
        self,
        routes: Routes,
        bind_host: str = "127.0.0.1",
        port: int = 0,
        token_sha256: str | None = None,
        *,
        read_timeout_s: float = READ_TIMEOUT_S,
        handler_timeout_s: float = HANDLER_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        name: str = "health",
    ) -> None:
        if token_sha256 is not None:
            token_sha256 = token_sha256.lower()
            if not _SHA256_HEX.fullmatch(token_sha256):
                raise ValueError("token_sha256 must be 64 hex digits (see hash_token)")
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
        self._handler_timeout_s = handler_timeout_s
        self._max_connections = max_connections
        self._name = name
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._stopping = False
        #: requests refused with 401 (a wrong or missing token)
        self.auth_failures = 0

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

    async def start(self) -> None:
        """Bind and start serving. Raises OSError if the address is taken."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._serve,
            self._bind_host,
            self._requested_port,
            # The stream limit caps a single header line; _read_head caps their sum.
            limit=MAX_HEAD_BYTES,
        )
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
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()
        self._stopping = False
        logger.info("%s endpoint stopped", self._name)

    # ---------------------------------------------------------------- per connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        busy = len(self._connections) >= self._max_connections
        self._connections.add(task)
        peer = _peer_name(writer)
        try:
            if busy:
                await self._send(writer, _error(503, "too many connections"), head_only=False)
            else:
                await self._serve_one(reader, writer, peer)
            await self._linger(reader, writer)
        except (ConnectionError, TimeoutError):
            pass  # the client went away; nothing to answer
        except asyncio.CancelledError:
            # asyncio's stream server reports a cancelled connection task as an
            # unhandled error, so a connection that stop() ends finishes quietly.
            if not self._stopping:
                raise
        finally:
            self._connections.discard(task)
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
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        try:
            request = await asyncio.wait_for(self._read_request(reader, peer), self._read_timeout_s)
        except TimeoutError:
            await self._send(writer, _error(408, "request not received in time"), head_only=False)
            return
        except _HttpError as exc:
            logger.debug("%s: bad request: %s", peer, exc.message)
            await self._send(writer, _error(exc.status, exc.message), head_only=False)
            return
        if request is None:
            return  # connected and left without a byte
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
        head = await self._read_head(reader)
        if head is None:
            return None
        request_line, *header_lines = head
        match = _REQUEST_LINE.fullmatch(request_line)
        if match is None:
            raise _HttpError(400, "malformed request line")
        method, target, major, minor = match.groups()
        if (major, minor) not in (("1", "0"), ("1", "1")):
            raise _HttpError(505, "only HTTP/1.0 and HTTP/1.1 are served")
        if not target.startswith("/"):
            raise _HttpError(400, "the request target must be a path")
        headers: dict[str, str] = {}
        for line in header_lines:
            header = _HEADER_LINE.fullmatch(line)
            if header is None or _BAD_VALUE_CHARS.search(header.group(2)):
                raise _HttpError(400, "malformed header line")
            name, value = header.group(1).lower(), header.group(2)
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        body = await self._read_body(reader, headers)
        parts = urlsplit(target)
        return Request(
            method=method,
            path=unquote(parts.path),
            query=dict(parse_qsl(parts.query)),
            headers=headers,
            body=body,
            peer=peer,
        )

    async def _read_head(self, reader: asyncio.StreamReader) -> list[str] | None:
        """The request line and header lines, without line endings; None on early EOF."""
        lines: list[str] = []
        total = 0
        while True:
            try:
                raw = await reader.readline()
            except ValueError as exc:  # one line longer than the stream limit
                raise _HttpError(431, "request head too large") from exc
            total += len(raw)
            if total > MAX_HEAD_BYTES:
                raise _HttpError(431, "request head too large")
            if not raw:
                if lines:
                    raise _HttpError(400, "connection closed inside the request head")
                return None
            if not raw.endswith(b"\n"):
                raise _HttpError(400, "connection closed inside the request head")
            line = raw.rstrip(b"\r\n")
            if not line:
                if not lines:
                    raise _HttpError(400, "empty request line")
                return lines
            if line[:1] in (b" ", b"\t"):
                # Obsolete line folding is a classic request-smuggling vector.
                raise _HttpError(400, "folded header lines are not accepted")
            try:
                lines.append(line.decode("ascii"))
            except UnicodeDecodeError as exc:
                raise _HttpError(400, "non-ASCII bytes in the request head") from exc

    async def _read_body(self, reader: asyncio.StreamReader, headers: Mapping[str, str]) -> bytes:
        if "transfer-encoding" in headers:
            raise _HttpError(501, "chunked bodies are not supported; send Content-Length")
        length_text = headers.get("content-length")
        if length_text is None:
            return b""
        if not length_text.isdigit() or not length_text.isascii():
            raise _HttpError(400, "malformed Content-Length")
        length = int(length_text)
        if length > MAX_BODY_BYTES:
            raise _HttpError(413, f"body larger than {MAX_BODY_BYTES} bytes")
        try:
            return await reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise _HttpError(400, "connection closed inside the body") from exc

    async def _send(
        self, writer: asyncio.StreamWriter, response: Response, *, head_only: bool
    ) -> None:
        reason = _reason(response.status)
        lines = [
            f"HTTP/1.1 {response.status} {reason}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            "Connection: close",
            "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff",
        ]
        lines.extend(f"{name}: {value}" for name, value in response.headers)
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        writer.write(head if head_only else head + response.body)
        await asyncio.wait_for(writer.drain(), self._read_timeout_s)


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
