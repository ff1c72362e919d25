"""The AWS event-stream codec: round trips, the SDK's view of our frames, corruption."""

from __future__ import annotations

import contextlib
import datetime
import io
import uuid

import pytest
from edgevoice_dev.testing.eventstream import (
    EventStreamError,
    Message,
    MessageDecoder,
    decode_message,
    encode_message,
)
from hypothesis import given, settings
from hypothesis import strategies as st

SIGNED_LIKE = Message(
    headers={
        ":date": datetime.datetime(2025, 6, 14, 13, 30, 5, 123000, tzinfo=datetime.UTC),
        ":chunk-signature": bytes(range(32)),
    },
    payload=encode_message(
        Message(
            headers={
                ":message-type": "event",
                ":event-type": "chunk",
                ":content-type": "application/json",
            },
            payload=b'{"bytes":"e30="}',
        )
    ),
)

header_values = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.binary(max_size=64),
    st.text(max_size=64),
    st.uuids(),
)
messages = st.builds(
    Message,
    headers=st.dictionaries(
        st.text(min_size=1, max_size=20).filter(lambda s: len(s.encode()) < 256),
        header_values,
        max_size=6,
    ),
    payload=st.binary(max_size=512),
)


def test_round_trip_of_a_signed_frame_with_an_inner_event() -> None:
    decoded = decode_message(encode_message(SIGNED_LIKE))
    assert decoded == SIGNED_LIKE
    inner = decode_message(decoded.payload)
    assert inner.headers[":event-type"] == "chunk"
    assert inner.payload == b'{"bytes":"e30="}'


@given(messages)
@settings(max_examples=200)
def test_round_trip_of_any_message(message: Message) -> None:
    assert decode_message(encode_message(message)) == message


@given(st.lists(messages, min_size=1, max_size=4), st.data())
@settings(max_examples=100)
def test_decoder_reassembles_messages_split_anywhere(
    batch: list[Message], data: st.DataObject
) -> None:
    wire = b"".join(encode_message(m) for m in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    decoder = MessageDecoder()
    out: list[Message] = []
    start = 0
    for cut in [*cuts, len(wire)]:
        out += decoder.feed(wire[start:cut])
        start = cut
    assert out == batch
    assert decoder.pending_bytes == 0


def test_the_sdk_decodes_our_frames_and_we_decode_its() -> None:
    events = pytest.importorskip(
        "smithy_aws_event_stream.events", reason="needs the nova extra (Python >= 3.12)"
    )
    theirs = events.Event.decode(io.BytesIO(encode_message(SIGNED_LIKE)))
    assert theirs.message.headers[":chunk-signature"] == bytes(range(32))
    assert theirs.message.headers[":date"] == SIGNED_LIKE.headers[":date"]
    assert theirs.message.payload == SIGNED_LIKE.payload

    uid = uuid.UUID(int=7)
    sdk_message = events.EventMessage(
        headers={"s": "text", "i": 5, "l": events.Long(2**40), "b": True, "u": uid, "x": b"\x00"},
        payload=b"payload",
    )
    ours = decode_message(sdk_message.encode())
    assert ours.headers == {"s": "text", "i": 5, "l": 2**40, "b": True, "u": uid, "x": b"\x00"}
    assert ours.payload == b"payload"


@pytest.mark.parametrize("position", [0, 5, 9, 14, -5, -1])
def test_any_flipped_byte_is_detected(position: int) -> None:
    wire = bytearray(encode_message(SIGNED_LIKE))
    wire[position] ^= 0x40
    with pytest.raises(EventStreamError):
        decode_message(bytes(wire))


def test_a_failed_decoder_stays_failed() -> None:
    decoder = MessageDecoder()
    with pytest.raises(EventStreamError):
        list(decoder.feed(b"\x00\x00\x00\x05" + b"\x00" * 12))
    with pytest.raises(EventStreamError):
        list(decoder.feed(encode_message(SIGNED_LIKE)))


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_garbage_raises_only_event_stream_errors(garbage: bytes) -> None:
    decoder = MessageDecoder()
    with contextlib.suppress(EventStreamError):
        list(decoder.feed(garbage))


def test_encoder_refuses_what_the_format_cannot_carry() -> None:
    with pytest.raises(ValueError, match="header name"):
        encode_message(Message(headers={"": "x"}))
    with pytest.raises(TypeError):
        encode_message(Message(headers={"f": 1.5}))  # type: ignore[dict-item]
