"""Malformed device messages for fuzzing a live relay, each with the close it must get.

Every case is wrong by construction (a random mutation of a valid message could
stay valid), and is sent either as the first message of a connection (before
``hello``) or right after a valid handshake.
"""

from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass

from edgevoice.protocol.messages import (
    MAX_TEXT_BYTES,
    CloseCode,
    Hello,
    TurnStart,
    encode_message,
)

PROTOCOL_ERROR = int(CloseCode.PROTOCOL_ERROR)


@dataclass(frozen=True)
class Case:
    """One malformed message and the close codes that are a correct answer to it."""

    kind: str
    data: str | bytes
    after_hello: bool
    closes: frozenset[int] = frozenset({PROTOCOL_ERROR})


def _junk_text(rng: random.Random) -> str:
    alphabet = '{}[]":,0123456789abcdefxyz \\\n\t\u00e9\u2603'
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
    try:
        json.loads(text)
    except ValueError:
        return text
    return "{" + text  # an accident produced valid JSON: break it


def _bad_header(rng: random.Random) -> bytes:
    """An audio frame whose header is wrong: version, kind, flags or length."""
    payload = rng.randbytes(rng.randint(1, 60))
    choice = rng.randrange(4)
    if choice == 0:
        return struct.pack("!BBBxII", rng.choice([0, 2, 7, 255]), 1, 0, 0, 0) + payload
    if choice == 1:
        return struct.pack("!BBBxII", 1, rng.choice([0, 2, 3, 200]), 0, 0, 0) + payload
    if choice == 2:
        return struct.pack("!BBBxII", 1, 1, rng.choice([0x08, 0x10, 0x80, 0xF8]), 0, 0) \
            + payload
    return rng.randbytes(rng.randint(0, 11))  # shorter than a header


def _wrong_fields(rng: random.Random) -> str:
    bodies: list[dict[str, object]] = [
        {"type": "turn_start"},  # missing turn_id
        {"type": "turn_start", "turn_id": "1"},
        {"type": "turn_start", "turn_id": 1.5},
        {"type": "turn_start", "turn_id": True},
        {"type": "turn_end", "turn_id": None},
        {"type": "ping", "id": 1},
        {"type": "ping", "id": 1, "sent_ms": 2**60},
        {"type": "pong", "id": [], "ping_sent_ms": 0},
        {"type": "stats", "values": [1, 2]},
        {"type": "interrupt", "turn_id": {}},
        {"type": rng.choice(["", "hello!", "TURN_START", "audio", "x" * 40])},
        {"no_type": 1},
        {"type": 7},
    ]
    body = rng.choice(bodies)
    if rng.random() < 0.5:
        body = {**body, "extra": rng.randint(0, 9)}  # unknown fields change nothing
    return json.dumps(body)


def _relay_only(rng: random.Random) -> str:
    return json.dumps(rng.choice([
        {"type": "transcript", "role": "user", "text": "hi"},
        {"type": "response_start"},
        {"type": "response_end"},
        {"type": "welcome", "session_id": "s"},
        {"type": "hello", "device": "again"},
    ]))


def _bad_hello(rng: random.Random, device: str) -> tuple[str, frozenset[int]]:
    choice = rng.randrange(5)
    if choice == 0:
        return encode_message(Hello(device=device, protocol=rng.choice([0, 2, 99]))), \
            frozenset({int(CloseCode.UNSUPPORTED_VERSION)})
    if choice == 1:
        return encode_message(Hello(device="someone-else")), \
            frozenset({int(CloseCode.POLICY_VIOLATION)})
    if choice == 2:
        body = json.loads(encode_message(Hello(device=device)))
        body["uplink"]["sample_rate_hz"] = rng.choice([8000, 48000, -1])
        return json.dumps(body), frozenset({PROTOCOL_ERROR})
    if choice == 3:
        body = json.loads(encode_message(Hello(device=device)))
        body["resume"] = {"session_id": rng.choice(["", "x" * 70]), "last_downlink_seq": 1}
        return json.dumps(body), frozenset({PROTOCOL_ERROR})
    return encode_message(TurnStart(1)), frozenset({PROTOCOL_ERROR})  # not a hello


def make_case(rng: random.Random, device: str) -> Case:
    """One malformed message, chosen at random among the kinds above."""
    roll = rng.randrange(100)
    if roll < 25:
        hello, closes = _bad_hello(rng, device)
        return Case("bad-hello", hello, after_hello=False, closes=closes)
    after = rng.random() < 0.6
    if roll < 40:
        return Case("junk-text", _junk_text(rng), after)
    if roll < 55:
        return Case("bad-header", _bad_header(rng), after)
    if roll < 70:
        return Case("wrong-fields", _wrong_fields(rng), after)
    if roll < 80:
        return Case("relay-only", _relay_only(rng), after_hello=True)
    if roll < 90:
        # uplink audio outside a turn (well-formed frame, wrong moment)
        frame = struct.pack("!BBBxII", 1, 1, 0, 0, 0) + b"\xf8\xff\xfe"
        return Case("audio-no-turn", frame, after_hello=True)
    if roll < 95:
        return Case("binary-first", rng.randbytes(rng.randint(12, 100)), after_hello=False)
    return Case("oversized", "x" * (MAX_TEXT_BYTES + rng.randint(1, 4000)),
                after, frozenset({int(CloseCode.MESSAGE_TOO_BIG)}))
