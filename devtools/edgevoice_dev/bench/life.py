"""Rows 11-13: what a Pi-class device and a relay cost while nobody talks (issue 15).

* Rows 11 and 12: the real ``edgevoice device`` process listening to a quiet room,
  always-on (row 11) and with the wake word on (row 12), each twice: with WAV stand-ins
  and with the virtual sound card (``scripts/soundcard``: PulseAudio through ALSA,
  PortAudio's callback threads as on a board). CPU from the process's own /proc
  counters (every thread), RSS from /proc/PID/status, per thread where it helps explain.
* Row 13: an idle fleet: N devices connected to one relay process, none talking; the
  relay's resident memory and CPU per connected device.

Findings are written from the figures measured in the same run, never from a script.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgevoice.device.link import RelaySettings
from edgevoice.protocol.heartbeat import stats_every
from edgevoice.relay.settings import LimitsSettings
from edgevoice_dev.bench.plan import PLAIN_AEC_MODE, Workspace
from edgevoice_dev.bench.proc import (
    Child,
    cpu_seconds,
    memory_kib,
    python_module,
    rss_by_mapping,
)
from edgevoice_dev.bench.profiles import summarize
from edgevoice_dev.bench.results import INFO, Line, RowResult, verdict

logger = logging.getLogger(__name__)

IDLE_TARGET_PCT = 1.0
#: the level of the quiet room the idle device hears (rows 11 and 12)
ROOM_DBFS = -60.0
WAKE_TARGET_PCT = 1.5
RSS_TARGET_MB = 55.0
FLEET_KIB_TARGET = 24.0
FLEET_CPU_TARGET_PCT = 0.001
#: Seconds between the last device connecting and the window: what a fleet does once
#: after it connects (the relay's heap pass, relay/loop.py) is not its idle cost.
FLEET_WARMUP_S = 10.0
_TICKS = os.sysconf("SC_CLK_TCK")
#: Seconds an idle run settles before its window (imports, streams open, first stats
#: sent, speaker parked).
SETTLE_S = 8.0


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Every thread of ``pid``: tid -> (its name now, CPU seconds)."""
    out: dict[int, tuple[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            with_name = (task / "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        name = with_name[with_name.index("(") + 1 : with_name.rindex(")")]
        fields = with_name[with_name.rindex(")") + 2 :].split()
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / _TICKS)
    return out


ENDED = "- threads-that-ended"


def thread_shares(pid: int, before: dict[int, tuple[str, float]],
                  after: dict[int, tuple[str, float]], process_pct: float,
                  span_s: float) -> list[tuple[str, float]]:
    """% of a core per thread over a window, the busiest first, as "tid name".

    Threads are matched by id, named as at the end: PortAudio's callback threads take
    their names (edgevoice-mic, edgevoice-play) at their first callback, and the input
    stream's thread may spend a second of CPU before it (PortAudio waiting for the sound
    server's first block), which must not count in a window that began after it. The
    main thread, which runs the event loop, is "event-loop". What threads that ended
    within the window used is in the process's total, not in any thread's: the rest
    (speaker streams park after each reply and reopen at the next turn, with new
    threads)."""
    shares = [(f"{tid} {'event-loop' if tid == pid else name}",
               100 * (cpu - before.get(tid, (name, 0.0))[1]) / span_s)
              for tid, (name, cpu) in after.items()]
    ended = process_pct - sum(p for _, p in shares)
    if ended >= 0.01:
        shares.append((ENDED, ended))
    shares.sort(key=lambda kv: -kv[1])
    return shares


@dataclass
class IdleRun:
    path: str
    wake: bool
    cpu_pct: float
    rss_mb: float
    window_s: float
    #: % of a core in the event loop's thread (the main thread)
    main_pct: float = 0.0
    #: % of a core per thread, the busiest first (names as the kernel has them)
    threads: list[tuple[str, float]] = field(default_factory=list)
    #: anonymous and file-backed parts of the RSS at the end of the window, MB
    anon_mb: float = 0.0
    file_mb: float = 0.0
    #: resident KiB per mapped file at the end of the window
    mappings: dict[str, int] = field(default_factory=dict)
    #: % of a core a stream on the same card with a callback doing nothing cost over
    #: the same window (None: not measured)
    bare_pct: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "wake": self.wake, "cpu_pct": round(self.cpu_pct, 3),
                "rss_mb": round(self.rss_mb, 1), "rss_anon_mb": round(self.anon_mb, 1),
                "rss_file_mb": round(self.file_mb, 1), "window_s": round(self.window_s, 1),
                "threads": [[n, round(p, 3)] for n, p in self.threads]}


def _quiet_room(path: Path, seconds: float) -> Path:
    """A quiet room as a microphone hears it: white noise at :data:`ROOM_DBFS`. Not
    digital zeros: no microphone gives those, and a device that did less work on
    exact zeros than on a real room would measure better than it is."""
    rng = np.random.default_rng(11)
    noise = rng.standard_normal(int(16_000 * seconds)) * (32768 * 10 ** (ROOM_DBFS / 20))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes(np.clip(np.round(noise), -32768, 32767).astype("<i2").tobytes())
    return path


@contextlib.contextmanager
def _card_hearing(room: Path) -> Iterator[dict[str, str]]:
    """The virtual sound card with ``room`` played into its microphone for as long as
    the block runs; yields the environment a process needs to use it."""
    from edgevoice_dev.testing.soundcard import VirtualSoundCard

    card = VirtualSoundCard()
    card.start()
    room_player: subprocess.Popen[bytes] | None = None
    try:
        room_player = card.play_into_mic(room, wait=False)
        yield card.environ()
    finally:
        if room_player is not None:
            room_player.terminate()
            room_player.wait(10)
        card.stop()


async def _idle(ws: Workspace, relay_port: int, path: str, wake: bool,
                seconds: float, profile_out: Path | None = None,
                with_bare: bool = False) -> IdleRun:
    """One device process listening to silence for ``seconds`` after settling (with
    ``profile_out``: under cProfile from then on, its profile written there). With
    ``with_bare`` on the card path: capture alone (:func:`_start_bare`) runs beside it,
    measured over the same window, so that machine noise is the same for both."""
    name = f"idle-{path}-{'wake' if wake else 'voice'}{'-profiled' if profile_out else ''}"
    room = _quiet_room(ws.root / f"{name}-room.wav", seconds + 60)
    with contextlib.ExitStack() as stack:
        env: dict[str, str] = {}
        if path == "card":
            env = stack.enter_context(_card_hearing(room))  # the room, for the whole run
            audio_in, audio_out = "default", "default"
        else:
            audio_in = f"wav:{room}"
            audio_out = f"wav:{ws.root / f'{name}-out.wav'}"
        config = ws.device_config(name, f"ws://127.0.0.1:{relay_port}/", audio_in, audio_out,
                                  log_level="warning", aec_mode=PLAIN_AEC_MODE)
        if wake:
            with config.open("a") as f:
                f.write("turn:\n  start: wake\n")
        device: Child | None = None
        bare: Child | None = None
        try:
            argv = ["edgevoice", "device", "--config", str(config)]
            if profile_out is not None:
                argv = ["edgevoice_dev.bench.profiled", "--on-signal", str(profile_out), *argv]
            device = await ws.spawn(name, python_module(*argv), env=env)
            if with_bare and path == "card":
                bare = await _start_bare(ws, f"{name}-bare-capture", env)
            # settle: imports done, streams open, first stats sent, speaker parked
            await asyncio.sleep(SETTLE_S)
            if device.proc.returncode is not None:
                raise RuntimeError(f"{name} exited early: see {device.log_path}")
            if profile_out is not None:
                device.proc.send_signal(signal.SIGUSR2)  # steady state: profile from now on
            bare0 = _cpu_or_none(bare)
            cpu0, threads0, t0 = (cpu_seconds(device.pid), thread_cpu(device.pid),
                                  time.monotonic())
            rss: list[int] = []
            end = t0 + seconds
            while (now := time.monotonic()) < end:
                rss.append(memory_kib(device.pid).get("VmRSS", 0))
                await asyncio.sleep(min(1.0, end - now))
            cpu1, threads1, t1 = (cpu_seconds(device.pid), thread_cpu(device.pid),
                                  time.monotonic())
            bare1 = _cpu_or_none(bare)
            parts, mappings = memory_kib(device.pid), rss_by_mapping(device.pid)
        finally:
            if device is not None:
                await device.stop()
            if bare is not None:
                await bare.stop()
    span = t1 - t0
    threads = thread_shares(device.pid, threads0, threads1, 100 * (cpu1 - cpu0) / span, span)
    rss.sort()
    main = next((p for k, p in threads if k.split()[0] == str(device.pid)), 0.0)
    bare_pct = (None if bare0 is None or bare1 is None
                else 100 * (bare1 - bare0) / span)
    return IdleRun(path, wake, 100 * (cpu1 - cpu0) / span, rss[len(rss) // 2] / 1024, span,
                   main, [t for t in threads if t[1] >= 0.01],
                   parts.get("RssAnon", 0) / 1024, parts.get("RssFile", 0) / 1024, mappings,
                   bare_pct)


async def _start_bare(ws: Workspace, name: str, env: dict[str, str]) -> Child | None:
    """Capture alone (:mod:`edgevoice_dev.bench.bare_capture`): a stream on the same
    card, block and quiet room as the device, with a callback that does nothing; None
    (logged) if it cannot run: the device's figures stand without it."""
    child: Child | None = None
    try:
        child = await ws.spawn(name, python_module("edgevoice_dev.bench.bare_capture"),
                               env=env)
        await child.event("capturing", 30)
        return child
    except Exception:
        logger.exception("measuring capture alone failed")
        if child is not None:
            await child.stop()
        return None


def _cpu_or_none(child: Child | None) -> float | None:
    """CPU seconds of ``child`` so far; None if there is none or it has exited."""
    if child is None or child.proc.returncode is not None:
        return None
    try:
        return cpu_seconds(child.pid)
    except OSError:  # gone meanwhile
        return None


def _thread_story(run: IdleRun) -> str:
    main = run.main_pct
    others = run.cpu_pct - main
    return (f"{run.path}{' + wake word' if run.wake else ''}: {run.cpu_pct:.2f} % = event-loop "
            f"thread {main:.2f} % + audio and sound-server threads {others:.2f} % ("
            + ", ".join(f"{n.split()[1]} {p:.2f} %" for n, p in run.threads[:7]
                        if n.split()[1] != "event-loop") + ")")


async def run_idle_rows(ws: Workspace) -> list[RowResult]:
    """Rows 11 and 12 (one relay, four device runs, one after another)."""
    seconds = ws.plan.idle_s
    relay = await ws.relay("idle-relay", "reply")
    runs: dict[tuple[str, bool], IdleRun] = {}
    errors: dict[tuple[str, bool], str] = {}
    from edgevoice_dev.testing.soundcard import missing_tools

    missing = missing_tools()  # no PulseAudio here: the WAV rows still run
    try:
        port = int(relay.events[0]["port"])
        for path in ("wav",) if missing else ("wav", "card"):
            for wake in (False, True):
                try:
                    runs[(path, wake)] = await _idle(ws, port, path, wake, seconds,
                                                     with_bare=True)
                except Exception as exc:  # one path failing must not lose the others
                    logger.exception("idle run %s wake=%s failed", path, wake)
                    errors[(path, wake)] = f"{type(exc).__name__}: {exc}"
        profiles = await _profile_missed(ws, port, runs, seconds, bool(missing))
    finally:
        await relay.stop()
    rows = []
    for number, wake, target in ((11, False, IDLE_TARGET_PCT), (12, True, WAKE_TARGET_PCT)):
        title = ("Device idle, always-on listening" if not wake
                 else "Device idle, wake word on")
        row = RowResult(number, title)
        card, wav = runs.get(("card", wake)), runs.get(("wav", wake))
        bare = card.bare_pct if card is not None else None
        for what, run in (("sound card (PortAudio, PulseAudio)", card), ("WAV stand-ins", wav)):
            if run is None and missing and "card" in what:
                row.lines.append(Line(f"CPU, {what}", "not measured",
                                      f"missing: {', '.join(missing)}", f"<= {target:g} %",
                                      INFO))
                continue
            if run is None:
                row.lines.append(Line(f"CPU, {what}", "n/a", errors.get(
                    ("card" if "card" in what else "wav", wake), ""), f"<= {target:g} %",
                    "error"))
                continue
            on_card = run is card
            row.lines.append(Line(f"CPU while nobody speaks, {what}, % of one core",
                                  f"{run.cpu_pct:.2f} %", f"{run.window_s:.0f} s",
                                  f"<= {target:g} %" if on_card else "",
                                  verdict(run.cpu_pct <= target) if on_card else INFO))
            if on_card and bare is not None:
                row.lines.append(Line(
                    "  capture alone: the same card and block, a callback doing nothing",
                    f"{bare:.2f} %", f"edgevoice's own {run.cpu_pct - bare:.2f} %", "", INFO))
            row.lines.append(Line(f"  resident memory, {what}", f"{run.rss_mb:.1f} MB", "",
                                  f"<= {RSS_TARGET_MB:g} MB" if on_card else "",
                                  verdict(run.rss_mb <= RSS_TARGET_MB) if on_card else INFO))
        row.data = {k[0]: r.as_dict() for k, r in runs.items() if k[1] == wake}
        if bare is not None:
            row.data["capture_alone_pct"] = round(bare, 3)
        if errors:
            row.data["errors"] = {f"{k[0]}{'+wake' if k[1] else ''}": e
                                  for k, e in errors.items()}
        row.notes.append(
            "The real `edgevoice device` process, microphone hearing a quiet room (white "
            f"noise at {ROOM_DBFS:g} dBFS: a microphone's self-noise and a room's hiss, not "
            "digital zeros), relay on 127.0.0.1; CPU from /proc/PID/stat (all threads) over "
            f"the window, after {SETTLE_S:g} s to settle; RSS the median of 1 s samples. "
            "Sound card: "
            "scripts/soundcard (a private PulseAudio with null sinks, reached through ALSA's "
            "pulse plugin, the room played into its microphone), so PortAudio's callback "
            "threads and the sound server's client threads run as on a board; capture "
            "alone is edgevoice_dev.bench.bare_capture on that card, in the same room, "
            "running beside the device and measured over the same window. "
            f"Echo cancellation (aec.mode) {PLAIN_AEC_MODE}, as a plain install has it (AEC3 "
            "is the optional aec extra; row 8 prices it). "
            "1 % of a core here is about 6 % of a Pi Zero 2 W core.")
        for run in (card, wav):
            if run is not None:
                row.notes.append("Per thread: " + _thread_story(run))
        if card is not None and card.cpu_pct > target:
            row.findings.append(_over_target_story(card, bare, target))
        if card is not None and card.rss_mb > RSS_TARGET_MB:
            row.findings.append(_rss_story(card, wav))
        row.profile = profiles.get(wake, "")
        rows.append(row)
    return rows


def _over_target_story(card: IdleRun, bare: float | None, target: float) -> str:
    text = f"Over target on the sound card path: {_thread_story(card)}."
    if bare is not None:
        own = card.cpu_pct - bare
        text += (f" A stream on the same card whose callback does nothing costs {bare:.2f} % "
                 f"by itself (PortAudio's thread and the sound server's client thread, woken "
                 f"by every block and every packet); edgevoice's own share is {own:.2f} %"
                 + (f", and the target leaves it {target - bare:.2f} %." if bare < target
                    else ": the card alone is over the target."))
    return text + (" What is left per 60 ms capture block: a PortAudio wake-up, a PulseAudio "
                   "round trip and one event-loop wake-up; larger audio.capture_block_ms "
                   "trades detection latency for fewer of them.")


def _rss_story(card: IdleRun, wav: IdleRun | None) -> str:
    """What the sound card path's resident memory is made of, from the run's own maps."""
    text = (f"Resident memory on the sound card path: {card.rss_mb:.1f} MB = "
            f"{card.anon_mb:.1f} MB anonymous (heap, stacks, arenas) + {card.file_mb:.1f} MB "
            "of mapped files")
    if wav is not None:
        text += (f"; with WAV stand-ins {wav.rss_mb:.1f} MB ({wav.anon_mb:.1f} + "
                 f"{wav.file_mb:.1f})")
        extra = sorted(((k, v - wav.mappings.get(k, 0)) for k, v in card.mappings.items()),
                       key=lambda kv: -kv[1])
        top = [(k, v) for k, v in extra if v >= 256][:8]
        if top:
            text += (". Mapped only or more on the card path: "
                     + ", ".join(f"{Path(k).name} {v / 1024:.1f} MB" for k, v in top))
    return text + "."


async def _profile_missed(ws: Workspace, port: int, runs: dict[tuple[str, bool], IdleRun],
                          seconds: float, no_card: bool) -> dict[bool, str]:
    """For each idle row whose CPU target was missed (on the sound card path, or the
    WAV one where there is no card): the event loop's profile over a second run."""
    out: dict[bool, str] = {}
    if not ws.plan.profile:
        return out
    path = "wav" if no_card else "card"
    for wake, target in ((False, IDLE_TARGET_PCT), (True, WAKE_TARGET_PCT)):
        run = runs.get((path, wake))
        if run is None or run.cpu_pct <= target:
            continue
        prof = ws.root / f"idle-{path}-{'wake' if wake else 'voice'}.prof"
        try:
            await _idle(ws, port, path, wake, seconds, profile_out=prof)
            out[wake] = summarize(prof, title=(
                f"`edgevoice device` idle{' with the wake word' if wake else ''}, {path} "
                f"path, {seconds:.0f} s, cProfile (CPU time, event-loop thread; the audio "
                "threads are in the per-thread note above)"))
        except Exception:
            logger.exception("profiling the idle device (%s, wake=%s) failed", path, wake)
    return out


def idle_device_schedule() -> tuple[str, float]:
    """What an idle daemon sends its relay with the shipped settings (the link's own
    schedule, as the load generator plays it), in words, and the relay wake-ups per
    second it costs."""
    limits, link = LimitsSettings(), RelaySettings()
    heartbeat_s = limits.heartbeat_interval_ms / 1000
    every = stats_every(limits.heartbeat_interval_ms, link.stats_interval_s)
    words = f"the protocol heartbeat every {heartbeat_s:g} s"
    if every == 1:
        words += " carrying its fleet stats in the same write"
    elif every:
        words += f", every {every}th carrying its fleet stats in the same write"
    wakeups_per_s = 1 / heartbeat_s
    if link.ping_interval_ms:
        words += f", and the WebSocket keepalive ping every {link.ping_interval_ms / 1000:g} s"
        wakeups_per_s += 1000 / link.ping_interval_ms
    else:
        words += ", no WebSocket keepalive (relay.ping_interval_ms 0)"
    if limits.ping_interval_ms:
        words += f"; the relay pings every {limits.ping_interval_ms / 1000:g} s"
        wakeups_per_s += 1000 / limits.ping_interval_ms
    else:
        words += "; the relay sends none (limits.ping_interval_ms 0)"
    return words, wakeups_per_s


async def run_fleet_row(ws: Workspace) -> RowResult:
    """Row 13: N idle devices connected to one relay process."""
    row = RowResult(13, "Idle fleet: connected devices nobody talks to")
    n = ws.plan.fleet_devices
    tokens = ws.tokens_json([f"fleet-{i:05d}" for i in range(n)], f"fleet-{n}.json")
    relay = await ws.relay("fleet-relay", "reply", "--cpu", "0")
    load: Child | None = None
    try:
        await asyncio.sleep(1.0)
        base_kib = memory_kib(relay.pid).get("VmRSS", 0)
        port = int(relay.events[0]["port"])
        load = await ws.spawn("fleet-load", python_module(
            "edgevoice_dev.bench.loadgen", "--url", f"ws://127.0.0.1:{port}/", "--tokens",
            str(tokens), "--clients", str(n), "--speech", str(ws.fixture.path), "--idle",
            "--warmup", str(FLEET_WARMUP_S), "--measure", str(ws.plan.fleet_measure_s),
            "--record", str(ws.root / "fleet-load.json"), "--cpu", "1"))
        streaming = await load.event("streaming", 120 + n / 20)
        started = await load.event("measure_start", 30)
        cpu0, t0 = cpu_seconds(relay.pid), time.monotonic()
        ended = await load.event("measure_end", 30 + ws.plan.fleet_measure_s)
        cpu1, t1 = cpu_seconds(relay.pid), time.monotonic()
        t0_mono, t1_mono = float(started["t"]), float(ended["t"])
        held_kib = memory_kib(relay.pid).get("VmRSS", 0)
        await load.event("done", 120)
        await load.wait(60)
    finally:
        if load is not None:
            await load.stop()
        await relay.stop()
    connected = int(streaming.get("clients", 0))
    per_kib = (held_kib - base_kib) / connected if connected else float("nan")
    cpu_each = 100 * (cpu1 - cpu0) / (t1 - t0) / connected if connected else float("nan")
    row.lines.append(Line("relay memory per connected idle device", f"{per_kib:.1f} KiB",
                          f"{connected} devices, relay {held_kib / 1024:.0f} MB "
                          f"(empty {base_kib / 1024:.0f} MB)", f"<= {FLEET_KIB_TARGET:g} KiB",
                          verdict(per_kib <= FLEET_KIB_TARGET)))
    schedule, wakeups_per_s = idle_device_schedule()
    row.lines.append(Line("relay CPU per connected idle device, % of one core",
                          f"{cpu_each:.4f} %", f"{100 * (cpu1 - cpu0) / (t1 - t0):.2f} % for "
                          f"all {connected} ({cpu1 - cpu0:.2f} CPU-s in {t1 - t0:.0f} s)",
                          f"<= {FLEET_CPU_TARGET_PCT:g} %",
                          verdict(cpu_each <= FLEET_CPU_TARGET_PCT)))
    # the relay's heap passes (relay/loop.py HeapKeeper): one is expected once the fleet
    # has connected, before the window; any in the window is in the figure above
    passes = [e for e in relay.events if e.get("event") == "heap"]
    inside = [e for e in passes if t0_mono <= float(e["t"]) <= t1_mono]
    row.lines.append(Line(
        "  relay heap passes (collect and freeze, when quiet)",
        ", ".join(f"{e['pass']} {float(e['pause_ms']):.0f} ms" for e in passes) or "none",
        f"{len(inside)} in the window", "", INFO))
    row.data = {"devices": connected, "relay_rss_kib_empty": base_kib,
                "relay_rss_kib_connected": held_kib, "kib_per_device": round(per_kib, 2),
                "cpu_pct_per_device": round(cpu_each, 5),
                "relay_cpu_s": round(cpu1 - cpu0, 3), "window_s": round(t1 - t0, 1),
                "relay_wakeups_per_device_per_s": round(wakeups_per_s, 4)}
    row.notes.append(
        f"One relay process (pinned to CPU 0) and {n} protocol clients (CPU 1) that connect "
        f"in batches of 20, say hello and then live as an idle daemon does: {schedule}; RSS "
        f"of the relay before connecting and after, CPU over {ws.plan.fleet_measure_s:g} s "
        f"starting {FLEET_WARMUP_S:g} s after the last device connected (the relay's one "
        "heap pass after a fleet connects falls in between, and is shown on its own).")
    if per_kib > FLEET_KIB_TARGET:
        row.findings.append(
            f"{per_kib:.1f} KiB per idle device. No codec state is held for a quiet session "
            "any more (libopus state is made on the first packet and freed when a turn or "
            "reply ends), and its queues, resume journal and reply pacer are made with "
            "their first use. What remains per idle connection: the WebSocket connection "
            "(its transport and buffers), the session, its upstream task and the upstream "
            "session object.")
    if cpu_each > FLEET_CPU_TARGET_PCT:
        per_wakeup = (cpu1 - cpu0) / connected / ((t1 - t0) * wakeups_per_s)
        row.findings.append(
            f"{cpu_each:.4f} % of a core per idle device: with nothing else to do, that is "
            f"{per_wakeup * 1e6:.0f} us of relay CPU for each wake-up an idle device causes "
            f"({schedule}; a heartbeat is a read, a parse of its messages and a written "
            "pong).")
    return row


