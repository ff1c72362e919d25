"""Graceful drain of one relay (SIGTERM), and the device honouring close 4004.

A real RelayServer with the echo upstream and real DeviceLinks on 127.0.0.1; no
balancer here (tests/cluster/test_cluster.py has HAProxy and three relays).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

from edgevoice_dev.testing.cluster import (
    CuttableProxy,
    SimulatedDevice,
    scaled,
    speech_packets,
    until,
)

from edgevoice.backoff import Backoff, BackoffSettings
from edgevoice.device.link import DeviceLink, RelaySettings
from edgevoice.protocol.messages import CloseCode, TurnStart
from edgevoice.relay.auth import TokenStore
from edgevoice.relay.health_source import RelayHealth
from edgevoice.relay.server import RelayServer
from edgevoice.relay.settings import LimitsSettings, ListenSettings
from edgevoice.upstream.echo import EchoUpstream


@contextlib.asynccontextmanager
async def relay(tmp_path: Path, tokens: Path | None = None) -> AsyncIterator[RelayServer]:
    server = RelayServer(ListenSettings(port=0), LimitsSettings(),
                         TokenStore(tokens or tmp_path / "tokens.json"), EchoUpstream())
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def device(server: RelayServer, name: str, packets: list[bytes],
                 backoff: BackoffSettings | None = None) -> AsyncIterator[SimulatedDevice]:
    token = server.tokens.add(name)
    sim = SimulatedDevice(name, token, f"ws://127.0.0.1:{server.port}/", packets)
    if backoff is not None:
        sim.link = DeviceLink(RelaySettings(url=sim.link.settings.url, backoff=backoff,
                                            stats_interval_s=0), name, token, sim)
    sim.start()
    try:
        await asyncio.wait_for(sim.up.wait(), scaled(10))
        yield sim
    finally:
        await sim.stop()


def run(coro: object, timeout: float = 60) -> None:
    asyncio.run(asyncio.wait_for(coro, scaled(timeout)))  # type: ignore[arg-type]


def test_drain_lets_the_reply_in_flight_finish_then_sends_the_device_elsewhere(
        tmp_path: Path) -> None:
    # a backoff so long that only "reconnect at once" can explain a quick retry
    slow = BackoffSettings(initial_ms=60_000, max_ms=60_000, min_ms=60_000)

    async def scenario() -> None:
        async with relay(tmp_path) as server, \
                device(server, "kitchen", speech_packets(40), slow) as sim:
            turn = asyncio.create_task(sim.turn(1))
            # the turn has ended and the reply is being paced: drain now
            await until(lambda: server.sessions["kitchen"].replying)
            assert RelayHealth(server).health_problems(time.monotonic()) == []
            drain = asyncio.create_task(server.drain(scaled(10)))
            await asyncio.sleep(0.05)
            assert RelayHealth(server).health_problems(time.monotonic())  # /healthz 503
            result = await turn
            idle, busy = await drain
            assert result.ok, result.reason
            assert result.echo_number == 1
            assert (idle, busy) == (1, 0)
            # the whole reply arrived: 40 uplink frames echo as 40 downlink frames
            assert sim.frames_received >= 40
            await until(lambda: sim.closes)
            assert f"{int(CloseCode.RECONNECT_NOW)}" in sim.closes[0]
            # no backoff: the link tries again at once (and, with no balancer in front,
            # finds nobody listening: that attempt backs off as usual)
            assert sim.retry_delays[0] == 0.0
            await asyncio.sleep(0.3)
            assert sim.link.stats.reconnects >= 1

    run(scenario())


def test_a_device_that_never_ends_its_turn_is_sent_away_when_the_drain_times_out(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with relay(tmp_path) as server, device(server, "hall", speech_packets(2)) as sim:
            sim.link.send(TurnStart(7))  # and never turn_end
            await until(lambda: server.sessions["hall"].turn_id is not None)
            started = time.monotonic()
            idle, busy = await server.drain(0.5)
            assert (idle, busy) == (0, 1)
            assert time.monotonic() - started < scaled(5)
            await until(lambda: sim.closes)
            assert f"{int(CloseCode.RECONNECT_NOW)}" in sim.closes[0]

    run(scenario())


def test_idle_devices_are_sent_away_at_once_and_new_ones_are_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with relay(tmp_path) as server, device(server, "a", []) as a, \
                device(server, "b", []) as b:
            started = time.monotonic()
            port = server.port
            idle, busy = await server.drain(scaled(10))
            assert (idle, busy) == (2, 0)
            assert time.monotonic() - started < scaled(2)
            assert not server.sessions and not server.held
            for sim in (a, b):
                await until(lambda: sim.closes)  # noqa: B023 (awaited in the loop)
                assert "4004" in sim.closes[0]
            # stopped listening: a new connection is refused (a balancer redispatches)
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                pass
            else:
                writer.close()
                raise AssertionError("a draining relay still accepts connections")

    run(scenario())


def test_a_turn_begun_as_the_relay_closes_is_carried_to_the_next_relay(tmp_path: Path) -> None:
    # The race a drain cannot avoid: the device starts a turn while the relay, having
    # seen nothing of it, closes with 4004. The device re-sends what the relay did not
    # receive on its next session, here with a second relay, and the turn is answered.
    async def scenario() -> None:
        tokens = tmp_path / "tokens.json"  # two relays of one fleet: the same tokens
        async with relay(tmp_path, tokens) as first, relay(tmp_path, tokens) as second:
            token = first.tokens.add("kitchen")
            async with CuttableProxy(first.port) as proxy:
                sim = SimulatedDevice("kitchen", token, proxy.url, speech_packets(30))
                sim.start()
                try:
                    await asyncio.wait_for(sim.up.wait(), scaled(10))
                    first_session = sim.session_id
                    proxy.hold_uplink()  # what the device says now never reaches `first`
                    proxy.target_port = second.port
                    turn = asyncio.create_task(sim.turn(1))
                    await asyncio.sleep(0.1)  # turn_start and some audio are on their way
                    assert await first.drain(scaled(10)) == (1, 0)  # it saw no turn
                    proxy.hold_uplink(False)
                    result = await turn
                    assert result.ok, result.reason
                    assert sim.session_id != first_session
                    assert second.counters.frames_in >= 30  # the whole turn, re-sent
                    assert sim.link.stats.dropped_session_lost == 0
                finally:
                    await sim.stop()

    run(scenario())


def test_the_handover_reason_says_what_the_relay_received_and_fits_a_close_frame() -> None:
    from edgevoice.protocol.messages import handover_reason, parse_handover_reason
    for seq, messages in ((None, 0), (0, 1), (2**32 - 1, 10**6)):
        reason = handover_reason(seq, messages)
        assert len(reason.encode()) <= 123  # a close frame's reason limit
        assert parse_handover_reason(reason) == (seq, messages)
    for other in ("relay draining: reconnect now", "", "; got 1", "; got x 2", "; got 1 -2"):
        assert parse_handover_reason(other) is None


def test_a_relay_that_drained_is_retried_at_least_every_retry_max_while_it_restarts(
        tmp_path: Path) -> None:
    # systemd restarts a relay within seconds; the exponential backoff had grown to a
    # 2 s ceiling by the time it listened again (bench row 6: 1.29 s late once in 20).
    async def scenario() -> None:
        async with relay(tmp_path) as server, device(server, "a", []) as a:
            a.link.backoff = Backoff(a.link.settings.backoff, random.Random(7))
            await server.drain(scaled(10))
            await server.close()  # gone: every attempt is refused
            await until(lambda: len(a.retry_delays) >= 8, scaled(20))
        retry_max = a.link.settings.resume.retry_max_ms / 1000
        delays = [d for d in a.retry_delays if d is not None]
        assert "4004" in a.closes[0] and delays[0] == 0.0  # a handover attempt at once
        later = delays[1:8]
        assert max(later) <= retry_max, later  # the ceilings were 0.25 ... 16 s
        assert len(set(later)) == len(later)  # drawn, not clipped to the cap together
        # uncapped, this seed's draws would have waited longer than that
        uncapped = Backoff(a.link.settings.backoff, random.Random(7))
        assert max(uncapped.next_delay() for _ in later) > retry_max

    run(scenario())

