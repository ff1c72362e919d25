"""Row 3: added latency per hop, one device on loopback, relay and device in their
own processes.

The device is the real daemon with timestamps taken around it
(:mod:`edgevoice_dev.bench.device_runner`); the relay is the real relay with a
recording upstream (:mod:`edgevoice_dev.bench.upstreams`) that answers each turn with
a reply streamed at real time. Both stamp with ``time.monotonic``, one clock for
every process on the machine, so per-frame delays are differences of timestamps:

* uplink: a 20 ms microphone frame entering the daemon's send path (before Opus
  encoding; for live frames that is the moment the capture delivered it) -> its
  PCM handed to the upstream (after the relay's Opus decoding);
* downlink: the upstream handing over a 20 ms reply frame -> the first sample of
  that frame in the device's playback buffer (after the relay's Opus encoding and
  pacing, the device's decoding straight to 48 kHz).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from edgevoice_dev.bench.analysis import Spread, downlink_delays, paired_delays
from edgevoice_dev.bench.fixtures import build_speech
from edgevoice_dev.bench.plan import OUTPUT_RATE_HZ, Workspace
from edgevoice_dev.bench.proc import Child, python_module
from edgevoice_dev.bench.results import Line, RowResult, fmt_ms, verdict

logger = logging.getLogger(__name__)

DEVICE = "bench-latency"
TARGET_P99_MS = 5.0
#: end of speech -> first reply sample, beyond the hangover (issue 15)
TARGET_ANSWER_MS = 60.0
HANGOVER_MS = 600
PREFILL_MS = 60


async def _run(ws: Workspace, seconds: float) -> tuple[dict[str, Any], dict[str, Any]]:
    fixture = build_speech(ws.root / "speech", seconds)
    relay_record = ws.root / "latency-relay.json"
    device_record = ws.root / "latency-device.json"
    relay = await ws.relay("latency-relay", "reply", "--record", str(relay_record))
    device: Child | None = None
    try:
        port = int(relay.events[0]["port"])
        config = ws.device_config(DEVICE, f"ws://127.0.0.1:{port}/", "unused", "unused",
                                  log_level="warning")
        device = await ws.spawn("latency-device", python_module(
            "edgevoice_dev.bench.device_runner", "--config", str(config),
            "--source", f"wav:{fixture.path}", "--output-rate", str(OUTPUT_RATE_HZ),
            "--record", str(device_record)))
        linked = await device.event("link_up", 30)
        # the source started just before the link came up; give the last reply time
        await asyncio.sleep(max(0.0, linked["t"] + fixture.duration_s + 1.0 - time.monotonic()))
        await device.stop()
        await relay.stop()
    finally:
        if device is not None:
            await device.stop()
        await relay.stop()
    sessions = json.loads(relay_record.read_text()).get(DEVICE, [])
    if not sessions:
        raise RuntimeError("the device never opened a session with the relay")
    return sessions[0], json.loads(device_record.read_text())


def reply_after_hangover(uplink: list[list[float]],
                         pulls: list[list[float]] | list[tuple[float, int]]) -> list[float]:
    """Per turn: last uplink frame -> first pulled block holding reply audio (seconds)."""
    out = []
    reply_pulls = [float(t) for t, n in pulls if n > 0]
    for frames in uplink:
        if not frames:
            continue
        end = frames[-1]
        first = next((t for t in reply_pulls if t > end), None)
        if first is not None and first - end < 5.0:
            out.append(first - end)
    return out


async def run_row(ws: Workspace) -> RowResult:
    started = time.monotonic()
    row = RowResult(3, "Added latency per hop (loopback, one device)")
    relay_log, device_log = await _run(ws, ws.plan.latency_speech_s)
    up_all, up_unmatched = paired_delays(device_log["uplink"], relay_log["turns"])
    live_sent = [[t for t, pre in zip(ts, flags, strict=True) if not pre]
                 for ts, flags in zip(device_log["uplink"], device_log["preroll"], strict=True)]
    live_arrived = [[t for t, pre in zip(arrived, flags, strict=False) if not pre]
                    for arrived, flags in zip(relay_log["turns"], device_log["preroll"],
                                              strict=False)]
    up_live, _ = paired_delays(live_sent, live_arrived)
    down, down_missing = downlink_delays(relay_log["responses"], device_log["pushes"],
                                         device_log["output_rate_hz"] or OUTPUT_RATE_HZ)
    up, up_every, dn = Spread.of(up_live), Spread.of(up_all), Spread.of(down)
    row.lines.append(Line("uplink: mic frame -> upstream, p50 / p99",
                          f"{fmt_ms(up.p50_ms)} / {fmt_ms(up.p99_ms)}", f"{up.n} live frames",
                          f"p99 <= {TARGET_P99_MS:g} ms", verdict(up.p99_ms <= TARGET_P99_MS)))
    row.lines.append(Line("  incl. pre-roll bursts, p50 / p99",
                          f"{fmt_ms(up_every.p50_ms)} / {fmt_ms(up_every.p99_ms)}",
                          f"{up_every.n} frames", "", "-"))
    row.lines.append(Line("downlink: upstream -> playback buffer, p50 / p99",
                          f"{fmt_ms(dn.p50_ms)} / {fmt_ms(dn.p99_ms)}", f"{dn.n} frames",
                          f"p99 <= {TARGET_P99_MS:g} ms", verdict(dn.p99_ms <= TARGET_P99_MS)))
    row.data = {"uplink_live": up.as_dict(), "uplink_all": up_every.as_dict(),
                "downlink": dn.as_dict(), "uplink_unmatched_frames": up_unmatched,
                "downlink_frames_never_played": down_missing,
                "turns": len(device_log["uplink"]), "responses": len(relay_log["responses"]),
                "output_rate_hz": device_log["output_rate_hz"],
                "speech_s": ws.plan.latency_speech_s}
    row.notes.append(
        "Relay and device in separate processes on one machine, timestamps from "
        "CLOCK_MONOTONIC (shared by all processes). Uplink: frame enters the daemon's send "
        "path -> PCM handed to the upstream (Opus encode, WebSocket, relay, Opus decode). "
        "Downlink: upstream hands over a 20 ms frame -> its first sample is in the playback "
        "buffer (relay encode and pacing, WebSocket, device decode: libopus decodes "
        f"straight to the sink's {OUTPUT_RATE_HZ // 1000} kHz, no resampler).")
    row.notes.append(
        "Pre-roll: when speech is confirmed the daemon releases the 400 ms it kept in one "
        "burst; those frames queue behind each other, so they are reported apart.")
    answer = Spread.of(reply_after_hangover(device_log["uplink"], device_log["pulls"]))
    row.lines.append(Line("end of speech -> first reply sample, beyond the hangover, "
                          "p50 / p99", f"{fmt_ms(answer.p50_ms)} / {fmt_ms(answer.p99_ms)}",
                          f"{answer.n} turns, hangover {HANGOVER_MS} ms",
                          f"p50 <= {TARGET_ANSWER_MS:g} ms",
                          verdict(answer.p50_ms <= TARGET_ANSWER_MS)))
    row.data["answer_after_hangover"] = answer.as_dict()
    playback = device_log.get("playback") or {}
    rate = device_log["output_rate_hz"] or OUTPUT_RATE_HZ
    if playback:
        row.lines.append(Line(
            "  reply underruns (same run) / prefill at the end",
            f"{playback.get('underruns', 0)} / "
            f"{1000 * playback.get('prefill_samples', 0) / rate:.0f} ms",
            f"{playback.get('responses_started', 0)} replies played, prefill "
            f"{PREFILL_MS} ms at most", "0 underruns", verdict(playback.get("underruns", 0) == 0)))
        row.data["playback"] = playback
    row.notes.append(
        "End of speech -> first reply sample: from the last frame of the turn the device "
        "sends (the one on which the hangover expired) to the first 20 ms block its sink "
        "pulls that holds reply audio; the upstream answers at once, so this is the "
        "device's and the relay's own delay (turn end, reply frames, jitter-buffer "
        "prefill, one block of pull granularity), with no earcon in front of the reply. "
        "The prefill adapts (audio.playback_prefill_min_ms): the first reply waits the "
        "full one, later ones what the link has shown it needs; the underruns of the "
        "same run show what that cost.")
    if answer.p50_ms > TARGET_ANSWER_MS:
        row.findings.append(
            f"The reply starts {answer.p50_ms:.0f} ms (p50) after the hangover ends: the "
            f"jitter buffer's prefill ({PREFILL_MS} ms) and the 20 ms pull granularity are "
            "most of it; the prefill adapts down to audio.playback_prefill_min_ms once replies "
            "arrive in time (see the underruns line).")
    fast = sorted(d for d in down if d < 0.010)
    if dn.p99_ms > TARGET_P99_MS:
        slow = sorted(d for d in down if d >= 0.010)
        row.findings.append(
            f"Downlink: {len(fast)} of {len(down)} reply frames reach the playback buffer "
            f"within {1000 * (fast[-1] if fast else 0):.1f} ms (relay pacing, network, "
            f"decode together); {len(slow)} took 10 ms or more (slowest "
            f"{1000 * (slow[-1] if slow else 0):.1f} ms): late pacing ticks in the relay or "
            "a busy device loop; the relay's loop-stall figures (rows 4 and 14) tell which.")
    if up.p99_ms > TARGET_P99_MS:
        row.findings.append(
            "Uplink p99 above target: see the device profile under row 2 (Opus encoding "
            "and the event loop's 20 ms wake-ups share one thread with the link).")
    row.seconds = time.monotonic() - started
    return row
