"""A relay with the browser page on 127.0.0.1, and headless Debian Chromium to drive it.

Chromium is the system's (``/usr/bin/chromium``, Debian's package) driven through
the DevTools protocol by Playwright's Python package with ``executable_path``:
nothing downloads a browser. The fake microphone plays a speech WAV in a loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import urllib.request
import wave
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgevoice_dev.testing.timeouts import TIMEOUT_FACTOR

from edgevoice.config.relay import RelayConfig
from edgevoice.health.relay import relay_admin_api
from edgevoice.relay.app import build_server
from edgevoice.relay.health_source import RelayHealth
from edgevoice.relay.server import RelayServer
from edgevoice.web.gate import BrowserGate, WebSettings, ticket_routes
from edgevoice.web.tickets import TicketStore

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ADMIN_TOKEN = "admin-test-token-0123456789abcdef"
DOCS = Path(__file__).resolve().parents[2] / "docs"

needs_chromium = pytest.mark.skipif(CHROMIUM is None,
                                    reason="needs Debian's chromium (./scripts/setup --test)")


def ms(value: float) -> float:
    """A timeout in milliseconds for Playwright, scaled for slow machines."""
    return value * TIMEOUT_FACTOR


class Wall:
    """A wall clock for the ticket store that a test can move forward."""

    def __init__(self) -> None:
        import time
        self.offset = 0.0
        self._time = time.time

    def __call__(self) -> float:
        return self._time() + self.offset


@dataclass
class BrowserRelay:
    server: RelayServer
    gate: BrowserGate
    store: TicketStore
    wall: Wall
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/"

    def admin(self, method: str, path: str, body: object | None = None,
              token: str | None = ADMIN_TOKEN) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}",
                                         data=data, method=method)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                raw = response.read()
                status = response.status
                kind = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raw, status, kind = exc.read(), exc.code, exc.headers.get("Content-Type", "")
        return status, json.loads(raw) if "json" in kind else raw.decode()

    async def mint(self, device: str = "browser", ttl_s: float = 120) -> str:
        status, answer = await asyncio.to_thread(
            self.admin, "POST", "/tickets", {"device": device, "ttl_s": ttl_s})
        assert status == 201, answer
        return str(answer["ticket"])


@contextlib.asynccontextmanager
async def browser_relay(tmp_path: Path, **limits: Any) -> AsyncIterator[BrowserRelay]:
    """The relay (echo upstream) serving the page, and its admin endpoint with a token."""
    base = RelayConfig()
    web = WebSettings(enabled=True, tickets_file=str(tmp_path / "tickets.json"))
    config = replace(base, web=web,
                     listen=replace(base.listen, host="127.0.0.1", port=0),
                     auth=replace(base.auth, tokens_file=str(tmp_path / "tokens.json")),
                     limits=replace(base.limits, **limits))
    wall = Wall()
    store = TicketStore(web.tickets_file, wall=wall)
    server = build_server(config)
    gate = BrowserGate(web, store)
    server.browser = gate
    await server.start()
    listen = replace(config.listen, port=server.port)
    admin = relay_admin_api(RelayHealth(server), replace(config.admin, port=0), ADMIN_TOKEN,
                            extra_routes=ticket_routes(store, web, listen, admin_token_set=True))
    await admin.start()
    try:
        yield BrowserRelay(server, gate, store, wall, admin.port)
    finally:
        await admin.stop()
        await server.close()


def speech_fixture(tmp_path: Path) -> Path:
    """The bundled speech with silence around it: what the fake microphone loops."""
    from edgevoice.demo import bundled_speech
    with wave.open(str(bundled_speech()), "rb") as w:
        rate = w.getframerate()
        speech = w.readframes(w.getnframes())
    path = tmp_path / "speech.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * rate + speech + b"\0\0" * (rate * 3 // 2))
    return path


def chromium_args(speech: Path) -> list[str]:
    return [
        "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
        "--autoplay-policy=no-user-gesture-required",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={speech}",
    ]


@contextlib.asynccontextmanager
async def chromium(tmp_path: Path, speech: Path) -> AsyncIterator[Any]:
    """A Playwright browser over the system Chromium, with a fresh profile."""
    from playwright.async_api import async_playwright
    assert CHROMIUM is not None
    profile = tmp_path / "chromium-profile"
    async with async_playwright() as p:
        context = await p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=chromium_args(speech),
            viewport={"width": 820, "height": 640})
        try:
            yield context
        finally:
            await context.close()


async def open_page(context: Any, url: str, errors: list[str] | None = None) -> Any:
    page = await context.new_page()
    sink = errors if errors is not None else []
    page.on("pageerror", lambda exc: sink.append(str(exc)))
    page.on("console", lambda m: sink.append(m.text) if m.type == "error" else None)
    await page.goto(url)
    await page.wait_for_selector("body[data-ready]", timeout=ms(10_000))
    return page


async def connect(page: Any) -> None:
    await page.click("#connect")
    await page.wait_for_selector("#state[data-state=open]", timeout=ms(15_000))


def decode_tap(tap: dict[str, Any]) -> tuple[np.ndarray, int]:
    pcm = np.frombuffer(base64.b64decode(tap["pcm"]), dtype="<i2").astype(np.float64) / 32768
    return pcm, int(tap["rate"])


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return data.astype(np.float64) / 32768, w.getframerate()


def envelope_db(samples: np.ndarray, rate: int, window_ms: int = 20) -> np.ndarray:
    """Loudness per window in dB, floored at -70: what should line up, not phase."""
    n = rate * window_ms // 1000
    usable = len(samples) // n * n
    rms = np.sqrt(np.mean(samples[:usable].reshape(-1, n) ** 2, axis=1) + 1e-12)
    return np.maximum(20 * np.log10(rms), -70.0)


def best_envelope_correlation(speech: np.ndarray, speech_rate: int,
                              played: np.ndarray, played_rate: int) -> float:
    """Pearson correlation of the speech's envelope with the best-aligned stretch of
    what was played (each at its own rate; windows are the same length in time)."""
    a = envelope_db(speech, speech_rate)
    b = envelope_db(played, played_rate)
    if len(b) < len(a):
        b = np.concatenate([b, np.full(len(a) - len(b), -70.0)])
    a = a - a.mean()
    best = -1.0
    for lag in range(len(b) - len(a) + 1):
        seg = b[lag:lag + len(a)] - b[lag:lag + len(a)].mean()
        denom = float(np.linalg.norm(a) * np.linalg.norm(seg))
        if denom > 0:
            best = max(best, float(np.dot(a, seg) / denom))
    return best


async def wait_until(predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s * TIMEOUT_FACTOR
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


async def wait_for_js(page: Any, expression: str, timeout_s: float) -> Any:
    """Poll ``expression`` in the page until it is truthy (Playwright's own
    wait_for_function evaluates strings, which the page's CSP forbids)."""
    deadline = asyncio.get_running_loop().time() + timeout_s * TIMEOUT_FACTOR
    while True:
        value = await page.evaluate(expression)
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"page never had {expression}")
        await asyncio.sleep(0.05)


def squeeze_underruns(samples: np.ndarray, rate: int, min_ms: int = 20) -> np.ndarray:
    """Remove runs of exact digital silence (what the player outputs while its
    buffer is empty, e.g. during a reconnect); decoded speech is never exactly 0."""
    zero = samples == 0.0
    edges = np.flatnonzero(np.diff(np.concatenate([[0], zero.astype(np.int8), [0]])))
    keep = np.ones(len(samples), dtype=bool)
    for start, end in zip(edges[::2], edges[1::2], strict=True):
        if end - start >= rate * min_ms // 1000:
            keep[start:end] = False
    return samples[keep]


class FlakyProxy:
    """A TCP proxy on 127.0.0.1 in front of the relay that a test can cut: every
    connection through it is reset, and for ``down_s`` new ones are dropped at once
    (what a Wi-Fi roam looks like to both ends)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._down_until = 0.0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.cut(0)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self, down_s: float) -> None:
        self._down_until = asyncio.get_running_loop().time() + down_s
        for writer in list(self._writers):
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if asyncio.get_running_loop().time() < self._down_until:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))
