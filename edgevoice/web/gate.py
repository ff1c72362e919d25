"""The relay's door for browsers: the page it serves, and ticket admission.

The relay asks :meth:`BrowserGate.admit` about every HTTP request on its device
port before its own Bearer check:

* a plain ``GET`` (no WebSocket upgrade) is a browser loading the page: the gate
  answers with the file, or 404;
* an upgrade that offers a ``edgevoice.ticket.<ticket>`` subprotocol is a browser
  device: its ``Origin`` must be allowed (else 403, and the ticket is not burnt),
  then the ticket is redeemed (burnt) and the device id it names is admitted;
* anything else is a daemon: the gate says nothing and the Bearer path runs as
  before.

The page itself lives in ``static/`` beside this module (plain HTML and JavaScript
modules, package data: no build step).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http
import importlib.resources
import json
import logging
import weakref
from dataclasses import dataclass
from urllib.parse import urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request as WsRequest
from websockets.http11 import Response as WsResponse

from edgevoice.config.base import require
from edgevoice.errors import EdgevoiceError
from edgevoice.health.http import Handler, Request, Response, json_response
from edgevoice.relay.auth import DEVICE_ID
from edgevoice.relay.settings import ListenSettings
from edgevoice.web.tickets import (
    MAX_TTL_S,
    Redeemed,
    Refusal,
    TicketError,
    TicketStore,
)

logger = logging.getLogger(__name__)

#: A browser offers ``edgevoice.ticket.<ticket>`` next to ``edgevoice.v1``.
TICKET_SUBPROTOCOL_PREFIX = "edgevoice.ticket."

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
#: The page loads only its own files and talks only to its own relay.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self'; script-src 'self'; style-src 'self'; "
        "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


@dataclass(frozen=True)
class WebSettings:
    """The browser device: a page served by the relay, and browser tickets."""

    enabled: bool = False
    """Serve the browser device page on the device port and admit browsers with tickets."""
    tickets_file: str = "/var/lib/edgevoice-relay/tickets.json"
    """JSON file of ticket digests, written by `edgevoice token ticket` and the relay."""
    ticket_ttl_s: int = 300
    """A new ticket expires this many seconds after it was issued (single use)."""
    reconnect_ttl_s: int = 60
    """The reconnect ticket a browser gets in welcome expires this long after its
    connection ended, in seconds (so the page can resume after a drop)."""
    allowed_origins: tuple[str, ...] = ()
    """Origins (scheme://host[:port]) whose pages may connect with a ticket, besides the
    relay's own (the Host the browser asked for)."""
    public_url: str | None = None
    """The page's address as users reach it (printed with new tickets); empty: built
    from listen.host and listen.port."""

    def __post_init__(self) -> None:
        require(bool(self.tickets_file), "tickets_file", "must name a file")
        require(1 <= self.ticket_ttl_s <= MAX_TTL_S, "ticket_ttl_s", f"must be 1..{MAX_TTL_S}")
        require(1 <= self.reconnect_ttl_s <= MAX_TTL_S, "reconnect_ttl_s",
                f"must be 1..{MAX_TTL_S}")
        for origin in self.allowed_origins:
            parts = urlsplit(origin)
            require(parts.scheme in ("http", "https") and bool(parts.hostname)
                    and parts.path in ("", "/"), "allowed_origins",
                    f"{origin!r} is not an origin like https://host[:port]")
        if self.public_url is not None:
            require(urlsplit(self.public_url).scheme in ("http", "https"), "public_url",
                    "must be an http:// or https:// address")


@dataclass(frozen=True)
class Admission:
    """A browser offered a ticket: the device it names, or None when refused."""

    device_id: str | None
    reason: str = ""


def page_url(web: WebSettings, listen: ListenSettings) -> str:
    """Where users open the page (without a ticket fragment)."""
    if web.public_url:
        return web.public_url if web.public_url.endswith("/") else web.public_url + "/"
    scheme = "https" if listen.tls_cert_file else "http"
    host = listen.host if listen.host not in ("0.0.0.0", "::", "") else "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{listen.port}/"


def _authority(scheme: str, host: str | None, port: int | None) -> tuple[str, int] | None:
    if not host:
        return None
    return host.lower(), port or _DEFAULT_PORTS.get(scheme, 0)


def origin_allowed(origin: str | None, host_header: str | None,
                   allowed: tuple[str, ...], *, tls: bool) -> bool:
    """Whether a page from ``origin`` may use a ticket on this relay.

    Its own origin (what the browser put in ``Host``) always may; others only when
    listed. A missing or ``null`` Origin never may: every browser sends one.
    """
    if not origin or origin == "null":
        return False
    try:
        parts = urlsplit(origin)
        mine = _authority(parts.scheme, parts.hostname, parts.port)
    except ValueError:
        return False
    for listed in allowed:
        other = urlsplit(listed)
        if (parts.scheme == other.scheme
                and mine == _authority(other.scheme, other.hostname, other.port)):
            return True
    if host_header:
        try:
            host = urlsplit(f"//{host_header}")
            # behind a TLS proxy the relay cannot know the page's scheme; the Host
            # port (or the default of the Origin's scheme) must still match
            scheme = parts.scheme if not tls else "https"
            if mine is not None and mine == _authority(scheme, host.hostname, host.port):
                return True
        except ValueError:
            return False
    return False


def _response(status: http.HTTPStatus, body: bytes, content_type: str,
              **headers: str) -> WsResponse:
    return WsResponse(status.value, status.phrase,
                      Headers({"Content-Type": content_type, **headers}), body)


class BrowserGate:
    """Serves the page and admits browsers with tickets; see the module docstring."""

    def __init__(self, settings: WebSettings, store: TicketStore | None = None, *,
                 tls: bool = False) -> None:
        self.settings = settings
        self.store = store or TicketStore(settings.tickets_file)
        self.tls = tls
        self._files = self._load_files()
        #: connections admitted by ticket, until their welcome is sent
        self._admitted: weakref.WeakKeyDictionary[ServerConnection, str] = (
            weakref.WeakKeyDictionary())
        self._releases: set[asyncio.Task[None]] = set()
        #: counters for /metrics and tests
        self.tickets_accepted = 0
        self.tickets_refused = 0
        self.origins_refused = 0
        dropped = self.store.drop_held()
        if dropped:
            logger.info("forgot %d reconnect tickets of a previous run", dropped)

    @staticmethod
    def _load_files() -> dict[str, tuple[str, bytes]]:
        files: dict[str, tuple[str, bytes]] = {}
        root = importlib.resources.files("edgevoice.web") / "static"
        for entry in root.iterdir():
            name = entry.name
            suffix = name[name.rfind("."):] if "." in name else ""
            if entry.is_file() and suffix in _CONTENT_TYPES:
                files["/" + name] = (_CONTENT_TYPES[suffix], entry.read_bytes())
        files["/"] = files["/index.html"]
        return files

    # ----------------------------------------------------------------- handshake

    def admit(self, ws: ServerConnection, request: WsRequest) -> WsResponse | Admission | None:
        """The page, a refusal, a ticket admission, or None (not a browser: Bearer path)."""
        if "websocket" not in request.headers.get("Upgrade", "").lower():
            return self._page(request.path)
        offered = [p.strip() for h in request.headers.get_all("Sec-WebSocket-Protocol")
                   for p in h.split(",")]
        tickets = [p[len(TICKET_SUBPROTOCOL_PREFIX):] for p in offered
                   if p.startswith(TICKET_SUBPROTOCOL_PREFIX)]
        if not tickets:
            return None
        address = str(ws.remote_address[0]) if ws.remote_address else "?"
        origin = request.headers.get("Origin")
        if not origin_allowed(origin, request.headers.get("Host"),
                              self.settings.allowed_origins, tls=self.tls):
            self.origins_refused += 1
            logger.info("refused a browser from %s: origin %r is not allowed", address,
                        (origin or "")[:100])
            return _response(http.HTTPStatus.FORBIDDEN, b"this page's origin is not allowed\n",
                             "text/plain; charset=utf-8")
        if len(tickets) != 1:
            return self._refused(address, "more than one ticket offered")
        try:
            result = self.store.redeem(tickets[0])
        except (OSError, EdgevoiceError) as exc:
            logger.error("cannot check a browser ticket: %s", exc)
            return _response(http.HTTPStatus.SERVICE_UNAVAILABLE,
                             b"the relay cannot check tickets right now\n",
                             "text/plain; charset=utf-8", **{"Retry-After": "30"})
        if isinstance(result, Refusal):
            return self._refused(address, result.value)
        assert isinstance(result, Redeemed)
        self.tickets_accepted += 1
        self._admitted[ws] = result.device_id
        return Admission(result.device_id)

    def _refused(self, address: str, reason: str) -> Admission:
        self.tickets_refused += 1
        logger.info("refused a browser from %s: %s", address, reason)
        return Admission(None, reason)

    def _page(self, path: str) -> WsResponse:
        found = self._files.get(path.split("?", 1)[0])
        if found is None:
            return _response(http.HTTPStatus.NOT_FOUND, b"not found\n",
                             "text/plain; charset=utf-8")
        content_type, body = found
        return _response(http.HTTPStatus.OK, body, content_type, **_PAGE_HEADERS)

    def welcome_ticket(self, ws: ServerConnection) -> str | None:
        """For a browser's welcome: a reconnect ticket, held until ``ws`` closes.

        None for a daemon's connection (it has its token).
        """
        device_id = self._admitted.pop(ws, None)
        if device_id is None:
            return None
        try:
            issued = self.store.issue(device_id, None)
        except (OSError, EdgevoiceError) as exc:
            logger.warning("%s: no reconnect ticket: %s", device_id, exc)
            return None
        task = asyncio.create_task(self._release_when_closed(ws, issued.digest),
                                   name=f"ticket-release:{device_id}")
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
        return issued.ticket

    async def _release_when_closed(self, ws: ServerConnection, digest: str) -> None:
        try:
            await ws.wait_closed()
        finally:
            with contextlib.suppress(Exception):
                self.store.release(digest, self.settings.reconnect_ttl_s)


def ticket_routes(store: TicketStore, web: WebSettings, listen: ListenSettings, *,
                  admin_token_set: bool) -> dict[tuple[str, str], Handler]:
    """``POST /tickets`` for the relay's admin endpoint.

    Body ``{"device": "name", "ttl_s": 300}`` (``ttl_s`` optional); answers 201
    with the ticket, its expiry and the page URL carrying it. Only with an admin
    token configured: a ticket lets its holder talk to the upstream.
    """

    async def mint(request: Request) -> Response:
        if not admin_token_set:
            return json_response(403, {"error": "minting tickets over HTTP needs "
                                        "admin.token_file; or run `edgevoice token ticket`"})
        try:
            body = json.loads(request.body or b"{}")
            device = body["device"]
            ttl = body.get("ttl_s", web.ticket_ttl_s)
        except (ValueError, KeyError, TypeError, AttributeError):
            return json_response(400, {"error": 'send {"device": "name"} (and "ttl_s")'})
        if not isinstance(device, str) or not DEVICE_ID.match(device) or \
                isinstance(ttl, bool) or not isinstance(ttl, int | float):
            return json_response(400, {"error": "device must be a device id, ttl_s a number"})
        try:
            issued = store.issue(device, float(ttl))
        except TicketError as exc:
            return json_response(400, {"error": str(exc)})
        except (OSError, EdgevoiceError) as exc:
            logger.error("cannot issue a browser ticket: %s", exc)
            return json_response(503, {"error": f"the ticket store failed: {exc}"})
        assert issued.expires_at is not None
        expires = datetime.datetime.fromtimestamp(issued.expires_at, datetime.UTC)
        logger.info("issued a browser ticket for %s (admin endpoint)", device)
        answer = json_response(201, {
            "ticket": issued.ticket, "device": device,
            "expires": expires.isoformat(timespec="seconds"),
            "url": f"{page_url(web, listen)}#ticket={issued.ticket}"})
        return Response(answer.status, answer.content_type, answer.body,
                        (("Cache-Control", "no-store"),))

    return {("POST", "/tickets"): mint}
