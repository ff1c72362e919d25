"""The session rules both ends share, without I/O (``docs/protocol.md`` §5, §7).

* :func:`close_ends_session` — which close codes leave a session to resume and
  which end it (§7.2). The device's link and the relay's server both ask it, so
  they cannot disagree again.
* :class:`SessionState` and :data:`SESSION_TRANSITIONS` — the relay's per-device
  session lifecycle as one table; :class:`SessionLifecycle` walks it and raises
  :class:`~edgevoice.errors.IllegalTransitionError` on a move it does not list.
* :class:`SessionTable` — the relay's device id → session table. Every decision a
  hello needs (resume this session, or replace it with a new one) is one
  synchronous call, so no other hello can run between reading the table and
  writing it: one session per device id, always.
* :func:`replay_for` — what either end re-sends after a resumed welcome, and
  :func:`catch_up_after` — what a resumed device may send at once (§7.4).
* :class:`LinkState` and :data:`LINK_TRANSITIONS` — the device link's states.

Nothing here touches a socket or a clock; times are passed in.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from edgevoice.errors import IllegalTransitionError
from edgevoice.protocol.connection import Connection
from edgevoice.protocol.messages import CloseCode
from edgevoice.protocol.replay import ReplayJournal, SentFrame

logger = logging.getLogger(__name__)


class Closer(enum.Enum):
    """Which end sent the close frame."""

    DEVICE = "device"
    RELAY = "relay"


#: Close codes that end the session at once, by the end that sends them (§7.2).
#: Any other ending (no close frame, 1006, a keepalive or idle timeout, 4003, 4005)
#: is a *drop*: the session may be resumed within the window.
SESSION_ENDING_CLOSES: dict[Closer, frozenset[int]] = {
    Closer.DEVICE: frozenset({CloseCode.NORMAL, CloseCode.GOING_AWAY}),
    Closer.RELAY: frozenset({
        CloseCode.NORMAL, CloseCode.GOING_AWAY, CloseCode.PROTOCOL_ERROR,
        CloseCode.POLICY_VIOLATION, CloseCode.MESSAGE_TOO_BIG, CloseCode.SESSION_REPLACED,
        CloseCode.UNSUPPORTED_VERSION, CloseCode.RECONNECT_NOW}),
}


def close_ends_session(code: int | None, closer: Closer) -> bool:
    """Whether a close with ``code`` sent by ``closer`` ends the session (no resume).

    ``code`` None means no close frame was exchanged: a drop.
    """
    return code is not None and code in SESSION_ENDING_CLOSES[closer]


# ----------------------------------------------------------- relay session lifecycle


class SessionState(enum.Enum):
    """Where one device session stands on the relay."""

    #: a hello created or resumed it; welcome, replay and held messages go out
    ATTACHING = "attaching"
    #: a connection carries it; the pacer sends the reply
    ATTACHED = "attached"
    #: its connection dropped; kept for the resume window
    HELD = "held"
    #: ended; its upstream is being (or has been) closed
    CLOSED = "closed"


S = SessionState
#: (from, to): every move a relay session can make.
SESSION_TRANSITIONS: frozenset[tuple[SessionState, SessionState]] = frozenset({
    (S.ATTACHING, S.ATTACHED),
    (S.ATTACHING, S.HELD),  # the link dropped during the replay
    (S.ATTACHING, S.ATTACHING),  # a newer connection resumed it during the replay
    (S.ATTACHED, S.HELD),
    (S.ATTACHED, S.ATTACHING),  # resumed before the old connection was noticed dead
    (S.HELD, S.ATTACHING),  # resumed within the window
    (S.ATTACHING, S.CLOSED),
    (S.ATTACHED, S.CLOSED),
    (S.HELD, S.CLOSED),
})


class SessionLifecycle:
    """One session's state, moved only along :data:`SESSION_TRANSITIONS`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = SessionState.ATTACHING

    def to(self, new: SessionState) -> None:
        if (self.state, new) not in SESSION_TRANSITIONS:
            raise IllegalTransitionError(
                f"session {self.name}: illegal transition {self.state.value} -> {new.value}")
        logger.debug("session %s: %s -> %s", self.name, self.state.value, new.value)
        self.state = new

    @property
    def closed(self) -> bool:
        return self.state is SessionState.CLOSED


class TableEntry(Protocol):
    """What :class:`SessionTable` needs of a session."""

    device_id: str
    session_id: str
    lifecycle: SessionLifecycle


E = TypeVar("E", bound=TableEntry)


@dataclass(frozen=True)
class HelloOutcome(Generic[E]):
    """What a hello did to the table: the session it now names, and the one it ended."""

    session: E
    resumed: bool
    #: an older session of the same device that this hello ended (the caller closes
    #: its connection and upstream); None when there was none
    replaced: E | None = None
    #: the connection the resumed session was still attached to (to be closed 4000)
    was_attached: bool = False


class SessionTable(Generic[E]):
    """Device id → its one live session. Every method is synchronous on purpose."""

    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self._by_device: dict[str, E] = {}

    def __len__(self) -> int:
        return len(self._by_device)

    def __iter__(self) -> Iterator[E]:
        return iter(list(self._by_device.values()))

    def get(self, device_id: str) -> E | None:
        return self._by_device.get(device_id)

    def in_state(self, *states: SessionState) -> dict[str, E]:
        return {d: s for d, s in self._by_device.items() if s.lifecycle.state in states}

    def has_room_for(self, device_id: str) -> bool:
        """A device that has a session may always replace it; others need a free slot."""
        return device_id in self._by_device or len(self._by_device) < self.max_sessions

    def hello(self, device_id: str, resume_session_id: str | None,
              new_session: Callable[[], E], *, may_resume: bool) -> HelloOutcome[E]:
        """Apply one hello: resume the named session, or install ``new_session()``.

        Resumes only the session this device holds under that id, when
        ``may_resume`` (the caller's own checks passed: its window is not zero, the
        peer's claims are possible). Otherwise a new session takes the device's slot
        and the old session, if any, is returned to be ended.
        """
        current = self._by_device.get(device_id)
        if (may_resume and current is not None and resume_session_id is not None
                and current.session_id == resume_session_id and not current.lifecycle.closed):
            was_attached = current.lifecycle.state is SessionState.ATTACHED
            current.lifecycle.to(SessionState.ATTACHING)
            return HelloOutcome(current, resumed=True, was_attached=was_attached)
        session = new_session()
        self._by_device[device_id] = session
        if current is not None and not current.lifecycle.closed:
            current.lifecycle.to(SessionState.CLOSED)
        return HelloOutcome(session, resumed=False, replaced=current)

    def attached(self, session: E) -> bool:
        """The session's replay is done and its connection carries it; False if it
        was replaced or closed meanwhile (the caller then stops using it)."""
        if self._by_device.get(session.device_id) is not session or session.lifecycle.closed:
            return False
        if session.lifecycle.state is SessionState.ATTACHING:
            session.lifecycle.to(SessionState.ATTACHED)
        return session.lifecycle.state is SessionState.ATTACHED

    def dropped(self, session: E, *, hold: bool) -> bool:
        """The session's connection ended; hold it (True) or end it (False returned).

        Returns whether the session is now held. A session no longer in the table
        (replaced) is ended.
        """
        current = self._by_device.get(session.device_id) is session
        if hold and current and not session.lifecycle.closed:
            session.lifecycle.to(SessionState.HELD)
            return True
        self.remove(session)
        return False

    def remove(self, session: E) -> None:
        """End ``session`` and free its device's slot if it still holds it."""
        if self._by_device.get(session.device_id) is session:
            del self._by_device[session.device_id]
        if not session.lifecycle.closed:
            session.lifecycle.to(SessionState.CLOSED)


# ------------------------------------------------------------------------ replay


@dataclass(frozen=True)
class ReplayWire:
    """What one end re-sends after a resumed welcome (§7.4), ready for the socket."""

    #: texts and binary frames, in the order first sent (frames flagged REPLAY)
    data: tuple[str | bytes, ...]
    frames: int
    messages: int
    #: frames the peer missed that the journal had already forgotten (a seq gap)
    frames_lost: int


def replay_for(journal: ReplayJournal, conn: Connection, last_seq: int | None,
               messages_received: int) -> ReplayWire:
    """Everything the peer says it did not get, framed on the resumed ``conn``.

    The device's link and the relay's session both send exactly this; raises
    :class:`~edgevoice.errors.RemoteProtocolError` when the peer claims more than
    was sent.
    """
    replay = journal.after(last_seq, messages_received)
    data: list[str | bytes] = []
    for entry in replay.items:
        if isinstance(entry, SentFrame):
            data.append(conn.replay_audio(entry.frame))
        else:
            data.append(conn.resend(entry.message))
    return ReplayWire(tuple(data), replay.frames, len(replay.items) - replay.frames,
                      replay.frames_lost)


#: What a device may queue per second away, for its catch-up after a resume (§7.4):
#: 50 audio frames of 20 ms and a few control messages.
CATCH_UP_MESSAGES_PER_S = 60
CATCH_UP_AUDIO_MS_PER_S = 1000


def catch_up_after(away_s: float, window_s: float) -> tuple[float, float]:
    """(messages, milliseconds of audio) a resumed device may send beyond its limits:
    what it can have queued in the time it was away, at most the window. Resuming
    again and again therefore earns nothing."""
    away = min(window_s, max(0.0, away_s))
    return away * CATCH_UP_MESSAGES_PER_S, away * CATCH_UP_AUDIO_MS_PER_S


# ---------------------------------------------------------------- resume window


class ResumeWindow:
    """How long a dropped session may still be resumed, counted from the moment this
    end noticed the drop (§7.2); pure (takes ``now``)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        #: when this end noticed the drop, and when the window closes (None: no drop)
        self.dropped_at: float | None = None
        self.until: float | None = None

    def dropped(self, now: float) -> bool:
        """The link dropped (again): start the window if it is not running; whether the
        session may still be resumed."""
        if self.window_s <= 0:
            return False
        if self.until is None:
            self.dropped_at, self.until = now, now + self.window_s
        return now < self.until

    def is_open(self, now: float) -> bool:
        return self.until is not None and now < self.until

    def left_s(self, now: float) -> float:
        """Seconds until the window closes (0 when not running or past)."""
        return 0.0 if self.until is None else max(0.0, self.until - now)

    def clear(self) -> None:
        """Resumed, or the session ended: no window."""
        self.dropped_at = self.until = None


# ------------------------------------------------------------------- device link


class LinkState(enum.Enum):
    """The device link, as its runner moves it."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    WAITING = "waiting"  # backing off before the next attempt
    STOPPED = "stopped"


L = LinkState
LINK_TRANSITIONS: frozenset[tuple[LinkState, LinkState]] = frozenset({
    (L.CONNECTING, L.CONNECTED),
    (L.CONNECTING, L.WAITING),
    (L.CONNECTED, L.WAITING),
    (L.CONNECTED, L.CONNECTING),  # dropped; resuming at once
    (L.WAITING, L.CONNECTING),
    (L.CONNECTING, L.CONNECTING),  # the first attempt (the link starts CONNECTING)
    (L.WAITING, L.WAITING),  # marked down, then handed over by a draining relay
} | {(state, L.STOPPED) for state in LinkState})


def check_link_transition(old: LinkState, new: LinkState) -> None:
    """Raise IllegalTransitionError unless ``old -> new`` is in LINK_TRANSITIONS."""
    if (old, new) not in LINK_TRANSITIONS:
        raise IllegalTransitionError(f"link: illegal transition {old.value} -> {new.value}")


__all__ = [
    "LINK_TRANSITIONS",
    "SESSION_ENDING_CLOSES",
    "SESSION_TRANSITIONS",
    "Closer",
    "HelloOutcome",
    "LinkState",
    "ReplayWire",
    "ResumeWindow",
    "SessionLifecycle",
    "SessionState",
    "SessionTable",
    "catch_up_after",
    "check_link_transition",
    "close_ends_session",
    "replay_for",
]
