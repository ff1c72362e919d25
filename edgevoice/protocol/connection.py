"""The sans-I/O protocol state machine shared by the device and the relay.

A :class:`Connection` is fed what the WebSocket delivered (``receive_text``,
``receive_binary``) and returns parsed, validated events; it is asked to produce
what to send (``send``, ``send_audio``) and returns text or bytes for the caller to
put on the socket. It never touches a socket or a clock. Who may send what, in which
state, lives in the tables below and nowhere else.

States::

    device:  AWAITING_WELCOME --Welcome received--> OPEN --close()--> CLOSED
    relay:   AWAITING_HELLO   --accept() sent-----> OPEN --close()--> CLOSED
             AWAITING_HELLO   --Hello received----> HELLO_RECEIVED --accept()--> OPEN
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from edgevoice.errors import LocalProtocolError, RemoteProtocolError
from edgevoice.protocol.messages import (
    DOWNLINK_FORMAT,
    PROTOCOL_VERSION,
    UPLINK_FORMAT,
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
    decode_message,
    encode_message,
)

logger = logging.getLogger(__name__)


class Role(enum.Enum):
    DEVICE = "device"
    RELAY = "relay"


class State(enum.Enum):
    AWAITING_WELCOME = "awaiting_welcome"  # device: hello sent
    AWAITING_HELLO = "awaiting_hello"  # relay: nothing received yet
    HELLO_RECEIVED = "hello_received"  # relay: hello parsed, welcome not yet sent
    OPEN = "open"
    CLOSED = "closed"


#: (role, from_state, to_state): the only transitions there are.
TRANSITIONS: frozenset[tuple[Role, State, State]] = frozenset(
    {
        (Role.DEVICE, State.AWAITING_WELCOME, State.OPEN),
        (Role.RELAY, State.AWAITING_HELLO, State.HELLO_RECEIVED),
        (Role.RELAY, State.HELLO_RECEIVED, State.OPEN),
    }
    | {(role, state, State.CLOSED) for role in Role for state in State if state != State.CLOSED}
)

#: Control messages each role may send once the connection is open.
SENDS: dict[Role, frozenset[type[Message]]] = {
    Role.DEVICE: frozenset({TurnStart, TurnEnd, Interrupt, Ping, Pong, Stats, Error}),
    Role.RELAY: frozenset(
        {Transcript, ResponseStart, ResponseEnd, Interrupt, Ping, Pong, Error}
    ),
}
#: The audio kind each role sends.
AUDIO_SENT: dict[Role, AudioKind] = {Role.DEVICE: AudioKind.UPLINK, Role.RELAY: AudioKind.DOWNLINK}


def _peer(role: Role) -> Role:
    return Role.RELAY if role is Role.DEVICE else Role.DEVICE


@dataclass(frozen=True)
class AudioReceived:
    """An audio frame arrived; ``missing`` frames were skipped just before it."""

    frame: AudioFrame
    missing: int


class Connection:
    """One side of one WebSocket connection."""

    def __init__(self, role: Role, *, next_seq: int = 0, last_received_seq: int | None = None,
                 debug: bool = False) -> None:
        self.role = role
        self.state = State.AWAITING_WELCOME if role is Role.DEVICE else State.AWAITING_HELLO
        self.hello: Hello | None = None
        self.welcome: Welcome | None = None
        #: next sequence number for audio we send
        self.next_seq = next_seq
        #: highest sequence number of audio received (None: none yet)
        self.last_received_seq = last_received_seq
        #: counters
        self.duplicates = 0
        self.missing = 0
        self.debug = debug

    # ------------------------------------------------------------------ state

    def _transition(self, new: State) -> None:
        if (self.role, self.state, new) not in TRANSITIONS:
            raise LocalProtocolError(f"{self.role.value}: illegal transition {self.state} -> {new}")
        if self.debug:
            logger.debug("%s connection %s -> %s", self.role.value, self.state.value, new.value)
        self.state = new

    def close(self) -> None:
        """Mark the connection closed; further use is a LocalProtocolError."""
        if self.state is not State.CLOSED:
            self._transition(State.CLOSED)

    # ---------------------------------------------------------------- sending

    def start(self, hello: Hello) -> str:
        """Device: the hello to send first."""
        if self.role is not Role.DEVICE or self.state is not State.AWAITING_WELCOME:
            raise LocalProtocolError("only a new device connection sends hello")
        if self.hello is not None:
            raise LocalProtocolError("hello already sent")
        self.hello = hello
        return encode_message(hello)

    def accept(self, welcome: Welcome) -> str:
        """Relay: answer the hello received with this welcome; the connection opens."""
        if self.role is not Role.RELAY or self.state is not State.HELLO_RECEIVED:
            raise LocalProtocolError("welcome can only answer a hello")
        self.welcome = welcome
        self._transition(State.OPEN)
        return encode_message(welcome)

    def send(self, message: Message) -> str:
        """Text of a control message we may send now."""
        if isinstance(message, Error) and self.state is not State.CLOSED:
            return encode_message(message)  # an error may explain any close
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"cannot send {message.TYPE} in state {self.state.value}")
        if type(message) not in SENDS[self.role]:
            raise LocalProtocolError(f"a {self.role.value} does not send {message.TYPE}")
        return encode_message(message)

    def send_audio(self, payload: bytes, timestamp_ms: int,
                   flags: AudioFlags = AudioFlags.NONE) -> tuple[AudioFrame, bytes]:
        """Frame one Opus packet with the next sequence number."""
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"cannot send audio in state {self.state.value}")
        frame = AudioFrame(AUDIO_SENT[self.role], self.next_seq, timestamp_ms & 0xFFFFFFFF,
                           payload, flags)
        self.next_seq += 1
        return frame, frame.encode()

    # -------------------------------------------------------------- receiving

    def receive_text(self, text: str | bytes) -> Message:
        """Parse and check one control message from the peer."""
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection is closed")
        message = decode_message(text)
        if isinstance(message, Error):
            return message  # accepted in any state: it says why the peer is closing
        if self.state is State.AWAITING_HELLO:
            if not isinstance(message, Hello):
                raise RemoteProtocolError(f"expected hello, got {message.TYPE}")
            self._check_hello(message)
            self.hello = message
            self._transition(State.HELLO_RECEIVED)
            return message
        if self.state is State.AWAITING_WELCOME:
            if not isinstance(message, Welcome):
                raise RemoteProtocolError(f"expected welcome, got {message.TYPE}")
            self._check_welcome(message)
            self.welcome = message
            self._transition(State.OPEN)
            return message
        if self.state is State.HELLO_RECEIVED:
            raise RemoteProtocolError(f"{message.TYPE} before welcome was sent")
        if type(message) not in SENDS[_peer(self.role)]:
            raise RemoteProtocolError(f"a {_peer(self.role).value} may not send {message.TYPE}")
        return message

    def receive_binary(self, data: bytes) -> AudioReceived | None:
        """Parse one audio frame; None when it is a duplicate of one already received."""
        if self.state is not State.OPEN:
            raise RemoteProtocolError(f"audio before the handshake finished ({self.state.value})")
        frame = AudioFrame.decode(data)
        if frame.kind is not AUDIO_SENT[_peer(self.role)]:
            peer = _peer(self.role).value
            raise RemoteProtocolError(f"a {peer} may not send {frame.kind.name} audio")
        last = self.last_received_seq
        if last is not None and frame.seq <= last:
            self.duplicates += 1
            return None
        missing = 0 if last is None else frame.seq - last - 1
        self.missing += missing
        self.last_received_seq = frame.seq
        return AudioReceived(frame, missing)

    # ------------------------------------------------------------- validation

    @staticmethod
    def _check_hello(hello: Hello) -> None:
        if hello.protocol != PROTOCOL_VERSION:
            error = RemoteProtocolError(
                f"protocol version {hello.protocol} is not supported (this relay speaks "
                f"{PROTOCOL_VERSION})")
            error.close_code = CloseCode.UNSUPPORTED_VERSION
            raise error
        if hello.uplink != UPLINK_FORMAT or hello.downlink != DOWNLINK_FORMAT:
            raise RemoteProtocolError("unsupported audio formats in hello")
        if not hello.device or len(hello.device) > 64:
            raise RemoteProtocolError("hello.device must be 1 to 64 characters")

    @staticmethod
    def _check_welcome(welcome: Welcome) -> None:
        if welcome.protocol != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"relay answered with protocol {welcome.protocol}")
        if welcome.uplink != UPLINK_FORMAT or welcome.downlink != DOWNLINK_FORMAT:
            raise RemoteProtocolError("relay chose unsupported audio formats")
        if welcome.heartbeat_interval_ms < 100:
            raise RemoteProtocolError("heartbeat interval below 100 ms")


__all__ = [
    "AudioReceived",
    "Connection",
    "ResumeRequest",
    "ResumeResult",
    "Role",
    "State",
]
