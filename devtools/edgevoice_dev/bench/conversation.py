"""Rows 1, 2 and 7: the real ``edgevoice device`` process in a conversation.

One run serves three rows. A relay process (bench upstream: a 600 ms spoken reply
to each turn, streamed at real time) and ``edgevoice device`` (WAV microphone and
WAV speaker at 48 kHz, both at real time) talk through a counting proxy while the
device speaks the speech fixture. Then:

* row 1: the device's uplink bytes on the wire, against the two peers streaming
  the same speech (:mod:`edgevoice_dev.bench.peers`);
* row 2: the device process's CPU time over the conversation, against the floor
  (libopus and soxr alone on the same frames, :mod:`edgevoice_dev.bench.floor`);
* row 7: its resident memory in that steady state, and the time from starting the
  process to ``READY=1`` (or, while the daemon does not send it yet, to the log
  line saying the relay answered).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevoice.config.model import DeviceConfig
from edgevoice_dev.bench.fixtures import SpeechFixture, build_speech
from edgevoice_dev.bench.floor import Floor, measure_floor
from edgevoice_dev.bench.lean import LeanRun, measure_lean
from edgevoice_dev.bench.life import thread_cpu, thread_shares
from edgevoice_dev.bench.peers import PeerBytes, nova_json_bytes, wyoming_bytes
from edgevoice_dev.bench.plan import OUTPUT_RATE_HZ, PLAIN_AEC_MODE, REPLY_MS, Workspace
from edgevoice_dev.bench.proc import (
    Child,
    busy_pct,
    cpu_busy_ticks,
    cpu_seconds,
    memory_kib,
    python_module,
)
from edgevoice_dev.bench.profiles import summarize
from edgevoice_dev.bench.results import (
    INFO,
    Line,
    RowResult,
    fmt_bytes_per_s,
    fmt_kb,
    verdict,
)
from edgevoice_dev.bench.wire import OPCODE_BINARY, CountingProxy
from edgevoice_dev.testing.soundcard import VirtualSoundCard, missing_tools

logger = logging.getLogger(__name__)

DEVICE = "bench-device"
WARMUP_S = 1.0
CPU_TARGET_FLOOR_RATIO = 3.0
CPU_TARGET_CORE_PCT = 2.0
#: Passes of the floor's codec work, the best one taken. Three let a moment of load on
#: the machine through (measured here, four floors each: 437-532 ms of CPU with three
#: passes, 430-438 ms with nine), and that flattered the ratio by up to a fifth.
FLOOR_PASSES = 9
RSS_TARGET_MB = 60.0
READY_TARGET_S = 1.5
BANDWIDTH_TARGET_RATIO = 1 / 8


@dataclass
class NotifyListener:
    """A bound NOTIFY_SOCKET: what the daemon tells systemd, and when."""

    sock: socket.socket
    messages: list[tuple[float, str]] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def on_readable(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                text = self.sock.recv(4096).decode("utf-8", "replace")
                self.messages.append((time.monotonic(), text))
                if "READY=1" in text.splitlines():
                    self.ready.set()

    def first(self, key: str) -> float | None:
        for at, text in self.messages:
            if key in text.splitlines():
                return at
        return None


@dataclass
class ConversationRun:
    window_s: float
    cpu_s: float
    up_frames_in_window: int
    down_frames_in_window: int
    rss_kib: list[int]
    hwm_kib: int
    started_at: float
    connected_at: float
    ready_at: float | None
    notify_messages: list[str]
    proxy: CountingProxy
    relay_counters: dict[str, Any]
    #: how busy the whole machine was over the window (all cores, anyone's work)
    machine_busy_pct: float
    #: % of a core per thread of the device, the busiest first ("tid name")
    threads: list[tuple[str, float]] = field(default_factory=list)


async def _conversation(ws: Workspace, fixture: SpeechFixture | None = None,
                        profile_out: Path | None = None, card: bool = False) -> ConversationRun:
    """One conversation: WAV stand-ins, or with ``card`` the virtual sound card (the
    fixture played into its microphone at real time, the reply to its speaker)."""
    fixture = fixture or ws.fixture
    notify_path = ws.root / f"notify-{'profile' if profile_out else 'run'}.sock"
    notify_path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.setblocking(False)
    listener = NotifyListener(sock)
    loop = asyncio.get_running_loop()
    loop.add_reader(sock.fileno(), listener.on_readable)
    relay: Child | None = None
    device: Child | None = None
    proxy: CountingProxy | None = None
    sound_card: VirtualSoundCard | None = None
    player: subprocess.Popen[bytes] | None = None
    suffix = "-card" if card else ""
    try:
        relay = await ws.relay(f"conversation-relay{suffix}", "reply")
        proxy = CountingProxy(int(relay.events[0]["port"]), websocket=True)
        port = await proxy.start()
        env = {"NOTIFY_SOCKET": str(notify_path)}
        if card:
            sound_card = VirtualSoundCard()
            sound_card.start()
            env = {**sound_card.environ(), **env}
            audio_in, audio_out = "default", "default"
        else:
            audio_in, audio_out = f"wav:{fixture.path}", f"wav:{ws.root / 'heard.wav'}"
        config = ws.device_config(f"{DEVICE}{suffix}", f"ws://127.0.0.1:{port}/",
                                  audio_in, audio_out, aec_mode=PLAIN_AEC_MODE)
        argv = ["edgevoice", "device", "--config", str(config)]
        if profile_out is not None:
            argv = ["edgevoice_dev.bench.profiled", "--on-signal", str(profile_out), *argv]
        device = await ws.spawn(f"conversation-device{suffix}", python_module(*argv), env=env)
        connected_at = await device.line("connected to", 30)
        if sound_card is not None:
            # the room starts talking once the device listens, as the WAV microphone does
            player = sound_card.play_into_mic(fixture.path, wait=False)
        # READY=1 comes right after the relay answers, if the daemon sends it at all.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(listener.ready.wait(), 2.0)
        window_start = connected_at + WARMUP_S
        await asyncio.sleep(max(0.0, window_start - time.monotonic()))
        if profile_out is not None:
            device.proc.send_signal(signal.SIGUSR2)  # steady state: start profiling now
        cpu0, threads0 = cpu_seconds(device.pid), thread_cpu(device.pid)
        ticks0 = cpu_busy_ticks()
        t0 = time.monotonic()
        window_end = connected_at + fixture.duration_s + 0.5
        rss: list[int] = []
        while (now := time.monotonic()) < window_end:
            rss.append(memory_kib(device.pid).get("VmRSS", 0))
            await asyncio.sleep(min(0.5, window_end - now))
        cpu1, threads1 = cpu_seconds(device.pid), thread_cpu(device.pid)
        ticks1 = cpu_busy_ticks()
        t1 = time.monotonic()
        threads = thread_shares(device.pid, threads0, threads1,
                                100 * (cpu1 - cpu0) / (t1 - t0), t1 - t0)
        hwm = memory_kib(device.pid).get("VmHWM", 0)
        up_frames = sum(c.up.binary_frames_between(t0, t1)
                        for c in proxy.connections if c.up is not None)
        down_frames = sum(c.down.binary_frames_between(t0, t1)
                          for c in proxy.connections if c.down is not None)
        await device.stop()
        stopped = await _stop_relay(relay)
        return ConversationRun(
            window_s=t1 - t0, cpu_s=cpu1 - cpu0, up_frames_in_window=up_frames,
            down_frames_in_window=down_frames, rss_kib=rss, hwm_kib=hwm,
            started_at=device.started_at, connected_at=connected_at,
            ready_at=listener.first("READY=1"),
            notify_messages=[text for _, text in listener.messages],
            proxy=proxy, relay_counters=stopped, machine_busy_pct=busy_pct(ticks0, ticks1),
            threads=[(name, pct) for name, pct in threads if pct >= 0.01])
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()
        if device is not None:
            await device.stop()
        if relay is not None:
            await relay.stop()
        if proxy is not None:
            await proxy.close()
        if player is not None and player.poll() is None:
            player.kill()
            player.wait()
        if sound_card is not None:
            sound_card.stop()


async def _stop_relay(relay: Child) -> dict[str, Any]:
    count = len(relay.events)
    await relay.stop()
    for event in relay.events[count:]:
        if event.get("event") == "stopped":
            counters: dict[str, Any] = event.get("counters", {})
            return counters
    return {}


def _bandwidth_row(ws: Workspace, run: ConversationRun, peers: list[PeerBytes]) -> RowResult:
    row = RowResult(1, "Uplink bandwidth while speaking")
    ups = [c.up for c in run.proxy.connections if c.up is not None]
    audio_frames = sum(t.tally(OPCODE_BINARY).frames for t in ups)
    audio_wire = sum(t.tally(OPCODE_BINARY).wire_bytes for t in ups)
    audio_payload = sum(t.tally(OPCODE_BINARY).payload_bytes for t in ups)
    control = sum(t.control_bytes for t in ups)
    handshake = sum(t.handshake_bytes for t in ups)
    session = sum(c.up_bytes for c in run.proxy.connections)
    streamed_s = audio_frames * 0.02
    rate = audio_wire / streamed_s if streamed_s else 0.0
    duration = ws.fixture.duration_s
    wyoming = next(p for p in peers if p.name == "wyoming")
    ratio = rate / wyoming.streaming_bps if wyoming.streaming_bps else float("nan")
    row.lines.append(Line("bytes/s on the wire while streaming speech",
                          fmt_bytes_per_s(rate),
                          f"wyoming {fmt_bytes_per_s(wyoming.streaming_bps)}",
                          "<= 1/8 of wyoming", verdict(ratio <= BANDWIDTH_TARGET_RATIO)))
    row.lines.append(Line("  ratio to wyoming", f"1/{1 / ratio:.1f}" if ratio else "n/a",
                          "", "<= 1/8", INFO))
    for peer in peers:
        if peer.name != "wyoming":
            row.lines.append(Line("", "", f"{peer.name} {fmt_bytes_per_s(peer.streaming_bps)}",
                                  "", INFO))
    per_min = 60.0 / duration
    first = True
    for peer in peers:
        row.lines.append(Line("bytes per session, scaled to 60 s" if first else "",
                              fmt_kb(session * per_min) if first else "",
                              f"{peer.name} {fmt_kb(peer.session_bytes * per_min)}", "", INFO))
        first = False
    row.data = {
        "speech": {"duration_s": duration, "speech_s": round(ws.fixture.speech_s, 2),
                   "speech_fraction": round(ws.fixture.speech_fraction, 3),
                   "phrases": ws.fixture.phrases, "source": ws.fixture.source},
        "edgevoice": {
            "transport": "WebSocket edgevoice.v1: 12-byte header + one Opus packet per "
                         "binary message, 20 ms frames, speech only",
            "audio_frames": audio_frames, "streamed_s": round(streamed_s, 2),
            "audio_wire_bytes": audio_wire, "opus_and_header_bytes": audio_payload,
            "control_bytes": control, "handshake_bytes": handshake,
            "session_bytes": session, "connections": len(run.proxy.connections),
            "streaming_bytes_per_s": round(rate, 1),
            "bytes_per_speech_s": round(session / ws.fixture.speech_s, 1)
            if ws.fixture.speech_s else None,
            "opus": _opus_settings(),
        },
        "peers": [p.as_dict() for p in peers],
        "ratio_to_wyoming": round(ratio, 4),
    }
    row.notes.append(
        f"The same {duration:.0f} s session of speech ({100 * ws.fixture.speech_fraction:.0f} % "
        f"speech, {ws.fixture.phrases} phrases, {ws.fixture.source}) through one counting "
        "TCP proxy for all three; TCP payload bytes client to server, WebSocket framing "
        "included, IP and TCP headers not.")
    row.notes.append(
        f"edgevoice sends only speech (silence detector, {audio_frames} frames = "
        f"{streamed_s:.1f} s streamed of {duration:.0f} s); the peers stream continuously "
        "while listening, so per session the gap is wider than while speaking.")
    return row


def _opus_settings() -> dict[str, Any]:
    opus = DeviceConfig().opus
    return {"bitrate_bps": opus.bitrate_bps, "complexity": opus.complexity, "fec": opus.fec,
            "expected_loss_pct": opus.expected_loss_pct, "dtx": opus.dtx}


def _cpu_lines(ws: Workspace, run: ConversationRun, what: str
               ) -> tuple[list[Line], dict[str, Any], Floor]:
    """Row 2's lines and figures for one conversation run (``what``: its audio path)."""
    floor = measure_floor(ws.fixture.pcm, ws.reply_path.read_bytes(), run.up_frames_in_window,
                          run.down_frames_in_window, OUTPUT_RATE_HZ, passes=FLOOR_PASSES)
    device_pct = 100.0 * run.cpu_s / run.window_s
    floor_pct = 100.0 * floor.total_s / run.window_s
    ratio = device_pct / floor_pct if floor_pct else float("inf")
    lines = [Line(f"CPU per second of conversation, {what}, % of one core",
                  f"{device_pct:.2f} %", f"floor {floor_pct:.3f} %",
                  f"<= {CPU_TARGET_CORE_PCT:g} %", verdict(device_pct <= CPU_TARGET_CORE_PCT)),
             Line("  ratio to the floor", f"{ratio:.1f}x", "1x",
                  f"<= {CPU_TARGET_FLOOR_RATIO:g}x", verdict(ratio <= CPU_TARGET_FLOOR_RATIO))]
    data = {"window_s": round(run.window_s, 2), "cpu_s": round(run.cpu_s, 3),
            "device_pct_of_core": round(device_pct, 3), "floor_pct_of_core": round(floor_pct, 4),
            "ratio_to_floor": round(ratio, 2), "floor": floor.as_dict(),
            "uplink_frames": run.up_frames_in_window,
            "downlink_frames": run.down_frames_in_window,
            "machine_busy_pct": round(run.machine_busy_pct, 1),
            "threads": [[n, round(p, 3)] for n, p in run.threads]}
    return lines, data, floor


def _cpu_row(ws: Workspace, run: ConversationRun, card: ConversationRun | None = None,
             card_missing: str = "", lean: LeanRun | None = None) -> RowResult:
    row = RowResult(2, "Device CPU, full-duplex conversation")
    opus = _opus_settings()
    wav_lines, wav_data, floor = _cpu_lines(ws, run, "WAV stand-ins")
    row.lines += wav_lines
    lean_data: dict[str, Any] | None = None
    if lean is not None:
        lean_floor = measure_floor(ws.fixture.pcm, ws.reply_path.read_bytes(), lean.up_frames,
                                   lean.down_frames, OUTPUT_RATE_HZ, passes=FLOOR_PASSES)
        lean_floor_pct = 100.0 * lean_floor.total_s / lean.window_s
        lean_ratio = lean.pct / lean_floor_pct if lean_floor_pct else float("inf")
        row.lines.append(Line(
            "  the same codec work in the leanest Python loop (no protocol, no detector)",
            f"{lean.pct:.2f} % ({lean_ratio:.1f}x)", f"floor {lean_floor_pct:.3f} %", "",
            INFO))
        lean_data = {**lean.as_dict(), "floor": lean_floor.as_dict(),
                     "floor_pct_of_core": round(lean_floor_pct, 4),
                     "ratio_to_floor": round(lean_ratio, 2)}
    card_data: dict[str, Any] | None = None
    if card is not None:
        card_lines, card_data, _ = _cpu_lines(ws, card, "sound card (PortAudio, PulseAudio)")
        row.lines += card_lines
    else:
        row.lines.append(Line("CPU per second of conversation, sound card", "not measured",
                              card_missing, f"<= {CPU_TARGET_FLOOR_RATIO:g}x the floor", INFO))
    row.lines.append(Line("  Opus complexity (uplink encoder)", str(opus["complexity"]),
                          f"{opus['bitrate_bps'] // 1000} kbps, FEC "
                          f"{'on' if opus['fec'] else 'off'}", "", INFO))
    row.data = {**wav_data, "opus": opus, "output_rate_hz": OUTPUT_RATE_HZ,
                "reply_ms_per_turn": REPLY_MS,
                "cpu_time_source": "/proc/PID/stat utime+stime (10 ms ticks)",
                "aec_mode": PLAIN_AEC_MODE,
                "sound_card": card_data, "lean_loop": lean_data}
    row.notes.append(
        f"`edgevoice device` in its own process, WAV microphone and 48 kHz WAV speaker at "
        f"real time, talking to a relay process whose upstream answers every turn with "
        f"{REPLY_MS} ms of speech. Over {run.window_s:.1f} s the device sent "
        f"{run.up_frames_in_window} and played {run.down_frames_in_window} 20 ms frames; "
        f"capture and playback ran the whole time. The machine was {run.machine_busy_pct:.0f} % "
        "busy over that window (all cores, every process). Echo cancellation "
        f"(aec.mode) {PLAIN_AEC_MODE}: the device a plain install gets (AEC3 is the optional aec "
        "extra, outside the floor; row 8 prices it).")
    if card is not None:
        row.notes.append(
            "Sound card: the same conversation through the virtual sound card "
            "(scripts/soundcard: PulseAudio null sinks through ALSA's pulse plugin), the "
            "fixture played into its microphone at real time by paplay (not counted) and the "
            "reply played to its speaker, so PortAudio's callback threads and the sound "
            f"server's client threads run as on a board: {card.up_frames_in_window} frames "
            f"sent, {card.down_frames_in_window} played over {card.window_s:.1f} s, the "
            f"machine {card.machine_busy_pct:.0f} % busy; its floor is computed from its own "
            "frame counts.")
    row.notes.append(
        f"Floor: Opus encode of those {run.up_frames_in_window} frames (complexity "
        f"{opus['complexity']}, {opus['bitrate_bps'] // 1000} kbps) + decode of the "
        f"{run.down_frames_in_window} 24 kHz frames to {OUTPUT_RATE_HZ // 1000} kHz, as the "
        f"device does, in-process, best of {FLOOR_PASSES}: {floor.total_s * 1000:.1f} ms "
        f"of CPU in all (encode {floor.encode_s * 1000:.1f}, decode "
        f"{floor.decode_s * 1000:.1f}, resample {floor.resample_s * 1000:.1f}).")
    if lean is not None:
        row.notes.append(
            "Leanest Python loop (edgevoice_dev.bench.lean): a process whose asyncio loop "
            "wakes once per 60 ms block, measures each frame's level, Opus-encodes as many "
            f"frames a second as the device sent ({lean.up_frames} in {lean.window_s:.1f} s) "
            "and writes each block's packets to a TCP socket in one write, and decodes the "
            f"{lean.down_frames} reply packets its peer sends to 48 kHz into a buffer; no "
            "WebSocket, no detector or turn state, no playback pacing, no file, no health. "
            "What it costs above the floor, no Python design of the device goes below.")
    if row.missed:
        for what, r, data in (("WAV stand-ins", run, wav_data), ("sound card", card, card_data)):
            if r is None or data is None:
                continue
            spent = r.cpu_s - float(data["floor"]["total_s"])
            row.findings.append(
                f"{what}: the device spends {spent * 1000 / r.window_s:.1f} ms of CPU per "
                f"second outside libopus and soxr, {data['ratio_to_floor']:.1f} times what the "
                f"codecs need; the uplink encoder is "
                f"{100 * float(data['floor']['encode_s']) / max(r.cpu_s, 1e-9):.0f} % of the "
                "device's CPU. Per thread (% of a core): "
                + ", ".join(f"{n.split(' ', 1)[1]} {p:.2f}" for n, p in r.threads[:6])
                + ". Where the event loop's share goes: the profile below (steady state, "
                "WAV stand-ins).")
        if lean_data is not None:
            lean_ratio = float(lean_data["ratio_to_floor"])
            row.findings.append(
                f"The leanest Python loop doing the same codec work costs {lean_ratio:.1f}x the "
                f"floor by itself ({lean_data['pct_of_core']:.2f} % against the device's "
                f"{wav_data['device_pct_of_core']:.2f} % with WAV stand-ins): "
                + (f"a ratio of {CPU_TARGET_FLOOR_RATIO:g}x leaves no room for the protocol, "
                   "the detector, turn-taking and playback in Python at this cadence; it needs "
                   "the per-frame path in compiled code." if lean_ratio >= CPU_TARGET_FLOOR_RATIO
                   else f"{CPU_TARGET_FLOOR_RATIO - lean_ratio:.1f}x of the floor is left for "
                   "the protocol, the detector, turn-taking and playback."))
    return row


def _footprint_row(run: ConversationRun) -> RowResult:
    row = RowResult(7, "Device footprint")
    steady = run.rss_kib[len(run.rss_kib) // 2:] or run.rss_kib
    rss_mb = statistics.median(steady) / 1024 if steady else float("nan")
    hwm_mb = run.hwm_kib / 1024
    if run.ready_at is not None:
        ready_s, what = run.ready_at - run.started_at, "start -> READY=1"
    else:
        ready_s, what = run.connected_at - run.started_at, "start -> relay answered (log)"
    row.lines.append(Line("resident memory, steady state", f"{rss_mb:.1f} MB",
                          f"peak {hwm_mb:.1f} MB", f"<= {RSS_TARGET_MB:g} MB",
                          verdict(rss_mb <= RSS_TARGET_MB)))
    row.lines.append(Line(what, f"{ready_s:.2f} s", "", f"<= {READY_TARGET_S:g} s",
                          verdict(ready_s <= READY_TARGET_S)))
    row.data = {"rss_mb": round(rss_mb, 2), "peak_rss_mb": round(hwm_mb, 2),
                "rss_samples_kib": run.rss_kib, "start_to_ready_s": round(ready_s, 3),
                "ready_signal": "READY=1" if run.ready_at is not None else "log line",
                "notify_messages": run.notify_messages[:10]}
    row.notes.append("RSS from /proc/PID/status (VmRSS, median of the second half of the "
                     "conversation; VmHWM as the peak). Start is the moment the bench spawned "
                     "`python -m edgevoice device`.")
    if run.ready_at is None:
        row.notes.append("The daemon sent no READY=1 on NOTIFY_SOCKET, so the start time is "
                         "measured to its 'connected to' log line, the moment it would be "
                         "ready (audio open, relay answered).")
    return row


async def run_rows(ws: Workspace) -> tuple[RowResult, RowResult, RowResult]:
    started = time.monotonic()
    run = await _conversation(ws)
    card: ConversationRun | None = None
    missing = ", ".join(missing_tools())
    if missing:
        missing = f"missing: {missing}"
    else:
        try:
            card = await _conversation(ws, card=True)
        except Exception as exc:  # the WAV figures stand on their own
            logger.exception("the sound card conversation failed")
            missing = f"failed: {type(exc).__name__}: {exc}"
    lean: LeanRun | None = None
    try:  # the leanest Python doing the same codec work at the rates the device ran
        lean = await measure_lean(ws, run.window_s, run.up_frames_in_window / run.window_s,
                                  run.down_frames_in_window / run.window_s)
    except Exception:  # the row stands without it
        logger.exception("the lean reference loop failed")
    peers = [await wyoming_bytes(ws.fixture.pcm), await nova_json_bytes(ws.fixture.pcm),
             await nova_json_bytes(ws.fixture.pcm, deflate=True)]
    rows = (_bandwidth_row(ws, run, peers), _cpu_row(ws, run, card, missing, lean),
            _footprint_row(run))
    for row in rows:
        row.seconds = time.monotonic() - started
    return rows


async def profile_device(ws: Workspace, seconds: float = 20.0) -> str:
    """The device's CPU profile over a conversation like row 2's (not measured)."""
    fixture = build_speech(ws.root / "speech", seconds)
    out = ws.root / "device.prof"
    await _conversation(ws, fixture, profile_out=out)
    return summarize(out, title=f"`edgevoice device`, {seconds:.0f} s conversation, cProfile "
                                "(CPU time)")
