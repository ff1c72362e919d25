"""Session resume between a real DeviceLink and a real relay, through a fault proxy."""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

from edgevoice_dev.testing.harness import run, running_relay
from edgevoice_dev.testing.netfault import FaultProxy
from reliability_support import LinkEvents, scaled, wait_until

from edgevoice.audio.opus import OpusEncoder
from edgevoice.backoff import BackoffSettings
from edgevoice.config.relay import RelayConfig
from edgevoice.device.link import DeviceLink, RelaySettings, ResumeSettings
from edgevoice.protocol.messages import AudioFlags, ResponseEnd, TurnEnd, TurnStart
from edgevoice.relay.app import build_server
from edgevoice.relay.server import RelayServer

FAST_BACKOFF = BackoffSettings(initial_ms=100, max_ms=400, min_ms=20)


def opus_frames(n: int) -> list[bytes]:
    """``n`` valid 20 ms Opus packets of a tone."""
    encoder = OpusEncoder()
    packets = []
    for k in range(n):
        pcm = struct.pack("<320h", *(int(8000 * math.sin(2 * math.pi * 220 * (k * 320 + i)
                                                          / 16000)) for i in range(320)))
        packets.append(encoder.encode(pcm))
    return packets


def link_settings(url: str, open_timeout_ms: int = 10_000, **resume: int) -> RelaySettings:
    return RelaySettings(url=url, backoff=FAST_BACKOFF, resume=ResumeSettings(**resume),
                         open_timeout_ms=open_timeout_ms)


@contextlib.asynccontextmanager
async def linked(tmp_path: Path, settings_for: dict[str, int] | None = None,
                 **limits: int) -> AsyncIterator[tuple[RelayServer, FaultProxy, DeviceLink,
                                                      LinkEvents]]:
    async with running_relay(tmp_path, **limits) as relay:
        token = relay.tokens.add("d1")
        async with FaultProxy("127.0.0.1", relay.port) as proxy:
            events = LinkEvents()
            link = DeviceLink(link_settings(proxy.url, **(settings_for or {})), "d1", token,
                              events)
            task = asyncio.create_task(link.run())
            try:
                await events.wait_for(lambda: "up" in events.kinds())
                yield relay, proxy, link, events
            finally:
                await link.stop()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def send_turn(link: DeviceLink, turn_id: int, packets: list[bytes],
                    during: int | None = None, outage: FaultProxy | None = None,
                    outage_s: float = 2.0, stall_s: float = 0.0) -> asyncio.Task[None] | None:
    """A turn at real time; with ``during``, an outage starts after that many frames."""
    link.send(TurnStart(turn_id))
    cut: asyncio.Task[None] | None = None
    for k, packet in enumerate(packets):
        if k == during and outage is not None:
            cut = asyncio.create_task(outage.outage(outage_s, stall_s=stall_s))
        assert link.send_audio(packet, k * 20, AudioFlags.START if k == 0 else AudioFlags.NONE)
        await asyncio.sleep(0.02)
    link.send(TurnEnd(turn_id))
    return cut


def test_uplink_sent_across_an_outage_arrives_whole_and_in_order(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with linked(tmp_path) as (relay, proxy, link, events):
            packets = opus_frames(100)
            cut = await send_turn(link, 1, packets, during=40, outage=proxy, stall_s=0.3)
            assert cut is not None
            await cut
            await events.wait_for(lambda: len(events.ups()) == 2, within_s=10)
            assert events.kinds()[:2] == ["up", "suspended"] and "down" not in events.kinds()
            assert events.ups()[1].resume.resumed
            session = relay.sessions["d1"]
            await wait_until(lambda: session.conn is not None
                             and session.conn.last_received_seq == 99)
            assert relay.counters.frames_in == 100
            assert relay.counters.frames_concealed == 0
            assert session.conn is not None and session.conn.missing == 0
            assert link.stats.resumes == 1 and link.stats.dropped_session_lost == 0
            assert link.stats.frames_queued_suspended > 0
            assert link.stats.frames_replayed >= 5  # sent into the stall, lost with the cut
            # the echo answers with the whole utterance, and it arrives complete
            await events.wait_for(lambda: any(isinstance(m, ResponseEnd)
                                              for m in events.messages), within_s=10)
            seqs = [a.frame.seq for a in events.audio]
            assert seqs == list(range(len(seqs))) and len(seqs) >= 99
            assert relay.counters.sessions_total == 1 and relay.counters.sessions_resumed == 1
    run(scenario(), timeout=scaled(40))


def test_reply_cut_mid_stream_resumes_where_it_stopped(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with linked(tmp_path) as (relay, proxy, link, events):
            await send_turn(link, 1, opus_frames(150))  # a 3 s reply, paced at real time
            await events.wait_for(lambda: len(events.audio) >= 50, within_s=10)
            await proxy.outage(2.0, stall_s=0.5)  # ~25 frames die with the connection
            await events.wait_for(lambda: any(isinstance(m, ResponseEnd)
                                              for m in events.messages), within_s=15)
            seqs = [a.frame.seq for a in events.audio]
            assert seqs == list(range(len(seqs)))  # nothing missing, nothing twice
            assert all(a.missing == 0 for a in events.audio)
            assert len(seqs) == relay.counters.frames_out
            assert events.ups()[-1].resume.resumed
            replayed = [a for a in events.audio if a.frame.flags & AudioFlags.REPLAY]
            assert relay.counters.frames_replayed == len(replayed) >= 10
    run(scenario(), timeout=scaled(40))


def test_a_restarted_relay_refuses_the_resume_and_a_new_session_starts(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as first:
            token = first.tokens.add("d1")
            port = first.port
            async with FaultProxy("127.0.0.1", port) as proxy:
                events = LinkEvents()
                link = DeviceLink(link_settings(proxy.url), "d1", token, events)
                task = asyncio.create_task(link.run())
                await events.wait_for(lambda: "up" in events.kinds())
                link.send(TurnStart(1))
                await wait_until(lambda: first.sessions["d1"].turn_id == 1)
                proxy.refuse(True)
                proxy.cut()
                await first.close()  # the relay dies with its sessions
                await events.wait_for(lambda: "suspended" in events.kinds())
                for k, packet in enumerate(opus_frames(10)):
                    assert link.send_audio(packet, k * 20)  # queued for the resume
                config = RelayConfig()
                config = replace(config, listen=replace(config.listen, host="127.0.0.1",
                                                        port=port),
                                 auth=replace(config.auth,
                                              tokens_file=str(tmp_path / "tokens.json")))
                second = build_server(config)
                await second.start()
                proxy.refuse(False)
                try:
                    await events.wait_for(lambda: len(events.ups()) == 2, within_s=10)
                    kinds = events.kinds()
                    assert kinds.index("suspended") < kinds.index("down") < len(kinds) - 1
                    assert not events.ups()[1].resume.resumed
                    assert link.stats.resumes_refused == 1
                    assert link.stats.dropped_session_lost == 10
                    assert second.counters.frames_in == 0  # nothing of the old session leaked
                finally:
                    await link.stop()
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    await second.close()
    run(scenario(), timeout=scaled(40))


def test_a_window_that_runs_out_during_a_connection_attempt_is_counted(
        tmp_path: Path) -> None:
    """The window can close while the device waits between attempts or while an attempt
    hangs (a path that swallows packets): both lose the session the same way, and both
    count as a window run out."""
    async def scenario() -> None:
        async with linked(tmp_path, {"window_ms": 1000, "open_timeout_ms": 1500},
                          resume_window_ms=1000) as (relay, proxy, link, events):
            link.send(TurnStart(1))
            await wait_until(lambda: "d1" in relay.sessions
                             and relay.sessions["d1"].turn_id == 1)
            proxy.hold(True)  # new connections hang: the next attempt outlives the window
            proxy.cut()
            await asyncio.sleep(2.0)
            proxy.hold(False)
            await events.wait_for(lambda: len(events.ups()) == 2, within_s=scaled(10))
            assert "down" in events.kinds()
            assert not events.ups()[1].resume.resumed
            assert link.stats.resumes_expired == 1
    run(scenario(), timeout=scaled(30))


def test_past_the_window_the_session_is_lost_cleanly(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with linked(tmp_path, {"window_ms": 1000}, resume_window_ms=1000) as (
                relay, proxy, link, events):
            link.send(TurnStart(1))
            await wait_until(lambda: "d1" in relay.sessions
                             and relay.sessions["d1"].turn_id == 1)
            await proxy.outage(2.5)
            await events.wait_for(lambda: len(events.ups()) == 2, within_s=10)
            kinds = events.kinds()
            assert kinds[1] == "suspended" and "down" in kinds
            assert not events.ups()[1].resume.resumed
            assert link.stats.resumes_expired == 1
            assert relay.counters.sessions_expired == 1
            assert relay.counters.sessions_total == 2 and not relay.held
            assert link.stats.dropped_session_lost == 0  # nothing was queued to lose
    run(scenario(), timeout=scaled(30))


def test_relay_going_away_ends_the_session_without_a_resume(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as relay:
            token = relay.tokens.add("d1")
            events = LinkEvents()
            link = DeviceLink(link_settings(f"ws://127.0.0.1:{relay.port}/"), "d1", token,
                              events)
            task = asyncio.create_task(link.run())
            await events.wait_for(lambda: "up" in events.kinds())
        # relay closed with 1001: the device does not try to resume
        await events.wait_for(lambda: len(events.kinds()) >= 2)
        assert events.kinds()[1] == "down"
        first_down = next(str(d) for k, d in events.events if k == "down")
        assert "1001" in first_down, first_down
        assert link.session_id is None
        await link.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    run(scenario(), timeout=scaled(20))


def test_a_resume_takes_over_a_connection_the_relay_still_thinks_alive(
        tmp_path: Path) -> None:
    """A dead route: the device notices (short keepalive), the relay does not."""
    async def scenario() -> None:
        async with running_relay(tmp_path) as relay:
            token = relay.tokens.add("d1")
            async with FaultProxy("127.0.0.1", relay.port) as proxy:
                events = LinkEvents()
                settings = replace(link_settings(proxy.url), ping_interval_ms=300,
                                   ping_timeout_ms=300)
                link = DeviceLink(settings, "d1", token, events)
                task = asyncio.create_task(link.run())
                try:
                    await events.wait_for(lambda: "up" in events.kinds())
                    link.send(TurnStart(1))
                    for k, packet in enumerate(opus_frames(60)):
                        if k == 20:
                            proxy.hold(True)
                        link.send_audio(packet, k * 20)
                        await asyncio.sleep(0.02)
                    link.send(TurnEnd(1))
                    await events.wait_for(lambda: "suspended" in events.kinds(), within_s=5)
                    assert "d1" in relay.sessions  # the relay has not noticed
                    proxy.hold(False)
                    await events.wait_for(lambda: len(events.ups()) == 2, within_s=10)
                    assert events.ups()[1].resume.resumed
                    session = relay.sessions["d1"]
                    await wait_until(lambda: session.conn is not None
                                     and session.conn.last_received_seq == 59)
                    assert relay.counters.frames_in == 60
                    assert relay.counters.sessions_total == 1
                    await events.wait_for(lambda: any(isinstance(m, ResponseEnd)
                                                      for m in events.messages), within_s=10)
                finally:
                    await link.stop()
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
    run(scenario(), timeout=scaled(40))
