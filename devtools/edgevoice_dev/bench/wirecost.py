"""Row 16: the uplink on the real wire: wss://, TLS records and TCP/IP headers counted.

The real ``edgevoice device`` process speaks the speech fixture to a relay serving
wss:// (a throwaway CA, verification on) on 127.0.0.1. The kernel's own counters for
the device's TCP socket (``ss -ti``: bytes_sent, segs_out) give what went on the wire:
TLS records as sent, plus 52 bytes of IPv4 + TCP headers (with timestamps) per segment,
ACKs included. Wyoming's stream of the same speech (row 1's peer: raw PCM in 64 ms
``audio-chunk`` events over plain TCP) is counted the same way at one segment per chunk,
the most favourable case for it.

Then the options, measured offline on the same speech: Opus bitrate (bytes per frame,
and speech quality as the correlation of the 10 ms loudness envelope before and after an
Opus round trip) and frame packing (frames per TLS record and TCP segment, from the
overheads measured above). The product is not changed by this row; it reports.
"""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import time
from typing import Any

import numpy as np

from edgevoice.audio.base import CAPTURE_FRAME_BYTES
from edgevoice.audio.opus import OpusDecoder, OpusEncoder
from edgevoice_dev.bench.peers import WYOMING_SAMPLES_PER_CHUNK, wyoming_bytes
from edgevoice_dev.bench.plan import Workspace
from edgevoice_dev.bench.proc import Child, python_module
from edgevoice_dev.bench.results import INFO, Line, RowResult, fmt_bytes_per_s, verdict

logger = logging.getLogger(__name__)

IP_TCP_HEADER_BYTES = 52  # IPv4 20 + TCP 20 + timestamps option 12
TARGET_RATIO = 8.0
#: per frame inside a TLS record: edgevoice's 12-byte header + WebSocket framing
#: (2 bytes + 4 bytes of client mask)
FRAME_OVERHEAD_BYTES = 12 + 6
#: TLS 1.3 record: 5-byte header, 1-byte inner content type, 16-byte AEAD tag
TLS_RECORD_BYTES = 22


def socket_counters(peer_port: int) -> dict[str, int]:
    """bytes_sent and segs_out of the established TCP socket talking to ``peer_port``."""
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( dport = :{peer_port} )"],
                         capture_output=True, text=True, check=True).stdout
    found: dict[str, int] = {}
    for key in ("bytes_sent", "segs_out", "data_segs_out"):
        m = re.search(rf"\b{key}:(\d+)", out)
        if m:
            found[key] = int(m.group(1))
    return found


def envelope_correlation(a: np.ndarray, b: np.ndarray, rate: int = 16_000) -> float:
    """Correlation of the 10 ms RMS envelopes (dB) of two aligned signals."""
    n = min(len(a), len(b)) // (rate // 100) * (rate // 100)
    def env(x: np.ndarray) -> np.ndarray:
        blocks = x[:n].astype(np.float64).reshape(-1, rate // 100)
        return 10 * np.log10(np.mean(blocks ** 2, axis=1) + 1.0)
    return float(np.corrcoef(env(a), env(b))[0, 1])


def bitrate_options(pcm: bytes, rates: tuple[int, ...] = (12_000, 16_000, 20_000, 24_000)
                    ) -> list[dict[str, Any]]:
    """Per bitrate: mean Opus packet bytes and envelope correlation after a round trip."""
    frames = [pcm[i:i + CAPTURE_FRAME_BYTES]
              for i in range(0, len(pcm) - CAPTURE_FRAME_BYTES + 1, CAPTURE_FRAME_BYTES)]
    ref = np.frombuffer(b"".join(frames), dtype=np.int16)
    voiced = [k for k, f in enumerate(frames)
              if np.abs(np.frombuffer(f, dtype=np.int16)).max() > 500]
    out = []
    for rate in rates:
        enc, dec = OpusEncoder(bitrate_bps=rate), OpusDecoder()
        packets = [enc.encode(f) for f in frames]
        decoded = np.frombuffer(b"".join(dec.decode(p) for p in packets), dtype=np.int16)
        delay = enc.lookahead_samples
        corr = envelope_correlation(ref[: len(ref) - delay], decoded[delay:])
        sizes = [len(packets[k]) for k in voiced] or [len(p) for p in packets]
        out.append({"bitrate_bps": rate, "opus_bytes_per_frame": round(float(np.mean(sizes)), 1),
                    "envelope_correlation": round(corr, 4)})
    return out


def projected_wire(opus_bytes: float, frames_per_packet: int) -> float:
    """Wire bytes per second while speaking when ``frames_per_packet`` 20 ms frames share
    one TLS record and one TCP segment (device -> relay, ACKs not counted)."""
    per_packet = (frames_per_packet * (opus_bytes + FRAME_OVERHEAD_BYTES) + TLS_RECORD_BYTES
                  + IP_TCP_HEADER_BYTES)
    return per_packet * 50 / frames_per_packet


async def run_row(ws: Workspace) -> RowResult:
    started = time.monotonic()
    row = RowResult(16, "Uplink on the real wire: wss://, TLS and TCP/IP headers")
    fixture = ws.fixture
    relay = await ws.relay("wire-relay", "reply", "--tls-dir", str(ws.root / "tls"))
    device: Child | None = None
    port = int(relay.events[0]["port"])
    try:
        config = ws.device_config("wire-device", f"wss://127.0.0.1:{port}/",
                                  f"wav:{fixture.path}", f"wav:{ws.root / 'wire-out.wav'}",
                                  log_level="warning")
        text = config.read_text().replace(
            "relay:\n", f"relay:\n  ca_file: \"{ws.root / 'tls' / 'ca.pem'}\"\n", 1)
        config.write_text(text)
        device = await ws.spawn("wire-device", python_module("edgevoice", "device",
                                                             "--config", str(config)))
        deadline = time.monotonic() + 30
        first: dict[str, int] = {}
        while not first and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            first = socket_counters(port)
        if not first:
            raise RuntimeError("the device never connected to the wss:// relay")
        await asyncio.sleep(fixture.duration_s + 1.0)
        last = socket_counters(port)
        count = len(relay.events)
        await device.stop()
        device = None
        await relay.stop(30)
        counters: dict[str, Any] = next((e.get("counters", {}) for e in relay.events[count:]
                         if e.get("event") == "stopped"), {})
    finally:
        if device is not None:
            await device.stop()
        await relay.stop()
    frames = int(counters.get("frames_in", 0))
    if not frames:
        raise RuntimeError("the relay received no audio over wss://")
    wire = last["bytes_sent"] + IP_TCP_HEADER_BYTES * last["segs_out"]
    per_frame = wire / frames
    speaking = per_frame * 50
    wy = await wyoming_bytes(fixture.pcm)
    wy_chunks_per_s = 16_000 / WYOMING_SAMPLES_PER_CHUNK
    wy_wire = wy.streaming_bps + IP_TCP_HEADER_BYTES * wy_chunks_per_s
    ratio = wy_wire / speaking
    row.lines.append(Line("uplink bytes/s on the wire while speaking (TLS + TCP/IP)",
                          fmt_bytes_per_s(speaking), f"wyoming {fmt_bytes_per_s(wy_wire)}",
                          f"<= 1/{TARGET_RATIO:g} of wyoming", verdict(ratio >= TARGET_RATIO)))
    row.lines.append(Line("  ratio to wyoming", f"1/{ratio:.1f}", "", "", INFO))
    row.lines.append(Line("  per 20 ms frame: bytes / TCP segments",
                          f"{per_frame:.0f} B / {last['segs_out'] / frames:.2f}",
                          f"{frames} frames", "", INFO))
    options = bitrate_options(fixture.pcm)
    for opt in options:
        one, three = (projected_wire(opt["opus_bytes_per_frame"], k) for k in (1, 3))
        row.lines.append(Line(
            f"  option: {opt['bitrate_bps'] // 1000} kbps, envelope corr "
            f"{opt['envelope_correlation']:.3f}",
            f"{fmt_bytes_per_s(one)} (1/{wy_wire / one:.1f})",
            f"3 frames a packet: {fmt_bytes_per_s(three)} (1/{wy_wire / three:.1f})", "", INFO))
    row.data = {"wire_bytes": wire, "tcp": last, "frames": frames,
                "bytes_per_s_speaking": round(speaking), "wyoming_wire_bytes_per_s":
                round(wy_wire), "ratio": round(ratio, 2), "options": options}
    row.notes.append(
        "Device -> relay over wss:// on 127.0.0.1 (TLS verified against a throwaway CA). "
        "Wire bytes = the device socket's bytes_sent (TLS records: handshake, hello, audio, "
        "pings, stats) + 52 bytes of IPv4/TCP headers per segment sent (ACKs included), "
        "from `ss -ti`; divided by the audio frames the relay received, times 50 frames/s. "
        "Wyoming: row 1's payload rate for the same speech + one header per 64 ms chunk. "
        "Options: Opus at each bitrate on the same speech (envelope correlation of 10 ms "
        "loudness, 1.0 = same contour); packing projected with the measured per-record "
        "and per-segment overheads (TLS 1.3 record 22 B, WebSocket + edgevoice 18 B). "
        "The WAV microphone hands over `audio.capture_block_ms` (60 ms) blocks, as the "
        "sound card does; what the device queued together leaves in one write.")
    if ratio < TARGET_RATIO:
        best = next((o for o in options
                     if wy_wire / projected_wire(o["opus_bytes_per_frame"], 1) >= TARGET_RATIO
                     and o["envelope_correlation"] >= 0.95), None)
        row.findings.append(
            f"Every 20 ms frame travels in its own TLS record and TCP segment: {per_frame:.0f} "
            f"bytes on the wire for about {options[-1]['opus_bytes_per_frame']:.0f} bytes of "
            "Opus. "
            + (f"At {best['bitrate_bps'] // 1000} kbps (envelope correlation "
               f"{best['envelope_correlation']:.3f}) one frame a packet already meets 1/8; "
               if best else "No bitrate alone reaches 1/8 with one frame a packet; ")
            + "packing frames into one record (40-60 ms of latency while speaking, none at "
            "the end of a turn if the last frames are flushed) is what the table projects.")
    row.seconds = time.monotonic() - started
    return row
