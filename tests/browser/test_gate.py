"""The relay's browser door, driven by a plain WebSocket client (no browser needed):
the page, ticket admission, Origin checks, reconnect tickets, the admin endpoint and
the CLI. The Bearer path for daemons is unchanged."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from browser_support import ADMIN_TOKEN, BrowserRelay, browser_relay
from edgevoice_dev.testing.timeouts import scaled
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from edgevoice.config.relay import RelayConfig
from edgevoice.protocol.messages import SUBPROTOCOL, Hello, ResumeRequest, encode_message
from edgevoice.relay.app import build_server
from edgevoice.relay.settings import ListenSettings
from edgevoice.web.gate import WebSettings, origin_allowed, page_url


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, scaled(60)))


def ws_url(relay: BrowserRelay) -> str:
    return f"ws://127.0.0.1:{relay.server.port}/"


def own_origin(relay: BrowserRelay) -> str:
    return f"http://127.0.0.1:{relay.server.port}"


async def open_with_ticket(relay: BrowserRelay, ticket: str,
                           origin: str | None = None) -> ClientConnection:
    return await connect(ws_url(relay), subprotocols=[  # type: ignore[list-item]
        SUBPROTOCOL, f"edgevoice.ticket.{ticket}"], origin=origin or own_origin(relay),
        proxy=None)  # type: ignore[arg-type]


async def hello(ws: ClientConnection, device: str,
                resume: ResumeRequest | None = None) -> dict[str, Any]:
    await ws.send(encode_message(Hello(device, resume=resume)))
    welcome = json.loads(await ws.recv())
    assert welcome["type"] == "welcome"
    return welcome  # type: ignore[no-any-return]


def http_get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_the_page_is_off_by_default(tmp_path: Path) -> None:
    async def scenario() -> int:
        base = RelayConfig()
        server = build_server(replace(
            base, listen=replace(base.listen, port=0),
            auth=replace(base.auth, tokens_file=str(tmp_path / "tokens.json"))))
        assert server.browser is None
        await server.start()
        try:
            status, _, body = await asyncio.to_thread(
                http_get, f"http://127.0.0.1:{server.port}/")
        finally:
            await server.close()
        assert b"<html" not in body
        return status
    assert run(scenario()) == 401  # what any request without a device token gets


def test_the_page_and_its_modules_are_served_with_a_strict_policy(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with browser_relay(tmp_path) as relay:
            status, headers, body = await asyncio.to_thread(http_get, relay.url)
            assert status == 200 and b"<html" in body
            assert headers["Content-Type"].startswith("text/html")
            assert "script-src 'self'" in headers["Content-Security-Policy"]
            assert headers["Cache-Control"] == "no-store"
            for name in ("app.js", "link.js", "protocol.js", "capture-worklet.js",
                         "player-worklet.js", "resampler.js", "detector.js"):
                status, headers, body = await asyncio.to_thread(http_get, relay.url + name)
                assert status == 200 and headers["Content-Type"].startswith("text/javascript")
            status, _, _ = await asyncio.to_thread(http_get, relay.url + "../tokens.json")
            assert status == 404
            status, _, _ = await asyncio.to_thread(http_get, relay.url + "nothing.js")
            assert status == 404
    run(scenario())


def test_a_ticket_admits_its_device_once_and_welcome_carries_a_reconnect_ticket(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with browser_relay(tmp_path) as relay:
            ticket = await relay.mint("laptop")
            async with await open_with_ticket(relay, ticket) as ws:
                assert ws.subprotocol == SUBPROTOCOL
                welcome = await hello(ws, "laptop")
                assert welcome["ticket"] and welcome["ticket"].startswith("laptop.")
                assert welcome["ticket"] != ticket
            with pytest.raises(InvalidStatus) as refused:
                await open_with_ticket(relay, ticket)  # burnt
            assert refused.value.response.status_code == 401
            assert relay.gate.tickets_accepted == 1 and relay.gate.tickets_refused == 1
            assert relay.server.counters.auth_failures == 1
    run(scenario())


def test_the_hello_must_name_the_ticket_s_device(tmp_path: Path) -> None:
    async def scenario() -> int | None:
        async with browser_relay(tmp_path) as relay:
            ws = await open_with_ticket(relay, await relay.mint("laptop"))
            await ws.send(encode_message(Hello("kitchen")))
            await ws.wait_closed()
            return ws.close_code
    assert run(scenario()) == 1008


def test_an_expired_ticket_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with browser_relay(tmp_path) as relay:
            ticket = await relay.mint("laptop", ttl_s=30)
            relay.wall.offset = 31
            with pytest.raises(InvalidStatus) as refused:
                await open_with_ticket(relay, ticket)
            assert refused.value.response.status_code == 401
    run(scenario())


def test_a_wrong_or_missing_origin_is_refused_and_does_not_burn_the_ticket(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with browser_relay(tmp_path) as relay:
            ticket = await relay.mint("laptop")
            for origin in ("http://evil.example", f"http://127.0.0.1:{relay.server.port + 1}",
                           "null"):
                with pytest.raises(InvalidStatus) as refused:
                    await open_with_ticket(relay, ticket, origin=origin)
                assert refused.value.response.status_code == 403
            with pytest.raises(InvalidStatus) as refused:
                await connect(ws_url(relay), subprotocols=[  # type: ignore[list-item]
                    SUBPROTOCOL, f"edgevoice.ticket.{ticket}"], proxy=None)
            assert refused.value.response.status_code == 403
            assert relay.gate.origins_refused == 4
            async with await open_with_ticket(relay, ticket) as ws:  # still good
                await hello(ws, "laptop")
    run(scenario())


def test_bad_tickets_count_towards_the_per_address_limit(tmp_path: Path) -> None:
    async def scenario() -> list[int]:
        async with browser_relay(tmp_path) as relay:
            statuses = []
            for _ in range(11):
                with pytest.raises(InvalidStatus) as refused:
                    await open_with_ticket(relay, "laptop." + "x" * 43)
                statuses.append(refused.value.response.status_code)
            return statuses
    assert run(scenario()) == [401] * 10 + [429]


def test_the_reconnect_ticket_resumes_the_session_and_expires_after_the_drop(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with browser_relay(tmp_path) as relay:
            ws = await open_with_ticket(relay, await relay.mint("laptop"))
            first = await hello(ws, "laptop")
            ws.transport.abort()  # a drop, not a goodbye
            await asyncio.sleep(0.2)
            ws2 = await open_with_ticket(relay, first["ticket"])
            second = await hello(ws2, "laptop", ResumeRequest(first["session_id"]))
            assert second["resume"]["resumed"] and second["session_id"] == first["session_id"]
            assert relay.server.counters.sessions_resumed == 1
            await ws2.close()
            await asyncio.sleep(0.2)  # the relay releases the held ticket on close
            relay.wall.offset = WebSettings().reconnect_ttl_s + 1
            with pytest.raises(InvalidStatus):
                await open_with_ticket(relay, second["ticket"])
    run(scenario())


def test_daemons_keep_the_bearer_path_and_get_no_ticket(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with browser_relay(tmp_path) as relay:
            token = relay.server.tokens.add("kitchen")
            async with connect(ws_url(relay), subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                               additional_headers={"Authorization": f"Bearer {token}"},
                               proxy=None) as ws:
                welcome = await hello(ws, "kitchen")
                assert "ticket" not in welcome
            with pytest.raises(InvalidStatus) as refused:
                await connect(ws_url(relay), subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                              additional_headers={"Authorization": "Bearer kitchen.nope"},
                              proxy=None)
            assert refused.value.response.status_code == 401
    run(scenario())


def test_minting_over_http_needs_the_admin_token(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with browser_relay(tmp_path) as relay:
            status, _ = await asyncio.to_thread(
                relay.admin, "POST", "/tickets", {"device": "laptop"}, "wrong-token")
            assert status == 401
            status, answer = await asyncio.to_thread(
                relay.admin, "POST", "/tickets", {"device": "Laptop!"})
            assert status == 400
            status, answer = await asyncio.to_thread(
                relay.admin, "POST", "/tickets", {"device": "laptop", "ttl_s": 60})
            assert status == 201
            assert answer["url"] == f"{relay.url}#ticket={answer['ticket']}"
            assert ADMIN_TOKEN not in json.dumps(answer)
    run(scenario())


def test_without_an_admin_token_the_endpoint_refuses_to_mint() -> None:
    from edgevoice.health.http import Request
    from edgevoice.web.gate import ticket_routes
    from edgevoice.web.tickets import TicketStore

    routes = ticket_routes(TicketStore("/nonexistent/tickets.json"), WebSettings(),
                           ListenSettings(), admin_token_set=False)
    request = Request("POST", "/tickets", {}, {}, b'{"device": "laptop"}', "127.0.0.1:1")
    response = asyncio.run(routes[("POST", "/tickets")](request))
    assert response.status == 403 and b"admin.token_file" in response.body


def test_origin_rules() -> None:
    assert origin_allowed("http://127.0.0.1:8780", "127.0.0.1:8780", (), tls=False)
    assert origin_allowed("https://relay.example", "relay.example", (), tls=True)
    assert not origin_allowed("http://relay.example", "relay.example:8780", (), tls=False)
    assert not origin_allowed("https://evil.example", "relay.example", (), tls=True)
    assert origin_allowed("https://app.example", "relay.example", ("https://app.example",),
                          tls=True)
    assert not origin_allowed("http://app.example", "relay.example", ("https://app.example",),
                              tls=False)
    assert not origin_allowed(None, "relay.example", (), tls=False)
    assert not origin_allowed("null", "relay.example", (), tls=False)


def test_bad_web_settings_are_refused() -> None:
    from edgevoice.errors import ConfigError
    with pytest.raises((ConfigError, ValueError), match="allowed_origins"):
        WebSettings(allowed_origins=("relay.example",))
    with pytest.raises((ConfigError, ValueError), match="ticket_ttl_s"):
        WebSettings(ticket_ttl_s=0)
    assert page_url(WebSettings(), ListenSettings(host="0.0.0.0", port=9000)) == \
        "http://localhost:9000/"


def test_cli_issues_a_ticket_the_relay_accepts(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with browser_relay(tmp_path) as relay:
            config = tmp_path / "relay.yaml"
            config.write_text(
                f"auth: {{tokens_file: {tmp_path / 'tokens.json'}}}\n"
                f"web: {{enabled: true, tickets_file: {relay.store.path}}}\n")
            done = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "edgevoice", "token", "ticket", "laptop",
                                 "--config", str(config)],
                capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            ticket = done.stdout.strip()
            assert ticket.startswith("laptop.") and "#ticket=" + ticket in done.stderr
            assert ticket not in relay.store.path.read_text()
            async with await open_with_ticket(relay, ticket) as ws:
                await hello(ws, "laptop")
    run(scenario())


def test_an_unreadable_ticket_store_refuses_browsers_and_nothing_else(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with browser_relay(tmp_path) as relay:
            ticket = await relay.mint("laptop")
            relay.store.path.write_text("{ torn write")
            with pytest.raises(InvalidStatus) as refused:
                await open_with_ticket(relay, ticket)
            assert refused.value.response.status_code == 503
            assert relay.server.counters.auth_failures == 0  # not the browser's fault
            status, answer = await asyncio.to_thread(
                relay.admin, "POST", "/tickets", {"device": "laptop"})
            assert status == 503 and "tickets.json" in answer["error"]
            token = relay.server.tokens.add("kitchen")  # daemons are not affected
            async with connect(ws_url(relay), subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                               additional_headers={"Authorization": f"Bearer {token}"},
                               proxy=None) as ws:
                await hello(ws, "kitchen")
    run(scenario())
