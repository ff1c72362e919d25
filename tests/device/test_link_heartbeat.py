"""The link's heartbeat against real relays on 127.0.0.1 (docs/protocol.md §6).

With no WebSocket keepalive (the default), the protocol heartbeat is what finds a relay
that stopped answering without closing: a dead route (a proxy that forwards nothing)
and a relay process frozen with SIGSTOP. The device's stats ride the heartbeat: one
write carries ``stats`` and ``ping`` (one TCP segment, one relay wake-up), every Nth
heartbeat, and a failing stats provider does not stop the heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from device_support import running_link
from edgevoice_dev.testing.harness import run, running_relay
from edgevoice_dev.testing.netfault import FaultProxy
from edgevoice_dev.testing.timeouts import scaled

from edgevoice.device.link import ResumeSettings
from edgevoice.protocol.connection import AudioReceived
from edgevoice.protocol.messages import Message, Welcome
from edgevoice.relay.server import RelayServer

HEARTBEAT_MS = 300


@dataclass
class Events:
    """What the link told its listener, in order."""

    kinds: list[str] = field(default_factory=list)
    welcomes: list[Welcome] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def link_up(self, welcome: Welcome) -> None:
        self.welcomes.append(welcome)
        self._add("up")

    def link_down(self, reason: str, retry_in_s: float | None) -> None:
        self._add("down")

    def link_suspended(self, reason: str, retry_in_s: float | None,
                       resume_within_s: float) -> None:
        self._add("suspended")

    def on_message(self, message: Message) -> None: ...

    def on_audio(self, received: AudioReceived) -> None: ...

    def _add(self, kind: str) -> None:
        self.kinds.append(kind)
        self.changed.set()

    async def wait_for(self, predicate: Callable[[], bool], within_s: float) -> None:
        async def loop() -> None:
            while not predicate():
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(loop(), scaled(within_s))


async def until(predicate: Callable[[], bool], within_s: float) -> None:
    deadline = time.monotonic() + scaled(within_s)
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


class CountingStats:
    """A stats provider that numbers its answers (or fails, when told to)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("a bug in the stats")
        return {"n": self.calls, "timezone": "UTC"}


def last_stats(relay: RelayServer) -> object:
    record = relay.fleet.record("d1")
    return None if record is None else record.last_stats


# ------------------------------------------------------------- unhappy path

def test_a_dead_route_is_found_by_the_heartbeat_and_the_session_resumed(
        tmp_path: Path) -> None:
    """The relay stops answering (a proxy that forwards nothing, closes nothing): no
    keepalive ping is set, the heartbeat alone finds it and the link reconnects."""
    async def scenario() -> None:
        async with running_relay(tmp_path, heartbeat_interval_ms=HEARTBEAT_MS) as relay, \
                FaultProxy("127.0.0.1", relay.port) as proxy:
            events = Events()
            async with running_link(proxy.url, relay.tokens.add("d1"), events,
                                    ping_timeout_ms=300,
                                    resume=ResumeSettings(attempt_timeout_ms=500)) as link:
                assert link.settings.ping_interval_ms == 0  # no WebSocket keepalive
                await events.wait_for(lambda: "up" in events.kinds, 10)
                await until(lambda: link.stats.heartbeats >= 3, 10)  # answered: still up
                assert link.stats.heartbeat_timeouts == 0 and link.stats.connects == 1
                proxy.hold(True)
                held_at = time.monotonic()
                await events.wait_for(lambda: "suspended" in events.kinds, 10)
                found_s = time.monotonic() - held_at
                assert link.stats.heartbeat_timeouts == 1
                assert "silent" in link.stats.last_error, link.stats.last_error
                # within one interval and one timeout (+ scheduling slack)
                assert found_s < scaled((HEARTBEAT_MS + 300) / 1000 + 1.0), found_s
                proxy.hold(False)
                await events.wait_for(lambda: events.kinds.count("up") == 2, 15)
                assert events.welcomes[1].resume.resumed
                assert link.stats.connects == 2
    run(scenario(), timeout=scaled(60))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_a_frozen_relay_process_is_left_and_rejoined_once_it_thaws(tmp_path: Path) -> None:
    """A relay process stopped with SIGSTOP: its kernel still accepts TCP and acks the
    bytes, nothing answers. The device gives up within interval + timeout, keeps
    trying (connection attempts that hang time out), and is back once it runs."""
    port, admin = _free_port(), _free_port()
    cfg = tmp_path / "relay.yaml"
    cfg.write_text(f"listen: {{port: {port}}}\nadmin: {{port: {admin}}}\n"
                   f"auth: {{tokens_file: {tmp_path / 'tokens.json'}}}\n"
                   "limits: {heartbeat_interval_ms: 500}\n")
    token = subprocess.run([sys.executable, "-m", "edgevoice", "token", "add", "d1",
                            "--config", str(cfg)], capture_output=True, text=True,
                           check=True).stdout.strip()
    relay = subprocess.Popen([sys.executable, "-m", "edgevoice", "relay", "--config", str(cfg)],
                             stderr=subprocess.DEVNULL)

    async def scenario() -> None:
        deadline = time.monotonic() + scaled(30)
        while True:  # until the relay listens
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "the relay did not start"
            await asyncio.sleep(0.1)
        events = Events()
        async with running_link(f"ws://127.0.0.1:{port}/", token, events,
                                ping_timeout_ms=500, open_timeout_ms=1000,
                                resume=ResumeSettings(attempt_timeout_ms=500)) as link:
            await events.wait_for(lambda: "up" in events.kinds, 20)
            await until(lambda: link.stats.heartbeats >= 2, 10)
            os.kill(relay.pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            try:
                await events.wait_for(lambda: len(events.kinds) >= 2, 10)
                found_s = time.monotonic() - stopped_at
                assert events.kinds[1] in ("suspended", "down")
                assert link.stats.heartbeat_timeouts == 1
                assert found_s < scaled(0.5 + 0.5 + 1.0), found_s
                # attempts into the frozen relay hang and time out; none succeeds
                await asyncio.sleep(scaled(1.5))
                assert events.kinds.count("up") == 1
            finally:
                os.kill(relay.pid, signal.SIGCONT)
            await events.wait_for(lambda: events.kinds.count("up") == 2, 20)
            assert link.connected
            beats = link.stats.heartbeats
            await until(lambda: link.stats.heartbeats > beats, 10)

    try:
        run(scenario(), timeout=scaled(90))
    finally:
        relay.terminate()
        relay.wait(timeout=15)


def test_a_failing_stats_provider_does_not_stop_the_heartbeat(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path, heartbeat_interval_ms=200) as relay:
            events, stats = Events(), CountingStats(fail=True)
            async with running_link(f"ws://127.0.0.1:{relay.port}/", relay.tokens.add("d1"),
                                    events, stats=stats, stats_interval_s=1) as link:
                await until(lambda: link.stats.heartbeats >= 12, 15)
                assert stats.calls == link.stats.stats_failed >= 2
                assert link.stats.stats_sent == 0
                assert link.stats.connects == 1 and link.connected  # the relay kept it
                assert link.stats.heartbeat_timeouts == 0
                assert link.stats.rtt_ms is not None  # the pings were answered
                assert last_stats(relay) is None
    run(scenario(), timeout=scaled(40))


def test_no_stats_when_their_interval_is_zero(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path, heartbeat_interval_ms=200) as relay:
            events, stats = Events(), CountingStats()
            async with running_link(f"ws://127.0.0.1:{relay.port}/", relay.tokens.add("d1"),
                                    events, stats=stats, stats_interval_s=0) as link:
                await until(lambda: link.stats.heartbeats >= 5, 15)
                assert stats.calls == 0 and link.stats.stats_sent == 0
                assert last_stats(relay) is None
                assert link.stats.writes == link.stats.heartbeats  # pings only
    run(scenario(), timeout=scaled(40))


@pytest.mark.parametrize(("heartbeat_ms", "stats_s", "every"), [(500, 1, 2), (2000, 1, 1)])
def test_the_stats_ride_every_nth_heartbeat(tmp_path: Path, heartbeat_ms: int, stats_s: int,
                                            every: int) -> None:
    """Heartbeat shorter than the stats interval: stats on every Nth; longer: on each."""
    async def scenario() -> None:
        async with running_relay(tmp_path, heartbeat_interval_ms=heartbeat_ms) as relay:
            events, stats = Events(), CountingStats()
            async with running_link(f"ws://127.0.0.1:{relay.port}/", relay.tokens.add("d1"),
                                    events, stats=stats, stats_interval_s=stats_s) as link:
                await until(lambda: link.stats.heartbeats >= 4, 15)
                beats = link.stats.heartbeats
                assert stats.calls == link.stats.stats_sent == -(-beats // every)
                assert link.stats.writes == beats  # each heartbeat, stats or not: one write
                await until(lambda: last_stats(relay) == {"n": stats.calls, "timezone": "UTC"},
                            5)  # what the last of them said reached the fleet view
    run(scenario(), timeout=scaled(40))


#: struct tcp_info (linux/tcp.h): tcpi_data_segs_in, segments with data received
TCPI_DATA_SEGS_IN_OFFSET = 152


def data_segments_in(sock: socket.socket) -> int:
    """TCP segments carrying data that ``sock`` received (Linux TCP_INFO)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("I", info, TCPI_DATA_SEGS_IN_OFFSET)[0])


class RecordingProxy:
    """A TCP proxy that keeps each chunk the device's side delivered in one read, and
    the socket it read them from."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reads: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.device_sockets: list[socket.socket] = []

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/"

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writers += [writer, up_writer]
        self.device_sockets.append(writer.get_extra_info("socket"))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       record: bool) -> None:
            while data := await src.read(65536):
                if record:
                    self.reads.append(data)
                dst.write(data)
                await dst.drain()
            dst.close()

        with contextlib.suppress(Exception):
            await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))


def _unmasked_texts(chunk: bytes) -> list[str]:
    """The ``type`` of each client text frame in ``chunk`` (masked, short, unfragmented)."""
    types, i = [], 0
    while i + 6 <= len(chunk):
        opcode, length = chunk[i] & 0x0F, chunk[i + 1] & 0x7F
        i += 2
        if length == 126:
            length = int.from_bytes(chunk[i:i + 2], "big")
            i += 2
        elif length == 127:
            length = int.from_bytes(chunk[i:i + 8], "big")
            i += 8
        mask, payload = chunk[i:i + 4], chunk[i + 4:i + 4 + length]
        i += 4 + length
        if opcode == 1:
            text = bytes(b ^ mask[k % 4] for k, b in enumerate(payload))
            types.append(json.loads(text)["type"])
    return types


def test_stats_and_ping_leave_in_one_segment(tmp_path: Path) -> None:
    """Each heartbeat that carries stats is one TCP segment at the relay's end (counted
    by the receiving kernel), with the stats frame right before the ping."""
    async def scenario() -> None:
        async with running_relay(tmp_path, heartbeat_interval_ms=200) as relay:
            proxy = RecordingProxy(relay.port)
            async with proxy as url:
                events, stats = Events(), CountingStats()
                async with running_link(url, relay.tokens.add("d1"), events, stats=stats,
                                        stats_interval_s=1) as link:
                    await until(lambda: link.stats.stats_sent >= 3, 15)
                    (sock,) = proxy.device_sockets
                    # the HTTP upgrade and the hello, then one segment per heartbeat
                    # (this test, the link and the proxy share one event loop: no
                    # heartbeat is half-sent while this line runs)
                    assert data_segments_in(sock) == 2 + link.stats.heartbeats
                    assert link.stats.writes == link.stats.heartbeats
                    await until(lambda: last_stats(relay) == {"n": stats.calls,
                                                              "timezone": "UTC"}, 5)
            frames = [_unmasked_texts(chunk) for chunk in proxy.reads
                      if not chunk.startswith(b"GET ")]  # not the HTTP upgrade
            with_stats = [types for types in frames if "stats" in types]
            assert len(with_stats) >= 3
            assert all(types == ["stats", "ping"] for types in with_stats), with_stats
    run(scenario(), timeout=scaled(40))
