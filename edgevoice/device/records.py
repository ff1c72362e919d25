"""Turn records: what happened when in each turn, and how it ended.

:class:`TurnRecorder` keeps the open turn's :class:`TurnTimeline` and the last
twenty closed ones (what ``/stats``, the demo and the bench report). A turn is
``OPEN`` until exactly one outcome closes it; closing a closed turn changes nothing
(a link lost after the reply completed does not rewrite history). Pure bookkeeping:
no I/O, time comes in as ``now``.
"""

from __future__ import annotations

import collections
import datetime
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

#: Closed turns kept for /stats.
TURNS_KEPT = 20


class TurnOutcome(enum.StrEnum):
    """How a turn ended. Values are the stable strings /stats and the logs show."""

    OPEN = "open"
    COMPLETED = "completed"
    """The whole reply played."""
    INTERRUPTED = "interrupted"
    """The reply was cut short (barge-in, button, relay interrupt)."""
    NO_SPEECH = "no_speech"
    """Nobody spoke before the no-speech timeout."""
    CANCELLED = "cancelled"
    """Ended on the device's side before a reply (mute, stop, button)."""
    SUPERSEDED = "superseded"
    """A new turn began while this one was still open."""
    LINK_LOST = "link_lost"
    """The link went down, with no session to resume, before any reply audio."""
    NO_REPLY = "no_reply"
    """The relay ended the response without any audio."""
    REPLY_TIMEOUT = "reply_timeout"
    """No reply came within ``turn.reply_timeout_ms`` after the turn ended."""
    REFUSED = "refused"
    """The relay refused the turn: it was at capacity (``relay_busy``)."""


#: Outcomes an operator should see at warning priority: something went wrong.
TROUBLED = frozenset({TurnOutcome.LINK_LOST, TurnOutcome.NO_REPLY, TurnOutcome.REPLY_TIMEOUT,
                      TurnOutcome.REFUSED})


#: The turn machine's FinishTurn reasons that close the record at once (the others
#: keep it open for the reply).
CLOSED_BY_FINISH: dict[str, TurnOutcome] = {
    "no_speech": TurnOutcome.NO_SPEECH,
    "cancelled": TurnOutcome.CANCELLED,
    "refused": TurnOutcome.REFUSED,
}


@dataclass
class TurnTimeline:
    """When each step of one turn happened (monotonic seconds; None: did not happen)."""

    turn_id: int
    trigger: str
    started_at: float
    wall_start: float = field(default_factory=time.time)
    speech_start: float | None = None
    speech_end: float | None = None
    first_uplink: float | None = None
    turn_end: float | None = None
    first_downlink: float | None = None
    playback_start: float | None = None
    playback_end: float | None = None
    uplink_frames: int = 0
    downlink_frames: int = 0
    transcripts: list[tuple[str, str]] = field(default_factory=list)
    outcome: TurnOutcome = TurnOutcome.OPEN

    @property
    def is_open(self) -> bool:
        return self.outcome is TurnOutcome.OPEN

    def milestones_ms(self) -> dict[str, float | None]:
        """Each milestone in ms after the turn started."""
        def rel(t: float | None) -> float | None:
            return None if t is None else round((t - self.started_at) * 1000.0, 1)
        return {
            "speech_start": rel(self.speech_start), "first_uplink": rel(self.first_uplink),
            "speech_end": rel(self.speech_end), "turn_end": rel(self.turn_end),
            "first_downlink": rel(self.first_downlink),
            "playback_start": rel(self.playback_start), "playback_end": rel(self.playback_end),
        }

    def log_line(self) -> str:
        """One ``key=value`` line for the journal: grep- and filter-friendly, no reprs.
        Milestones are ms after the turn started; one that did not happen is left out."""
        pairs = [f"turn={self.turn_id}", f"outcome={self.outcome}", f"trigger={self.trigger}"]
        pairs += [f"{name}_ms={value:.0f}" for name, value in self.milestones_ms().items()
                  if value is not None]
        pairs += [f"uplink_frames={self.uplink_frames}",
                  f"downlink_frames={self.downlink_frames}"]
        return " ".join(pairs)

    def as_dict(self) -> dict[str, Any]:
        return {
            "turn_id": self.turn_id, "trigger": self.trigger, "outcome": str(self.outcome),
            "started": datetime.datetime.fromtimestamp(self.wall_start, datetime.UTC)
            .isoformat(timespec="milliseconds"),
            "milestones_ms": self.milestones_ms(),
            "uplink_frames": self.uplink_frames, "downlink_frames": self.downlink_frames,
            "transcripts": [{"role": r, "text": t} for r, t in self.transcripts],
        }


@dataclass
class DeviceCounters:
    """The daemon's counters; each field has one writer (named after it)."""

    frames_captured: int = 0  # TurnTaking
    frames_sent: int = 0  # Uplink
    frames_received: int = 0  # Downlink
    frames_concealed: int = 0  # Downlink
    audio_reopens: int = 0  # CaptureLoop
    turns: int = 0  # TurnRecorder
    interrupts: int = 0  # Downlink
    #: link drops survived by resuming the session (DeviceDaemon)
    suspensions: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # TurnTaking


class TurnRecorder:
    """The open turn and the last :data:`TURNS_KEPT` closed ones."""

    def __init__(self, counters: DeviceCounters,
                 on_closed: Callable[[TurnTimeline], None] | None = None) -> None:
        self.counters = counters
        self.on_closed = on_closed
        self.current: TurnTimeline | None = None
        self.turns: collections.deque[TurnTimeline] = collections.deque(maxlen=TURNS_KEPT)

    @property
    def open_turn(self) -> TurnTimeline | None:
        """The current turn if it is still open."""
        turn = self.current
        return turn if turn is not None and turn.is_open else None

    def begin(self, turn_id: int, trigger: str, now: float) -> TurnTimeline:
        """A new turn; an open one before it is closed as superseded."""
        self.close(TurnOutcome.SUPERSEDED)
        turn = TurnTimeline(turn_id, trigger, now)
        if trigger == "vad":
            turn.speech_start = now  # the detector's onset is what started it
        self.current = turn
        self.counters.turns += 1
        return turn

    def close(self, outcome: TurnOutcome) -> None:
        """Close the current turn with ``outcome``; nothing if it is already closed."""
        if outcome is TurnOutcome.OPEN:
            raise ValueError("a turn is closed with an outcome, not OPEN")
        turn = self.open_turn
        if turn is None:
            return
        turn.outcome = outcome
        self.turns.append(turn)
        level = logging.WARNING if outcome in TROUBLED else logging.INFO
        logger.log(level, "%s", turn.log_line())
        if self.on_closed is not None:
            self.on_closed(turn)

    # ------------------------------------------------------------ milestones

    def speech(self, *, started: bool, ended: bool, now: float) -> None:
        turn = self.current
        if turn is None:
            return
        if started and turn.speech_start is None:
            turn.speech_start = now
        if ended and turn.speech_end is None:
            turn.speech_end = now

    def uplink_frame(self, now: float) -> None:
        turn = self.current
        if turn is not None:
            turn.uplink_frames += 1
            if turn.first_uplink is None:
                turn.first_uplink = now

    def downlink_frame(self, now: float) -> None:
        turn = self.current
        if turn is not None:
            turn.downlink_frames += 1
            if turn.first_downlink is None:
                turn.first_downlink = now

    def finished(self, reason: str, now: float) -> None:
        """The device ended its side of the turn (TurnEnd sent)."""
        turn = self.current
        if turn is None:
            return
        turn.turn_end = now
        outcome = CLOSED_BY_FINISH.get(reason)
        if outcome is not None:
            self.close(outcome)

    def playback_started(self, now: float) -> None:
        turn = self.current
        if turn is not None and turn.playback_start is None:
            turn.playback_start = now

    def playback_ended(self, *, flushed: bool, now: float) -> None:
        turn = self.current
        if turn is None:
            return
        if flushed:
            self.close(TurnOutcome.INTERRUPTED)
        else:
            turn.playback_end = now
            self.close(TurnOutcome.COMPLETED)

    def transcript(self, role: str, text: str) -> None:
        if self.current is not None:
            self.current.transcripts.append((role, text))
