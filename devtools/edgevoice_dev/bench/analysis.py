"""Turning timestamp logs into latencies. Pure: lists of times in, numbers out.

Every time here is ``time.monotonic()`` seconds, taken in whichever process saw the
event (one clock for the whole machine). Frames are matched by position: the k-th
uplink frame of a turn on the device is the k-th frame the upstream received in
that turn (TCP on loopback loses nothing, and the relay only conceals frames that
never arrived); the j-th 20 ms frame an upstream handed over is the j-th downlink
frame of that response.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: samples of one 20 ms frame at the upstream's output rate (24 kHz)
REPLY_FRAME_SAMPLES = 480
REPLY_RATE_HZ = 24_000


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between closest ranks; NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Spread:
    """Distribution of a latency, in milliseconds."""

    n: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Spread:
        ms = [1000.0 * s for s in seconds]
        return cls(len(ms), percentile(ms, 50), percentile(ms, 90), percentile(ms, 99),
                   max(ms) if ms else math.nan)

    def as_dict(self) -> dict[str, Any]:
        def r(x: float) -> float | None:
            return None if math.isnan(x) else round(x, 2)
        return {"n": self.n, "p50_ms": r(self.p50_ms), "p90_ms": r(self.p90_ms),
                "p99_ms": r(self.p99_ms), "max_ms": r(self.max_ms)}


def paired_delays(sent: Sequence[Sequence[float]],
                  arrived: Sequence[Sequence[float]]) -> tuple[list[float], int]:
    """Arrival minus send time of frame k of group i, for every pair; and how many
    frames had no partner (lists of unequal length)."""
    delays: list[float] = []
    unmatched = 0
    for a, b in zip(sent, arrived, strict=False):
        n = min(len(a), len(b))
        unmatched += abs(len(a) - len(b))
        delays.extend(b[k] - a[k] for k in range(n))
    for rest in (sent[len(arrived):], arrived[len(sent):]):
        unmatched += sum(len(group) for group in rest)
    return delays, unmatched


def downlink_delays(emitted: Sequence[Sequence[float]],
                    pushes: Sequence[Sequence[tuple[float, int]]],
                    output_rate_hz: int, limit_s: float = 1.0) -> tuple[list[float], int]:
    """For every reply frame j an upstream handed over at ``emitted[r][j]``: how long
    until the first sample of that frame was in the device's playback buffer.

    ``pushes[r]`` lists (time, samples at ``output_rate_hz``) of each push into the
    buffer during response r. A resampler may hold audio back (soxr releases it in
    bursts), so a frame is in the buffer once the pushed total passes its start.
    Frames never pushed (the reply was interrupted) are counted, not timed, and so
    is a frame "found" more than ``limit_s`` later: that push was other audio (an
    earcon) after the reply had stopped.
    """
    ratio = output_rate_hz / REPLY_RATE_HZ
    delays: list[float] = []
    missing = 0
    for frames, response in zip(emitted, pushes, strict=False):
        totals: list[int] = []
        running = 0
        for _, samples in response:
            running += samples
            totals.append(running)
        for j, at in enumerate(frames):
            first_sample = j * REPLY_FRAME_SAMPLES * ratio
            i = bisect.bisect_right(totals, first_sample)
            if i >= len(totals) or response[i][0] - at > limit_s:
                missing += 1
            else:
                delays.append(response[i][0] - at)
    return delays, missing


def first_at_or_after(times: Sequence[float], t: float) -> float | None:
    i = bisect.bisect_left(times, t)
    return times[i] if i < len(times) else None


def silence_delays(interrupts: Sequence[float], pulls: Sequence[tuple[float, int]],
                   limit_s: float = 1.0) -> tuple[list[float], int]:
    """For each interrupt: how long until the sink first pulled a block with no
    audio in it; and how many interrupts saw no silent block within ``limit_s``."""
    silent = [t for t, real in pulls if real == 0]
    delays: list[float] = []
    missed = 0
    for t in interrupts:
        at = first_at_or_after(silent, t)
        if at is None or at - t > limit_s:
            missed += 1
        else:
            delays.append(at - t)
    return delays, missed


def following_delays(starts: Sequence[float], ends: Sequence[float],
                     limit_s: float = 1.0) -> tuple[list[float], int]:
    """For each start: time to the first end at or after it (within ``limit_s``)."""
    ordered = sorted(ends)
    delays: list[float] = []
    missed = 0
    for t in starts:
        at = first_at_or_after(ordered, t)
        if at is None or at - t > limit_s:
            missed += 1
        else:
            delays.append(at - t)
    return delays, missed
