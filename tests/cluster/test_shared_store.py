"""The state relays share through a real redis-server: tokens, fleet, limiter, history."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from edgevoice_dev.testing.cluster import KEY_PREFIX, RedisServer, missing_tools, until

from edgevoice.relay.auth import FailureLimiter, TokenExistsError
from edgevoice.relay.shared import (
    HistoryKeepingUpstream,
    MemoryHistory,
    RedisState,
    RedisTokens,
    RefreshSchedule,
    SharedStoreSettings,
    liveness_ttl_ms,
)
from edgevoice.upstream.base import DeviceContext, HistoryLine, TranscriptReceived
from edgevoice.upstream.echo import EchoUpstream

pytestmark = pytest.mark.skipif(bool(missing_tools()),
                                reason="needs redis-server and haproxy: ./scripts/setup --test")


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def relay_state(url: str, relay_id: str, *, failures: int = 10,
                      refresh_ms: int = 100) -> AsyncIterator[RedisState]:
    state = RedisState(SharedStoreSettings(kind="redis", url=url, key_prefix=KEY_PREFIX,
                                           refresh_ms=refresh_ms), relay_id, failures)
    await state.start()
    try:
        yield state
    finally:
        await state.aclose()


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


def test_a_token_added_anywhere_is_accepted_by_every_relay_and_removal_too(
        redis_url: str) -> None:
    async def scenario() -> None:
        async with relay_state(redis_url, "a") as a, relay_state(redis_url, "b") as b:
            cli = RedisTokens(redis_url, KEY_PREFIX)
            token = await asyncio.to_thread(cli.add, "kitchen")
            await until(lambda: a.tokens.verify(token) == "kitchen"
                        and b.tokens.verify(token) == "kitchen", 5, "token everywhere")
            assert a.tokens.verify(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
            assert a.tokens.verify("kitchen.") is None
            assert await asyncio.to_thread(cli.devices) == ["kitchen"]
            # a second add would lock out the device using the first: refused unless asked
            with pytest.raises(TokenExistsError):
                await asyncio.to_thread(cli.add, "kitchen")
            assert a.tokens.verify(token) == "kitchen"
            assert await asyncio.to_thread(cli.remove, "kitchen")
            await until(lambda: b.tokens.verify(token) is None, 5, "token gone everywhere")
            # only digests are stored
            import redis
            with redis.Redis.from_url(redis_url, decode_responses=True) as client:
                assert token not in str(client.hgetall(f"{KEY_PREFIX}tokens"))

    run(scenario())


def test_the_token_file_seeds_an_empty_store(redis_url: str, tmp_path: Path) -> None:
    from edgevoice.relay.auth import TokenStore
    token = TokenStore(tmp_path / "tokens.json").add("porch")

    async def scenario() -> None:
        state = RedisState(SharedStoreSettings(kind="redis", url=redis_url), "a", 10)
        await state.start(tokens_file=str(tmp_path / "tokens.json"))
        try:
            assert state.tokens.verify(token) == "porch"
        finally:
            await state.aclose()

    run(scenario())


def test_the_fleet_view_is_the_same_from_every_relay(redis_url: str) -> None:
    async def scenario() -> None:
        async with relay_state(redis_url, "a") as a, relay_state(redis_url, "b") as b:
            now = time.time()
            a.fleet.connected("kitchen", session_id="s1", address="10.0.0.2", at=now)
            a.fleet.stats_received("kitchen", {"rtt_ms": 12}, at=now)
            b.fleet.connected("hall", session_id="s2", address="10.0.0.3", at=now)
            for state in (a, b):
                state.fleet.records()  # someone asked: the view refreshes from now on

            def view(state: RedisState) -> dict[str, bool]:
                return {r.device_id: r.connected for r in state.fleet.records()}
            await until(lambda: view(a) == view(b) == {"kitchen": True, "hall": True}, 5,
                        "both devices on both relays")
            kitchen = next(r for r in b.fleet.records() if r.device_id == "kitchen")
            assert kitchen.last_stats == {"rtt_ms": 12}
            # kitchen moves to b; a notices its old connection's end only afterwards
            b.fleet.connected("kitchen", session_id="s3", address="10.0.0.2", at=now + 1)
            await asyncio.sleep(0.3)
            a.fleet.disconnected("kitchen", session_id="s1", at=now + 2)
            await asyncio.sleep(0.5)
            record = next(r for r in a.fleet.records() if r.device_id == "kitchen")
            assert record.connected and record.session_id == "s3"
            assert record.connections == 2  # counted across relays
        # both relays are gone: a third sees their devices as disconnected
        async with relay_state(redis_url, "c") as c:
            c.fleet.records()
            await until(lambda: len(c.fleet.records()) == 2
                        and not any(r.connected for r in c.fleet.records()), 5,
                        "devices of stopped relays shown disconnected")

    run(scenario())


def test_a_fleet_of_heartbeats_is_written_in_one_round_trip_per_refresh(
        redis_url: str) -> None:
    async def scenario() -> None:
        async with relay_state(redis_url, "a", refresh_ms=300) as a, \
                relay_state(redis_url, "b", refresh_ms=300) as b:
            now = time.time()
            for k in range(50):
                a.fleet.connected(f"d{k:02d}", session_id=f"s{k}", address=None, at=now)
            for k in range(50):  # a second's worth of heartbeats from a large fleet
                a.fleet.stats_received(f"d{k:02d}", {"rtt_ms": k}, at=now)
            a.fleet.stats_received("d07", {"rtt_ms": 700}, at=now)  # the newest wins
            b.fleet.records()

            def seen() -> dict[str, object]:
                return {r.device_id: (r.last_stats or {}).get("rtt_ms")
                        for r in b.fleet.records()}
            await until(lambda: len(seen()) == 50 and None not in seen().values(), 5,
                        "every device's stats on the other relay")
            assert seen()["d07"] == 700 and seen()["d49"] == 49
            assert (a.fleet.batches_written, a.fleet.batched_documents) == (1, 50)

    run(scenario())


def test_batched_stats_never_overwrite_a_device_that_moved_to_another_relay(
        redis_url: str) -> None:
    async def scenario() -> None:
        async with relay_state(redis_url, "a", refresh_ms=300) as a, \
                relay_state(redis_url, "b", refresh_ms=300) as b:
            now = time.time()
            a.fleet.connected("kitchen", session_id="s1", address=None, at=now)
            await asyncio.sleep(0.1)
            a.fleet.stats_received("kitchen", {"rtt_ms": 1}, at=now)  # batched, pending
            b.fleet.connected("kitchen", session_id="s2", address=None, at=now + 1)
            b.fleet.stats_received("kitchen", {"rtt_ms": 2}, at=now + 1)
            await until(lambda: a.fleet.batches_written == 1
                        and b.fleet.batches_written == 1, 5, "both batches written")
            import redis
            with redis.Redis.from_url(redis_url, decode_responses=True) as client:
                document = json.loads(client.hget(f"{KEY_PREFIX}fleet", "kitchen"))
            assert (document["relay"], document["session_id"]) == ("b", "s2")
            assert document["last_stats"] == {"rtt_ms": 2}

    run(scenario())


def test_stats_batched_while_the_store_is_away_are_written_when_it_is_back(
        tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()

    async def scenario() -> None:
        async with relay_state(server.url, "a", refresh_ms=200) as a:
            a.fleet.connected("porch", session_id="s1", address=None, at=time.time())
            await asyncio.sleep(0.3)
            server.stop()
            await until(lambda: not a.reachable, 5, "store seen down")
            a.fleet.stats_received("porch", {"rtt_ms": 5}, at=time.time())
            await asyncio.sleep(1.0)  # a batch or two fail
            assert a.fleet.batches_written == 0
            server.start()
            await until(lambda: a.fleet.batches_written >= 1, 10, "batch written after all")
            import redis
            with redis.Redis.from_url(server.url, decode_responses=True) as client:
                document = client.hget(f"{KEY_PREFIX}fleet", "porch")
            assert document is not None and json.loads(document)["last_stats"] == {"rtt_ms": 5}

    try:
        run(scenario())
    finally:
        server.stop()


def test_bad_tokens_are_limited_across_the_fleet(redis_url: str) -> None:
    async def scenario() -> None:
        async with relay_state(redis_url, "a", failures=4) as a, \
                relay_state(redis_url, "b", failures=4) as b:
            now = 100.0
            for _ in range(2):
                a.limiter.record_failure("192.0.2.7", now)
                b.limiter.record_failure("192.0.2.7", now)
            # neither relay alone has seen 4 ...
            for state in (a, b):
                assert not FailureLimiter.blocked(state.limiter, "192.0.2.7", now)
            # ... but the fleet has
            await until(lambda: a.limiter.blocked("192.0.2.7", now)
                        or b.limiter.blocked("192.0.2.7", now), 5, "fleet-wide block")
            assert not a.limiter.blocked("192.0.2.8", now)
            # a minute later the address may try again
            assert not a.limiter.blocked("192.0.2.7", now + 61)
            assert not b.limiter.blocked("192.0.2.7", now + 61)

    run(scenario())


async def echo_turn(upstream: HistoryKeepingUpstream, device_id: str) -> list[str]:
    session = await upstream.open_session(DeviceContext(device_id, "s"))
    await session.start_turn()
    await session.send_audio(b"\x00\x10" * 320)
    await session.end_turn()
    said = []
    async for event in session.events():
        if isinstance(event, TranscriptReceived) and event.role == "assistant":
            said.append(event.text)
            break
    await asyncio.sleep(0.2)  # the writer stores the line
    await session.close()
    return said


def test_history_follows_the_device_to_another_relay(redis_url: str) -> None:
    async def scenario() -> None:
        async with relay_state(redis_url, "a") as a:
            on_a = HistoryKeepingUpstream(EchoUpstream(), a.history)
            assert await echo_turn(on_a, "kitchen") == ["(echo #1)"]
            assert await echo_turn(on_a, "kitchen") == ["(echo #2)"]
        async with relay_state(redis_url, "b") as b:  # a is gone
            on_b = HistoryKeepingUpstream(EchoUpstream(), b.history)
            assert await echo_turn(on_b, "kitchen") == ["(echo #3)"]
            assert await echo_turn(on_b, "hall") == ["(echo #1)"]
            lines = await b.history.load("kitchen")
            assert [line.role for line in lines].count("assistant") == 3

    run(scenario())


def test_history_is_capped_per_device() -> None:
    async def scenario() -> None:
        store = MemoryHistory(max_lines=3)
        for k in range(5):
            store.append("kitchen", HistoryLine("user", f"line {k}"))
        assert [line.text for line in await store.load("kitchen")] == [
            "line 2", "line 3", "line 4"]

    run(scenario())


def test_a_store_that_goes_away_degrades_but_does_not_stop_the_relay(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()

    async def scenario() -> None:
        async with relay_state(server.url, "a") as a:
            cli = RedisTokens(server.url, KEY_PREFIX)
            token = await asyncio.to_thread(cli.add, "kitchen")
            await until(lambda: a.tokens.verify(token) == "kitchen", 5, "token read")
            server.stop()
            await until(lambda: not a.reachable, 5, "store seen down")
            assert a.tokens.verify(token) == "kitchen"  # the last read still holds
            upstream = HistoryKeepingUpstream(EchoUpstream(), a.history, load_timeout_s=0.5)
            started = time.monotonic()
            session = await upstream.open_session(DeviceContext("kitchen", "s"))
            assert time.monotonic() - started < 5
            assert upstream.load_failures == 1
            await session.close()
            a.fleet.connected("kitchen", session_id="s", address=None, at=time.time())

    try:
        run(scenario())
    finally:
        server.stop()


@pytest.mark.nova
def test_a_nova_session_starts_from_the_stored_history() -> None:
    # the seam: DeviceContext.history becomes the history events of Nova's first stream
    pytest.importorskip("aws_sdk_bedrock_runtime")
    import json

    from edgevoice.nova.settings import NovaSettings
    from edgevoice.nova.upstream import NovaUpstream

    async def scenario() -> None:
        upstream = NovaUpstream(NovaSettings())
        context = DeviceContext("kitchen", "s", history=(
            HistoryLine("user", "what is the capital of France"),
            HistoryLine("assistant", "Paris")))
        session = await upstream.open_session(context)
        try:
            replayed = json.dumps(session.core.history.events("prompt", lambda: "c"))
            assert "capital of France" in replayed and "Paris" in replayed
        finally:
            await session.close()
            await upstream.aclose()

    run(scenario())


def test_a_token_is_accepted_at_once_by_its_notice_not_at_the_next_poll(
        redis_url: str) -> None:
    # refresh_ms 60 s: the liveness renewal (which also reads the tokens' version) is 60 s
    # away; the notice `edgevoice token add` publishes is what makes the relay re-read
    async def scenario() -> None:
        async with relay_state(redis_url, "a", refresh_ms=60_000) as a:
            cli = RedisTokens(redis_url, KEY_PREFIX)
            token = await asyncio.to_thread(cli.add, "kitchen")
            await until(lambda: a.tokens.verify(token) == "kitchen", 5, "token by notice")
            assert await asyncio.to_thread(cli.remove, "kitchen")
            await until(lambda: a.tokens.verify(token) is None, 5, "removal by notice")

    run(scenario())


def test_a_token_written_without_a_notice_is_still_seen_at_the_next_renewal(
        redis_url: str) -> None:
    import redis

    from edgevoice.tokens import hash_token

    async def scenario() -> None:
        async with relay_state(redis_url, "a", refresh_ms=200) as a:
            token = RedisTokens(redis_url, KEY_PREFIX)
            secret = "kitchen.0123456789abcdef0123456789abcdef"
            with redis.Redis.from_url(redis_url, decode_responses=True) as client:
                # an older `edgevoice token`, or a hand edit: no notice published
                client.hset(token.keys.tokens, "kitchen",
                            json.dumps({"sha256": hash_token(secret)}))
                client.incr(token.keys.tokens_version)
            await until(lambda: a.tokens.verify(secret) == "kitchen", 5,
                        "token at the liveness renewal")

    run(scenario())


def test_a_live_relay_keeps_its_key_and_a_dead_one_expires(redis_url: str) -> None:
    import redis

    async def scenario() -> None:
        state = RedisState(SharedStoreSettings(kind="redis", url=redis_url,
                                               key_prefix=KEY_PREFIX, refresh_ms=200), "a", 10)
        await state.start()
        key = state.keys.relay("a")
        with redis.Redis.from_url(redis_url, decode_responses=True) as client:
            assert 0 < client.pttl(key) <= liveness_ttl_ms(200)
            # alive: renewed before it expires, for longer than its time to live
            for _ in range(6):
                await asyncio.sleep(0.5)
                assert client.exists(key), "a live relay's key expired"
            # killed: nothing deletes the key, its time to live ends it
            for task in state._tasks:
                task.cancel()
            await asyncio.gather(*state._tasks, return_exceptions=True)
            await until(lambda: not client.exists(key), liveness_ttl_ms(200) / 1000 + 2,
                        "dead relay's key expired")
        await state.client.aclose()
        await state._notices.aclose()

    run(scenario())


def test_the_refresh_schedule_renews_within_the_ttl_and_reads_the_fleet_only_when_asked(
        ) -> None:
    schedule = RefreshSchedule(200, now=0.0)
    renewals, fleet_reads, last_renewal = [], [], 0.0
    now = 0.0
    while now < 60.0:
        wanted = 20.0 <= now < 30.0  # someone looked at /devices for 10 s
        renew, fleet = schedule.poll(now, wanted)
        if renew:
            assert now - last_renewal < liveness_ttl_ms(200) / 1000
            renewals.append(now)
            last_renewal = now
        if fleet:
            fleet_reads.append(now)
        assert schedule.wake_at(wanted) > now
        now = schedule.wake_at(wanted)
    # a renewal every third of the 2 s time to live, not every 200 ms (15 round trips/s)
    assert 85 <= len(renewals) <= 95
    assert all(20.0 <= t < 30.0 for t in fleet_reads)
    assert 45 <= len(fleet_reads) <= 55
