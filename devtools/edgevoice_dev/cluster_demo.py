"""A fleet taking turns while one relay dies and another drains (./scripts/cluster-demo).

HAProxy (deploy/haproxy/edgevoice.cfg), three echo relays and Redis on 127.0.0.1;
N simulated devices (the real DeviceLink) take turns through HAProxy. Part-way,
the relay holding the most devices is killed (SIGKILL), later another is restarted
with SIGTERM (it drains, exits, starts again). One JSON object on stdout says what
the fleet lived through; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevoice_dev.testing.cluster import (
    Cluster,
    SimulatedDevice,
    TurnResult,
    issue_tokens,
    percentile,
    running_cluster,
    scaled,
    speech_packets,
)


def say(text: str) -> None:
    print(f"cluster-demo: {text}", file=sys.stderr, flush=True)


@dataclass
class Event:
    kind: str  # "killed" or "drained"
    relay: str
    at: float
    devices: set[str] = field(default_factory=set)
    #: when the drained relay had exited
    done_at: float | None = None
    #: the session each of ``devices`` had on the relay at that moment
    sessions: dict[str, str | None] = field(default_factory=dict)


async def take_turns(device: SimulatedDevice, stop: asyncio.Event, rng: random.Random) -> None:
    turn_id = 0
    await asyncio.sleep(rng.uniform(0, 1.0))  # not all at once
    while not stop.is_set():
        turn_id += 1
        await device.turn(turn_id)
        await asyncio.sleep(rng.uniform(0.3, 1.0))


def on_relay(cluster: Cluster, devices: Sequence[SimulatedDevice], relay: str) -> set[str]:
    return {d.device_id for d in devices if d.up.is_set()
            and cluster.relay_of(d.device_id) == relay}


async def scenario(cluster: Cluster, n_devices: int, *, kill_after_s: float,
                   drain_after_s: float, run_s: float, frames: int = 40,
                   seed: int = 1) -> dict[str, Any]:
    rng = random.Random(seed)
    tokens = issue_tokens(cluster, n_devices)
    packets = speech_packets(frames)
    devices = [SimulatedDevice(name, token, cluster.haproxy.url, packets)
               for name, token in tokens.items()]
    # tokens reach every relay within refresh_ms
    await asyncio.sleep(0.5)
    for device in devices:
        device.start()
    await asyncio.wait_for(asyncio.gather(*(d.up.wait() for d in devices)), scaled(30))
    spread = {r.name: len(on_relay(cluster, devices, r.name)) for r in cluster.relays}
    say(f"{n_devices} devices connected through HAProxy: {spread}")
    stop = asyncio.Event()
    started = time.monotonic()
    talkers = [asyncio.create_task(take_turns(d, stop, rng)) for d in devices]
    events: list[Event] = []

    await asyncio.sleep(kill_after_s)
    victim = max(cluster.relays, key=lambda r: len(on_relay(cluster, devices, r.name)))
    killed = Event("killed", victim.name, time.monotonic(), on_relay(cluster, devices,
                                                                     victim.name))
    killed.sessions = {d.device_id: d.session_id for d in devices
                       if d.device_id in killed.devices}
    victim.kill()
    events.append(killed)
    say(f"SIGKILL {victim.name} ({len(killed.devices)} devices on it)")

    await asyncio.sleep(max(0.0, drain_after_s - (time.monotonic() - started)))
    others = [r for r in cluster.relays if r.alive]
    drained_relay = max(others, key=lambda r: len(on_relay(cluster, devices, r.name)))
    drained = Event("drained", drained_relay.name, time.monotonic(),
                    on_relay(cluster, devices, drained_relay.name))
    drained_relay.terminate()
    events.append(drained)
    say(f"SIGTERM {drained_relay.name} ({len(drained.devices)} devices on it): draining")
    code = await asyncio.to_thread(drained_relay.wait, 60)
    drained.done_at = time.monotonic()
    say(f"{drained_relay.name} exited ({code}) after {drained.done_at - drained.at:.1f} s; "
        "starting it again")
    await asyncio.to_thread(drained_relay.start)

    await asyncio.sleep(max(0.0, run_s - (time.monotonic() - started)))
    stop.set()
    await asyncio.wait_for(asyncio.gather(*talkers), scaled(60))
    report = summarize(cluster, devices, events)
    for device in devices:
        await device.stop()
    return report


def summarize(cluster: Cluster, devices: Sequence[SimulatedDevice],
              events: Sequence[Event]) -> dict[str, Any]:
    results = [r for d in devices for r in d.results]
    failed = [r for r in results if not r.ok]
    killed = next(e for e in events if e.kind == "killed")
    drained = next(e for e in events if e.kind == "drained")

    def in_flight(result: TurnResult, event: Event) -> bool:
        # begun before the relay went, or begun after on the session it served: the
        # device had not heard of the kill yet (the close takes a few ms through HAProxy)
        # and sent its turn to a relay that was gone
        if result.device not in event.devices or result.ended_at < event.at:
            return False
        return result.started_at <= event.at or (
            result.session_id is not None
            and result.session_id == event.sessions.get(result.device))

    lost_on_killed = [r for r in failed if in_flight(r, killed)]
    lost_on_drained = [r for r in failed if r.device in drained.devices
                       and drained.at <= r.ended_at
                       and r.started_at <= (drained.done_at or r.ended_at)]
    # talking again: killed, from the kill (when it happened, not when noticed);
    # drained, from the 4004 (the drain first finished the device's reply)
    reconnect_ms: dict[str, list[float]] = {"killed": [], "drained": []}
    for device in devices:
        for event in events:
            if device.device_id not in event.devices:
                continue
            back = [(down, up) for down, up in device.outages
                    if up is not None and down >= event.at]
            if back:
                down, up = min(back)
                start = event.at if event.kind == "killed" else down
                reconnect_ms[event.kind].append((up - start) * 1000)
    moved = {name for e in events for name in e.devices}
    kept = 0
    for device in devices:
        if device.device_id not in moved:
            continue
        event = next(e for e in events if device.device_id in e.devices)
        before = [r.echo_number for r in device.results
                  if r.ok and r.ended_at < event.at and r.echo_number is not None]
        after = [r.echo_number for r in device.results
                 if r.ok and r.started_at > event.at and r.echo_number is not None]
        # the echo upstream counts replies over the stored conversation: 1 means forgotten
        if before and after and after[0] > max(before):
            kept += 1
    return {
        "devices": len(devices),
        "relays": len(cluster.relays),
        "turns_ok": len(results) - len(failed),
        "turns_failed": len(failed),
        "turns_failed_in_flight_on_killed_relay": len(lost_on_killed),
        "turns_failed_on_drained_relay": len(lost_on_drained),
        "turns_failed_elsewhere": len(failed) - len(lost_on_killed) - len(lost_on_drained),
        "relays_killed": sum(e.kind == "killed" for e in events),
        "relays_drained": sum(e.kind == "drained" for e in events),
        "devices_on_killed_relay": len(killed.devices),
        "devices_on_drained_relay": len(drained.devices),
        "reconnect_p50_ms": round(percentile(reconnect_ms["killed"], 50)),
        "reconnect_p99_ms": round(percentile(reconnect_ms["killed"], 99)),
        "drained_reconnect_p99_ms": round(percentile(reconnect_ms["drained"], 99)),
        "drain_s": round((drained.done_at or drained.at) - drained.at, 2),
        "devices_moved": len(moved),
        "history_kept": kept,
        "failures": sorted({r.reason for r in failed})[:5],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster-demo", description=__doc__)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--relays", type=int, default=3)
    parser.add_argument("--kill-after", type=float, default=8.0, help="s into the turns")
    parser.add_argument("--drain-after", type=float, default=16.0, help="s into the turns")
    parser.add_argument("--run", type=float, default=28.0, help="s of turns in all")
    parser.add_argument("--workdir", help="keep configs and logs here (default: a temp dir)")
    parser.add_argument("--verbose", action="store_true", help="the devices' link logs too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="%(name)s: %(message)s")
    from edgevoice_dev.testing.cluster import missing_tools
    if missing_tools():
        say(f"missing {' and '.join(missing_tools())}: run ./scripts/setup --test (as root) "
            "or apt-get install haproxy redis-server")
        return 69
    with tempfile.TemporaryDirectory(prefix="edgevoice-cluster-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        say(f"starting redis-server, {args.relays} relays and HAProxy in {workdir}")
        with running_cluster(workdir, args.relays) as cluster:
            report = asyncio.run(scenario(cluster, args.devices, kill_after_s=args.kill_after,
                                          drain_after_s=args.drain_after, run_s=args.run))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
