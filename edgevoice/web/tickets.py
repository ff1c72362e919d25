"""Browser tickets: short-lived, single-use credentials bound to a device id.

A browser cannot set ``Authorization`` on a WebSocket, so it cannot present a
device token. It presents a *ticket* instead, as a WebSocket subprotocol
(``docs/protocol.md`` §9). A ticket has the shape of a token,
``<device-id>.<secret>`` (32 random bytes), but:

* it expires (``web.ticket_ttl_s`` after it was issued);
* it is burnt by the first handshake that presents it, accepted or not further;
* only its SHA-256 is stored, and it is compared in constant time.

:class:`TicketBook` is the pure core (takes ``now``, wall-clock Unix seconds,
because the CLI and the relay are different processes). :class:`TicketStore` keeps
a book in a JSON file (mode 0600) shared by ``edgevoice token ticket``, the admin
endpoint and the relay, under an advisory lock so they never lose each other's
writes.

A relay hands a browser it admitted a *reconnect ticket* in ``welcome``: it is
"held" (no expiry) while the connection lives, and starts expiring when the
connection ends, so the page can resume its session after a drop.
"""

from __future__ import annotations

import contextlib
import enum
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from edgevoice.errors import ConfigError, EdgevoiceError
from edgevoice.relay.auth import DEVICE_ID, split_token
from edgevoice.statefile import locked_directory, write_json_atomic
from edgevoice.tokens import hash_token

logger = logging.getLogger(__name__)

#: Most tickets a book holds (unexpired ones); issuing more is refused.
MAX_TICKETS = 10_000
#: Longest lifetime a ticket may be issued with, in seconds.
MAX_TTL_S = 24 * 3600


class TicketError(EdgevoiceError):
    """A ticket cannot be issued (bad device id or lifetime, too many tickets)."""


def ticket_digest(ticket: str) -> str:
    return hash_token(ticket)


@dataclass(frozen=True)
class Ticket:
    """One stored ticket: only its digest, its device and when it expires."""

    digest: str
    device_id: str
    #: wall-clock Unix seconds; None while held for a live connection
    expires_at: float | None


class Refusal(enum.Enum):
    """Why a ticket was not accepted (for logs and counters; the client only sees 401)."""

    MALFORMED = "malformed ticket"
    UNKNOWN = "unknown or already used ticket"
    EXPIRED = "expired ticket"


@dataclass(frozen=True)
class Redeemed:
    """The ticket was good: it names ``device_id``, and it is now burnt."""

    device_id: str


@dataclass(frozen=True)
class IssuedTicket:
    """What issuing returns; ``ticket`` is shown once and never stored."""

    ticket: str
    device_id: str
    expires_at: float | None

    @property
    def digest(self) -> str:
        return ticket_digest(self.ticket)


class TicketBook:
    """The tickets in force, by digest. Pure: every method takes ``now``."""

    def __init__(self, tickets: dict[str, Ticket] | None = None) -> None:
        self._tickets: dict[str, Ticket] = dict(tickets or {})
        self._dummy = ticket_digest(secrets.token_urlsafe(32))

    def __len__(self) -> int:
        return len(self._tickets)

    def tickets(self) -> list[Ticket]:
        return list(self._tickets.values())

    def issue(self, device_id: str, secret: str, now: float,
              ttl_s: float | None) -> IssuedTicket:
        """Add a ticket for ``device_id``; ``ttl_s`` None holds it until :meth:`release`."""
        if not DEVICE_ID.match(device_id):
            raise TicketError(
                f"device id {device_id!r} must be lowercase letters, digits and dashes (1-63)")
        if ttl_s is not None and not 0 < ttl_s <= MAX_TTL_S:
            raise TicketError(f"a ticket lives 1 s to {MAX_TTL_S} s, not {ttl_s}")
        self.purge(now)
        if len(self._tickets) >= MAX_TICKETS:
            raise TicketError(f"{MAX_TICKETS} tickets are already in force; try again later")
        ticket = f"{device_id}.{secret}"
        expires_at = None if ttl_s is None else now + ttl_s
        digest = ticket_digest(ticket)
        self._tickets[digest] = Ticket(digest, device_id, expires_at)
        return IssuedTicket(ticket, device_id, expires_at)

    def redeem(self, ticket: str, now: float) -> Redeemed | Refusal:
        """Burn ``ticket`` and say whom it names; or say why it is refused.

        The digest is compared with :func:`hmac.compare_digest` against every ticket
        of the device it names (or a dummy), so timing tells nothing about secrets.
        """
        parts = split_token(ticket)
        digest = ticket_digest(ticket)
        device_id = parts[0] if parts else ""
        found: Ticket | None = None
        candidates = [t for t in self._tickets.values() if t.device_id == device_id]
        for candidate in candidates or [Ticket(self._dummy, "", None)]:
            if hmac.compare_digest(candidate.digest, digest) and candidates:
                found = candidate
        if parts is None:
            return Refusal.MALFORMED
        if found is None:
            return Refusal.UNKNOWN
        del self._tickets[found.digest]  # burnt, whatever happens next
        if found.expires_at is not None and found.expires_at <= now:
            return Refusal.EXPIRED
        return Redeemed(found.device_id)

    def release(self, digest: str, now: float, ttl_s: float) -> bool:
        """A held ticket's connection ended: it expires ``ttl_s`` from ``now``."""
        ticket = self._tickets.get(digest)
        if ticket is None or ticket.expires_at is not None:
            return False
        self._tickets[digest] = replace(ticket, expires_at=now + ttl_s)
        return True

    def drop_held(self) -> int:
        """Forget held tickets (a relay starting: their connections are gone)."""
        held = [d for d, t in self._tickets.items() if t.expires_at is None]
        for digest in held:
            del self._tickets[digest]
        return len(held)

    def purge(self, now: float) -> int:
        """Forget expired tickets; return how many."""
        gone = [d for d, t in self._tickets.items()
                if t.expires_at is not None and t.expires_at <= now]
        for digest in gone:
            del self._tickets[digest]
        return len(gone)


class TicketStore:
    """A :class:`TicketBook` kept in a JSON file, read and written under a lock.

    Every operation re-reads the file, so tickets issued by another process (the
    CLI) are seen at once and a burnt ticket is burnt for everyone.
    """

    def __init__(self, path: str | Path, *, wall: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._wall = wall

    def issue(self, device_id: str, ttl_s: float | None) -> IssuedTicket:
        with self._book() as book:
            return book.issue(device_id, secrets.token_urlsafe(32), self._wall(), ttl_s)

    def redeem(self, ticket: str) -> Redeemed | Refusal:
        if split_token(ticket) is None:
            return Refusal.MALFORMED  # no need to touch the file
        with self._book() as book:
            return book.redeem(ticket, self._wall())

    def release(self, digest: str, ttl_s: float) -> bool:
        with self._book() as book:
            return book.release(digest, self._wall(), ttl_s)

    def drop_held(self) -> int:
        with self._book() as book:
            return book.drop_held()

    def tickets(self) -> list[Ticket]:
        with self._book() as book:
            return book.tickets()

    @contextlib.contextmanager
    def _book(self) -> Iterator[TicketBook]:
        with locked_directory(self.path.parent):
            book = TicketBook(self._load())
            before = book.tickets()
            yield book
            book.purge(self._wall())
            if book.tickets() != before:
                self._save(book)

    def _load(self) -> dict[str, Ticket]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ConfigError(str(self.path), "tickets", f"unreadable ticket file: {exc}") from None
        try:
            return {
                str(digest): Ticket(str(digest), str(entry["device"]),
                                    None if entry["expires"] is None else float(entry["expires"]))
                for digest, entry in data["tickets"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(str(self.path), "tickets",
                              f"unreadable ticket file: {exc!r}") from None

    def _save(self, book: TicketBook) -> None:
        data = {"version": 1, "tickets": {
            t.digest: {"device": t.device_id, "expires": t.expires_at} for t in book.tickets()}}
        write_json_atomic(self.path, data, indent=1)
