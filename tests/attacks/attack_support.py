"""What the attack suite shares: a live relay with a legitimate device having turns,
raw sockets for handshakes no well-behaved client sends, and process figures.

Everything runs on 127.0.0.1 (and other loopback addresses, 127.0.0.0/8, to play
many source addresses). Figures go to $RELIABILITY_FIGURES when set
(docs/reliability.md quotes them); the assertions are the bounds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import resource
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevoice_dev.testing.harness import device_config, running_relay
from edgevoice_dev.testing.timeouts import scaled
from websockets.asyncio.client import ClientConnection, connect

from edgevoice.audio.wavio import WavSink, WavSource
from edgevoice.config.model import DeviceConfig
from edgevoice.config.relay import RelayConfig
from edgevoice.device.daemon import DeviceDaemon, TurnTimeline
from edgevoice.protocol.messages import SUBPROTOCOL, Hello, encode_message
from edgevoice.relay.server import RelayServer


def record(name: str, figures: dict[str, object]) -> None:
    path = os.environ.get("RELIABILITY_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"test": f"attack_{name}", **figures}) + "\n")


async def wait_until(predicate: Callable[[], bool], within_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + scaled(within_s)
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


@dataclass
class LegitDevice:
    """The shipped daemon, looping a speech WAV, on its own token."""

    daemon: DeviceDaemon
    turns: list[TurnTimeline] = field(default_factory=list)

    @property
    def completed(self) -> int:
        return sum(1 for t in self.turns if t.outcome == "completed")

    async def completes_turns(self, n: int, within_s: float = 40.0) -> None:
        """Wait until ``n`` more turns completed than now."""
        target = self.completed + n
        await wait_until(lambda: self.completed >= target, within_s)


@contextlib.asynccontextmanager
async def relay_and_device(tmp_path: Path, speech: Path, config: RelayConfig | None = None,
                           **limits: Any) -> AsyncIterator[tuple[RelayServer, LegitDevice]]:
    """A relay on 127.0.0.1 and a legitimate device that has completed one turn."""
    async with running_relay(tmp_path, config, **limits) as relay:
        token = relay.tokens.add("good")
        url = f"ws://127.0.0.1:{relay.port}/"
        legit: LegitDevice
        turns: list[TurnTimeline] = []
        daemon = DeviceDaemon(device_config(url, "good", DeviceConfig()), token,
                              WavSource(speech, realtime=True, loop=True, tail_silence_ms=6000),
                              WavSink(tmp_path / "good-out.wav", realtime=False),
                              on_turn_done=turns.append)
        legit = LegitDevice(daemon, turns)
        task = asyncio.create_task(daemon.run())
        try:
            await legit.completes_turns(1, within_s=60)
            yield relay, legit
        finally:
            daemon.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, scaled(10))


async def open_device(url: str, token: str, device: str, *, hello: bool = True,
                      **kwargs: Any) -> ClientConnection:
    """A hand-driven device connection (a protocol-speaking attacker)."""
    ws = await connect(url, subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                       additional_headers={"Authorization": f"Bearer {token}"},
                       proxy=None, open_timeout=scaled(10), close_timeout=2,
                       max_size=None, **kwargs)
    if hello:
        await ws.send(encode_message(Hello(device=device)))
    return ws


def upgrade_request(headers: list[tuple[str, str]], path: str = "/") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
             "Sec-WebSocket-Version: 13", f"Sec-WebSocket-Protocol: {SUBPROTOCOL}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def raw_upgrade(port: int, headers: list[tuple[str, str]],
                      source: str = "127.0.0.1") -> tuple[int, asyncio.StreamReader,
                                                          asyncio.StreamWriter]:
    """Send an upgrade request as written; return the status and the open stream."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(upgrade_request(headers))
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), scaled(10))
    status = int(status_line.split()[1])
    while (await asyncio.wait_for(reader.readline(), scaled(10))) not in (b"\r\n", b""):
        pass
    return status, reader, writer


async def raw_status(port: int, headers: list[tuple[str, str]],
                     source: str = "127.0.0.1") -> int:
    status, _, writer = await raw_upgrade(port, headers, source)
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return status


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One client→server WebSocket frame (clients must mask)."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body
