"""``edgevoice token ticket NAME``: issue a browser ticket and print the page URL."""

from __future__ import annotations

import datetime
import sys

from edgevoice.config.relay import RelayConfig
from edgevoice.web.gate import page_url
from edgevoice.web.tickets import TicketError, TicketStore


def issue_ticket(config: RelayConfig, name: str | None, ttl_s: int | None) -> int:
    """Print a new ticket for ``name`` on stdout (shown once), and how to use it on stderr."""
    if not name:
        print("edgevoice token ticket: give the device name", file=sys.stderr)
        return 2
    ttl = config.web.ticket_ttl_s if ttl_s is None else ttl_s
    try:
        issued = TicketStore(config.web.tickets_file).issue(name, float(ttl))
    except TicketError as exc:
        print(f"edgevoice token ticket: {exc}", file=sys.stderr)
        return 2
    assert issued.expires_at is not None
    expires = datetime.datetime.fromtimestamp(issued.expires_at, datetime.UTC)
    print(issued.ticket)
    url = f"{page_url(config.web, config.listen)}#ticket={issued.ticket}"
    print(f"# browser ticket for {name!r}: single use, expires {expires:%H:%M:%S} UTC; open\n"
          f"#   {url}", file=sys.stderr)
    if not config.web.enabled:
        print("# the relay does not serve the page yet: set web.enabled: true and restart it",
              file=sys.stderr)
    return 0
