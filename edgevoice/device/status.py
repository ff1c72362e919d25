"""What the device tells the world about itself: STATUS text, readiness, the shown state.

- :class:`StatusBoard`: the one-line status (systemd ``STATUS=``), the microphone's
  problem if any, and readiness (``READY=1`` once audio is open and the link has made
  its first attempt).
- :class:`StatePresenter`: the user-visible :class:`DeviceState` (LED, triggers,
  barge-in detector), from the turn state by one table, plus OFFLINE and a timed ERROR.
- :class:`EarconPlayer`: the device's own sounds, never over a reply.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from edgevoice.clock import Clock
from edgevoice.device.downlink import Downlink
from edgevoice.device.observer import DeviceObserver
from edgevoice.device.turn import TurnState
from edgevoice.feedback.earcons import Earcon, Earcons
from edgevoice.feedback.states import DeviceState

logger = logging.getLogger(__name__)

#: How long the ERROR state (LED, /stats) lasts after a failed turn, in seconds.
ERROR_STATE_S = 3.0
#: Before the first open, the microphone's problem is this (not reported as unhealthy).
AUDIO_NOT_OPENED = "audio not opened yet"

#: What the user sees in each turn state (OFFLINE and ERROR come from the link and time).
SHOWN_STATE: dict[TurnState, DeviceState] = {
    TurnState.IDLE: DeviceState.IDLE,
    TurnState.LISTENING: DeviceState.LISTENING,
    TurnState.THINKING: DeviceState.THINKING,
    TurnState.SPEAKING: DeviceState.SPEAKING,
    TurnState.MUTED: DeviceState.MUTED,
    # waiting for speech alone to start the next turn: a press starts one as when idle
    TurnState.FOLLOW_UP: DeviceState.FOLLOW_UP,
}

#: The turn machine's earcon kinds and the sounds that play them.
EARCONS: dict[str, Earcon] = {
    "listening": Earcon.LISTEN_START, "done": Earcon.LISTEN_END,
    "error": Earcon.ERROR, "offline": Earcon.OFFLINE,
    "follow_up": Earcon.FOLLOW_UP, "thinking": Earcon.THINKING,
}


class LinkView(Protocol):
    """Whether the relay can be reached (DeviceLink has these)."""

    @property
    def connected(self) -> bool: ...

    @property
    def suspended(self) -> bool: ...


class StateDisplay(Protocol):
    """Something that shows the device state (the LED, a trigger, barge-in)."""

    def set_state(self, state: DeviceState) -> None: ...


class Readiness(enum.Enum):
    """Startup: READY once (and for good) audio is open and the link has been tried."""

    STARTING = "starting"
    READY = "ready"


class StatusBoard:
    """STATUS text, the microphone's problem, and readiness."""

    def __init__(self, on_state: Callable[[str], None] | None = None,
                 on_ready: Callable[[str], None] | None = None) -> None:
        self.on_state = on_state
        self.on_ready = on_ready
        self.text = "starting"
        self.audio_problem: str | None = AUDIO_NOT_OPENED
        self.readiness = Readiness.STARTING
        #: the link loop has made its first attempt (answered or not)
        self.link_attempted = False

    @property
    def ready(self) -> bool:
        return self.readiness is Readiness.READY

    def set(self, text: str) -> None:
        if text != self.text:
            self.text = text
            if self.on_state is not None:
                self.on_state(text)

    def audio_opened(self) -> None:
        self.audio_problem = None
        self._maybe_ready()

    def audio_failed(self, problem: str) -> None:
        self.audio_problem = problem

    def link_tried(self) -> None:
        self.link_attempted = True
        self._maybe_ready()

    def _maybe_ready(self) -> None:
        """Ready once audio is open and the link loop has made its first attempt.

        Not "once the relay answered": a device booting while the relay is down must
        still come up (and say so in its status) rather than be killed by systemd's
        start timeout and restarted in a loop.
        """
        if self.ready or self.audio_problem is not None or not self.link_attempted:
            return
        self.readiness = Readiness.READY
        logger.info("ready: %s", self.text)
        if self.on_ready is not None:
            self.on_ready(self.text)


class StatePresenter:
    """Shows the device state on every display, when it changes."""

    def __init__(self, clock: Clock, link: LinkView, displays: Sequence[StateDisplay]) -> None:
        self.clock = clock
        self.link = link
        self.displays = list(displays)
        self.state = DeviceState.OFFLINE
        self._shown: DeviceState | None = None  # what the displays were last told
        self._error_until = 0.0

    def flag_error(self, now: float) -> None:
        """Show ERROR (when idle) for :data:`ERROR_STATE_S` from ``now``."""
        self._error_until = now + ERROR_STATE_S

    def show(self, turn_state: TurnState) -> None:
        state = SHOWN_STATE[turn_state]
        if state is DeviceState.IDLE:
            if not (self.link.connected or self.link.suspended):
                state = DeviceState.OFFLINE
            elif self.clock.now() < self._error_until:
                state = DeviceState.ERROR
        self.state = state
        if state is self._shown:
            return
        self._shown = state
        for display in self.displays:
            display.set_state(state)


class EarconPlayer:
    """Plays the turn machine's earcons, never over the assistant.

    An error during a reply (a reply cut by a fault) is not dropped: it plays once
    what did arrive of the reply has been heard (:meth:`reply_ended`), unless the
    reply is stopped first.
    """

    def __init__(self, earcons: Earcons | None, downlink: Downlink, presenter: StatePresenter,
                 clock: Clock, observer: DeviceObserver | None = None) -> None:
        self.earcons = earcons
        self.observer = observer or DeviceObserver()
        self.downlink = downlink
        self.presenter = presenter
        self.clock = clock
        #: an earcon due once the reply now playing has been heard
        self.after_reply: str | None = None

    def play(self, kind: str) -> None:
        if kind == "error":
            self.presenter.flag_error(self.clock.now())
        if self.earcons is None:
            return
        if self.downlink.reply_playing:
            if kind == "error":
                self.after_reply = kind
            return
        if self.downlink.play_earcon(self.earcons.pcm(EARCONS[kind])):
            self.observer.earcon_played(kind, self.clock.now())

    def reply_ended(self) -> None:
        """A reply finished playing: play what was held back for it."""
        kind, self.after_reply = self.after_reply, None
        if kind is not None:
            self.play(kind)

    def cancel_pending(self) -> None:
        """The reply was stopped: what waited for its end is moot."""
        self.after_reply = None
