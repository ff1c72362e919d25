"""Real HAProxy, real Redis, three real relay processes on 127.0.0.1 (slow).

Affinity for resume, drain with no lost turn, SIGKILL with reconnect and kept
history, the fleet view from any relay, tokens added on one relay accepted by all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from edgevoice_dev.testing.cluster import (
    Cluster,
    CuttableProxy,
    SimulatedDevice,
    http_json,
    issue_tokens,
    missing_tools,
    running_cluster,
    scaled,
    speech_packets,
    until,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_tools()),
                       reason="needs haproxy and redis-server: ./scripts/setup --test"),
]

PACKETS = speech_packets(25)


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("cluster"), 3) as cluster:
        yield cluster


@pytest.fixture
def cluster(module_cluster: Cluster) -> Cluster:
    """The module's cluster with every relay running (a test may have killed one)."""
    restarted = False
    for relay in module_cluster.relays:
        if not relay.alive:
            relay.start()
            restarted = True
    if restarted:
        module_cluster.wait_until_balanced()
    return module_cluster


def run(coro: object, timeout: float = 120) -> None:
    asyncio.run(asyncio.wait_for(coro, scaled(timeout)))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def fleet(cluster: Cluster, count: int, prefix: str,
                url: str | None = None) -> AsyncIterator[list[SimulatedDevice]]:
    tokens = await asyncio.to_thread(issue_tokens, cluster, count, prefix)
    await asyncio.sleep(0.5)  # every relay reads new tokens within refresh_ms (200 ms)
    devices = [SimulatedDevice(name, token, url or cluster.haproxy.url, PACKETS)
               for name, token in tokens.items()]
    for device in devices:
        device.start()
    try:
        await asyncio.wait_for(asyncio.gather(*(d.up.wait() for d in devices)), scaled(30))
        yield devices
    finally:
        for device in devices:
            await device.stop()


def placement(cluster: Cluster, devices: list[SimulatedDevice]) -> dict[str, str | None]:
    return {d.device_id: cluster.relay_of(d.device_id) for d in devices}


async def settled_placement(cluster: Cluster,
                            devices: list[SimulatedDevice]) -> dict[str, str | None]:
    """Where each device is, once the shared fleet view has every one of them."""
    await until(lambda: None not in placement(cluster, devices).values(), 10, "placement")
    return placement(cluster, devices)


def busiest(cluster: Cluster, where: dict[str, str | None]) -> str:
    names = [r.name for r in cluster.relays]
    return max(names, key=lambda n: list(where.values()).count(n))


def test_a_device_that_drops_resumes_its_session_on_the_same_relay(cluster: Cluster) -> None:
    async def scenario() -> None:
        async with CuttableProxy(cluster.haproxy.port) as proxy, \
                fleet(cluster, 12, "aff", proxy.url) as devices:
            before = await settled_placement(cluster, devices)
            assert len(set(before.values())) >= 2, before  # spread over relays
            sessions = {d.device_id: d.session_id for d in devices}
            proxy.cut()  # every device's connection drops at once, no close frame
            await until(lambda: all(d.link.stats.resumes == 1 for d in devices), 20,
                        "every device resumed")
            assert {d.device_id: d.session_id for d in devices} == sessions
            assert placement(cluster, devices) == before
            results = await asyncio.gather(*(d.turn(1) for d in devices))
            assert all(r.ok for r in results), [r.reason for r in results if not r.ok]

    run(scenario())


async def talk(device: SimulatedDevice, stop: asyncio.Event) -> None:
    turn_id = 0
    while not stop.is_set():
        turn_id += 1
        await device.turn(turn_id)
        await asyncio.sleep(0.2 + 0.05 * (hash(device.device_id) % 8))


def test_a_draining_relay_loses_no_turn(cluster: Cluster) -> None:
    async def scenario() -> None:
        async with fleet(cluster, 12, "drn") as devices:
            where = await settled_placement(cluster, devices)
            name = busiest(cluster, where)
            moved = {d for d, r in where.items() if r == name}
            stop = asyncio.Event()
            talkers = [asyncio.create_task(talk(d, stop)) for d in devices]
            await asyncio.sleep(3)
            relay = cluster.relay(name)
            relay.terminate()
            assert await asyncio.to_thread(relay.wait, 30) == 0
            gone_at = time.monotonic()
            await asyncio.sleep(3)
            stop.set()
            await asyncio.gather(*talkers)
            results = [r for d in devices for r in d.results]
            assert len(results) >= 2 * len(devices)
            assert [r for r in results if not r.ok] == []
            after = placement(cluster, devices)
            assert all(after[d] not in (None, name) for d in moved), after
            # every device that was on it is answered elsewhere after it left
            assert all(any(r.ok and r.started_at > gone_at for r in dev.results)
                       for dev in devices if dev.device_id in moved)
            assert "drained" in relay.log()

    run(scenario())


def test_a_killed_relays_devices_come_back_elsewhere_with_their_history(
        cluster: Cluster) -> None:
    async def scenario() -> None:
        async with fleet(cluster, 12, "kil") as devices:
            first = await asyncio.gather(*(d.turn(1) for d in devices))
            second = await asyncio.gather(*(d.turn(2) for d in devices))
            assert all(r.ok for r in first + second)
            assert {r.echo_number for r in second} == {2}
            where = placement(cluster, devices)
            name = busiest(cluster, where)
            victims = [d for d in devices if where[d.device_id] == name]
            assert victims
            cluster.relay(name).kill()
            await until(lambda: all(d.outages and d.outages[-1][1] is not None
                                    and len(d.sessions) == 2 for d in victims), 20,
                        "the killed relay's devices on a new session")
            back_ms = [(d.outages[-1][1] - d.outages[-1][0]) * 1000  # type: ignore[operator]
                       for d in victims]
            assert max(back_ms) < scaled(5) * 1000, back_ms  # a bound, not the target
            third = await asyncio.gather(*(d.turn(3) for d in devices))
            assert all(r.ok for r in third), [r.reason for r in third if not r.ok]
            # the echo counts replies over the stored conversation: 1 would mean forgotten
            assert {r.echo_number for r in third} == {3}
            after = placement(cluster, devices)
            assert all(after[d.device_id] != name for d in victims)

    run(scenario())


def test_the_fleet_view_is_the_whole_fleet_from_any_relay(cluster: Cluster) -> None:
    async def scenario() -> None:
        async with fleet(cluster, 9, "fv") as devices:
            names = {d.device_id for d in devices}
            where = await settled_placement(cluster, devices)
            assert len(set(where.values())) >= 2

            def connected(relay_url: str) -> set[str]:
                records = http_json(f"{relay_url}/devices")
                assert isinstance(records, list)
                return {r["device_id"] for r in records if r["connected"]} & names
            for relay in cluster.relays:
                await until(lambda r=relay: connected(r.admin_url) == names, 10,  # type: ignore[misc]
                            f"/devices on {relay.name}")
            gone = devices[0]
            await gone.stop()
            for relay in cluster.relays:
                await until(lambda r=relay: gone.device_id not in connected(r.admin_url),  # type: ignore[misc]
                            10, f"{gone.device_id} shown gone on {relay.name}")

    run(scenario())


def token_cli(action: str, name: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgevoice", "token", action, name,
                           "--config", str(config)], capture_output=True, text=True,
                          check=False, timeout=60)


def test_a_token_added_on_one_relay_is_accepted_by_all(cluster: Cluster) -> None:
    added = token_cli("add", "porch", cluster.relays[0].config_file)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().splitlines()[-1]
    assert token.startswith("porch.")

    async def connect_directly(port: int) -> bool:
        device = SimulatedDevice("porch", token, f"ws://127.0.0.1:{port}/", PACKETS)
        device.start()
        try:
            await asyncio.wait_for(device.up.wait(), scaled(5))
            return True
        except TimeoutError:
            return False
        finally:
            await device.stop()

    async def everywhere() -> list[bool]:
        await asyncio.sleep(0.5)
        return [await connect_directly(r.port) for r in cluster.relays]

    assert asyncio.run(everywhere()) == [True, True, True]
    removed = token_cli("remove", "porch", cluster.relays[1].config_file)
    assert removed.returncode == 0, removed.stderr
    assert asyncio.run(everywhere()) == [False, False, False]


def test_the_cluster_demo_prints_its_summary(tmp_path: Path) -> None:
    # ./scripts/cluster-demo's own run, smaller: a kill and a drain, one JSON object
    script = Path(__file__).resolve().parents[2] / "scripts" / "cluster-demo"
    result = subprocess.run([str(script), "--devices", "8", "--kill-after", "4",
                             "--drain-after", "8", "--run", "14", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=scaled(180), check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    for key in ("devices", "turns_ok", "turns_failed", "relays_killed", "relays_drained",
                "reconnect_p99_ms", "history_kept"):
        assert key in summary, key
    assert summary["devices"] == 8
    assert (summary["relays_killed"], summary["relays_drained"]) == (1, 1)
    assert summary["turns_ok"] > 8
    # only turns in flight on the killed relay may fail
    assert summary["turns_failed"] == summary["turns_failed_in_flight_on_killed_relay"]
    assert summary["history_kept"] == summary["devices_moved"] > 0
