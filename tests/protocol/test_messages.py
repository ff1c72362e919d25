"""Round trips and malformed input for the wire messages."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from edgevoice.errors import LocalProtocolError, RemoteProtocolError
from edgevoice.protocol.messages import (
    AUDIO_HEADER_BYTES,
    MAX_TEXT_BYTES,
    MESSAGE_TYPES,
    AudioFlags,
    AudioFrame,
    AudioKind,
    DeviceCall,
    DeviceResult,
    Error,
    Hello,
    Interrupt,
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
    decode_message,
    encode_message,
)

EXAMPLES = [
    Hello(device="kitchen", software="edgevoice/0.1.0"),
    Hello(device="hall", resume=ResumeRequest(session_id="abc", last_downlink_seq=41)),
    Welcome(session_id="s-1", heartbeat_interval_ms=5000),
    Welcome(session_id="s-2", resume=ResumeResult(resumed=True, last_uplink_seq=9)),
    TurnStart(turn_id=3, trigger="button"),
    TurnEnd(turn_id=3, reason="release"),
    Interrupt(turn_id=3),
    Interrupt(),
    Transcript(role="assistant", text="Grüße, 世界", final=True, turn_id=2),
    ResponseStart(turn_id=2),
    ResponseEnd(turn_id=2, reason="interrupted"),
    Error(code="upstream_auth", message="credentials rejected", retryable=False),
    Ping(id=7, sent_ms=123456),
    Pong(id=7, ping_sent_ms=123456, sent_ms=99),
    Stats(values={"rtt_ms": 3.5, "frames_sent": 10}),
    DeviceCall(id="c7", name="timer.set", args={"seconds": 300, "label": "tea"}),
    DeviceResult(id="c7", ok=False, result={"error": "there is no timer 'tea'"}),
]


def test_every_message_type_has_an_example() -> None:
    assert {type(m) for m in EXAMPLES} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.TYPE)
def test_message_round_trip(message: object) -> None:
    text = encode_message(message)  # type: ignore[arg-type]
    assert json.loads(text)["type"] == message.TYPE  # type: ignore[attr-defined]
    assert decode_message(text) == message


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    assert decode_message('{"type":"turn_start","turn_id":1,"future":"x"}') == TurnStart(1)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("not json", "not valid JSON"),
        ("[1,2]", "not a JSON object"),
        ('{"turn_id": 1}', "no string 'type'"),
        ('{"type": "launch_missiles"}', "unknown message type"),
        ('{"type": "turn_start"}', "missing field 'turn_id'"),
        ('{"type": "turn_start", "turn_id": "1"}', "expected an integer"),
        ('{"type": "turn_start", "turn_id": true}', "expected an integer"),
        ('{"type": "transcript", "role": "robot", "text": "x"}', "is not one of"),
        ('{"type": "hello", "device": "d", "uplink": 5}', "expected an object"),
        ('{"type": "stats", "values": []}', "expected an object"),
        ('{"type": "error", "code": "x", "message": "y", "retryable": 1}', "true or false"),
        ('{"type": "ping", "id": 1, "sent_ms": 1e400}', "expected an integer"),
    ],
)
def test_malformed_control_messages_are_remote_errors(text: str, fragment: str) -> None:
    with pytest.raises(RemoteProtocolError, match=fragment):
        decode_message(text)


def test_oversized_control_message_is_refused() -> None:
    big = json.dumps({"type": "stats", "values": {"x": "a" * 20000}})
    with pytest.raises(RemoteProtocolError, match="too large"):
        decode_message(big)


def test_audio_frame_round_trip() -> None:
    frame = AudioFrame(AudioKind.UPLINK, seq=2**32 - 1, timestamp_ms=1234, payload=b"\x01" * 60,
                       flags=AudioFlags.START | AudioFlags.REPLAY)
    data = frame.encode()
    assert len(data) == AUDIO_HEADER_BYTES + 60
    assert AudioFrame.decode(data) == frame


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"\x01\x01\x00", "a header and a payload"),
        (bytes([1, 1, 0, 0]) + bytes(8), "a header and a payload"),  # empty payload
        (bytes([2, 1, 0, 0]) + bytes(9), "version 2"),
        (bytes([1, 9, 0, 0]) + bytes(9), "unknown audio kind"),
        (bytes([1, 1, 0x80, 0]) + bytes(9), "unknown audio flags"),
        (bytes([1, 1, 0, 0]) + bytes(8) + bytes(1300), "too large"),
    ],
)
def test_malformed_audio_frames_are_remote_errors(data: bytes, fragment: str) -> None:
    with pytest.raises(RemoteProtocolError, match=fragment):
        AudioFrame.decode(data)


def test_encoding_an_oversized_packet_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        AudioFrame(AudioKind.UPLINK, 0, 0, bytes(2000)).encode()


@given(st.binary(max_size=2000))
def test_audio_decoder_never_raises_anything_but_protocol_errors(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        AudioFrame.decode(data)


@given(st.text(max_size=300) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12).map(json.dumps))
def test_control_decoder_never_raises_anything_but_protocol_errors(text: str) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_message(text)


@given(st.sampled_from(sorted(MESSAGE_TYPES)), st.dictionaries(
    st.sampled_from(["turn_id", "device", "text", "role", "code", "message", "id", "sent_ms",
                     "values", "uplink", "resume", "session_id", "retryable", "ping_sent_ms"]),
    st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.just({}) | st.just([]),
    max_size=6))
def test_typed_fields_reject_wrong_shapes(kind: str, fields: dict[str, object]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_message(json.dumps({"type": kind, **fields}))


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('{"type": "ping", "id": true, "sent_ms": 1}', "expected an integer"),
        ('{"type": "ping", "id": 1, "sent_ms": "1"}', "expected an integer"),
        ('{"type": "ping", "id": 1}', "missing field 'sent_ms'"),
        ('{"type": "ping", "id": 9007199254740993, "sent_ms": 1}', "out of range"),
        ('{"type": "ping", "id": 1.5, "sent_ms": 1}', "expected an integer"),
        ('{"type": "stats", "values": null}', "must not be null|expected an object"),
        ('{"type": "stats", "values": "rtt 3"}', "expected an object"),
    ],
)
def test_a_malformed_heartbeat_gets_the_general_decoders_error(text: str, fragment: str) -> None:
    # the quick decoders of ping and stats answer only for well-formed ones
    with pytest.raises(RemoteProtocolError, match=fragment):
        decode_message(text)


@pytest.mark.parametrize("text", [
    '{"type": "ping", "id": 7, "sent_ms": -3, "later": [1]}',
    '{"type": "stats", "values": {"rtt_ms": 1.5, "nested": {"a": [1, null]}, "s": "x"}}',
    '{"type": "stats"}',
    '{"type": "stats", "values": {}}',
])
def test_a_heartbeat_decodes_as_the_general_decoder_would(text: str) -> None:
    from edgevoice.decoding import PROTOCOL_POLICY, decode

    body = json.loads(text)
    assert decode_message(text) == decode(MESSAGE_TYPES[body["type"]], body, PROTOCOL_POLICY)
    assert decode_message(text.encode()) == decode_message(text)


def test_a_short_text_of_wide_characters_is_measured_in_bytes() -> None:
    # 4,100 characters, 16,400 bytes of UTF-8: over the limit although len() is small
    wide = json.dumps({"type": "stats", "values": {"x": "\U0001F600" * 4096}},
                      ensure_ascii=False)
    assert len(wide) < MAX_TEXT_BYTES < len(wide.encode())
    with pytest.raises(RemoteProtocolError, match="too large"):
        decode_message(wide)


_JSON_ISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12)


@given(st.one_of(
    _JSON_ISH.map(lambda v: json.dumps(v, separators=(",", ":"))),
    st.tuples(_JSON_ISH, st.sampled_from(["", " ", "\n", "x", "}", ",1"]),
              st.sampled_from(["", " ", "\t"])).map(
        lambda t: t[2] + json.dumps(t[0]) + t[1]),
    st.text(max_size=40)))
@example("NaN")  # json.loads takes it: nan, which equals nothing, not even itself
@example('[1, -Infinity, {"a": NaN}]')
def test_control_text_is_parsed_as_json_loads_would(text: str) -> None:
    # the relay scans a message directly (messages._parse_json); what it accepts, and
    # the error it gives, are json.loads's
    from edgevoice.protocol.messages import _parse_json
    try:
        expected: object = json.loads(text)
    except ValueError as exc:
        expected = f"error {exc}"
    try:
        got: object = _parse_json(text)
    except ValueError as exc:
        got = f"error {exc}"
    assert got == expected or repr(got) == repr(expected)  # repr: NaN, at any depth
