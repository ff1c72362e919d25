"""Rows 9 and 10: scale-out behind HAProxy (docs/scale-out.md).

    edgevoice bench --rows 9,10
    .venv/bin/python -m edgevoice_dev.bench.scaleout idle [--devices 2000]
    .venv/bin/python -m edgevoice_dev.bench.scaleout talk [--devices 40]

``idle``: HAProxy, two relays and Redis; N idle devices (hello, then what an idle
daemon sends: the load generator's idle device) connect through HAProxy; over a
30 s window, each relay's RSS growth and CPU per idle device.

``talk``: N devices taking echo turns back to back through HAProxy, first with one
relay, then with two: CPU seconds each relay process spends per second of device
talk (uplink decode + downlink encode + pacing), and HAProxy's and Redis's share.
One JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgevoice.relay.auth import new_token
from edgevoice.relay.settings import LimitsSettings
from edgevoice.tokens import hash_token
from edgevoice_dev.bench import loadgen
from edgevoice_dev.bench.life import idle_device_schedule
from edgevoice_dev.bench.plan import Workspace
from edgevoice_dev.bench.proc import cpu_seconds, memory_kib
from edgevoice_dev.bench.results import INFO, Line, RowResult, verdict
from edgevoice_dev.testing.cluster import (
    KEY_PREFIX,
    Cluster,
    SimulatedDevice,
    missing_tools,
    running_cluster,
    speech_packets,
)


def raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def bulk_tokens(cluster: Cluster, count: int, prefix: str) -> dict[str, str]:
    import redis
    tokens = {f"{prefix}{i:05d}": new_token(f"{prefix}{i:05d}") for i in range(count)}
    with redis.Redis.from_url(cluster.redis.url, decode_responses=True) as client:
        pipe = client.pipeline(transaction=False)
        for name, token in tokens.items():
            pipe.hset(f"{KEY_PREFIX}tokens", name, json.dumps({"sha256": hash_token(token)}))
        pipe.incr(f"{KEY_PREFIX}tokens:version")
        version = pipe.execute()[-1]
        # as `edgevoice token add` does: the relays re-read on the notice, not by polling
        client.publish(f"{KEY_PREFIX}tokens:changed", version)
    return tokens


async def idle_device(url: str, name: str, token: str, stop: asyncio.Event,
                      first_beat_at: float) -> bool:
    """One idle device through HAProxy until ``stop``, living as the daemon does with
    its shipped settings: the load generator's idle device (the protocol heartbeat on
    the link's own schedule, stats riding in its write, the keepalive only if the
    settings turn it on), its first heartbeat at ``first_beat_at``. False if it could
    not connect."""
    try:
        ws, conn, heartbeat_ms = await loadgen.open_device(url, name, token)
    except Exception:
        return False
    log = loadgen.ClientLog(name)
    async with ws:
        tasks = [asyncio.create_task(loadgen.receive_counting(ws, log)),
                 asyncio.create_task(loadgen.hold_idle(ws, conn, first_beat_at, heartbeat_ms,
                                                       math.inf, log)),
                 asyncio.create_task(stop.wait())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return True


def processes(cluster: Cluster) -> dict[str, int]:
    pids = {r.name: r.proc.pid for r in cluster.relays if r.proc is not None and r.alive}
    assert cluster.haproxy.proc is not None and cluster.redis.proc is not None
    pids["haproxy"] = cluster.haproxy.proc.pid
    pids["redis"] = cluster.redis.proc.pid
    return pids


async def measure_idle(cluster: Cluster, devices: int, window_s: float) -> dict[str, Any]:
    tokens = await asyncio.to_thread(bulk_tokens, cluster, devices, "idle")
    await asyncio.sleep(1.0)
    pids = processes(cluster)
    rss_before = {k: memory_kib(p)["VmRSS"] for k, p in pids.items()}
    stop = asyncio.Event()
    tasks = []
    # heartbeats spread over one interval, as devices coming online at random times
    # would send them, so any window sees the fleet's average rate
    heartbeat_s = LimitsSettings().heartbeat_interval_ms / 1000
    spread_from = time.monotonic() + 5.0
    for k, (name, token) in enumerate(tokens.items()):
        tasks.append(asyncio.create_task(idle_device(
            cluster.haproxy.url, name, token, stop,
            spread_from + heartbeat_s * k / max(1, len(tokens)))))
        if k % 50 == 49:
            await asyncio.sleep(0.1)  # a ramp, not a storm
    await asyncio.sleep(10)  # every device said hello and settled
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    t0 = time.monotonic()
    await asyncio.sleep(window_s)
    elapsed = time.monotonic() - t0
    cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
    rss_after = {k: memory_kib(p)["VmRSS"] for k, p in pids.items()}
    connected = sum(1 for t in tasks if not t.done())
    on = {r.name: sum(1 for n in tokens if cluster.relay_of(n) == r.name)
          for r in cluster.relays}
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    out: dict[str, Any] = {"devices": devices, "connected": connected, "window_s": window_s}
    for name in pids:
        n = on.get(name, connected)
        busy_pct = (cpu1[name] - cpu0[name]) / elapsed * 100
        out[name] = {
            "devices": n,
            "rss_mib": round(rss_after[name] / 1024, 1),
            "rss_growth_kib_per_device": round((rss_after[name] - rss_before[name]) / max(n, 1),
                                               1),
            "cpu_pct": round(busy_pct, 2),
            "cpu_pct_per_1000_devices": round(busy_pct / max(n, 1) * 1000, 3),
        }
    return out


async def talk(devices: list[SimulatedDevice], seconds: float) -> int:
    stop = asyncio.Event()
    turns = 0

    async def loop(device: SimulatedDevice) -> None:
        nonlocal turns
        k = 0
        while not stop.is_set():
            k += 1
            if (await device.turn(k)).ok:
                turns += 1
    tasks = [asyncio.create_task(loop(d)) for d in devices]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    return turns


async def measure_talk(cluster: Cluster, count: int, window_s: float) -> dict[str, Any]:
    tokens = await asyncio.to_thread(bulk_tokens, cluster, count, f"talk{len(cluster.relays)}")
    await asyncio.sleep(1.0)
    packets = speech_packets(50)  # 1 s of speech, echoed: 2 s of audio per turn
    devices = [SimulatedDevice(n, t, cluster.haproxy.url, packets) for n, t in tokens.items()]
    for d in devices:
        d.start()
    await asyncio.gather(*(d.up.wait() for d in devices))
    pids = processes(cluster)
    # what each relay costs with its devices connected and nobody talking: the part of
    # its CPU that does not grow with talk (event loop, admin endpoint, shared store)
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    t0 = time.monotonic()
    await asyncio.sleep(IDLE_S)
    idle_s = time.monotonic() - t0
    fixed = {r.name: (cpu_seconds(pids[r.name]) - cpu0[r.name]) / idle_s
             for r in cluster.relays}
    await talk(devices, 3)  # warm up
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    t0 = time.monotonic()
    turns = await talk(devices, window_s)
    elapsed = time.monotonic() - t0
    cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
    for d in devices:
        await d.stop()
    audio_s = turns * 2.0  # 1 s up + 1 s down per turn
    out: dict[str, Any] = {"relays": len(cluster.relays), "devices": count,
                           "turns": turns, "elapsed_s": round(elapsed, 1)}
    relay_cpu = sum(cpu1[r.name] - cpu0[r.name] for r in cluster.relays)
    out["relay_cpu_ms_per_audio_s"] = round(relay_cpu / audio_s * 1000, 2)
    out["relay_fixed_cpu_pct_each"] = {k: round(100 * v, 2) for k, v in fixed.items()}
    # the same, less what the relays would have used anyway over the window
    out["relay_talk_cpu_ms_per_audio_s"] = round(
        max(0.0, relay_cpu - sum(fixed.values()) * elapsed) / audio_s * 1000, 2)
    out["relay_cpu_pct_each"] = {r.name: round((cpu1[r.name] - cpu0[r.name]) / elapsed * 100, 1)
                                 for r in cluster.relays}
    for name in ("haproxy", "redis"):
        out[f"{name}_cpu_ms_per_audio_s"] = round((cpu1[name] - cpu0[name]) / audio_s * 1000,
                                                  3)
    return out


SCALE_TITLE = "Scale-out: two relay processes vs one, behind HAProxy"
IDLE_TITLE = "Idle devices spread over two relays"
TARGET_RATIO = 1.8
#: how long the relays are watched with their devices connected and silent, seconds
IDLE_S = 3.0


async def run_scale_row(ws: Workspace) -> RowResult:
    """Row 9: relay CPU per second of talk with one relay process, then two."""
    row = RowResult(9, SCALE_TITLE)
    if missing_tools():
        row.lines.append(Line("two relays vs one", "n/a", "", f">= {TARGET_RATIO}x", INFO))
        row.notes.append(f"needs {' and '.join(missing_tools())} (./scripts/setup --test)")
        return row
    raise_fd_limit()
    plan = ws.plan
    figures = {}
    for relays in (1, 2):
        workdir = ws.root / f"scaleout-{relays}"
        with running_cluster(workdir, relays) as cluster:
            figures[relays] = await measure_talk(cluster, plan.scaleout_devices,
                                                 plan.scaleout_measure_s)
    one, two = figures[1], figures[2]
    ratio = 2 * one["relay_cpu_ms_per_audio_s"] / max(two["relay_cpu_ms_per_audio_s"], 1e-9)
    row.lines.append(Line(
        "capacity, two processes on two cores vs one (from relay CPU per second of talk)",
        f"{ratio:.2f}x",
        f"{one['relay_cpu_ms_per_audio_s']:.1f} ms/s vs "
        f"{two['relay_cpu_ms_per_audio_s']:.1f} ms/s", f">= {TARGET_RATIO}x",
        verdict(ratio >= TARGET_RATIO)))
    talk_ratio = 2 * one["relay_talk_cpu_ms_per_audio_s"] / max(
        two["relay_talk_cpu_ms_per_audio_s"], 1e-9)
    fixed_two = sum(two["relay_fixed_cpu_pct_each"].values())
    row.lines.append(Line(
        "  the same, less each relay's cost while its devices are silent",
        f"{talk_ratio:.2f}x",
        f"{one['relay_talk_cpu_ms_per_audio_s']:.1f} ms/s vs "
        f"{two['relay_talk_cpu_ms_per_audio_s']:.1f} ms/s", "", INFO))
    row.lines.append(Line(
        "  relay CPU with devices connected and silent, one relay / two together",
        f"{sum(one['relay_fixed_cpu_pct_each'].values()):.2f} % / {fixed_two:.2f} %",
        f"{IDLE_S:g} s before the talk", "", INFO))
    row.lines.append(Line("HAProxy CPU per second of talk",
                          f"{two['haproxy_cpu_ms_per_audio_s']:.2f} ms/s",
                          f"Redis {two['redis_cpu_ms_per_audio_s']:.2f} ms/s", "", INFO))
    row.lines.append(Line("turns answered, one relay / two", f"{one['turns']} / {two['turns']}",
                          f"{plan.scaleout_devices} devices", "", INFO))
    row.data = {"relays_1": one, "relays_2": two, "ratio": round(ratio, 3)}
    row.notes.append(
        f"{plan.scaleout_devices} devices take echo turns back to back through HAProxy "
        f"for {plan.scaleout_measure_s:g} s (1 s of speech, 1 s of echo). Derived, not "
        "measured at saturation: two cores cannot hold two saturated relays and the load "
        "generator at once.")
    if ratio < TARGET_RATIO:
        gap = two["relay_cpu_ms_per_audio_s"] - one["relay_cpu_ms_per_audio_s"]
        talk_gap = (two["relay_talk_cpu_ms_per_audio_s"]
                    - one["relay_talk_cpu_ms_per_audio_s"])
        fixed_part = max(0.0, gap - talk_gap)
        row.findings.append(
            f"Two relays used {gap:.1f} ms more CPU per second of talk than one "
            f"({two['relay_cpu_ms_per_audio_s']:.1f} vs "
            f"{one['relay_cpu_ms_per_audio_s']:.1f} ms/s). Measured with their devices "
            f"connected and silent, the relays' cost that does not grow with talk accounts "
            f"for {fixed_part:.1f} ms/s of it; the other {max(0.0, talk_gap):.1f} ms/s is "
            "the talk itself costing more CPU per second in each of two relays than in one. "
            "The code per frame is the same in both runs; what differs is the machine: with "
            "two relays, two busy relay processes, HAProxy, Redis and the load generator "
            "share its two cores, while one relay has a core nearly to itself (cache and "
            "scheduler contention; not separated further here). Real scale-out gives each "
            "relay its own core and the devices their own machines.")
    return row


async def run_idle_row(ws: Workspace) -> RowResult:
    """Row 10: RSS and CPU per idle device, devices spread over two relays."""
    row = RowResult(10, IDLE_TITLE)
    if missing_tools():
        row.lines.append(Line("RSS per idle device", "n/a", "", "", INFO))
        row.notes.append(f"needs {' and '.join(missing_tools())} (./scripts/setup --test)")
        return row
    raise_fd_limit()
    plan = ws.plan
    with running_cluster(ws.root / "idle", 2, max_devices=plan.idle_devices + 100) as cluster:
        m = await measure_idle(cluster, plan.idle_devices, plan.idle_measure_s)
    relays = [m[r] for r in ("relay1", "relay2")]
    rss = sum(r["rss_growth_kib_per_device"] * r["devices"] for r in relays) / max(
        1, sum(r["devices"] for r in relays))
    cpu = sum(r["cpu_pct"] for r in relays) / max(1, m["connected"]) * 1000
    row.lines.append(Line("devices connected", f"{m['connected']} of {m['devices']}",
                          f"{relays[0]['devices']} + {relays[1]['devices']}", "", INFO))
    row.lines.append(Line("relay RSS per idle device", f"{rss:.0f} KiB",
                          f"HAProxy {m['haproxy']['rss_growth_kib_per_device']:.0f} KiB", "",
                          INFO))
    row.lines.append(Line("relay CPU per 1,000 idle devices", f"{cpu:.1f} % of a core",
                          f"HAProxy {m['haproxy']['cpu_pct_per_1000_devices']:.1f} %, Redis "
                          f"{m['redis']['cpu_pct_per_1000_devices']:.1f} %", "", INFO))
    row.data = m
    schedule, _ = idle_device_schedule()
    row.notes.append(f"Idle: hello, then as an idle daemon lives: {schedule}; measured over "
                     f"{plan.idle_measure_s:g} s.")
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["idle", "talk"])
    parser.add_argument("--devices", type=int)
    parser.add_argument("--window", type=float, default=30.0)
    args = parser.parse_args(argv)
    raise_fd_limit()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgevoice-scaleout-") as tmp:
        if args.what == "idle":
            with running_cluster(Path(tmp), 2, max_devices=5000) as cluster:
                results = asyncio.run(measure_idle(cluster, args.devices or 2000,
                                                   args.window))
        else:
            for relays in (1, 2):
                with running_cluster(Path(tmp) / str(relays), relays) as cluster:
                    results[f"relays_{relays}"] = asyncio.run(
                        measure_talk(cluster, args.devices or 16, args.window))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
