"""Test doubles for the doctor: a scripted sound system and a relay stub on 127.0.0.1."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Literal

import numpy as np
from edgevoice_dev.testing.timeouts import TIMEOUT_FACTOR
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from edgevoice.doctor import AudioDevice


def sine(rate_hz: int, seconds: float, dbfs_peak: float, hz: float = 1000.0) -> np.ndarray:
    n = np.arange(int(rate_hz * seconds))
    return 32768 * 10 ** (dbfs_peak / 20) * np.sin(2 * np.pi * hz * n / rate_hz)


def pcm(samples: np.ndarray) -> bytes:
    return np.clip(np.round(samples), -32768, 32767).astype("<i2").tobytes()


def room(
    rate_hz: int,
    seconds: float,
    noise_dbfs: float,
    *,
    speech_dbfs: float | None = None,
    seed: int = 1,
) -> bytes:
    """Gaussian room noise with RMS ``noise_dbfs``, and optionally a tone (the "speech")
    peaking at ``speech_dbfs`` over the first third."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, 32768 * 10 ** (noise_dbfs / 20), int(rate_hz * seconds))
    if speech_dbfs is not None:
        burst = sine(rate_hz, seconds / 3, speech_dbfs)
        noise[: burst.size] += burst
    return pcm(noise)


@dataclass
class FakeAudio:
    """A sound system with fixed devices; records return ``recording``, plays are kept."""

    devices_list: list[AudioDevice] = field(
        default_factory=lambda: [
            AudioDevice(0, "bcm2835 Headphones: - (hw:0,0)", 0, 8, 48000),
            AudioDevice(1, "USB PnP Sound Device: Audio (hw:1,0)", 1, 0, 44100),
            AudioDevice(2, "pulse", 32, 32, 44100),
            AudioDevice(3, "default", 32, 32, 44100),
        ]
    )
    defaults: dict[str, int | None] = field(default_factory=lambda: {"input": 3, "output": 3})
    recording: bytes | Exception = b""
    play_error: Exception | None = None
    #: rates every device refuses to play at (as PortAudio does: "Invalid sample rate")
    refused_rates: frozenset[int] = frozenset()
    recorded: list[tuple[str, float, int]] = field(default_factory=list)
    played: list[tuple[str, bytes, int]] = field(default_factory=list)

    def devices(self) -> list[AudioDevice]:
        return list(self.devices_list)

    def default_device(self, kind: Literal["input", "output"]) -> int | None:
        return self.defaults[kind]

    def record(self, device: AudioDevice, seconds: float, rate_hz: int) -> bytes:
        self.recorded.append((device.name, seconds, rate_hz))
        if isinstance(self.recording, Exception):
            raise self.recording
        return self.recording

    def play(self, device: AudioDevice, pcm: bytes, rate_hz: int) -> None:
        if self.play_error is not None:
            raise self.play_error
        if rate_hz in self.refused_rates:
            raise OSError(f"Invalid sample rate {rate_hz}")
        self.played.append((device.name, pcm, rate_hz))


class RelayStub:
    """A WebSocket server on 127.0.0.1 in its own thread that answers like a relay:
    401 for a wrong token, else the upgrade (with or without the subprotocol), or a
    fixed HTTP status. It records what clients sent."""

    def __init__(
        self,
        token: str,
        *,
        subprotocols: Sequence[str] = ("edgevoice.v1",),
        status: int | None = None,
    ) -> None:
        self.token = token
        self.subprotocols = [Subprotocol(p) for p in subprotocols]
        self.status = status
        self.requests: list[Headers] = []
        self.messages: list[str | bytes] = []
        self.sessions = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: Server | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RelayStub:
        self._thread.start()
        if not self._ready.wait(10 * TIMEOUT_FACTOR):
            raise RuntimeError("relay stub did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10 * TIMEOUT_FACTOR)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10 * TIMEOUT_FACTOR)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _start(self) -> None:
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            subprotocols=self.subprotocols or None,
            process_request=self._process_request,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        self.requests.append(request.headers)
        if self.status is not None:
            return connection.respond(HTTPStatus(self.status), "stub says no\n")
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return connection.respond(HTTPStatus.UNAUTHORIZED, "unknown or missing device token\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        self.sessions += 1
        try:
            async for message in ws:
                self.messages.append(message)
        except ConnectionClosed:
            pass
