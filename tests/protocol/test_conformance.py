"""The protocol cores against docs/protocol-vectors.json (what a C device is built from).

Each vector is checked both ways where it can be: decoding the wire form gives the
fields, encoding the fields gives the wire form. The resume exchange is replayed
through the real cores (Connection, ReplayJournal) with the file's Opus payloads
and must produce exactly the file's bytes and texts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from edgevoice.errors import RemoteProtocolError
from edgevoice.protocol.limits import opus_packet_duration_ms
from edgevoice.protocol.messages import (
    AudioFlags,
    AudioFrame,
    AudioKind,
    CloseCode,
    decode_message,
    encode_message,
)
from edgevoice.protocol.session import Closer, close_ends_session

sys.path.insert(0, str(Path(__file__).parent))
from vectors import resume_exchange

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parents[2] / "docs" / "protocol-vectors.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("vector", VECTORS["audio_frames"], ids=lambda v: v["note"])
def test_audio_frames(vector: dict[str, Any]) -> None:
    frame = AudioFrame.decode(bytes.fromhex(vector["hex"]))
    assert (frame.kind, frame.flags, frame.seq, frame.timestamp_ms, frame.payload.hex()) == (
        vector["kind"], vector["flags"], vector["seq"], vector["timestamp_ms"],
        vector["payload_hex"])
    built = AudioFrame(AudioKind(vector["kind"]), vector["seq"], vector["timestamp_ms"],
                       bytes.fromhex(vector["payload_hex"]), AudioFlags(vector["flags"]))
    assert built.encode().hex() == vector["hex"]


@pytest.mark.parametrize("vector", VECTORS["invalid_audio_frames"], ids=lambda v: v["why"])
def test_invalid_audio_frames(vector: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        AudioFrame.decode(bytes.fromhex(vector["hex"]))
    assert caught.value.close_code == vector["close_code"]


@pytest.mark.parametrize("vector", VECTORS["opus_packet_duration_ms"], ids=lambda v: v["note"])
def test_opus_durations(vector: dict[str, Any]) -> None:
    assert opus_packet_duration_ms(bytes.fromhex(vector["toc_hex"]) + b"\0" * 8) == vector["ms"]


@pytest.mark.parametrize("vector", VECTORS["messages"], ids=lambda v: v["type"])
def test_messages_round_trip(vector: dict[str, Any]) -> None:
    message = decode_message(vector["text"])
    assert vector["type"] == message.TYPE
    assert encode_message(message) == vector["text"]
    # key order and spacing do not matter
    shuffled = json.dumps(dict(reversed(list(json.loads(vector["text"]).items()))), indent=2)
    assert decode_message(shuffled) == message


@pytest.mark.parametrize("vector", VECTORS["invalid_messages"], ids=lambda v: v["why"])
def test_invalid_messages(vector: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        decode_message(vector["text"])
    assert caught.value.close_code == vector["close_code"]


def test_close_codes_and_which_end_the_session() -> None:
    listed = {v["code"]: v for v in VECTORS["close_codes"]}
    assert set(listed) == {int(c) for c in CloseCode}
    for code, vector in listed.items():
        assert CloseCode(code).name == vector["name"]
        assert close_ends_session(code, Closer.RELAY) is vector["ends_session_when_sent_by_relay"]
        assert close_ends_session(code, Closer.DEVICE) is \
            vector["ends_session_when_sent_by_device"]


def test_resume_exchange_is_what_the_cores_produce() -> None:
    steps = VECTORS["resume_exchange"]
    frames = [AudioFrame.decode(bytes.fromhex(s["hex"])) for s in steps if "hex" in s]
    up = [f.payload for f in frames if f.kind is AudioKind.UPLINK
          and not f.flags & AudioFlags.REPLAY]
    down = [f.payload for f in frames if f.kind is AudioKind.DOWNLINK
            and not f.flags & AudioFlags.REPLAY][:4]
    assert resume_exchange(up, down) == steps


def test_resume_exchange_replays_what_was_lost_and_continues_the_numbering() -> None:
    steps = VECTORS["resume_exchange"]
    drop = next(i for i, s in enumerate(steps) if s.get("event") == "drop")
    after = [AudioFrame.decode(bytes.fromhex(s["hex"])) for s in steps[drop:] if "hex" in s]
    replayed = [(f.kind, f.seq) for f in after if f.flags & AudioFlags.REPLAY]
    assert replayed == [(AudioKind.DOWNLINK, 2), (AudioKind.DOWNLINK, 3),
                        (AudioKind.UPLINK, 2)]
    assert [f.seq for f in after if not f.flags & AudioFlags.REPLAY] == [4]
