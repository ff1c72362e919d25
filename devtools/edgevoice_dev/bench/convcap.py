"""Rows 14 and 15: the relay under a conversational load, and beyond its capacity.

Every simulated device lives a conversation: it speaks for 3 s (real Opus frames at
real time), ends its turn, gets a 3 s reply streamed by the upstream at real time,
pauses 2 s, and starts again, each device at its own phase of that 8 s cycle. A reply
*glitches* when a frame arrives after a device with the default 60 ms jitter buffer
would have needed it. Row 14: the largest number of devices one relay core serves with
no glitch (no admission limit, to measure the engine); per-session CPU against the
codec floor; the event loop's stalls. Row 15: twice that many devices with the
admission limit set to what the core held: new turns are refused with a retryable
error, and the admitted ones must stay whole.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevoice_dev.bench.analysis import Spread
from edgevoice_dev.bench.floor import relay_opus_seconds_per_frame
from edgevoice_dev.bench.lean_relay import LeanRelayRun, measure_lean_relay
from edgevoice_dev.bench.loadgen import CAPTURE_BLOCK_MS
from edgevoice_dev.bench.plan import Workspace
from edgevoice_dev.bench.proc import Child, busy_pct, cpu_busy_ticks, cpu_seconds, python_module
from edgevoice_dev.bench.profiles import summarize
from edgevoice_dev.bench.results import INFO, Line, RowResult, fmt_ms, verdict

logger = logging.getLogger(__name__)

SPEECH_S, REPLY_S, PAUSE_S = 3.0, 3.0, 2.0
PREFILL_S = 0.060
TARGET_SESSIONS = 150
TARGET_FLOOR_RATIO = 1.3
TARGET_STALL_P99_MS = 5.0
RELAY_CPU, LOADGEN_CPU = 0, 1


@dataclass
class ConvStep:
    clients: int
    connected: int
    limit: int
    replies: int
    glitched: int
    turns: int
    refused: int
    unanswered: int
    relay_cpu_pct: float
    stall: Spread
    #: how busy the relay's core was over the window, whoever kept it busy
    core_busy_pct: float = math.nan
    #: share of the window the relay was runnable but waiting for its core, %
    waited_pct: float = math.nan
    #: the load generator's CPU, % of its own core, and the share of the window it was
    #: runnable but waiting for that core: a generator that cannot keep up records
    #: late arrivals the relay did not cause
    loadgen_cpu_pct: float = math.nan
    loadgen_waited_pct: float = math.nan
    #: turns the relay refused, by reason (relay/admission.py), over the whole run
    refused_by_reason: dict[str, int] = field(default_factory=dict)
    #: with ``step_times``: how long each step the loop ran held it, over the window
    steps: StepSpread | None = None

    @property
    def others_pct(self) -> float:
        """How much of the relay's core other processes took."""
        return max(0.0, self.core_busy_pct - self.relay_cpu_pct)

    @property
    def passed(self) -> bool:
        return (self.connected == self.clients and self.replies > 0 and self.glitched == 0
                and self.refused == 0 and self.unanswered == 0)

    @property
    def cpu_per_session_pct(self) -> float:
        return self.relay_cpu_pct / self.connected if self.connected else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {"clients": self.clients, "connected": self.connected, "limit": self.limit,
                "replies": self.replies, "glitched": self.glitched, "turns": self.turns,
                "refused": self.refused, "unanswered": self.unanswered,
                "relay_cpu_pct_of_core": round(self.relay_cpu_pct, 2),
                "relay_cpu_per_session_pct": round(self.cpu_per_session_pct, 4),
                "loop_stall": self.stall.as_dict(), "passed": self.passed,
                "relay_core_busy_pct": round(self.core_busy_pct, 1),
                "relay_waited_for_core_pct": round(self.waited_pct, 1),
                "loadgen_cpu_pct_of_core": round(self.loadgen_cpu_pct, 1),
                "loadgen_waited_for_core_pct": round(self.loadgen_waited_pct, 1),
                "refused_by_reason": self.refused_by_reason,
                **({"single_steps": self.steps.as_dict()} if self.steps else {})}


@dataclass(frozen=True)
class StepSpread:
    """The event loop's single steps over a window (relay_runner --step-times)."""

    held: Spread
    #: steps over TARGET_STALL_P99_MS, and how many of those a collector pass was in
    over_target: int
    over_target_in_gc: int
    #: the longest steps: (ms, what ran), longest first
    longest: list[tuple[float, str]]

    @classmethod
    def read(cls, path: Path, window: tuple[float, float]) -> StepSpread:
        raw = array("d")
        data = Path(f"{path}.bin").read_bytes()
        raw.frombytes(data)
        half = len(raw) // 2
        ended, held = raw[:half], raw[half:]
        inside = [h for t, h in zip(ended, held, strict=True) if window[0] <= t <= window[1]]
        meta = json.loads(path.read_text())
        limit_s = TARGET_STALL_P99_MS / 1000
        gcs = [(start, start + dur) for start, dur, _gen in meta["collections"]]
        over = [(t, h) for t, h in zip(ended, held, strict=True)
                if window[0] <= t <= window[1] and h > limit_s]
        in_gc = sum(1 for t, h in over if any(a >= t - h and b <= t for a, b in gcs))
        slow = sorted(((round(1000 * h, 1), name) for t, h, name in meta["slow"]
                       if window[0] <= t <= window[1]), reverse=True)[:5]
        return cls(Spread.of(inside), len(over), in_gc, slow)

    def as_dict(self) -> dict[str, Any]:
        return {**self.held.as_dict(), "over_target": self.over_target,
                "over_target_in_gc": self.over_target_in_gc,
                "longest": [list(x) for x in self.longest]}


def runqueue_wait_s(pid: int) -> float:
    """Time the process's threads spent runnable but waiting for a CPU (schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def glitched(arrivals: list[float], prefill_s: float = PREFILL_S) -> bool:
    """Whether a reply arriving at these times would have stuttered in a device whose
    jitter buffer starts playing ``prefill_s`` after the first frame."""
    if not arrivals:
        return False
    start = arrivals[0] + prefill_s
    return any(t > start + i * 0.02 for i, t in enumerate(arrivals))


async def _step(ws: Workspace, n: int, limit: int, admission: str = "off",
                *, step_times: bool = False, profile: Path | None = None) -> ConvStep:
    """``n`` conversing devices against one relay core; ``limit`` its max_active_turns,
    ``admission`` its ramp and load-based admission (relay_runner --admission);
    ``step_times``: time each step of its loop (on asyncio's loop, not uvloop);
    ``profile``: write a cProfile (CPU time) of the relay there."""
    plan = ws.plan
    tokens = ws.tokens_json([f"conv-{i:04d}" for i in range(n)], f"conv-{n}.json")
    lag_path = ws.root / f"conv-loop-{n}-{limit}.json"
    load_path = ws.root / f"conv-load-{n}-{limit}.json"
    steps_path = ws.root / f"conv-steps-{n}-{limit}.json"
    relay = await ws.relay(f"conv-relay-{n}-{limit}", "reply", "--reply-ms",
                           str(int(REPLY_S * 1000)), "--cpu", str(RELAY_CPU),
                           "--max-active-turns", str(limit), "--admission", admission,
                           "--loop-lag", str(lag_path),
                           *(("--step-times", str(steps_path)) if step_times else ()),
                           *(("--profile", str(profile)) if profile is not None else ()))
    load: Child | None = None
    try:
        port = int(relay.events[0]["port"])
        load = await ws.spawn(f"conv-load-{n}-{limit}", python_module(
            "edgevoice_dev.bench.loadgen", "--url", f"ws://127.0.0.1:{port}/", "--tokens",
            str(tokens), "--clients", str(n), "--speech", str(ws.fixture.path),
            "--conversation", "--speech-s", str(SPEECH_S), "--reply-s", str(REPLY_S),
            "--pause-s", str(PAUSE_S), "--warmup", str(plan.conv_warmup_s),
            "--measure", str(plan.conv_measure_s), "--record", str(load_path),
            "--cpu", str(LOADGEN_CPU)))
        await load.event("streaming", 60 + n / 10)
        start = await load.event("measure_start", 30 + plan.conv_warmup_s)
        cpu0, t0, ticks0 = cpu_seconds(relay.pid), time.monotonic(), cpu_busy_ticks()
        wait0 = runqueue_wait_s(relay.pid)
        gen_cpu0, gen_wait0 = cpu_seconds(load.pid), runqueue_wait_s(load.pid)
        end = await load.event("measure_end", 30 + plan.conv_measure_s)
        cpu1, t1, ticks1 = cpu_seconds(relay.pid), time.monotonic(), cpu_busy_ticks()
        waited = 100 * (runqueue_wait_s(relay.pid) - wait0) / (t1 - t0)
        gen_cpu = 100 * (cpu_seconds(load.pid) - gen_cpu0) / (t1 - t0)
        gen_waited = 100 * (runqueue_wait_s(load.pid) - gen_wait0) / (t1 - t0)
        await load.event("done", 120)
        await load.wait(60)
        await relay.stop(30)
        by_reason: dict[str, int] = next((e.get("counters", {}).get("turns_refused_by_reason", {})
                          for e in relay.events if e.get("event") == "stopped"), {})
    finally:
        if load is not None:
            await load.stop()
        await relay.stop()
    window = (float(start["t"]), float(end["t"]))
    data = json.loads(load_path.read_text())
    replies = glitches = turns = refused = 0
    for device in data["devices"].values():
        turns += device["turns"]
        refused += device["refused"]
        for reply in device["replies"]:
            if reply and window[0] <= reply[0] <= window[1]:
                replies += 1
                glitches += glitched(reply)
    answered = sum(len(d["replies"]) for d in data["devices"].values())
    unanswered = max(0, turns - refused - answered - n)  # each device's last turn may be open
    lags = [ms / 1000 for t, ms in json.loads(lag_path.read_text()) if window[0] <= t <= window[1]]
    step = ConvStep(n, int(data["clients"]), limit, replies, glitches, turns, refused,
                    unanswered, 100 * (cpu1 - cpu0) / (t1 - t0), Spread.of(lags),
                    busy_pct(ticks0, ticks1, f"cpu{RELAY_CPU}")
                    if f"cpu{RELAY_CPU}" in ticks1 else math.nan, waited, gen_cpu, gen_waited,
                    by_reason, StepSpread.read(steps_path, window) if step_times else None)
    logger.info("conversation %d (limit %d): %d replies, %d glitched, %d refused, relay "
                "%.0f %% CPU, loop stall p99 %.1f ms; load generator %.0f %% CPU, waited "
                "%.0f %%", n, limit, replies, glitches, refused, step.relay_cpu_pct,
                step.stall.p99_ms, gen_cpu, gen_waited)
    return step


def _floor_pct_per_session(ws: Workspace) -> float:
    """libopus alone per conversing session, % of a core: a 16 kHz decode and a 24 kHz
    encode for each 20 ms of speech and reply, over the 8 s cycle."""
    pair_s = relay_opus_seconds_per_frame(ws.fixture.pcm, ws.reply_path.read_bytes())
    frames_per_cycle = SPEECH_S / 0.02  # as many reply frames as speech frames
    return 100 * pair_s * frames_per_cycle / (SPEECH_S + REPLY_S + PAUSE_S)


async def run_rows(ws: Workspace) -> list[RowResult]:
    started = time.monotonic()
    cap = RowResult(14, "Relay conversational capacity, one core")
    over = RowResult(15, "Relay beyond capacity: admission control")
    steps: list[ConvStep] = []
    for n in ws.plan.conv_steps:
        step = await _step(ws, n, 0)
        steps.append(step)
        if not step.passed and ws.plan.stop_at_first_failure:
            break
    passing = [s for s in steps if s.passed]
    best = max(passing, key=lambda s: s.clients) if passing else None
    ref = best or steps[0]
    floor = _floor_pct_per_session(ws)
    ratio = ref.cpu_per_session_pct / floor if floor > 0 else math.nan
    largest = best.clients if best else 0
    tried = ", ".join(str(s.clients) for s in steps)
    cap.lines.append(Line("largest N with no glitched reply (3 s speech, 3 s reply, 2 s pause)",
                          f"{largest} sessions", f"tried {tried}",
                          f">= {TARGET_SESSIONS}", verdict(largest >= TARGET_SESSIONS)))
    cap.lines.append(Line("  relay CPU per session vs the codec floor",
                          f"{ref.cpu_per_session_pct:.3f} % ({ratio:.2f}x)",
                          f"floor {floor:.3f} % (libopus alone: {100 / floor:.0f} per core)",
                          f"<= {TARGET_FLOOR_RATIO:g}x", verdict(ratio <= TARGET_FLOOR_RATIO)))
    lean: LeanRelayRun | None = None
    try:  # the leanest Python relay, the same pattern and number of sessions
        lean = await measure_lean_relay(ws, ref.clients, ws.plan.conv_warmup_s,
                                        ws.plan.conv_measure_s, RELAY_CPU, LOADGEN_CPU)
    except Exception:  # the row stands without it
        logger.exception("the lean reference relay failed")
    lean_ratio = math.nan
    if lean is not None:
        lean_ratio = lean.cpu_pct / lean.clients / floor if floor > 0 else math.nan
        cap.lines.append(Line(
            "  the same codec work in the leanest Python relay (no protocol, one shared tick)",
            f"{lean.cpu_pct / lean.clients:.3f} % ({lean_ratio:.2f}x)",
            f"at N={lean.clients}, {lean.cpu_pct:.0f} % of its core", "", INFO))
    # the same load again with every step of the relay's loop timed (asyncio's loop)
    timed = await _step(ws, ref.clients, 0, step_times=True)
    single = timed.steps
    assert single is not None
    cap.lines.append(Line("  relay event-loop stall, any single step, p99 / max",
                          f"{fmt_ms(single.held.p99_ms)} / {fmt_ms(single.held.max_ms)}",
                          f"at N={timed.clients}: {single.held.n:,} steps timed, "
                          f"{single.over_target} over {TARGET_STALL_P99_MS:g} ms "
                          f"({single.over_target_in_gc} a collector pass)",
                          f"p99 <= {TARGET_STALL_P99_MS:g} ms",
                          verdict(single.held.p99_ms <= TARGET_STALL_P99_MS)))
    cap.lines.append(Line("  a 10 ms timer's lateness (steps queued ahead of it), p99 / max",
                          f"{fmt_ms(ref.stall.p99_ms)} / {fmt_ms(ref.stall.max_ms)}",
                          f"at N={ref.clients}, relay {ref.relay_cpu_pct:.0f} % of its core",
                          "", INFO))
    cap.data = {"steps": [s.as_dict() for s in steps], "largest_passing": largest,
                "floor_pct_per_session": round(floor, 4), "ratio_to_floor": round(ratio, 2),
                "timed": timed.as_dict(),
                "lean_relay": None if lean is None else {**lean.as_dict(),
                                                         "ratio_to_floor": round(lean_ratio, 2)}}
    cap.notes.append(
        "Single steps: the same load run again on asyncio's loop with every step it runs "
        "(callback, task step, I/O callback) timed where asyncio runs it, and every "
        "collector pass noted (uvloop runs its steps in C, where they cannot be timed); "
        "the steps are the relay's same code, the loop around them slightly slower than "
        "uvloop's. A timer's lateness is what a reply frame due at that moment waits: the "
        "sum of the short steps queued ahead of it, which grows with how busy the core "
        "is, not with any one step.")
    cap.notes.append(
        "Relay process pinned to CPU 0 with no admission limit, load generator on CPU 1. "
        "Each device: 3 s of speech at real time (sent as the daemon sends it: a "
        f"{CAPTURE_BLOCK_MS} ms capture block's frames in one write), turn end, a 3 s reply "
        "streamed by the "
        "upstream at real time, 2 s pause, again; phases spread over the 8 s cycle. A reply "
        "glitches when any frame arrives after a 60 ms jitter buffer would have played it. "
        "Per step: " + "; ".join(
            f"N={s.clients}: {s.replies} replies, {s.glitched} glitched, relay "
            f"{s.relay_cpu_pct:.0f} % CPU (its core {s.core_busy_pct:.0f} % busy, relay "
            f"waiting for it {s.waited_pct:.0f} % of the time), loop stall p99 "
            f"{fmt_ms(s.stall.p99_ms)}"
            for s in steps))
    profiled = ws.plan.profile and ratio > TARGET_FLOOR_RATIO
    if profiled:
        n = min(ref.clients, 100)
        logger.info("profiling the relay with %d conversing sessions (figures of this pass "
                    "not used)", n)
        path = ws.root / f"conv-relay-{n}.prof"
        await _step(ws, n, 0, profile=path)
        cap.profile = summarize(path, title=f"relay process, {n} conversing sessions, "
                                            "cProfile (CPU time, whole run)")
    if largest < TARGET_SESSIONS or ratio > TARGET_FLOOR_RATIO:
        failed = next((s for s in steps if not s.passed), None)
        cap.findings.append(
            f"One core served {largest} conversing sessions without a glitch"
            + (f"; at {failed.clients} the relay used {failed.relay_cpu_pct:.0f} % of its "
               f"core and {failed.glitched} of {failed.replies} replies glitched "
               f"(loop stall p99 {fmt_ms(failed.stall.p99_ms)})" if failed else "")
            + (f". Other processes took {failed.others_pct:.0f} % of that core meanwhile and "
               f"the relay spent {failed.waited_pct:.0f} % of the window runnable but waiting "
               "for it (scheduler statistics): its stalls are the machine's, not its own "
               "work; rerun on a quiet machine" if failed and failed.others_pct > 15
               and failed.relay_cpu_pct < 80 else "")
            + f". Each session costs {ref.cpu_per_session_pct:.3f} % of a core, "
            f"{ratio:.1f}x what libopus alone needs ({floor:.3f} %). Reply frames are "
            "paced by one shared tick and written without a coroutine, uplink frames are "
            "taken in the connection's data callback, and the relay runs on uvloop when "
            "installed; what is left beyond the codec is, per frame each way, a socket "
            "read or write, websockets' frame parser or serializer (Python), the "
            "protocol's header and budget checks and the downlink queue, plus the bench "
            "upstream's own pacing, which runs in the relay process ("
            + ("the profile below names each)." if profiled else "row 4's profile names "
               "each)."))
    if lean is not None:
        cap.notes.append(
            "Leanest Python relay (edgevoice_dev.bench.lean_relay): one asyncio server, the "
            "same conversational pattern and phases, uplink packets length-prefixed (three "
            "per write) and decoded in the data callback, each reply encoded at 24 kHz one "
            "frame per 20 ms on one shared tick, one write per frame; no WebSocket, no "
            "protocol messages, no upstream, no admission, no metrics. Pinned as the relay "
            "is, its load on the other core.")
        if ratio > TARGET_FLOOR_RATIO:
            cap.findings.append(
                f"The leanest Python relay doing the same codec work costs {lean_ratio:.2f}x "
                f"the floor per session by itself, the relay {ratio:.2f}x: "
                + (f"a ratio of {TARGET_FLOOR_RATIO:g}x is below what Python pays per frame "
                   "at this cadence; it needs the per-frame path in compiled code."
                   if lean_ratio >= TARGET_FLOOR_RATIO else
                   f"{TARGET_FLOOR_RATIO - lean_ratio:.2f}x of the floor is left for the "
                   "WebSocket protocol, the upstream and the relay's bookkeeping."))
    if single.held.p99_ms > TARGET_STALL_P99_MS:
        cap.findings.append(
            f"Single steps of the relay's loop at N={timed.clients}: p99 "
            f"{fmt_ms(single.held.p99_ms)}; the longest: " + "; ".join(
                f"{ms:g} ms {name}" for ms, name in single.longest[:3]) + ".")
    # Beyond capacity: twice as many devices, admission limit at what the core held
    # (the turns in flight when ``held`` devices converse). When no step passed (a busy
    # machine), half of what the first step asked for.
    busy_share = (SPEECH_S + REPLY_S) / (SPEECH_S + REPLY_S + PAUSE_S)
    held = largest or ws.plan.conv_steps[0] // 2
    active = max(1, round(held * busy_share))
    n_over = max(2 * held, 2)
    step = await _step(ws, n_over, active, "shipped")
    admitted_ok = step.replies > 0 and step.glitched == 0
    over.lines.append(Line("admitted replies that glitched", f"{step.glitched} of {step.replies}",
                           f"{n_over} devices, limit {active} active turns", "0",
                           verdict(admitted_ok)))
    over.lines.append(Line("  turns refused with a retryable relay_busy error",
                           f"{step.refused} of {step.turns}", "", "> 0 (shed, not degraded)",
                           verdict(step.refused > 0)))
    reasons = step.refused_by_reason
    over.lines.append(Line("  refused by reason: capacity / ramp / load",
                           " / ".join(str(reasons.get(k, 0)) for k in ("capacity", "ramp", "load")),
                           "whole run", "", INFO))
    over.lines.append(Line("  relay event-loop stall, p99", fmt_ms(step.stall.p99_ms), "", "",
                           INFO))
    over.data = {"step": step.as_dict(), "limit": active}
    over.notes.append(
        f"{n_over} conversing devices against one relay core whose limits.max_active_turns "
        f"is {active} (the turns and replies in flight when {held} devices converse), with "
        "the ramp (limits.turn_ramp_ms) and load-based admission (limits.overload_*) as "
        "shipped; the shipped max_active_turns is 150 for a relay with a core to itself. "
        "A refused device stops streaming, waits out the rest of its turn and its pause, "
        "and tries again: refused turns come back together, as people would.")
    if not admitted_ok:
        over.findings.append(
            f"{step.glitched} of {step.replies} admitted replies glitched with the limit at "
            f"{active} (refused: {reasons.get('capacity', 0)} at the count, "
            f"{reasons.get('ramp', 0)} by the ramp, {reasons.get('load', 0)} for load; "
            f"relay {step.relay_cpu_pct:.0f} % of its core, loop stall p99 "
            f"{fmt_ms(step.stall.p99_ms)}, load generator {step.loadgen_cpu_pct:.0f} % of "
            "its core).")
    cap.seconds = over.seconds = time.monotonic() - started
    return [cap, over]
