"""The device's turn state machine: who is talking, and what to do about it.

Pure: fed triggers, silence-detector results, relay events and the time, it returns
commands for the daemon to carry out (send, flush, play an earcon). Every state
change goes through :meth:`TurnMachine._enter`, checked against :data:`TRANSITIONS`.

::

    IDLE ──start──► LISTENING ──speech ended / release / max──► THINKING
      ▲                │ no speech                                 │ response_start
      │                ▼                                           ▼
      └──────────── (IDLE) ◄──── playback ended / reply timeout ── SPEAKING
      ▲                                                            │ barge-in   │ reply ended
      │ window over                                                ▼            ▼ (follow_up_s)
      └──────────────────────────────────────────────────────── LISTENING ◄── FOLLOW_UP
                                                                      speech
    any ──mute──► MUTED ──unmute──► IDLE

**How turns start** is one setting, :attr:`TurnSettings.start`, so the ways cannot
contradict each other (see :func:`parse_start`). **Held turns** (push-to-talk held,
toggle on: ``held=True`` in :meth:`TurnMachine.request_turn`) are ended by their
trigger or ``max_turn_ms``, never by the silence detector: a user who pauses while
holding the button is still talking. **Follow-up**: with ``follow_up_s`` set, a reply
that ends opens a window in which speech alone starts the next turn.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field

from edgevoice.config.base import require
from edgevoice.errors import IllegalTransitionError

logger = logging.getLogger(__name__)


class TurnState(enum.Enum):
    IDLE = "idle"
    LISTENING = "listening"  # the user's turn: audio streams to the relay
    THINKING = "thinking"  # turn ended, waiting for the reply
    SPEAKING = "speaking"  # the reply is playing
    MUTED = "muted"  # microphone muted by the user
    FOLLOW_UP = "follow_up"  # a reply just ended: speech alone starts the next turn


S = TurnState
#: 300 ms of voiced frames inside a trigger-started turn count as the user speaking.
HEARD_AFTER_VOICED_FRAMES = 15
TRANSITIONS: dict[TurnState, frozenset[TurnState]] = {
    S.IDLE: frozenset({S.LISTENING, S.MUTED}),
    # LISTENING -> SPEAKING: upstreams with their own turn detection may answer first
    S.LISTENING: frozenset({S.THINKING, S.SPEAKING, S.IDLE, S.MUTED}),
    S.THINKING: frozenset({S.SPEAKING, S.IDLE, S.LISTENING, S.MUTED, S.FOLLOW_UP}),
    S.SPEAKING: frozenset({S.IDLE, S.LISTENING, S.MUTED, S.FOLLOW_UP}),
    S.MUTED: frozenset({S.IDLE}),
    S.FOLLOW_UP: frozenset({S.LISTENING, S.IDLE, S.MUTED}),
}

#: The ways a turn can start, combined with "+" in ``turn.start``.
START_WAYS = ("voice", "wake", "button")
#: ``turn.start`` values shown in messages and docs.
START_EXAMPLES = ("voice", "wake", "button", "wake+button", "voice+button", "api")


def parse_start(value: str) -> frozenset[str]:
    """The ways in ``turn.start`` ("wake+button" -> {"wake", "button"}); "api" -> {}.

    Rules: parts are ``voice``, ``wake`` and ``button``, joined by ``+``, each at most
    once; ``api`` stands alone and means only the local API and SIGUSR1 start turns
    (they can in every mode). ``voice`` and ``wake`` together are refused: always-on
    voice starts a turn at the first syllable of the wake phrase, so the wake phrase
    itself would be sent upstream. Raises ``SettingError`` for key ``start``.
    """
    examples = ", ".join(START_EXAMPLES)
    if value.strip() == "api":
        return frozenset()
    parts = [part.strip() for part in value.split("+")]
    for part in parts:
        require(part in START_WAYS, "start",
                f"{part!r} is not a way to start a turn (use {examples})")
    require(len(set(parts)) == len(parts), "start", f"{value!r} names a way twice")
    require(not {"voice", "wake"} <= set(parts), "start",
            f"{value!r} would send every wake phrase upstream: always-on voice starts the "
            "turn at the wake phrase's first syllable, before the wake word is recognised. "
            "Use 'wake' (or 'wake+button') to talk after a wake word, 'voice' for no wake "
            "word at all")
    return frozenset(parts)


@dataclass(frozen=True)
class TurnSettings:
    """When turns start and end."""

    start: str = "voice"
    """How a turn starts, one of: voice (always on: any speech), wake (the wake word),
    button (the GPIO button), wake+button, voice+button, or api (only the local API
    and SIGUSR1, which also work in every other mode). voice+wake is refused: it would
    send the wake phrase upstream."""
    follow_up_s: float = 0.0
    """After a reply ends, listen this long (seconds) for a follow-up that needs no
    wake word or button (LED and earcon show the open window). 0: off. Not used with
    start: voice, which always listens."""
    max_turn_ms: int = 30_000
    """A turn is ended after this long, in milliseconds, even if the user keeps talking."""
    no_speech_timeout_ms: int = 8_000
    """A turn with no speech at all ends quietly after this long, in milliseconds."""
    reply_timeout_ms: int = 20_000
    """Give up waiting for a reply after this long, in milliseconds (error earcon)."""
    voice_barge_in: bool = True
    """Speech clearly above the device's own echo interrupts the reply."""

    def __post_init__(self) -> None:
        parse_start(self.start)
        require(0.0 <= self.follow_up_s <= 30.0, "follow_up_s", "must be in [0, 30] s")
        require(self.max_turn_ms >= 1000, "max_turn_ms", "must be >= 1000 ms")
        require(self.no_speech_timeout_ms >= 500, "no_speech_timeout_ms", "must be >= 500 ms")
        require(self.reply_timeout_ms >= 1000, "reply_timeout_ms", "must be >= 1000 ms")

    @property
    def ways(self) -> frozenset[str]:
        """The ways turns start besides the API: a subset of :data:`START_WAYS`."""
        return parse_start(self.start)

    @property
    def voice_starts(self) -> bool:
        """Whether any speech starts a turn (always-on)."""
        return "voice" in self.ways

    @property
    def always_on(self) -> bool:
        """Same as :attr:`voice_starts` (the name of the setting ``start`` replaced)."""
        return self.voice_starts


# ------------------------------------------------------------------- commands


@dataclass(frozen=True)
class BeginTurn:
    """Send turn_start, then the pre-roll frames (first one flagged START)."""

    turn_id: int
    trigger: str
    preroll: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class StreamFrame:
    """Send this 20 ms frame of the current turn."""

    pcm: bytes


@dataclass(frozen=True)
class FinishTurn:
    """Send turn_end."""

    turn_id: int
    reason: str


@dataclass(frozen=True)
class StopPlayback:
    """Flush playback now; tell the relay when ``notify_relay``."""

    reason: str
    notify_relay: bool


@dataclass(frozen=True)
class PlayEarcon:
    kind: str  # "listening", "done", "error", "offline", "follow_up"


@dataclass(frozen=True)
class StateChanged:
    state: TurnState
    previous: TurnState


Command = BeginTurn | StreamFrame | FinishTurn | StopPlayback | PlayEarcon | StateChanged


@dataclass
class TurnMachine:
    """Decides the device's turns; see the module docstring."""

    settings: TurnSettings = field(default_factory=TurnSettings)
    state: TurnState = TurnState.IDLE
    turn_id: int = 0
    link_up: bool = False
    _entered_at: float = 0.0
    _heard_speech: bool = False
    _voiced_frames: int = 0
    _held: bool = False

    # ----------------------------------------------------------- transitions

    def _enter(self, new: TurnState, now: float, out: list[Command]) -> None:
        if new is self.state:
            return
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransitionError(
                f"illegal turn transition {self.state.value} -> {new.value}")
        logger.debug("turn %d: %s -> %s", self.turn_id, self.state.value, new.value)
        out.append(StateChanged(new, self.state))
        self.state = new
        self._entered_at = now

    def _begin(self, trigger: str, preroll: tuple[bytes, ...], now: float,
               out: list[Command]) -> None:
        if not self.link_up:
            out.append(PlayEarcon("offline"))
            return
        if self.state is TurnState.SPEAKING:
            out.append(StopPlayback("barge_in", notify_relay=True))
        self.turn_id += 1
        self._heard_speech = bool(preroll)
        self._voiced_frames = 0
        self._held = False
        self._enter(TurnState.LISTENING, now, out)
        out.append(BeginTurn(self.turn_id, trigger, preroll))
        if trigger != "vad":
            out.append(PlayEarcon("listening"))

    def _finish(self, reason: str, now: float, out: list[Command]) -> None:
        self._held = False
        out.append(FinishTurn(self.turn_id, reason))
        if reason == "no_speech":
            self._enter(TurnState.IDLE, now, out)
        else:
            out.append(PlayEarcon("done"))
            self._enter(TurnState.THINKING, now, out)

    # -------------------------------------------------------------- triggers

    def request_turn(self, source: str, now: float, *, held: bool = False,
                     preroll: tuple[bytes, ...] = ()) -> list[Command]:
        """A button, wake word, API call or signal asks for a turn.

        ``held``: the turn stays open until :meth:`request_end` (or ``max_turn_ms``),
        whatever the silence detector says. A held request while a turn is already
        open holds that turn (push-to-talk pressed while the user talks).
        ``preroll``: audio already captured that belongs to the turn (what followed
        the wake phrase before it was recognised); it does not count as speech heard,
        so the end of the wake phrase's own speech cannot end the turn.
        """
        out: list[Command] = []
        if self.state is TurnState.MUTED:
            return out
        if self.state is TurnState.LISTENING:
            self._held = self._held or held  # already listening: at most hold the turn
            return out
        self._begin(source, preroll, now, out)
        self._heard_speech = False
        self._held = held and any(isinstance(c, BeginTurn) for c in out)
        return out

    def request_end(self, source: str, reason: str, now: float) -> list[Command]:
        """Button released or toggled off: the turn ends now."""
        out: list[Command] = []
        if self.state is TurnState.LISTENING:
            self._finish(reason if self._heard_speech else "no_speech", now, out)
        return out

    @property
    def held(self) -> bool:
        """Whether the open turn is held by its trigger (see :meth:`request_turn`)."""
        return self._held and self.state is TurnState.LISTENING

    def request_interrupt(self, source: str, now: float) -> list[Command]:
        """Stop the reply now (button press, wake word, API)."""
        out: list[Command] = []
        if self.state in (TurnState.SPEAKING, TurnState.THINKING):
            out.append(StopPlayback(source, notify_relay=True))
            self._enter(TurnState.IDLE, now, out)
        elif self.state is TurnState.FOLLOW_UP:
            self._enter(TurnState.IDLE, now, out)  # "stop" also closes the window
        return out

    def set_muted(self, muted: bool, now: float) -> list[Command]:
        out: list[Command] = []
        if muted and self.state is not TurnState.MUTED:
            if self.state is TurnState.LISTENING:
                self._held = False
                out.append(FinishTurn(self.turn_id, "cancelled"))
            if self.state in (TurnState.SPEAKING, TurnState.THINKING):
                out.append(StopPlayback("muted", notify_relay=True))
            self._enter(TurnState.MUTED, now, out)
        elif not muted and self.state is TurnState.MUTED:
            self._enter(TurnState.IDLE, now, out)
        return out

    # ------------------------------------------------------------ microphone

    def on_frame(self, pcm: bytes, *, speech_started: tuple[bytes, ...] | None,
                 speech_ended: bool, in_speech: bool, now: float,
                 voiced: bool = False) -> list[Command]:
        """One captured frame with the silence detector's verdict on it.

        ``speech_started`` is the pre-roll when speech began at this frame (None
        otherwise); ``in_speech`` is whether this frame belongs to speech or its
        hangover, i.e. whether it would be streamed; ``voiced`` is whether the frame
        itself is loud enough to be speech.

        A turn opened by a button or wake word may begin while the detector is still
        in the wake phrase's speech: its end must not end the turn. Such a turn
        counts as having heard speech only after a speech onset inside the turn or
        :data:`HEARD_AFTER_VOICED_FRAMES` voiced frames.
        """
        out: list[Command] = []
        state = self.state
        if speech_started is not None:
            starts = (state is TurnState.IDLE and self.settings.voice_starts) or (
                state is TurnState.SPEAKING and self.settings.voice_barge_in)
            if state is TurnState.FOLLOW_UP:
                self._begin("follow_up", speech_started, now, out)
                self._heard_speech = True
            elif starts:
                self._begin("vad", speech_started, now, out)
                self._heard_speech = True
            elif state is TurnState.LISTENING:
                self._heard_speech = True
                out.extend(StreamFrame(f) for f in speech_started)
        if self.state is TurnState.LISTENING:
            if voiced:
                self._voiced_frames += 1
                if self._voiced_frames >= HEARD_AFTER_VOICED_FRAMES:
                    self._heard_speech = True
            if in_speech:
                out.append(StreamFrame(pcm))
            if speech_ended and self._heard_speech and not self._held:
                self._finish("silence", now, out)
        return out

    # ----------------------------------------------------------------- relay

    def on_link(self, up: bool, now: float) -> list[Command]:
        out: list[Command] = []
        self.link_up = up
        if not up and self.state in (TurnState.LISTENING, TurnState.THINKING):
            self._held = False
            out.append(PlayEarcon("offline"))
            self._enter(TurnState.IDLE, now, out)
        elif not up and self.state is TurnState.FOLLOW_UP:
            self._enter(TurnState.IDLE, now, out)
        return out

    def on_response_start(self, now: float) -> list[Command]:
        out: list[Command] = []
        if self.state is TurnState.LISTENING:
            # The upstream decided the user had finished (Nova detects the end of
            # speech itself, sooner than our hangover): the turn is over.
            out.append(FinishTurn(self.turn_id, "answered"))
        if self.state in (TurnState.THINKING, TurnState.LISTENING):
            self._enter(TurnState.SPEAKING, now, out)
        return out

    def on_reply_finished(self, now: float) -> list[Command]:
        """The reply's playback drained (or it had no audio): maybe open the follow-up."""
        out: list[Command] = []
        if self.state in (TurnState.SPEAKING, TurnState.THINKING):
            if self.settings.follow_up_s > 0 and not self.settings.voice_starts:
                self._enter(TurnState.FOLLOW_UP, now, out)
                out.append(PlayEarcon("follow_up"))
            else:
                self._enter(TurnState.IDLE, now, out)
        return out

    def on_remote_interrupt(self, now: float) -> list[Command]:
        """The relay says the user barged in (the upstream heard it)."""
        out: list[Command] = [StopPlayback("remote", notify_relay=False)]
        if self.state is TurnState.SPEAKING:
            self._enter(TurnState.IDLE, now, out)
        return out

    def on_error(self, now: float, *, turn_refused: bool = False) -> list[Command]:
        """The relay reported an error. ``turn_refused``: it refused the turn being
        streamed (at capacity): the turn ends here, its audio would only be dropped."""
        out: list[Command] = [PlayEarcon("error")]
        if turn_refused and self.state is TurnState.LISTENING:
            self._held = False
            out.append(FinishTurn(self.turn_id, "refused"))
            self._enter(TurnState.IDLE, now, out)
        elif self.state in (TurnState.THINKING, TurnState.SPEAKING):
            self._enter(TurnState.IDLE, now, out)
        return out

    # ------------------------------------------------------------------ time

    def tick(self, now: float) -> list[Command]:
        """Check the timeouts; call a few times a second."""
        out: list[Command] = []
        elapsed_ms = (now - self._entered_at) * 1000.0
        s = self.settings
        if self.state is TurnState.LISTENING:
            if elapsed_ms >= s.max_turn_ms:
                self._finish("max_length" if self._heard_speech else "no_speech", now, out)
            elif not self._heard_speech and not self._held and \
                    elapsed_ms >= s.no_speech_timeout_ms:
                self._finish("no_speech", now, out)
        elif self.state is TurnState.FOLLOW_UP and elapsed_ms >= s.follow_up_s * 1000.0:
            self._enter(TurnState.IDLE, now, out)
        elif self.state is TurnState.THINKING and elapsed_ms >= s.reply_timeout_ms:
            out.append(PlayEarcon("error"))
            self._enter(TurnState.IDLE, now, out)
        return out
