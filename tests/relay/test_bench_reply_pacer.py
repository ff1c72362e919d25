"""The bench upstream's reply pacer (devtools bench/upstreams.py): one timer hands every
session's reply frames to the relay at real time, each frame once, in order."""

from __future__ import annotations

import asyncio
import time

from edgevoice_dev.bench.upstreams import FRAME_S, ReplyPacer, ReplyUpstream
from edgevoice_dev.testing.harness import run
from edgevoice_dev.testing.timeouts import scaled

from edgevoice.upstream.base import AudioOutput, DeviceContext, ResponseEnded, ResponseStarted


def test_replies_stream_at_real_time_on_one_timer_and_a_cancelled_one_stops() -> None:
    async def scenario() -> None:
        upstream = ReplyUpstream(b"", reply_ms=200)  # 10 frames
        a = await upstream.open_session(DeviceContext("a", "s-a"))
        b = await upstream.open_session(DeviceContext("b", "s-b"))
        assert upstream.pacer is a._pacer is b._pacer
        started = time.monotonic()
        await a.end_turn()
        await b.end_turn()
        await asyncio.sleep(0.05)
        await b.interrupt()  # cancels b's reply part-way
        events = []
        async for event in a.events():
            events.append(event)
            if isinstance(event, ResponseEnded):
                break
        took = time.monotonic() - started
        assert isinstance(events[0], ResponseStarted)
        assert [type(e) for e in events[1:-1]] == [AudioOutput] * 10
        assert took >= 9 * FRAME_S, "the reply went faster than real time"
        times = a.log.responses[0]
        assert len(times) == 10 and times == sorted(times)
        assert all(t - started >= k * FRAME_S - 0.001 for k, t in enumerate(times))
        b_frames = len(b.log.responses[0])
        assert 1 <= b_frames < 10
        await asyncio.sleep(0.1)
        assert len(b.log.responses[0]) == b_frames  # nothing after the interrupt
        await a.close()
        await b.close()
    run(scenario(), timeout=scaled(10))


def test_a_late_timer_catches_up_frame_by_frame() -> None:
    async def scenario() -> None:
        pacer = ReplyPacer(period_s=0.05)  # coarser than a frame: frames catch up
        upstream = ReplyUpstream(b"", reply_ms=200)
        session = await upstream.open_session(DeviceContext("a", "s-a"))
        session._pacer = pacer
        session.log.responses.append([])
        await asyncio.wait_for(session._stream(10), scaled(5))
        assert len(session.log.responses[0]) == 10
    run(scenario(), timeout=scaled(10))


def test_many_streams_each_get_every_frame_once_and_a_restart_replaces_only_its_own(
        ) -> None:
    async def scenario() -> None:
        upstream = ReplyUpstream(b"", reply_ms=100)  # 5 frames
        sessions = [await upstream.open_session(DeviceContext(f"d{i}", f"s{i}"))
                    for i in range(20)]
        for i, session in enumerate(sessions):
            await session.end_turn()
            if i % 5 == 0:
                await asyncio.sleep(0.003)  # spread their phases
        await sessions[0].end_turn()  # a new turn at once: the first reply is cut
        for session in sessions:
            async for event in session.events():
                if isinstance(event, ResponseEnded):
                    break
        for i, session in enumerate(sessions):
            counts = [len(times) for times in session.log.responses]
            if i == 0:  # the cut reply, then a whole one
                assert len(counts) == 2 and counts[0] < 5 and counts[1] == 5, counts
            else:
                assert counts == [5], counts
        await asyncio.sleep(0.05)
        assert not upstream.pacer._streams and upstream.pacer._handle is None
        for session in sessions:
            await session.close()
    run(scenario(), timeout=scaled(10))
