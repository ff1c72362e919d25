"""A real cluster on 127.0.0.1 for tests/cluster, ./scripts/cluster-demo and the bench.

Redis (redis-server), N relay processes (`python -m edgevoice relay`, echo
upstream, shared store) and HAProxy running deploy/haproxy/edgevoice.cfg with only
its addresses rewritten; simulated devices drive the real :class:`DeviceLink`.
Everything is a child process of the caller, on free ports, stopped on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from edgevoice.audio.opus import OpusEncoder
from edgevoice.backoff import BackoffSettings
from edgevoice.device.link import DeviceLink, RelaySettings, ResumeSettings
from edgevoice.protocol.connection import AudioReceived
from edgevoice.protocol.messages import (
    AudioFlags,
    Message,
    ResponseEnd,
    Transcript,
    TurnEnd,
    TurnStart,
    Welcome,
)
from edgevoice.relay.shared import RedisTokens
from edgevoice_dev import repository_root
from edgevoice_dev.testing.timeouts import TIMEOUT_FACTOR

HAPROXY_CFG = repository_root() / "deploy" / "haproxy" / "edgevoice.cfg"
KEY_PREFIX = "edgevoice:"


def scaled(seconds: float) -> float:
    return seconds * TIMEOUT_FACTOR


def missing_tools() -> list[str]:
    return [tool for tool in ("haproxy", "redis-server") if shutil.which(tool) is None]


async def until(predicate: Callable[[], object], within_s: float = 10, what: str = "") -> None:
    """Wait (polling, scaled) until ``predicate()`` is true."""
    deadline = time.monotonic() + scaled(within_s)
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"not true after {scaled(within_s):.0f} s: {what}")
        await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {scaled(timeout):.0f} s")


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def http_json(url: str) -> object:
    import json
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.loads(response.read())


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no",
             "--logfile", str(self.workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._ping, 10, "redis-server")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM,
                 timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Relay:
    """One `edgevoice relay` process of the cluster."""

    name: str
    workdir: Path
    redis_url: str
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    drain_timeout_ms: int = 15_000
    resume_window_ms: int = 10_000
    max_devices: int = 1000
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def config_file(self) -> Path:
        return self.workdir / f"{self.name}.yaml"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "log_level": "info",
            "listen": {"host": "127.0.0.1", "port": self.port},
            "admin": {"bind": "127.0.0.1", "port": self.admin_port},
            "auth": {"tokens_file": str(self.workdir / f"{self.name}-tokens.json")},
            "limits": {"resume_window_ms": self.resume_window_ms,
                       "max_devices": self.max_devices},
            "upstream": {"kind": "echo"},
            "cluster": {"relay_id": self.name, "drain_timeout_ms": self.drain_timeout_ms,
                        "store": {"kind": "redis", "url": self.redis_url,
                                  "key_prefix": KEY_PREFIX, "refresh_ms": 200}},
        }
        self.config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
        return self.config_file

    def start(self) -> None:
        self.write_config()
        log = open(self.workdir / f"{self.name}.log", "ab")  # noqa: SIM115 (child keeps it)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "edgevoice", "relay", "--config",
                                      str(self.config_file)], stdout=log, stderr=log, env=env)
        log.close()
        self.starts += 1
        wait_for(lambda: self.proc is not None and self.proc.poll() is None
                 and http_status(f"{self.admin_url}/healthz") == 200, 20, f"relay {self.name}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the relay dies with its sessions, as in a crash or an OOM kill."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def terminate(self) -> None:
        """SIGTERM (systemctl stop/restart): the relay drains, then exits."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(scaled(timeout))

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT)

    def log(self) -> str:
        path = self.workdir / f"{self.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def render_haproxy(port: int, relays: list[Relay]) -> str:
    """deploy/haproxy/edgevoice.cfg with this cluster's addresses, run unprivileged.

    Only what ties it to an installed machine changes: syslog, chroot, the stats
    socket, user and daemon mode, maxconn beyond the descriptor limit; the
    frontend's address; the server lines.
    """
    dropped = ("log ", "chroot ", "stats socket", "user ", "group ", "daemon")
    out: list[str] = []
    for line in HAPROXY_CFG.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith(dropped) or stripped.startswith("server "):
            continue
        if stripped.startswith("bind "):
            line = f"    bind 127.0.0.1:{port}"
        elif stripped.startswith("maxconn ") and not line.startswith("    default-server"):
            # two descriptors a connection: stay within this machine's hard limit
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            line = f"    maxconn {min(int(stripped.split()[1]), max(256, hard // 2 - 100))}"
        out.append(line)
    out.extend(f"    server {r.name} 127.0.0.1:{r.port} check port {r.admin_port}"
               for r in relays)
    return "\n".join(out) + "\n"


class HAProxy:
    def __init__(self, workdir: Path, relays: list[Relay]) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.relays = relays
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def start(self) -> None:
        config = self.workdir / "haproxy.cfg"
        config.write_text(render_haproxy(self.port, self.relays), encoding="utf-8")
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(config)], capture_output=True,
                               text=True, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        log = open(self.workdir / "haproxy.log", "ab")  # noqa: SIM115 (child keeps it)
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=log,
                                     stderr=log)
        log.close()
        wait_for(self._listening, 10, "haproxy")

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGUSR1)  # soft stop


@dataclass
class Cluster:
    redis: RedisServer
    relays: list[Relay]
    haproxy: HAProxy

    def tokens(self) -> RedisTokens:
        return RedisTokens(self.redis.url, KEY_PREFIX)

    def relay(self, name: str) -> Relay:
        return next(r for r in self.relays if r.name == name)

    def wait_until_balanced(self, timeout: float = 15) -> None:
        """Until HAProxy's checks see every live relay up (rise 2 at 1 s)."""
        time.sleep(scaled(2.5))

    def relay_of(self, device_id: str) -> str | None:
        """The relay the shared fleet view says ``device_id`` is (or was last) on."""
        import json

        import redis
        with redis.Redis.from_url(self.redis.url, decode_responses=True) as client:
            text = client.hget(f"{KEY_PREFIX}fleet", device_id)
        return str(json.loads(text)["relay"]) if text else None


@contextlib.contextmanager
def running_cluster(workdir: Path, relays: int = 3, *, drain_timeout_ms: int = 15_000,
                    resume_window_ms: int = 10_000,
                    max_devices: int = 1000) -> Iterator[Cluster]:
    redis = RedisServer(workdir / "redis")
    members = [Relay(f"relay{i + 1}", workdir, redis.url, drain_timeout_ms=drain_timeout_ms,
                     resume_window_ms=resume_window_ms, max_devices=max_devices)
               for i in range(relays)]
    haproxy = HAProxy(workdir, members)
    try:
        redis.start()
        for relay in members:
            relay.start()
        haproxy.start()
        cluster = Cluster(redis, members, haproxy)
        cluster.wait_until_balanced()
        yield cluster
    finally:
        haproxy.stop()
        for relay in members:
            relay.stop()
        redis.stop()


# --------------------------------------------------------------------------- devices


def speech_packets(n: int) -> list[bytes]:
    """``n`` 20 ms Opus packets of a warbling tone (the echo upstream speaks it back)."""
    encoder = OpusEncoder()
    packets = []
    for k in range(n):
        pcm = struct.pack("<320h", *(
            int(6000 * math.sin(2 * math.pi * (200 + 40 * math.sin(k / 8)) * (k * 320 + i)
                                / 16000)) for i in range(320)))
        packets.append(encoder.encode(pcm))
    return packets


@dataclass
class TurnResult:
    device: str
    turn_id: int
    ok: bool
    started_at: float
    ended_at: float
    #: the echo upstream's reply number, counted over the device's whole conversation
    echo_number: int | None
    session_id: str | None
    reason: str = ""


class SimulatedDevice:
    """A device without a sound card: the real DeviceLink, turns of recorded speech.

    A turn succeeds when the whole reply (response_end) arrives; it fails when the
    session ends first (the link reports it down) or nothing comes in time.
    """

    def __init__(self, device_id: str, token: str, url: str, packets: list[bytes]) -> None:
        self.device_id = device_id
        self.packets = packets
        settings = RelaySettings(url=url, stats_interval_s=0,
                                 backoff=BackoffSettings(initial_ms=250, max_ms=2000),
                                 resume=ResumeSettings())
        self.link = DeviceLink(settings, device_id, token, self)
        self.up = asyncio.Event()
        self.session_id: str | None = None
        self.sessions: list[str] = []
        self._reply: asyncio.Future[int | None] | None = None
        self._echo: int | None = None
        #: (time the link went down, time it was up again) for each outage
        self.outages: list[tuple[float, float | None]] = []
        self.closes: list[str] = []
        #: the link's announced wait before its next attempt, at each drop
        self.retry_delays: list[float | None] = []
        self.frames_received = 0
        self.results: list[TurnResult] = []
        self._task: asyncio.Task[None] | None = None

    # LinkListener -------------------------------------------------------
    def link_up(self, welcome: Welcome) -> None:
        now = time.monotonic()
        if self.outages and self.outages[-1][1] is None:
            self.outages[-1] = (self.outages[-1][0], now)
        if welcome.session_id != self.session_id:
            self.sessions.append(welcome.session_id)
        self.session_id = welcome.session_id
        self.up.set()

    def _went_down(self, reason: str) -> None:
        self.closes.append(reason)
        if self.up.is_set():
            self.outages.append((time.monotonic(), None))
        self.up.clear()

    def link_down(self, reason: str, retry_in_s: float | None) -> None:
        self.retry_delays.append(retry_in_s)
        self._went_down(reason)
        self._fail("session lost: " + reason)

    def link_suspended(self, reason: str, retry_in_s: float | None,
                       resume_within_s: float) -> None:
        self.retry_delays.append(retry_in_s)
        self._went_down(reason)

    def on_message(self, message: Message) -> None:
        if isinstance(message, Transcript) and message.role == "assistant":
            text = message.text
            if text.startswith("(echo #"):
                self._echo = int(text[len("(echo #"):].rstrip(")"))
        elif isinstance(message, ResponseEnd) and self._reply is not None \
                and not self._reply.done():
            self._reply.set_result(self._echo)

    def on_audio(self, received: AudioReceived) -> None:
        self.frames_received += 1

    def _fail(self, reason: str) -> None:
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(ConnectionError(reason))

    # driving -------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self.link.run(), name=f"link:{self.device_id}")

    async def stop(self) -> None:
        await self.link.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def turn(self, turn_id: int, reply_timeout_s: float = 10.0) -> TurnResult:
        await asyncio.wait_for(self.up.wait(), scaled(30))
        started = time.monotonic()
        session = self.session_id
        self._echo = None
        self._reply = asyncio.get_running_loop().create_future()
        ok, echo, reason = False, None, ""
        try:
            self.link.send(TurnStart(turn_id))
            for k, packet in enumerate(self.packets):
                flags = AudioFlags.START if k == 0 else AudioFlags.NONE
                if k == len(self.packets) - 1:
                    flags |= AudioFlags.END
                self.link.send_audio(packet, k * 20, flags)
                await asyncio.sleep(0.02)
                if self._reply.done():
                    break
            self.link.send(TurnEnd(turn_id))
            echo = await asyncio.wait_for(asyncio.shield(self._reply), scaled(reply_timeout_s))
            ok = True
        except (ConnectionError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
        finally:
            self._reply = None
        result = TurnResult(self.device_id, turn_id, ok, started, time.monotonic(), echo,
                            session, reason)
        self.results.append(result)
        return result


def issue_tokens(cluster: Cluster, count: int, prefix: str = "dev") -> dict[str, str]:
    store = cluster.tokens()
    return {f"{prefix}{i:03d}": store.add(f"{prefix}{i:03d}") for i in range(count)}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 whose connections can all be cut at once (a Wi-Fi drop:
    no close frame, nothing more from either side). New connections go to
    ``target_port`` (changeable); ``hold_uplink()`` stops forwarding what devices send
    (the bytes wait, and die with their connection) while replies still flow."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._uplink_open = asyncio.Event()
        self._uplink_open.set()

    def hold_uplink(self, held: bool = True) -> None:
        if held:
            self._uplink_open.clear()
        else:
            self._uplink_open.set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    async def __aenter__(self) -> CuttableProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await self._server.wait_closed()

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       gate: asyncio.Event | None) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    if gate is not None:
                        await gate.wait()
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()
        await asyncio.gather(pump(reader, up_writer, self._uplink_open),
                             pump(up_reader, writer, None))
