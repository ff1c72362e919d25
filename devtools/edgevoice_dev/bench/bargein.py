"""Row 5: barge-in, from the relay sending ``interrupt`` to the device output going silent.

The relay's upstream (:class:`~edgevoice_dev.bench.upstreams.BargeInUpstream`) starts a
reply, streams 250-450 ms of it at real time and then reports the user's
interruption, which the relay turns into an ``interrupt`` message at once. The
device (the real daemon, instrumented, silent microphone) plays through a sink
that pulls a 20 ms block every 20 ms, like a sound card. Measured per
interruption: the upstream handing the interruption to the relay -> the daemon
receiving the message -> the playback buffer flushed -> the first block pulled
with no audio in it. The block period bounds the last step (0-20 ms, uniformly).
"""

from __future__ import annotations

import json
import logging
import time

from edgevoice_dev.bench.analysis import Spread, following_delays, silence_delays
from edgevoice_dev.bench.plan import OUTPUT_RATE_HZ, Workspace
from edgevoice_dev.bench.proc import Child, python_module
from edgevoice_dev.bench.results import INFO, Line, RowResult, fmt_ms, verdict

logger = logging.getLogger(__name__)

DEVICE = "bench-bargein"
TARGET_P99_MS = 25.0


async def run_row(ws: Workspace) -> RowResult:
    started = time.monotonic()
    row = RowResult(5, "Barge-in: relay interrupt -> device output silent")
    trials = ws.plan.bargein_trials
    relay_record = ws.root / "bargein-relay.json"
    device_record = ws.root / "bargein-device.json"
    relay = await ws.relay("bargein-relay", "bargein", "--trials", str(trials),
                           "--record", str(relay_record))
    device: Child | None = None
    try:
        port = int(relay.events[0]["port"])
        config = ws.device_config(DEVICE, f"ws://127.0.0.1:{port}/", "unused", "unused",
                                  log_level="warning")
        device = await ws.spawn("bargein-device", python_module(
            "edgevoice_dev.bench.device_runner", "--config", str(config), "--source", "silence",
            "--output-rate", str(OUTPUT_RATE_HZ), "--record", str(device_record)))
        await device.event("link_up", 30)
        await relay.event("bargein_done", 10 + 1.5 * trials)
        await device.stop()
        await relay.stop()
    finally:
        if device is not None:
            await device.stop()
        await relay.stop()
    sessions = json.loads(relay_record.read_text()).get(DEVICE, [])
    if not sessions:
        raise RuntimeError("the device never opened a session with the relay")
    interrupts = sessions[0]["interrupts"]
    log = json.loads(device_record.read_text())
    pulls = [(float(t), int(n)) for t, n in log["pulls"]]
    to_silent, missed = silence_delays(interrupts, pulls)
    to_message, _ = following_delays(interrupts, log["interrupts"])
    to_flush, _ = following_delays(interrupts, log["flushes"])
    silent, message, flush = Spread.of(to_silent), Spread.of(to_message), Spread.of(to_flush)
    row.lines.append(Line("interrupt -> output silent, p50 / p99",
                          f"{fmt_ms(silent.p50_ms)} / {fmt_ms(silent.p99_ms)}",
                          f"{silent.n} of {len(interrupts)} replies",
                          f"p99 <= {TARGET_P99_MS:g} ms",
                          verdict(silent.p99_ms <= TARGET_P99_MS and missed == 0)))
    row.lines.append(Line("  interrupt -> playback buffer flushed, p50 / p99",
                          f"{fmt_ms(flush.p50_ms)} / {fmt_ms(flush.p99_ms)}",
                          "then the next 20 ms pull", "", INFO))
    row.data = {"to_silent": silent.as_dict(), "to_message": message.as_dict(),
                "to_flush": flush.as_dict(), "interrupts": len(interrupts),
                "never_silent": missed, "block_ms": 20, "output_rate_hz": OUTPUT_RATE_HZ}
    row.notes.append(
        "Interrupt: the upstream hands ResponseInterrupted to the relay, which sends "
        "`interrupt` at once; silent: the first 20 ms block the device's sink pulls that "
        "holds no audio. The sink pulls every 20 ms like a sound card, so 0-20 ms of the "
        f"figure is block granularity: message received p50 {fmt_ms(message.p50_ms)}, "
        f"buffer flushed p50 {fmt_ms(flush.p50_ms)} / p99 {fmt_ms(flush.p99_ms)}. Audio "
        "already handed to a real sound card's own buffer (its period) comes on top.")
    if row.missed:
        row.findings.append(
            "The flush itself is fast; what is left is the 20 ms pull period. Pull smaller "
            "blocks (10 ms) in the sound-device sink to halve it.")
    row.seconds = time.monotonic() - started
    return row
