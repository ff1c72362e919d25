"""Test helpers for the health endpoints: a real HTTP client and a raw-socket one.

The server under test runs in the test's own event loop, so the blocking urllib
client is driven from a worker thread.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from dataclasses import dataclass

from edgevoice_dev.testing.timeouts import TIMEOUT_FACTOR


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def _fetch(url: str, method: str, token: str | None, body: bytes | None) -> Reply:
    request = urllib.request.Request(url, data=body, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10 * TIMEOUT_FACTOR) as response:
            return Reply(
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                response.read(),
            )
    except urllib.error.HTTPError as error:
        with error:
            return Reply(error.code, {k.lower(): v for k, v in error.headers.items()}, error.read())


async def fetch(
    port: int,
    path: str,
    *,
    method: str = "GET",
    token: str | None = None,
    body: bytes | None = None,
    host: str = "127.0.0.1",
) -> Reply:
    """One request through urllib (a real client), off the event loop."""
    return await asyncio.to_thread(_fetch, f"http://{host}:{port}{path}", method, token, body)


async def raw_exchange(port: int, data: bytes, *, host: str = "127.0.0.1") -> bytes:
    """Send ``data`` as is, half-close, and return everything the server answers."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), 10 * TIMEOUT_FACTOR)
    finally:
        writer.close()
        await writer.wait_closed()


def status_of(raw: bytes) -> int:
    """The status code of a raw HTTP response."""
    first = raw.split(b"\r\n", 1)[0].decode()
    assert first.startswith("HTTP/1.1 "), first
    return int(first.split()[1])
