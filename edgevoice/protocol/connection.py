"""The sans-I/O protocol state machine shared by the device and the relay.

A :class:`Connection` is fed what the WebSocket delivered (``receive_text``,
``receive_binary``) and returns parsed, validated events; it is asked to produce
what to send (``send``, ``send_audio``) and returns text or bytes for the caller to
put on the socket. It never touches a socket or a clock. Who may send what, in which
state, lives in the tables below and nowhere else.

Session resume (``docs/protocol.md`` §7) is decided here too: which control messages
are *reliable* (counted, journaled and replayed after a resume) is :data:`RELIABLE`;
a resumed connection continues the sequence numbers and message counts of the one
it replaces (:meth:`Connection.continue_session`), and a refused resume starts both
from zero. The journal of what was sent lives in :mod:`edgevoice.protocol.replay`.

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
    DeviceCall,
    DeviceResult,
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
    Role.DEVICE: frozenset(
        {TurnStart, TurnEnd, Interrupt, Ping, Pong, Stats, Error, DeviceResult}
    ),
    Role.RELAY: frozenset(
        {Transcript, ResponseStart, ResponseEnd, Interrupt, Ping, Pong, Error, DeviceCall}
    ),
}
#: Control messages each role sends that are counted and, after a resume, re-sent
#: when the peer did not get them. Heartbeats, stats and the handshake are not:
#: a stale one is worthless, and they are never needed to make sense of the audio.
RELIABLE: dict[Role, frozenset[type[Message]]] = {
    Role.DEVICE: frozenset({TurnStart, TurnEnd, Interrupt}),
    Role.RELAY: frozenset({Transcript, ResponseStart, ResponseEnd, Interrupt, Error}),
}
#: Largest sequence number (32-bit field) and session id length.
MAX_SEQ = 0xFFFFFFFF
MAX_SESSION_ID_CHARS = 64
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
                 messages_sent: int = 0, messages_received: int = 0,
                 debug: bool = False) -> None:
        self.role = role
        self.state = State.AWAITING_WELCOME if role is Role.DEVICE else State.AWAITING_HELLO
        self.hello: Hello | None = None
        self.welcome: Welcome | None = None
        #: next sequence number for audio we send
        self.next_seq = next_seq
        #: highest sequence number of audio received (None: none yet)
        self.last_received_seq = last_received_seq
        #: reliable control messages sent / received in this session (see RELIABLE)
        self.messages_sent = messages_sent
        self.messages_received = messages_received
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

    def continue_session(self, *, next_seq: int, last_received_seq: int | None,
                         messages_sent: int, messages_received: int) -> None:
        """Relay: this connection resumes a held session; carry its counters over.

        Called between the hello and :meth:`accept`; the welcome must then say
        ``resumed`` with exactly what this side has received.
        """
        if self.role is not Role.RELAY or self.state is not State.HELLO_RECEIVED:
            raise LocalProtocolError("only a relay that received hello continues a session")
        assert self.hello is not None
        if self.hello.resume is None:
            raise LocalProtocolError("the hello did not ask to resume")
        self.next_seq = next_seq
        self.last_received_seq = last_received_seq
        self.messages_sent = messages_sent
        self.messages_received = messages_received

    def accept(self, welcome: Welcome) -> str:
        """Relay: answer the hello received with this welcome; the connection opens."""
        if self.role is not Role.RELAY or self.state is not State.HELLO_RECEIVED:
            raise LocalProtocolError("welcome can only answer a hello")
        assert self.hello is not None
        result = welcome.resume
        if result.resumed:
            request = self.hello.resume
            if request is None or request.session_id != welcome.session_id:
                raise LocalProtocolError("resumed a session the hello did not name")
            if (result.last_uplink_seq != self.last_received_seq
                    or result.uplink_messages != self.messages_received):
                raise LocalProtocolError("welcome.resume must report what this side received")
        self.welcome = welcome
        self._transition(State.OPEN)
        return encode_message(welcome)

    def send(self, message: Message) -> str:
        """Text of a control message we may send now."""
        if isinstance(message, Error) and self.state is not State.CLOSED:
            if self.state is State.OPEN and Error in RELIABLE[self.role]:
                self.messages_sent += 1
            return encode_message(message)  # an error may explain any close
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"cannot send {message.TYPE} in state {self.state.value}")
        if type(message) not in SENDS[self.role]:
            raise LocalProtocolError(f"a {self.role.value} does not send {message.TYPE}")
        if type(message) in RELIABLE[self.role]:
            self.messages_sent += 1
        return encode_message(message)

    def resend(self, message: Message) -> str:
        """Text of a reliable message sent earlier in this session, for a replay.

        It was counted when first sent, so it is not counted again.
        """
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"cannot resend {message.TYPE} in state {self.state.value}")
        if type(message) not in RELIABLE[self.role]:
            raise LocalProtocolError(f"{message.TYPE} is not replayed after a resume")
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

    def replay_audio(self, frame: AudioFrame) -> bytes:
        """Bytes of an audio frame sent earlier in this session, flagged REPLAY."""
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"cannot replay audio in state {self.state.value}")
        if frame.kind is not AUDIO_SENT[self.role] or frame.seq >= self.next_seq:
            raise LocalProtocolError(f"frame {frame.seq} was never sent on this session")
        return AudioFrame(frame.kind, frame.seq, frame.timestamp_ms, frame.payload,
                          frame.flags | AudioFlags.REPLAY).encode()

    # -------------------------------------------------------------- receiving

    def receive_text(self, text: str | bytes) -> Message:
        """Parse and check one control message from the peer."""
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection is closed")
        return self.receive_message(decode_message(text))

    def receive_message(self, message: Message) -> Message:
        """Check one control message from the peer that the caller has parsed
        (:func:`~edgevoice.protocol.messages.decode_message`): what :meth:`receive_text`
        does after parsing."""
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection is closed")
        if isinstance(message, Error):
            if self.state is State.OPEN and Error in RELIABLE[_peer(self.role)]:
                self.messages_received += 1
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
            self._take_resume_result(message)
            self.welcome = message
            self._transition(State.OPEN)
            return message
        if self.state is State.HELLO_RECEIVED:
            raise RemoteProtocolError(f"{message.TYPE} before welcome was sent")
        if type(message) not in SENDS[_peer(self.role)]:
            raise RemoteProtocolError(f"a {_peer(self.role).value} may not send {message.TYPE}")
        if type(message) in RELIABLE[_peer(self.role)]:
            self.messages_received += 1
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

    def _take_resume_result(self, welcome: Welcome) -> None:
        """Device: continue the session's counters, or start again from zero."""
        assert self.hello is not None
        request, result = self.hello.resume, welcome.resume
        if request is None:
            if result.resumed:
                raise RemoteProtocolError("relay resumed a session the device did not ask for")
            return
        if not result.resumed:
            # A new session: both directions start again from seq 0 (§7).
            self.next_seq = 0
            self.last_received_seq = None
            self.messages_sent = 0
            self.messages_received = 0
            return
        if welcome.session_id != request.session_id:
            raise RemoteProtocolError("relay resumed a different session")
        last = result.last_uplink_seq
        if (last is not None and last >= self.next_seq) or \
                result.uplink_messages > self.messages_sent:
            raise RemoteProtocolError("relay claims to have received more than was sent")

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
        if hello.resume is not None:
            _check_resume_counts(hello.resume.session_id, hello.resume.last_downlink_seq,
                                 hello.resume.downlink_messages, "hello.resume")

    @staticmethod
    def _check_welcome(welcome: Welcome) -> None:
        if welcome.protocol != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"relay answered with protocol {welcome.protocol}")
        if welcome.uplink != UPLINK_FORMAT or welcome.downlink != DOWNLINK_FORMAT:
            raise RemoteProtocolError("relay chose unsupported audio formats")
        if welcome.heartbeat_interval_ms < 100:
            raise RemoteProtocolError("heartbeat interval below 100 ms")
        _check_resume_counts(welcome.session_id, welcome.resume.last_uplink_seq,
                             welcome.resume.uplink_messages, "welcome")


def _check_resume_counts(session_id: str, last_seq: int | None, messages: int,
                         where: str) -> None:
    if not session_id or len(session_id) > MAX_SESSION_ID_CHARS:
        raise RemoteProtocolError(f"{where}: session_id must be 1 to "
                                  f"{MAX_SESSION_ID_CHARS} characters")
    if last_seq is not None and not 0 <= last_seq <= MAX_SEQ:
        raise RemoteProtocolError(f"{where}: sequence number out of range")
    if messages < 0:
        raise RemoteProtocolError(f"{where}: message count must be >= 0")


__all__ = [
    "RELIABLE",
    "AudioReceived",
    "Connection",
    "ResumeRequest",
    "ResumeResult",
    "Role",
    "State",
]
