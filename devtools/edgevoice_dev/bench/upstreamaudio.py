"""Row 17: how much audio the Nova upstream sends for the user's speech (cost).

Nova Sonic bills input audio by its length, so the figure that matters is the
audio sent upstream per second of the user's speech. A scripted five-turn
conversation runs through the real ``NovaUpstream`` and the real AWS SDK against
the fake Bedrock, which here behaves like Nova 2 for turn-taking: it answers only
after 1.75 s of silence (MEDIUM endpointing) with a 2 s spoken reply, streamed at
real time. Each turn is what a device sends: about 2 s of speech, then its 0.3 s
hangover of near-silence, then the end of the turn; then a pause until the next
turn (the whole day lasts about two minutes).

The same day runs twice: with the shipped settings (streams close 10 s after a
reply and reopen, with history, on the next turn) and with streams kept open all
day, so the reply latency of the follow-up turns can be compared: closing must
not make them slower.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

from edgevoice.nova.settings import NovaSettings
from edgevoice.nova.upstream import NovaUpstream
from edgevoice.tools.registry import ToolRegistry
from edgevoice.upstream.base import AudioOutput, DeviceContext, ResponseEnded
from edgevoice_dev.bench.plan import Workspace
from edgevoice_dev.bench.results import INFO, Line, RowResult, verdict
from edgevoice_dev.testing.fake_bedrock import FakeBedrock, Reply, Script, StreamPlan

TARGET_RATIO = 2.5
FRAME_S = 0.02
SPEECH_S = 1.9
HANGOVER_S = 0.3
#: Nova 2 answers after this much silence (MEDIUM endpointing).
NOVA_PAUSE_S = 1.75
REPLY_CHUNKS = 20  # 100 ms each: a 2 s reply


@dataclass
class Day:
    """One scripted conversation's numbers."""

    speech_s: float
    upstream_s: float
    received_s: float
    latencies_s: list[float]
    streams: int
    wall_s: float


def _frame(level: int) -> bytes:
    return level.to_bytes(2, "little", signed=True) * 320


async def _day(settings: NovaSettings, turns: int, cycle_s: float) -> Day:
    plan = StreamPlan(
        default_reply=Reply(audio_chunks=REPLY_CHUNKS, chunk_interval_s=0.1),
        end_of_speech_frames=round(NOVA_PAUSE_S / FRAME_S),
    )
    with FakeBedrock(script=Script(plan)) as fake:
        saved = {key: os.environ.get(key) for key in fake.env}
        os.environ.update(fake.env)
        try:
            return await _converse(fake, settings, turns, cycle_s)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


async def _converse(fake: FakeBedrock, settings: NovaSettings, turns: int,
                    cycle_s: float) -> Day:
    upstream = NovaUpstream(settings, ToolRegistry())
    session = await upstream.open_session(DeviceContext("bench", "bench"))
    first_audio: list[float] = []
    ended = asyncio.Event()

    async def read() -> None:
        async for event in session.events():
            if isinstance(event, AudioOutput) and len(first_audio) < len(turn_ends):
                first_audio.append(time.monotonic())
            elif isinstance(event, ResponseEnded):
                ended.set()

    turn_ends: list[float] = []
    reader = asyncio.create_task(read())
    started = time.monotonic()
    speech_frames = 0
    try:
        for turn in range(turns):
            turn_start = started + turn * cycle_s
            await asyncio.sleep(max(0.0, turn_start - time.monotonic()))
            ended.clear()
            await session.start_turn()
            for i in range(round(SPEECH_S / FRAME_S)):
                await session.send_audio(_frame(3000 + (i % 7) * 100))
                speech_frames += 1
                await asyncio.sleep(FRAME_S)
            for _ in range(round(HANGOVER_S / FRAME_S)):
                await session.send_audio(_frame(60))  # the device's hangover: near silence
                await asyncio.sleep(FRAME_S)
            await session.end_turn()
            turn_ends.append(time.monotonic())
            await asyncio.wait_for(ended.wait(), 30)
        await asyncio.sleep(2.0)
        stats = session.stats
        upstream_s = stats.upstream_audio_s
        streams = stats.streams_opened
    finally:
        await session.close()
        await upstream.aclose()
        reader.cancel()
    latencies = [audio - end for audio, end in zip(first_audio, turn_ends, strict=False)]
    received = sum(len(s.audio()) for s in fake.received) / 32_000
    return Day(speech_frames * FRAME_S, upstream_s, received, latencies, streams,
               time.monotonic() - started)


def _shape(mode: str) -> tuple[int, float]:
    """Turns and seconds per turn: the full day is five turns in about two minutes."""
    return {"full": (5, 24.0), "quick": (5, 10.0)}.get(mode, (2, 8.0))


async def run_row(ws: Workspace) -> RowResult:
    started = time.monotonic()
    row = RowResult(17, "Upstream audio / user speech (Nova, scripted conversation)")
    turns, cycle_s = _shape(ws.plan.mode)
    shipped = NovaSettings(endpointing_sensitivity="MEDIUM", system_prompt="Bench.")
    day = await _day(shipped, turns, cycle_s)
    kept_open = await _day(replace(shipped, idle_close_s=3600.0), turns, cycle_s)
    ratio = day.upstream_s / day.speech_s
    follow = day.latencies_s[1:] or day.latencies_s
    follow_open = kept_open.latencies_s[1:] or kept_open.latencies_s
    mean = statistics.fmean(follow) * 1000
    mean_open = statistics.fmean(follow_open) * 1000
    row.lines = [
        Line(f"upstream audio / user speech ({turns} turns, {day.wall_s:.0f} s)",
             f"{ratio:.2f}x ({day.upstream_s:.1f} s for {day.speech_s:.1f} s)",
             "19.8x before (silence fed while open)", f"<= {TARGET_RATIO}x",
             verdict(ratio <= TARGET_RATIO)),
        Line("follow-up reply latency, streams closed between turns",
             f"{mean:.0f} ms", f"{mean_open:.0f} ms kept open", "not slower than kept open",
             verdict(mean <= mean_open * 1.2 + 50)),
        Line("streams opened", str(day.streams), f"{kept_open.streams} kept open", "", INFO),
    ]
    data: dict[str, Any] = {
        "turns": turns, "cycle_s": cycle_s, "speech_s": round(day.speech_s, 2),
        "upstream_s": round(day.upstream_s, 2), "received_by_fake_s": round(day.received_s, 2),
        "ratio": round(ratio, 3), "latencies_ms": [round(x * 1000) for x in day.latencies_s],
        "kept_open_latencies_ms": [round(x * 1000) for x in kept_open.latencies_s],
        "kept_open_ratio": round(kept_open.upstream_s / kept_open.speech_s, 3),
        "streams": day.streams,
    }
    row.data = data
    row.notes = [
        "The fake answers like Nova 2 (after 1.75 s of silence, a 2 s reply at real time); "
        "the figure counts every 20 ms frame sent upstream (speech, hangover, replayed "
        "and silence) and agrees with what the fake received "
        f"({day.received_s:.1f} s).",
    ]
    row.seconds = time.monotonic() - started
    return row
