"""Browser tickets: hashed at rest, single use, expiring, bound to a device id."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from edgevoice.web.tickets import (
    MAX_TICKETS,
    Redeemed,
    Refusal,
    TicketBook,
    TicketError,
    TicketStore,
    ticket_digest,
)

SECRET = "s" * 43


class Wall:
    """A wall clock the test moves."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_ticket_names_its_device_and_works_once() -> None:
    book = TicketBook()
    issued = book.issue("web-1", SECRET, now=0.0, ttl_s=60)
    assert issued.ticket == f"web-1.{SECRET}" and issued.expires_at == 60.0
    assert book.redeem(issued.ticket, now=1.0) == Redeemed("web-1")
    assert book.redeem(issued.ticket, now=2.0) is Refusal.UNKNOWN  # burnt
    assert len(book) == 0


def test_an_expired_ticket_is_refused_and_burnt() -> None:
    book = TicketBook()
    issued = book.issue("web", SECRET, now=0.0, ttl_s=60)
    assert book.redeem(issued.ticket, now=60.0) is Refusal.EXPIRED
    assert book.redeem(issued.ticket, now=1.0) is Refusal.UNKNOWN


def test_a_ticket_for_another_device_or_secret_is_refused() -> None:
    book = TicketBook()
    book.issue("web", SECRET, now=0.0, ttl_s=60)
    assert book.redeem(f"kitchen.{SECRET}", now=1.0) is Refusal.UNKNOWN
    assert book.redeem(f"web.{'t' * 43}", now=1.0) is Refusal.UNKNOWN
    assert book.redeem("web", now=1.0) is Refusal.MALFORMED
    assert book.redeem("", now=1.0) is Refusal.MALFORMED
    assert len(book) == 1  # failed guesses burn nothing


def test_issuing_checks_the_device_id_and_lifetime() -> None:
    book = TicketBook()
    with pytest.raises(TicketError, match="device id"):
        book.issue("Web!", SECRET, now=0.0, ttl_s=60)
    with pytest.raises(TicketError, match="lives"):
        book.issue("web", SECRET, now=0.0, ttl_s=0)
    with pytest.raises(TicketError, match="lives"):
        book.issue("web", SECRET, now=0.0, ttl_s=10 * 24 * 3600)


def test_the_book_is_bounded_and_forgets_expired_tickets() -> None:
    book = TicketBook()
    for i in range(MAX_TICKETS):
        book.issue("web", f"{i:043d}", now=0.0, ttl_s=10)
    with pytest.raises(TicketError, match="in force"):
        book.issue("web", "x" * 43, now=5.0, ttl_s=10)
    book.issue("web", "x" * 43, now=10.0, ttl_s=10)  # the others expired: purged
    assert len(book) == 1


def test_a_held_ticket_starts_expiring_when_released() -> None:
    book = TicketBook()
    held = book.issue("web", SECRET, now=0.0, ttl_s=None)
    assert held.expires_at is None
    assert book.purge(now=1e9) == 0  # held: never expires by itself
    assert book.release(held.digest, now=100.0, ttl_s=30)
    assert not book.release(held.digest, now=101.0, ttl_s=30)  # only once
    assert book.redeem(held.ticket, now=131.0) is Refusal.EXPIRED
    other = book.issue("web", "o" * 43, now=0.0, ttl_s=None)
    assert book.drop_held() == 1
    assert book.redeem(other.ticket, now=1.0) is Refusal.UNKNOWN


def test_the_store_keeps_only_digests_in_a_private_file(tmp_path: Path) -> None:
    wall = Wall()
    store = TicketStore(tmp_path / "tickets.json", wall=wall)
    issued = store.issue("web", 300)
    text = (tmp_path / "tickets.json").read_text()
    assert issued.ticket not in text and issued.ticket.split(".")[1] not in text
    data = json.loads(text)
    assert data["tickets"][ticket_digest(issued.ticket)] == {
        "device": "web", "expires": wall.now + 300}
    assert stat.S_IMODE((tmp_path / "tickets.json").stat().st_mode) == 0o600


def test_a_ticket_issued_by_another_process_is_burnt_for_everyone(tmp_path: Path) -> None:
    wall = Wall()
    relay_a = TicketStore(tmp_path / "tickets.json", wall=wall)
    relay_b = TicketStore(tmp_path / "tickets.json", wall=wall)
    issued = TicketStore(tmp_path / "tickets.json", wall=wall).issue("web", 60)  # the CLI
    assert relay_a.redeem(issued.ticket) == Redeemed("web")
    assert relay_b.redeem(issued.ticket) is Refusal.UNKNOWN


def test_expiry_follows_the_wall_clock(tmp_path: Path) -> None:
    wall = Wall()
    store = TicketStore(tmp_path / "tickets.json", wall=wall)
    issued = store.issue("web", 60)
    wall.now += 61
    assert store.redeem(issued.ticket) is Refusal.EXPIRED
    assert store.tickets() == []


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "tickets.json"
    issued: list[str] = []

    def issue_many() -> None:
        store = TicketStore(path)
        for _ in range(40):
            issued.append(store.issue("web", 60).ticket)

    threads = [threading.Thread(target=issue_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store = TicketStore(path)
    assert len(store.tickets()) == 160
    assert all(isinstance(store.redeem(t), Redeemed) for t in issued)


def test_a_corrupt_file_is_reported_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / "tickets.json"
    path.write_text("{not json")
    from edgevoice.errors import ConfigError
    with pytest.raises(ConfigError, match=r"tickets\.json"):
        TicketStore(path).issue("web", 60)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_ticket_file_belongs_to_the_owner_of_its_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 4242, 4243)
    TicketStore(state / "tickets.json").issue("web", 60)
    st = (state / "tickets.json").stat()
    assert (st.st_uid, st.st_gid) == (4242, 4243)
