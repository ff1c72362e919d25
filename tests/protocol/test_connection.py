"""The protocol state machine, driven synchronously with two cores back to back."""

from __future__ import annotations

import pytest

from edgevoice.errors import LocalProtocolError, RemoteProtocolError
from edgevoice.protocol.connection import Connection, Role, State
from edgevoice.protocol.messages import (
    AudioFlags,
    AudioFrame,
    AudioKind,
    CloseCode,
    Error,
    Hello,
    Interrupt,
    ResponseStart,
    Transcript,
    TurnStart,
    Welcome,
    encode_message,
)


def open_pair() -> tuple[Connection, Connection]:
    device, relay = Connection(Role.DEVICE), Connection(Role.RELAY)
    hello = relay.receive_text(device.start(Hello(device="kitchen")))
    assert isinstance(hello, Hello) and relay.state is State.HELLO_RECEIVED
    welcome = device.receive_text(relay.accept(Welcome(session_id="s1")))
    assert isinstance(welcome, Welcome)
    assert device.state is State.OPEN and relay.state is State.OPEN
    return device, relay


def test_handshake_and_messages_both_ways() -> None:
    device, relay = open_pair()
    assert relay.receive_text(device.send(TurnStart(1))) == TurnStart(1)
    assert device.receive_text(relay.send(ResponseStart(1))) == ResponseStart(1)
    assert device.receive_text(relay.send(Interrupt(1))) == Interrupt(1)


def test_audio_sequence_numbers_and_loss_accounting() -> None:
    device, relay = open_pair()
    sent = [device.send_audio(b"op%d" % i, i * 20)[1] for i in range(5)]
    got = [relay.receive_binary(sent[i]) for i in (0, 1, 3, 4)]
    assert [g.frame.seq for g in got if g] == [0, 1, 3, 4]
    assert [g.missing for g in got if g] == [0, 0, 1, 0]
    assert relay.receive_binary(sent[1]) is None  # duplicate
    assert relay.duplicates == 1 and relay.missing == 1


def test_audio_before_hello_is_a_remote_error() -> None:
    relay = Connection(Role.RELAY)
    frame = AudioFrame(AudioKind.UPLINK, 0, 0, b"x").encode()
    with pytest.raises(RemoteProtocolError, match="before the handshake"):
        relay.receive_binary(frame)


def test_anything_but_hello_first_is_a_remote_error() -> None:
    relay = Connection(Role.RELAY)
    with pytest.raises(RemoteProtocolError, match="expected hello"):
        relay.receive_text(encode_message(TurnStart(1)))


def test_wrong_version_closes_with_unsupported_version() -> None:
    relay = Connection(Role.RELAY)
    with pytest.raises(RemoteProtocolError) as info:
        relay.receive_text(encode_message(Hello(device="d", protocol=2)))
    assert info.value.close_code == CloseCode.UNSUPPORTED_VERSION


def test_direction_is_enforced() -> None:
    device, relay = open_pair()
    with pytest.raises(LocalProtocolError):
        device.send(Transcript(role="user", text="x"))
    with pytest.raises(RemoteProtocolError, match="may not send transcript"):
        relay.receive_text(encode_message(Transcript(role="user", text="x")))
    downlink = AudioFrame(AudioKind.DOWNLINK, 0, 0, b"x").encode()
    with pytest.raises(RemoteProtocolError, match="DOWNLINK"):
        relay.receive_binary(downlink)


def test_device_cannot_send_before_welcome() -> None:
    device = Connection(Role.DEVICE)
    device.start(Hello(device="d"))
    with pytest.raises(LocalProtocolError):
        device.send(TurnStart(1))
    with pytest.raises(LocalProtocolError):
        device.send_audio(b"x", 0)


def test_error_is_accepted_in_any_state() -> None:
    device = Connection(Role.DEVICE)
    device.start(Hello(device="d"))
    msg = device.receive_text(encode_message(Error(code="busy", message="m", retryable=True)))
    assert isinstance(msg, Error)
    assert device.state is State.AWAITING_WELCOME


def test_closed_connection_refuses_use() -> None:
    device, _ = open_pair()
    device.close()
    with pytest.raises(LocalProtocolError):
        device.send_audio(b"x", 0)
    with pytest.raises(LocalProtocolError):
        device.receive_text("{}")


def test_resume_continues_sequence_numbers() -> None:
    device = Connection(Role.DEVICE, next_seq=100, last_received_seq=41)
    relay = Connection(Role.RELAY, last_received_seq=99)
    relay.receive_text(device.start(Hello(device="d")))
    device.receive_text(relay.accept(Welcome(session_id="s")))
    frame, data = device.send_audio(b"x", 0, AudioFlags.REPLAY)
    assert frame.seq == 100
    received = relay.receive_binary(data)
    assert received is not None and received.missing == 0
