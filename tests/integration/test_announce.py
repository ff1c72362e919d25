"""Announcements and conversation starts through the relay's admin endpoint.

A real relay (echo upstream) and a real device daemon on 127.0.0.1; the admin
endpoint speaks HTTP; the text is spoken by flite (a Debian package the tests
already need).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from edgevoice_dev.testing.harness import run, running_relay

from edgevoice.audio.wavio import WavSink, WavSource
from edgevoice.config.model import DeviceConfig
from edgevoice.device.daemon import DeviceDaemon
from edgevoice.device.observer import DeviceObserver
from edgevoice.device.records import TurnTimeline
from edgevoice.health.relay import RelayAdminSettings, relay_admin_api
from edgevoice.relay.announce import Announcer, AnnounceSettings, announce_routes
from edgevoice.relay.health_source import RelayHealth

pytestmark = pytest.mark.skipif(shutil.which("flite") is None, reason="needs flite")

ADMIN_TOKEN = "admin-secret-token"


class Seen(DeviceObserver):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.responses: list[float] = []
        self.turns: list[tuple[str, float]] = []
        self.begun: list[str] = []

    def response_started(self, at: float) -> None:
        self.responses.append(self.loop.time())

    def turn_closed(self, turn: TurnTimeline) -> None:
        self.turns.append((turn.outcome, self.loop.time()))

    def turn_begun(self, turn_id: int, trigger: str, at: float) -> None:
        self.begun.append(trigger)


async def http(port: int, method: str, path: str, body: Any = None,
               token: str | None = ADMIN_TOKEN) -> tuple[int, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = json.dumps(body).encode() if body is not None else b""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json"
                 f"\r\nContent-Length: {len(raw)}\r\n\r\n".encode() + raw)
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, payload = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload) if payload else None


def test_an_announcement_waits_behind_a_reply_and_a_converse_opens_a_turn(
        tmp_path: Path) -> None:
    from edgevoice.demo import bundled_speech

    async def scenario() -> dict[str, Any]:
        seen = Seen(asyncio.get_running_loop())
        async with running_relay(tmp_path) as server:
            token = server.tokens.add("kitchen")
            announcer = Announcer(AnnounceSettings(), lambda d: server.sessions.get(d))
            admin = relay_admin_api(RelayHealth(server, announcer=announcer),
                                    RelayAdminSettings(port=0), ADMIN_TOKEN,
                                    extra_routes=announce_routes(announcer))
            await admin.start()
            base = DeviceConfig()
            config = replace(base, device_id="kitchen",
                             relay=replace(base.relay, url=f"ws://127.0.0.1:{server.port}/"))
            daemon = DeviceDaemon(config, token, WavSource(bundled_speech(), realtime=True),
                                  WavSink(tmp_path / "out.wav", realtime=True),
                                  capture_after_link=True, observers=[seen])
            task = asyncio.create_task(daemon.run())
            out: dict[str, Any] = {}
            try:
                for _ in range(400):  # until the device's reply is owed or under way
                    session = server.sessions.get("kitchen")
                    if session is not None and session.replying:
                        break
                    await asyncio.sleep(0.05)
                out["unauthenticated"] = (await http(
                    admin.port, "POST", "/announce",
                    {"device": "kitchen", "text": "hello"}, token=None))[0]
                out["announce"] = await http(admin.port, "POST", "/announce",
                                             {"device": "kitchen",
                                              "text": "The laundry is done."})
                out["busy_when_queued"] = server.sessions["kitchen"].busy
                out["devices_while_queued"] = (await http(admin.port, "GET", "/devices"))[1]
                out["unknown"] = (await http(admin.port, "POST", "/announce",
                                             {"device": "garage", "text": "hi"}))[0]
                for _ in range(400):
                    if announcer.queues["kitchen"].played == 1 and len(seen.responses) >= 2:
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(1.0)
                out["devices_after"] = (await http(admin.port, "GET", "/devices"))[1]
                out["converse"] = await http(admin.port, "POST", "/converse",
                                             {"device": "kitchen"})
                for _ in range(200):
                    if "relay" in seen.begun:
                        break
                    await asyncio.sleep(0.05)
            finally:
                daemon.stop()
                await task
                await announcer.close()
                await admin.stop()
        out["seen"] = seen
        return out

    out = run(scenario(), timeout=90)
    seen: Seen = out["seen"]
    assert out["unauthenticated"] == 401
    assert out["announce"] == (202, {"queued": True, "position": 0})
    assert out["unknown"] == 404
    # queued while the reply was owed or playing, and shown in /devices meanwhile
    assert out["busy_when_queued"]
    kitchen = next(d for d in out["devices_while_queued"] if d["device_id"] == "kitchen")
    assert kitchen["announcements"]["queued"] == ["text: The laundry is done."]
    # the reply was not cut: its turn completed, and the announcement began after it
    outcome, reply_done_at = seen.turns[0]
    assert outcome == "completed"
    assert len(seen.responses) >= 2 and seen.responses[1] > reply_done_at
    after = next(d for d in out["devices_after"] if d["device_id"] == "kitchen")
    assert after["announcements"]["played"] == 1 and after["announcements"]["queued"] == []
    assert out["converse"][0] == 202
    assert "relay" in seen.begun  # a turn opened without the wake word
