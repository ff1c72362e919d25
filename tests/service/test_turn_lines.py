"""What the device's log and /stats say about its turns, as an operator reads them.

The real `edgevoice device` process against a relay on 127.0.0.1 whose upstream
hears the turn and never answers: the turn ends by the reply timeout, which must be
logged and recorded, not vanish.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

from edgevoice_dev.testing.timeouts import scaled

from edgevoice.relay.auth import TokenStore
from edgevoice.relay.server import RelayServer
from edgevoice.relay.settings import LimitsSettings, ListenSettings
from edgevoice.upstream.base import DeviceContext, UpstreamEvent

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "edgevoice" / "data" / "hello.wav"


class SilentSession:
    """Takes the user's audio and never says anything."""

    def __init__(self) -> None:
        self.turns_ended = 0
        self._closed = asyncio.Event()

    async def start_turn(self) -> None:
        pass

    async def send_audio(self, pcm: bytes) -> None:
        pass

    async def end_turn(self) -> None:
        self.turns_ended += 1

    async def interrupt(self) -> None:
        pass

    async def events(self) -> AsyncIterator[UpstreamEvent]:
        await self._closed.wait()
        return
        yield  # pragma: no cover - an async generator that yields nothing

    async def close(self) -> None:
        self._closed.set()


class SilentUpstream:
    name = "silent"

    def __init__(self) -> None:
        self.sessions: list[SilentSession] = []

    async def open_session(self, context: DeviceContext) -> SilentSession:
        session = SilentSession()
        self.sessions.append(session)
        return session

    async def aclose(self) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stats(port: int) -> dict[str, object]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=2) as r:
            document = json.loads(r.read())
            assert isinstance(document, dict)
            return document
    except OSError:
        return {}


def test_a_turn_ended_by_the_reply_timeout_is_logged_and_recorded(tmp_path: Path) -> None:
    async def scenario() -> tuple[dict[str, object], str, int]:
        upstream = SilentUpstream()
        server = RelayServer(ListenSettings(host="127.0.0.1", port=0), LimitsSettings(),
                             TokenStore(tmp_path / "tokens.json"), upstream)  # type: ignore[arg-type]
        token = server.tokens.add("kitchen")
        await server.start()
        (tmp_path / "device.token").write_text(token)
        health = free_port()
        cfg = tmp_path / "device.yaml"
        cfg.write_text(
            f"relay: {{url: 'ws://127.0.0.1:{server.port}/', "
            f"token_file: {tmp_path / 'device.token'}}}\n"
            f"audio: {{input: 'wav:{HELLO}', output: 'wav:{tmp_path / 'out.wav'}'}}\n"
            "turn: {reply_timeout_ms: 1500}\n"
            f"health: {{port: {health}}}\n")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgevoice", "device", "--config", str(cfg),
            stderr=asyncio.subprocess.PIPE, cwd=tmp_path)
        document: dict[str, object] = {}
        try:
            deadline = time.monotonic() + scaled(30)
            while time.monotonic() < deadline:
                document = await asyncio.to_thread(stats, health)
                if document.get("turns"):
                    break
                await asyncio.sleep(0.3)
        finally:
            proc.terminate()
            _, err = await proc.communicate()
            await server.close()
        ended = sum(s.turns_ended for s in upstream.sessions)
        return document, err.decode(), ended

    document, log, ended = asyncio.run(scenario())
    assert ended == 1, log  # the relay heard a whole turn: the silence is the upstream's
    assert document.get("turns_total") == 1, document
    turns = document["turns"]
    assert isinstance(turns, list) and len(turns) == 1, document
    assert turns[0]["outcome"] == "reply_timeout", turns
    lines = [line for line in log.splitlines() if re.search(r"\bturn=1\b.*\boutcome=", line)]
    assert len(lines) == 1, log  # one line per turn ...
    line = lines[0]
    assert "WARNING" in line and "outcome=reply_timeout" in line, line
    # ... of key=value pairs, no Python reprs
    assert "{" not in line and "'" not in line, line
    assert re.search(r"\btrigger=vad\b", line) and re.search(r"\bspeech_end_ms=\d", line), line
    # each state change is one key=value line too
    states = re.findall(r"\bstate=(\w+) previous=(\w+)", log)
    assert ("listening", "idle") in states and ("thinking", "listening") in states, log
    assert ("idle", "thinking") in states, log
