"""The small HTTP server: routing, limits, malformed input and the exposure rule."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from health_support import TIMEOUT_FACTOR, fetch, raw_exchange, status_of

from edgevoice.config.base import SettingError
from edgevoice.errors import ConfigError
from edgevoice.health import exposition
from edgevoice.health.http import (
    MAX_BODY_BYTES,
    MAX_HEAD_BYTES,
    HealthSettings,
    HttpApi,
    Request,
    Response,
    is_loopback,
    json_response,
    load_token,
    validate_exposure,
)
from edgevoice.tokens import hash_token

TOKEN = "s3cret-token-value"


async def echo(request: Request) -> Response:
    return json_response(
        200,
        {
            "method": request.method,
            "path": request.path,
            "query": dict(request.query),
            "body": request.body.decode(),
        },
    )


async def action(request: Request) -> Response:
    return json_response(202, {"accepted": True})


ROUTES = {("GET", "/echo"): echo, ("POST", "/echo"): echo, ("POST", "/act"): action}


def serve(
    scenario: Callable[[HttpApi], Awaitable[None]],
    routes: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]] | None = None,
    **kwargs: object,
) -> None:
    """Run ``scenario`` against a started server on 127.0.0.1 (unless told otherwise)."""

    async def main() -> None:
        kwargs.setdefault("bind_host", "127.0.0.1")
        api = HttpApi(routes if routes is not None else ROUTES, port=0, **kwargs)  # type: ignore[arg-type]
        await api.start()
        try:
            await scenario(api)
        finally:
            await api.stop()

    asyncio.run(main())


# ------------------------------------------------------------------------- routing


def test_routes_answer_and_parse_path_query_and_body() -> None:
    async def scenario(api: HttpApi) -> None:
        reply = await fetch(api.port, "/echo?x=1&y=%20z")
        assert reply.status == 200
        assert reply.headers["content-type"] == "application/json"
        assert reply.headers["connection"] == "close"
        assert json.loads(reply.body) == {
            "method": "GET",
            "path": "/echo",
            "query": {"x": "1", "y": " z"},
            "body": "",
        }
        reply = await fetch(api.port, "/echo", method="POST", body=b"hello")
        assert json.loads(reply.body)["body"] == "hello"

    serve(scenario)


def test_unknown_path_is_404_and_wrong_method_is_405_with_allow() -> None:
    async def scenario(api: HttpApi) -> None:
        assert (await fetch(api.port, "/nope")).status == 404
        reply = await fetch(api.port, "/act")
        assert reply.status == 405
        assert reply.headers["allow"] == "POST"
        reply = await fetch(api.port, "/echo", method="DELETE")
        assert reply.status == 405
        assert reply.headers["allow"] == "GET, HEAD, POST"

    serve(scenario)


def test_head_sends_headers_without_body() -> None:
    async def scenario(api: HttpApi) -> None:
        raw = await raw_exchange(api.port, b"HEAD /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        assert status_of(raw) == 200
        assert body == b""
        length = int(
            next(ln for ln in head.split(b"\r\n") if ln.startswith(b"Content-Length")).split(b":")[
                1
            ]
        )
        assert length > 0  # the length of the body a GET would have had

    serve(scenario)


def test_handler_failure_is_500_and_slow_handler_is_503() -> None:
    async def broken(request: Request) -> Response:
        raise RuntimeError("bug")

    async def slow(request: Request) -> Response:
        await asyncio.sleep(60)
        return json_response(200, {})

    async def scenario(api: HttpApi) -> None:
        assert (await fetch(api.port, "/broken")).status == 500
        assert (await fetch(api.port, "/slow")).status == 503
        assert (await fetch(api.port, "/echo")).status == 200

    serve(
        scenario,
        {("GET", "/broken"): broken, ("GET", "/slow"): slow, ("GET", "/echo"): echo},
        handler_timeout_s=0.2 * TIMEOUT_FACTOR,
    )


# ------------------------------------------------------------------ malformed input


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /echo\r\n\r\n", 400),
        (b"GET echo HTTP/1.1\r\n\r\n", 400),
        (b"GET /echo HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET /echo HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: \x01\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: \xe9\r\n\r\n", 400),
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n"
         b"\r\n", 400),
        (b"GET /\xff HTTP/1.1\r\n\r\n", 400),
        (b"\r\n", 400),
        (b"GET /echo HTTP/1.1\r\nHost: x", 400),  # closed inside the head
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nshort", 400),
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
        (f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n"
         .encode(), 413),
        (b"GET /echo HTTP/1.1\r\nX-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n", 431),
        (b"GET /echo HTTP/1.1\r\n" + b"X-Many: aaaaaaaaaa\r\n" * 600 + b"\r\n", 431),
    ],
)
def test_malformed_or_oversized_requests_are_refused_and_serving_goes_on(
    request_bytes: bytes, status: int
) -> None:
    async def scenario(api: HttpApi) -> None:
        raw = await raw_exchange(api.port, request_bytes)
        assert status_of(raw) == status
        assert b"Connection: close" in raw
        # The server survived: a well-formed request still works.
        assert (await fetch(api.port, "/echo")).status == 200

    serve(scenario)


def test_largest_allowed_body_is_accepted() -> None:
    async def scenario(api: HttpApi) -> None:
        body = b"x" * MAX_BODY_BYTES
        reply = await fetch(api.port, "/echo", method="POST", body=body)
        assert reply.status == 200
        assert len(json.loads(reply.body)["body"]) == MAX_BODY_BYTES

    serve(scenario)


def test_a_client_that_stalls_gets_408() -> None:
    async def scenario(api: HttpApi) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        writer.write(b"GET /echo HTTP/1.1\r\n")  # and never the blank line
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10 * TIMEOUT_FACTOR)
        writer.close()
        await writer.wait_closed()
        assert status_of(raw) == 408
        assert (await fetch(api.port, "/echo")).status == 200

    serve(scenario, read_timeout_s=0.3 * TIMEOUT_FACTOR)


def test_a_new_connection_takes_the_slot_of_an_idle_one() -> None:
    async def scenario(api: HttpApi) -> None:
        idle_reader, idle = await asyncio.open_connection("127.0.0.1", api.port)
        await asyncio.sleep(0.05)  # let the server accept the idle one first
        assert (await fetch(api.port, "/echo")).status == 200
        assert api.evicted == 1
        assert await asyncio.wait_for(idle_reader.read(), 5 * TIMEOUT_FACTOR) == b""
        idle.close()
        await idle.wait_closed()

    serve(scenario, max_connections=1)


def test_connections_beyond_the_limit_get_503_while_every_slot_is_served() -> None:
    release = asyncio.Event()

    async def busy(request: Request) -> Response:
        await release.wait()
        return json_response(200, {})

    async def scenario(api: HttpApi) -> None:
        first = asyncio.create_task(
            raw_exchange(api.port, b"GET /busy HTTP/1.1\r\nHost: x\r\n\r\n"))
        for _ in range(100):  # until its handler runs
            if api.connections == 1:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        raw = await raw_exchange(api.port, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(raw) == 503 and api.refused == 1
        release.set()
        assert status_of(await first) == 200

    serve(scenario, {("GET", "/busy"): busy, ("GET", "/echo"): echo}, max_connections=1)


def test_a_slow_head_gets_408_within_the_head_timeout_not_the_read_timeout() -> None:
    async def scenario(api: HttpApi) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        started = asyncio.get_running_loop().time()
        for byte in b"GET /echo HTTP/1.1\r\nHost: x\r\n":  # a byte at a time, slowly
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)
            if reader.at_eof():
                break
        raw = await asyncio.wait_for(reader.read(), 10 * TIMEOUT_FACTOR)
        took = asyncio.get_running_loop().time() - started
        writer.close()
        assert status_of(raw) == 408 and api.timed_out == 1
        assert took < 5.0 * TIMEOUT_FACTOR  # the 60 s read timeout did not apply

    serve(scenario, read_timeout_s=60, head_timeout_s=0.5 * TIMEOUT_FACTOR)


async def slowloris(port: int, source: str, stop: asyncio.Event, opened: list[int]) -> None:
    """One attacker socket after another: a partial head, a byte now and then."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0))
        except OSError:
            await asyncio.sleep(0.05)
            continue
        opened[0] += 1
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            while not stop.is_set() and not reader.at_eof():
                await asyncio.sleep(0.2)
                writer.write(b"X")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


@pytest.mark.parametrize("attackers_share_the_operators_address", [False, True])
def test_the_operators_healthz_answers_under_slow_unauthenticated_clients(
    attackers_share_the_operators_address: bool,
) -> None:
    """Issue 11 #10: bound beyond loopback, 24 slowloris clients (from 24 addresses, or
    from the operator's own) held slots, and 68 % of authorised /healthz got 503."""

    async def healthz(request: Request) -> Response:
        return json_response(200, {"status": "ok"})

    async def scenario(api: HttpApi) -> None:
        stop = asyncio.Event()
        opened = [0]
        sources = ["127.0.0.1"] * 24 if attackers_share_the_operators_address else \
            [f"127.0.0.{k}" for k in range(2, 26)]
        attackers = [asyncio.create_task(slowloris(api.port, src, stop, opened))
                     for src in sources]
        try:
            await asyncio.sleep(0.5)  # every attacker holds a socket
            statuses = []
            for _ in range(20):
                reply = await fetch(api.port, "/healthz", token=TOKEN)
                statuses.append(reply.status)
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.gather(*attackers)
        assert statuses == [200] * 20
        assert opened[0] >= 24  # the attack ran
        assert api.evicted > 0  # and what made room was the attackers' sockets
        scraped = exposition.render(exposition.endpoint_metrics(api, "edgevoice_health"))
        assert f"edgevoice_health_connections_evicted_total {float(api.evicted)}".encode() \
            in scraped

    serve(scenario, {("GET", "/healthz"): healthz}, bind_host="0.0.0.0",
          token_sha256=hash_token(TOKEN), max_connections=16, max_per_address=8)


def test_stop_does_not_wait_for_idle_clients() -> None:
    async def main() -> None:
        api = HttpApi(ROUTES, "127.0.0.1", 0, read_timeout_s=60)
        await api.start()
        port = api.port
        _, idle = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.05)
        await asyncio.wait_for(api.stop(), 5 * TIMEOUT_FACTOR)
        idle.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    asyncio.run(main())


# ------------------------------------------------------------------------- auth


def test_loopback_without_token_allows_everything() -> None:
    async def scenario(api: HttpApi) -> None:
        assert (await fetch(api.port, "/echo")).status == 200
        assert (await fetch(api.port, "/act", method="POST")).status == 202

    serve(scenario)


def test_loopback_with_token_opens_reads_but_guards_actions() -> None:
    async def scenario(api: HttpApi) -> None:
        assert (await fetch(api.port, "/echo")).status == 200
        reply = await fetch(api.port, "/act", method="POST")
        assert reply.status == 401
        assert reply.headers["www-authenticate"].startswith("Bearer")
        assert (await fetch(api.port, "/act", method="POST", token="wrong")).status == 401
        assert (await fetch(api.port, "/act", method="POST", token=TOKEN)).status == 202
        # A wrong token is refused even where none is needed.
        assert (await fetch(api.port, "/echo", token="wrong")).status == 401
        assert api.auth_failures == 3

    serve(scenario, token_sha256=hash_token(TOKEN))


def test_authorization_needs_the_bearer_scheme() -> None:
    async def scenario(api: HttpApi) -> None:
        for header, expected in (
            (f"Basic {TOKEN}", 401),
            ("Bearer", 401),
            (f"Bearer {TOKEN}x", 401),
            (f"Bearer  {TOKEN} ", 202),
            (f"bearer {TOKEN}", 202),
        ):
            raw = await raw_exchange(
                api.port,
                f"POST /act HTTP/1.1\r\nHost: x\r\nAuthorization: {header}\r\n\r\n".encode(),
            )
            assert status_of(raw) == expected, header

    serve(scenario, token_sha256=hash_token(TOKEN))


def test_binding_beyond_loopback_without_token_refuses_to_start() -> None:
    with pytest.raises(ConfigError, match="token"):
        HttpApi(ROUTES, "0.0.0.0", 0, None)
    with pytest.raises(ConfigError, match=r"health\.token_file"):
        validate_exposure(HealthSettings(bind="0.0.0.0"), None)
    with pytest.raises(ConfigError):
        validate_exposure(HealthSettings(bind="pi.example"), "")
    validate_exposure(HealthSettings(bind="0.0.0.0"), TOKEN)
    validate_exposure(HealthSettings(bind="127.0.0.1"), None)
    validate_exposure(HealthSettings(bind="localhost"), None)


def test_binding_beyond_loopback_requires_the_token_on_every_route() -> None:
    async def scenario(api: HttpApi) -> None:
        for path in ("/echo", "/nope"):
            reply = await fetch(api.port, path)
            assert reply.status == 401, path
            assert "www-authenticate" in reply.headers
        assert (await fetch(api.port, "/echo", token=TOKEN)).status == 200
        assert (await fetch(api.port, "/nope", token=TOKEN)).status == 404

    serve(scenario, bind_host="0.0.0.0", token_sha256=hash_token(TOKEN))


def test_the_token_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario(api: HttpApi) -> None:
        await fetch(api.port, "/echo", token=TOKEN)
        await fetch(api.port, "/echo", token=TOKEN + "x")
        await raw_exchange(api.port, f"GET /echo HTTP/1.1\r\nAuthorization: {TOKEN}\r\n".encode())

    serve(scenario, bind_host="0.0.0.0", token_sha256=hash_token(TOKEN))
    assert caplog.records  # the server did log, just not the secret
    assert TOKEN not in caplog.text
    assert hash_token(TOKEN) not in caplog.text


def test_token_hash_must_be_a_sha256_hex_digest() -> None:
    with pytest.raises(ValueError, match="hex"):
        HttpApi(ROUTES, "127.0.0.1", 0, TOKEN)
    HttpApi(ROUTES, "127.0.0.1", 0, hash_token(TOKEN).upper())


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.168.1.10", False),
        ("raspberrypi.local", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# ------------------------------------------------------------------ token file, settings


def test_load_token_reads_the_first_line(tmp_path: Path) -> None:
    path = tmp_path / "health.token"
    path.write_text(f"  {TOKEN}  \nignored\n")
    path.chmod(0o600)
    assert load_token(path) == TOKEN


def test_load_token_refuses_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.token"
    empty.write_text("\n \n")
    with pytest.raises(ConfigError, match="empty"):
        load_token(empty)
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_token(tmp_path / "missing.token", key="admin.token_file")
    assert info.value.key == "admin.token_file"


def test_load_token_warns_about_a_readable_file_without_logging_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "health.token"
    path.write_text(TOKEN)
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING):
        load_token(path)
    assert "chmod 600" in caplog.text
    assert TOKEN not in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"bind": " "}, "bind"),
        ({"port": 70000}, "port"),
        ({"port": -1}, "port"),
        ({"no_audio_after_s": 0}, "no_audio_after_s"),
        ({"relay_unreachable_after_s": -1}, "relay_unreachable_after_s"),
        ({"watchdog_late_after_s": 0}, "watchdog_late_after_s"),
    ],
)
def test_health_settings_reject_bad_values(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(SettingError) as info:
        HealthSettings(**kwargs)  # type: ignore[arg-type]
    assert info.value.key == key


def test_health_settings_defaults() -> None:
    settings = HealthSettings()
    assert (settings.bind, settings.port, settings.token_file) == ("127.0.0.1", 8765, None)
