"""Builds docs/protocol-vectors.json from the protocol cores (run it to regenerate).

    .venv/bin/python tests/protocol/vectors.py > docs/protocol-vectors.json

The conformance test (test_conformance.py) checks the cores against the *file*, so a
change in the implementation that changes the wire shows up as a failing test, not
as silently regenerated vectors.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from typing import Any

from edgevoice.protocol.connection import Connection, Role
from edgevoice.protocol.messages import (
    AudioFlags,
    AudioFrame,
    AudioKind,
    CloseCode,
    Error,
    Hello,
    Interrupt,
    Message,
    Ping,
    Pong,
    ResponseEnd,
    ResponseStart,
    ResumeRequest,
    ResumeResult,
    Stats,
    Transcript,
    TurnEnd,
    TurnStart,
    Welcome,
    encode_message,
)
from edgevoice.protocol.replay import ReplayJournal, SentFrame
from edgevoice.protocol.session import Closer, close_ends_session

SESSION_ID = "5f1c0a9e2b7d4c3e8a6f0b1d2c3e4f50"


def opus_packets(n: int, rate_hz: int) -> list[bytes]:
    from edgevoice.audio.opus import OpusEncoder
    encoder = OpusEncoder(rate_hz)
    samples = rate_hz // 50
    return [encoder.encode(struct.pack(f"<{samples}h", *(
        int(6000 * math.sin(2 * math.pi * 300 * (k * samples + i) / rate_hz))
        for i in range(samples)))) for k in range(n)]


MESSAGES: list[Message] = [
    Hello(device="kitchen", software="edgevoice/0.1.0"),
    Hello(device="kitchen", software="edgevoice/0.1.0",
          resume=ResumeRequest(SESSION_ID, last_downlink_seq=41, downlink_messages=3)),
    Welcome(session_id=SESSION_ID),
    Welcome(session_id=SESSION_ID, resume=ResumeResult(True, 17, 2)),
    TurnStart(1, "wake"),
    TurnEnd(1, "silence"),
    Interrupt(1, "barge_in"),
    Transcript("user", "what time is it", True, 1),
    ResponseStart(1),
    ResponseEnd(1, "end_turn"),
    Error("upstream_throttled", "Nova Sonic is throttling this account; retrying", True),
    Ping(7, 123456),
    Pong(7, 123456, 98765),
    Stats({"timezone": "Europe/Paris", "rtt_ms": 12.5, "turns": 3}),
]

INVALID_TEXT: list[tuple[str, str]] = [
    ('{"type":"turn_start"}', "missing field turn_id"),
    ('{"type":"turn_start","turn_id":"1"}', "turn_id is not an integer"),
    ('{"type":"nonsense"}', "unknown type"),
    ('["hello"]', "not an object"),
    ('{"type":"transcript","role":"robot","text":"x"}', "role is not user or assistant"),
]


def frame_vector(frame: AudioFrame, note: str) -> dict[str, Any]:
    return {"note": note, "kind": int(frame.kind), "flags": int(frame.flags), "seq": frame.seq,
            "timestamp_ms": frame.timestamp_ms, "payload_hex": frame.payload.hex(),
            "hex": frame.encode().hex()}


def resume_exchange(up: list[bytes], down: list[bytes]) -> list[dict[str, Any]]:
    """A session, a drop that loses frames each way, and its resume (§7): the device
    sends the three ``up`` packets, the relay the four ``down`` ones."""
    steps: list[dict[str, Any]] = []

    def text(sender: str, data: str, note: str) -> None:
        steps.append({"from": sender, "text": data, "note": note})

    def binary(sender: str, data: bytes, note: str) -> None:
        steps.append({"from": sender, "hex": data.hex(), "note": note})

    device, relay = Connection(Role.DEVICE), Connection(Role.RELAY)
    d_journal, r_journal = ReplayJournal(500), ReplayJournal(500)
    t = device.start(Hello(device="kitchen", software="edgevoice/0.1.0"))
    text("device", t, "hello, no resume")
    relay.receive_text(t)
    t = relay.accept(Welcome(session_id=SESSION_ID))
    text("relay", t, "welcome: a new session")
    device.receive_text(t)
    t = device.send(TurnStart(1, "vad"))
    d_journal.record_message(device.messages_sent, TurnStart(1, "vad"), 0.0)
    text("device", t, "reliable device message 1")
    relay.receive_text(t)
    for i, packet in enumerate(up):
        flags = AudioFlags.START if i == 0 else AudioFlags.NONE
        frame, data = device.send_audio(packet, 20 * i, flags)
        d_journal.record_frame(frame, 0.0)
        lost = i == 2
        binary("device", data, f"uplink seq {i}{' (lost in the drop)' if lost else ''}")
        if not lost:
            relay.receive_binary(data)
    t = relay.send(ResponseStart(1))
    r_journal.record_message(relay.messages_sent, ResponseStart(1), 0.0)
    text("relay", t, "reliable relay message 1")
    device.receive_text(t)
    for i, packet in enumerate(down):
        flags = AudioFlags.START if i == 0 else AudioFlags.NONE
        frame, data = relay.send_audio(packet, 20 * i, flags)
        r_journal.record_frame(frame, 0.0)
        lost = i >= 2
        binary("relay", data, f"downlink seq {i}{' (lost in the drop)' if lost else ''}")
        if not lost:
            device.receive_binary(data)
    steps.append({"event": "drop", "note": "the TCP connection dies; no close frame (1006)"})
    # the resume
    request = ResumeRequest(SESSION_ID, device.last_received_seq, device.messages_received)
    device2 = Connection(Role.DEVICE, next_seq=device.next_seq,
                         last_received_seq=device.last_received_seq,
                         messages_sent=device.messages_sent,
                         messages_received=device.messages_received)
    t = device2.start(Hello(device="kitchen", software="edgevoice/0.1.0", resume=request))
    text("device", t, "hello asking to resume: has downlink up to seq 1 and 1 message")
    relay2 = Connection(Role.RELAY)
    relay2.receive_text(t)
    relay2.continue_session(next_seq=relay.next_seq, last_received_seq=relay.last_received_seq,
                            messages_sent=relay.messages_sent,
                            messages_received=relay.messages_received)
    t = relay2.accept(Welcome(session_id=SESSION_ID, resume=ResumeResult(
        True, relay2.last_received_seq, relay2.messages_received)))
    text("relay", t, "welcome: resumed; the relay has uplink up to seq 1 and 1 message")
    device2.receive_text(t)
    for entry in r_journal.after(request.last_downlink_seq, request.downlink_messages).items:
        assert isinstance(entry, SentFrame)
        data = relay2.replay_audio(entry.frame)
        binary("relay", data, f"replay of downlink seq {entry.frame.seq}, flag REPLAY")
        device2.receive_binary(data)
    for entry in d_journal.after(relay2.last_received_seq, relay2.messages_received).items:
        assert isinstance(entry, SentFrame)
        data = device2.replay_audio(entry.frame)
        binary("device", data, f"replay of uplink seq {entry.frame.seq}, flag REPLAY")
        relay2.receive_binary(data)
    t = device2.send(TurnEnd(1, "silence"))
    text("device", t, "new traffic: reliable device message 2")
    relay2.receive_text(t)
    _, data = relay2.send_audio(down[0], 80, AudioFlags.END)
    binary("relay", data, "new downlink frame: seq 4 continues the session")
    device2.receive_binary(data)
    return steps


def build() -> dict[str, Any]:
    up = opus_packets(2, 16_000)
    return {
        "about": "Test vectors for docs/protocol.md (edgevoice protocol v1). Text is UTF-8 "
                 "JSON as the reference implementation writes it; any key order and "
                 "spacing is as valid. Binary is hex.",
        "subprotocol": "edgevoice.v1",
        "audio_frames": [
            frame_vector(AudioFrame(AudioKind.UPLINK, 0, 0, up[0], AudioFlags.START),
                         "first uplink frame of an utterance"),
            frame_vector(AudioFrame(AudioKind.UPLINK, 1, 20, up[1]), "second uplink frame"),
            frame_vector(AudioFrame(AudioKind.DOWNLINK, 4294967295, 4294967276,
                                    opus_packets(1, 24_000)[0], AudioFlags.END),
                         "downlink, last seq and timestamp before wrapping, END"),
            frame_vector(AudioFrame(AudioKind.DOWNLINK, 9, 180, b"\xf8",
                                    AudioFlags.REPLAY), "a one-byte payload, REPLAY"),
        ],
        "invalid_audio_frames": [
            {"hex": "010100000000000000000000", "close_code": 1002, "why": "no payload"},
            {"hex": "0101", "close_code": 1002, "why": "shorter than a header"},
            {"hex": "020100000000000000000000f8", "close_code": 1002, "why": "version 2"},
            {"hex": "010300000000000000000000f8", "close_code": 1002, "why": "kind 3"},
            {"hex": "010108000000000000000000f8", "close_code": 1002,
             "why": "unknown flag bit 3"},
            {"hex": "01010000000000000000000000" + "00" * 1275, "close_code": 1002,
             "why": "payload of 1276 bytes"},
        ],
        "opus_packet_duration_ms": [
            {"toc_hex": "48", "ms": 20, "note": "SILK wideband 20 ms, one frame"},
            {"toc_hex": "f8", "ms": 20, "note": "CELT fullband 20 ms, one frame"},
            {"toc_hex": "e0", "ms": 2.5, "note": "CELT fullband 2.5 ms"},
            {"toc_hex": "58", "ms": 60, "note": "SILK wideband 60 ms: refused uplink"},
            {"toc_hex": "59", "ms": 120, "note": "two 60 ms frames: refused uplink"},
            {"toc_hex": "fb06", "ms": 120, "note": "code 3, six 20 ms frames: refused"},
        ],
        "messages": [{"type": m.TYPE, "text": encode_message(m)} for m in MESSAGES],
        "invalid_messages": [{"text": t, "close_code": 1002, "why": why}
                             for t, why in INVALID_TEXT],
        "close_codes": [
            {"code": int(code), "name": code.name,
             "ends_session_when_sent_by_relay": close_ends_session(code, Closer.RELAY),
             "ends_session_when_sent_by_device": close_ends_session(code, Closer.DEVICE)}
            for code in CloseCode],
        "resume_exchange": resume_exchange(opus_packets(3, 16_000), opus_packets(4, 24_000)),
    }


if __name__ == "__main__":
    json.dump(build(), sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")
