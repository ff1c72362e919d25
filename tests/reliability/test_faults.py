"""Faults survived: a system-test suite over real sockets, namespaces and processes.

* link down and up mid-turn, and 5 % packet loss each way: a relay and a daemon in
  two network namespaces this test creates (root; ``nft`` ``numgen random`` rules);
* 200 ms added each way: a delay proxy on loopback;
* the relay killed with SIGKILL and restarted 20 times, and stopped with SIGTERM:
  a real ``edgevoice relay`` process;
* the microphone vanishing: a source that raises, then refuses to open.

The slow ones carry the ``slow`` marker (CI runs them); the namespace ones also
``root``, and skip themselves where namespaces cannot be made.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from edgevoice_dev.testing.harness import run, running_relay
from edgevoice_dev.testing.netfault import FaultProxy, NetnsLoop, NetnsPair, have_netns
from reliability_support import record, scaled, wait_until

from edgevoice.audio.base import CAPTURE_FRAME_BYTES, SourceStats
from edgevoice.audio.wavio import WavSink, WavSource
from edgevoice.backoff import BackoffSettings
from edgevoice.config.model import DeviceConfig
from edgevoice.config.relay import RelayConfig
from edgevoice.device.daemon import DeviceDaemon, TurnTimeline
from edgevoice.device.health_source import DaemonHealth
from edgevoice.errors import AudioDeviceError
from edgevoice.health.http import HealthSettings
from edgevoice.protocol.messages import Welcome
from edgevoice.relay.app import build_server
from edgevoice.relay.auth import TokenStore
from edgevoice.relay.server import RelayServer

needs_netns = pytest.mark.skipif(not have_netns(), reason="needs root, iproute2 and nftables")
RELAY_PORT = 8780


FAST_BACKOFF = BackoffSettings(initial_ms=100, max_ms=1000, min_ms=20)


def device_config(url: str, **relay: object) -> DeviceConfig:
    """A device config for ``url``; fast reconnects unless ``backoff`` is given."""
    base = DeviceConfig()
    relay.setdefault("backoff", FAST_BACKOFF)
    settings = replace(base.relay, url=url, **relay)  # type: ignore[arg-type]
    return replace(base, device_id="d1", relay=settings)


@dataclass
class TurnResult:
    turns: list[TurnTimeline]
    frames_sent: int
    frames_received: int
    frames_concealed: int
    dropped: int
    resumes: int
    rtt_ms: float | None
    last_resume_s: float | None
    frames_replayed: int
    underruns: int


async def talk(url: str, token: str, source: WavSource, out: Path, turns_wanted: int,
               within_s: float, during: object = None, **relay: object) -> TurnResult:
    """A daemon has ``turns_wanted`` turns; ``during`` (a coroutine function
    taking the daemon) runs alongside, to break things."""
    turns: list[TurnTimeline] = []
    finished = asyncio.Event()

    def done(turn: TurnTimeline) -> None:
        turns.append(turn)
        if len(turns) >= turns_wanted:
            finished.set()

    daemon = DeviceDaemon(device_config(url, **relay), token, source,
                            WavSink(out, realtime=True), on_turn_done=done,
                            capture_after_link=True)
    task = asyncio.create_task(daemon.run())
    breaker = asyncio.create_task(during(daemon)) if during else None  # type: ignore[operator]
    try:
        await asyncio.wait_for(finished.wait(), scaled(within_s))
        if breaker is not None:
            await breaker
    finally:
        daemon.stop()
        await task
    link = daemon.link.stats
    return TurnResult(turns, daemon.counters.frames_sent, daemon.counters.frames_received,
                      daemon.counters.frames_concealed, daemon.link.dropped, link.resumes,
                      link.rtt_ms, link.last_resume_s, link.frames_replayed,
                      daemon.playback.stats.underruns)


# ------------------------------------------------------------ network namespaces


@pytest.fixture
def netns_relay(tmp_path: Path) -> Iterator[tuple[NetnsPair, NetnsLoop, RelayServer, str]]:
    """A relay listening inside its own namespace; the device's namespace is empty."""
    with NetnsPair() as net, NetnsLoop(net.relay_ns) as relay_loop, \
            NetnsLoop(net.device_ns) as device_loop:
        base = RelayConfig()
        limits = replace(base.limits, ping_interval_ms=500, ping_timeout_ms=500)
        config = replace(base, listen=replace(base.listen, host=net.relay_ip, port=RELAY_PORT),
                         auth=replace(base.auth, tokens_file=str(tmp_path / "tokens.json")),
                         limits=limits)

        async def start() -> RelayServer:
            server = build_server(config)
            await server.start()
            return server

        server = relay_loop.run(start)
        token = server.tokens.add("d1")
        try:
            yield net, device_loop, server, token
        finally:
            relay_loop.run(server.close)


@pytest.mark.slow
@pytest.mark.root
@needs_netns
def test_link_down_and_up_mid_turn_loses_nothing(
        netns_relay: tuple[NetnsPair, NetnsLoop, RelayServer, str], long_voice_wav: Path,
        tmp_path: Path) -> None:
    net, device_loop, relay, token = netns_relay

    async def outage(daemon: DeviceDaemon) -> None:
        await wait_until(lambda: daemon.current is not None
                         and daemon.current.uplink_frames >= 70)
        await asyncio.to_thread(net.link, False)
        await asyncio.sleep(3.0)
        await asyncio.to_thread(net.link, True)

    result = device_loop.run(lambda: talk(
        f"ws://{net.relay_ip}:{RELAY_PORT}/", token, WavSource(long_voice_wav),
        tmp_path / "heard.wav", 1, 60, outage, ping_interval_ms=500, ping_timeout_ms=500),
        timeout=scaled(90))
    turn = result.turns[0]
    assert turn.outcome == "completed", turn.as_dict()
    assert result.resumes >= 1
    assert relay.counters.frames_in == turn.uplink_frames >= 300
    assert relay.counters.frames_concealed == 0
    assert result.frames_received == relay.counters.frames_out
    assert result.frames_concealed == 0 and result.dropped == 0
    record("netns_link_down_3s_mid_utterance", {
        "uplink_frames": turn.uplink_frames, "frames_in_at_relay": relay.counters.frames_in,
        "frames_lost": turn.uplink_frames - relay.counters.frames_in,
        "frames_replayed": result.frames_replayed,
        "drop_to_resumed_s": round(result.last_resume_s or 0, 3),
        "reply_frames": result.frames_received, "reply_frames_concealed": 0})


@pytest.mark.slow
@pytest.mark.root
@needs_netns
def test_five_percent_loss_each_way(
        netns_relay: tuple[NetnsPair, NetnsLoop, RelayServer, str], speech_wav: Path,
        tmp_path: Path) -> None:
    net, device_loop, relay, token = netns_relay
    net.set_loss(5)
    source = WavSource(speech_wav, loop=True, tail_silence_ms=6000)
    result = device_loop.run(lambda: talk(
        f"ws://{net.relay_ip}:{RELAY_PORT}/", token, source, tmp_path / "heard.wav", 2, 60),
        timeout=scaled(90))
    assert net.dropped_packets() > 0, "the loss rules dropped nothing"
    assert [t.outcome for t in result.turns] == ["completed", "completed"]
    # TCP repairs the loss: every frame arrives
    assert relay.counters.frames_in == sum(t.uplink_frames for t in result.turns)
    assert result.frames_concealed == 0
    record("netns_loss_5pct_each_way", {
        "packets_dropped": net.dropped_packets(), "turns": len(result.turns),
        "uplink_frames": sum(t.uplink_frames for t in result.turns),
        "frames_in_at_relay": relay.counters.frames_in,
        "reply_frames": result.frames_received, "playback_underruns": result.underruns})


# ----------------------------------------------------------------- delay


@pytest.mark.slow
def test_two_hundred_ms_added_each_way(tmp_path: Path, speech_wav: Path) -> None:
    async def scenario() -> tuple[TurnResult, int]:
        async with running_relay(tmp_path) as relay:
            token = relay.tokens.add("d1")
            async with FaultProxy("127.0.0.1", relay.port, delay_s=0.2) as proxy:
                result = await talk(proxy.url, token, WavSource(speech_wav,
                                                                 tail_silence_ms=6000),
                                    tmp_path / "heard.wav", 1, 40)
                return result, relay.counters.frames_in
    result, frames_in = run(scenario(), timeout=scaled(60))
    assert result.turns[0].outcome == "completed"
    assert frames_in == result.turns[0].uplink_frames
    assert result.rtt_ms is not None and result.rtt_ms >= 400
    record("delay_200ms_each_way", {
        "rtt_ms": round(result.rtt_ms, 1), "uplink_frames": result.turns[0].uplink_frames,
        "frames_in_at_relay": frames_in, "playback_underruns": result.underruns,
        "turn": result.turns[0].milestones_ms()})


# ----------------------------------------------------------- relay processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RelayProcess:
    """`edgevoice relay` as its own process, restartable on the same port."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.config = tmp_path / "relay.yaml"
        tokens = tmp_path / "tokens.json"
        self.config.write_text(
            f"listen: {{host: 127.0.0.1, port: {self.port}}}\n"
            f"auth: {{tokens_file: {tokens}}}\nadmin: {{port: 0}}\nlog_level: warning\n")
        self.tokens = TokenStore(tokens)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp_path / "relay.log"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgevoice", "relay", "--config", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=log)

    async def ready(self) -> float:
        """Wait until the relay accepts connections; the monotonic time it did."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + scaled(30)
        while loop.time() < deadline:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return time.monotonic()
            except OSError:
                await asyncio.sleep(0.005)
        raise TimeoutError("relay did not come up")

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=scaled(20))


class Timestamped(DeviceDaemon):
    """Notes when each link_up happened."""

    ups: list[tuple[float, bool]]

    def link_up(self, welcome: Welcome) -> None:
        self.ups.append((time.monotonic(), welcome.resume.resumed))
        super().link_up(welcome)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


@pytest.mark.slow
def test_relay_killed_and_restarted_twenty_times(tmp_path: Path, speech_wav: Path) -> None:
    relay = RelayProcess(tmp_path)
    token = relay.tokens.add("d1")
    restarts = int(os.environ.get("RELAY_RESTARTS", "20"))

    async def scenario() -> tuple[list[float], Timestamped]:
        relay.start()
        await relay.ready()
        # the shipped reconnect policy, so the figures are the ones a device would see
        config = device_config(f"ws://127.0.0.1:{relay.port}/", backoff=BackoffSettings())
        daemon = Timestamped(config, token,
                             WavSource(speech_wav, loop=True, tail_silence_ms=2000),
                             WavSink(tmp_path / "heard.wav", realtime=False),
                             capture_after_link=True)
        daemon.ups = []
        task = asyncio.create_task(daemon.run())
        reconnects: list[float] = []
        try:
            await wait_until(lambda: len(daemon.ups) == 1)
            for i in range(restarts):
                await asyncio.sleep(0.3 + (i % 5) * 0.2)  # somewhere in a turn or a reply
                assert relay.kill(signal.SIGKILL) == -signal.SIGKILL
                relay.start()
                ready_at = await relay.ready()
                await wait_until(lambda n=i: len(daemon.ups) == n + 2, within_s=30)
                reconnects.append(daemon.ups[-1][0] - ready_at)
                assert not daemon.ups[-1][1]  # a new relay holds no sessions
        finally:
            daemon.stop()
            await task
            relay.kill(signal.SIGTERM)
        return reconnects, daemon

    reconnects, daemon = run(scenario(), timeout=scaled(60 + restarts * 10))
    assert len(reconnects) == restarts
    assert daemon.link.stats.connects == restarts + 1
    p50, p99 = percentile(reconnects, 50), percentile(reconnects, 99)
    record("relay_sigkill_restarts", {
        "restarts": restarts, "reconnect_p50_s": round(p50, 3),
        "reconnect_p99_s": round(p99, 3), "reconnect_max_s": round(max(reconnects), 3),
        "reconnect_mean_s": round(statistics.mean(reconnects), 3),
        "frames_lost": daemon.link.dropped, "frames_sent": daemon.counters.frames_sent,
        "turns": daemon.counters.turns})
    # the device retries at least every resume.retry_max_ms (1 s) while it still hopes
    # to resume; a reconnect never waits for the long backoff
    assert max(reconnects) < 5.0, reconnects


@pytest.mark.slow
def test_relay_stopped_gracefully_sends_going_away_and_devices_come_back(
        tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path)
    token = relay.tokens.add("d1")

    async def scenario() -> tuple[list[str], float, int]:
        from reliability_support import LinkEvents

        from edgevoice.device.link import DeviceLink
        relay.start()
        await relay.ready()
        events = LinkEvents()
        link = DeviceLink(device_config(f"ws://127.0.0.1:{relay.port}/").relay, "d1",
                          token, events)
        task = asyncio.create_task(link.run())
        try:
            await events.wait_for(lambda: len(events.ups()) == 1)
            code = relay.kill(signal.SIGTERM)
            await events.wait_for(lambda: "down" in events.kinds())
            relay.start()
            ready_at = await relay.ready()
            await events.wait_for(lambda: len(events.ups()) == 2, within_s=30)
            reconnect = time.monotonic() - ready_at
            reasons = [str(d) for k, d in events.events if k == "down"]
        finally:
            await link.stop()
            task.cancel()
            relay.kill(signal.SIGTERM)
        return [*events.kinds(), *reasons], reconnect, code

    kinds, reconnect, code = run(scenario(), timeout=scaled(60))
    assert code == 0  # a clean exit
    states = [k for k in kinds if k in ("up", "down", "suspended")]
    # drained (4004, docs/scale-out.md): no attempt to resume, just down (again while
    # the relay restarts), up
    assert states[:2] == ["up", "down"] and "suspended" not in states
    assert states[-1] == "up" and states.count("up") == 2
    assert any("4004" in k for k in kinds), kinds
    record("relay_sigterm_restart", {"reconnect_s": round(reconnect, 3)})


# -------------------------------------------------------------- the microphone


class VanishingSource:
    """A microphone that works, vanishes (read raises), refuses to reopen, comes back."""

    name = "vanishing"

    def __init__(self, good_frames: int, failed_opens: int) -> None:
        self.stats = SourceStats()
        self.good_frames = good_frames
        self.failed_opens = failed_opens
        self.opens_tried = 0
        self._open = False
        self._frames = 0

    async def open(self) -> None:
        self.opens_tried += 1
        if 1 < self.opens_tried <= 1 + self.failed_opens:
            raise AudioDeviceError("no such device")
        self._open = True
        self.stats.opens += 1

    async def read(self) -> bytes:
        if not self._open:
            raise AudioDeviceError("not open")
        await asyncio.sleep(0.02)
        self._frames += 1
        if self.opens_tried == 1 and self._frames >= self.good_frames:
            self._open = False
            raise AudioDeviceError("device unplugged")
        self.stats.frames_captured += 1
        self.stats.last_frame_at = time.monotonic()
        return bytes(CAPTURE_FRAME_BYTES)

    async def close(self) -> None:
        self._open = False


def test_a_vanished_microphone_is_reopened_with_backoff_and_reported(
        tmp_path: Path) -> None:
    async def scenario() -> tuple[list[str], list[str], int, int]:
        async with running_relay(tmp_path) as relay:
            token = relay.tokens.add("d1")
            source = VanishingSource(good_frames=10, failed_opens=3)
            base = device_config(f"ws://127.0.0.1:{relay.port}/")
            config = replace(base, audio=replace(base.audio, reopen_max_ms=1000))
            daemon = DeviceDaemon(config, token, source,  # type: ignore[arg-type]
                                  WavSink(tmp_path / "heard.wav", realtime=False))
            health = DaemonHealth(daemon, HealthSettings())
            task = asyncio.create_task(daemon.run())
            try:
                await wait_until(lambda: source.opens_tried >= 2)
                during = health.health_problems(time.monotonic())
                await wait_until(lambda: source.stats.opens == 2, within_s=15)
                await wait_until(lambda: daemon.audio_problem is None)
                after = health.health_problems(time.monotonic())
            finally:
                daemon.stop()
                await task
            return during, after, daemon.counters.audio_reopens, source.opens_tried
    during, after, reopens, tried = run(scenario(), timeout=scaled(40))
    assert any("microphone unavailable" in p for p in during), during
    assert not any("microphone" in p for p in after), after
    assert tried == 5 and reopens == 4  # the vanishing read and three refused opens
