"""The GPIO button: push-to-talk or toggle, press-to-interrupt, long press to mute.

:class:`ButtonLogic` decides; :class:`ButtonTrigger` only wires it to gpiozero and
the event loop. What a press means is fixed when the button goes down, from the
mode and the device state at that moment, by one table, :data:`PRESS_PLANS`:

=================  ==============================  =================================
device state       push_to_talk                    toggle
=================  ==============================  =================================
IDLE/ERROR/OFFLINE start the turn at press,        start the turn at release
FOLLOW_UP          end it at release               (if the press was short)
                   end it at release               (if the press was short)
LISTENING          nothing at press (the press     end the turn at release
                   takes over the open turn),      (if the press was short)
                   end it at release
THINKING/SPEAKING  interrupt at press, start a     interrupt at press, nothing more
                   new turn at once, end it at
                   release
MUTED              nothing (a long press unmutes)  nothing (a long press unmutes)
=================  ==============================  =================================

Why these choices:

* **Interrupts happen at press**, never later, because a user who presses while the
  assistant talks wants it quiet now.
* **Push-to-talk, pressed during a reply**: holding the button *means* "I am talking",
  so the same press interrupts and opens a new turn; making the user press twice would
  lose their first words. In toggle mode a press during a reply only stops it (the
  common intent is "stop"); a second press starts a turn.
* **Long press = mute toggle, and never a turn.** In toggle mode turn decisions are
  therefore taken at *release* of a short press: a press held ``long_press_ms`` toggles
  mute instead (and its release does nothing). The cost is the length of a tap
  (~0.1-0.2 s) before a turn opens, which is shorter than any sentence start.
  In push-to-talk mode a long hold is just a long sentence (holding *is* talking), so
  holding mutes only when the press cannot start a turn, i.e. when already muted
  (unmute). Muting a push-to-talk device is rarely needed (its microphone is only sent
  while the button is held); when a wake word is also enabled, mute through the local
  API, or use toggle mode.

**Debounce is done here, in the pure logic**, not by the GPIO pin factory: every
mechanical switch bounces (a tactile switch for 1-10 ms, twice or more at each edge),
and a bounce that got through once gave five turns and cut a reply short. The first
edge that changes the debounced level is acted on at once (no added latency); edges
in the ``bounce_ms`` that follow are contact bounce and only update the raw level.
When the lockout ends and the raw level has been steady for ``bounce_ms`` yet differs
from the debounced one (the last bounce was a real change), :meth:`ButtonLogic.tick`
commits it. gpiozero is therefore given no ``bounce_time`` of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from edgevoice.clock import Clock, MonotonicClock
from edgevoice.config.base import require
from edgevoice.feedback.states import DeviceState
from edgevoice.triggers.base import (
    Emit,
    InterruptRequested,
    MuteToggled,
    TriggerEvent,
    TriggerUnavailableError,
    TurnEndRequested,
    TurnStartRequested,
    import_extra,
)

logger = logging.getLogger(__name__)

SOURCE = "button"

ButtonMode = Literal["push_to_talk", "toggle"]


@dataclass(frozen=True)
class ButtonSettings:
    """A momentary push button between a GPIO pin and ground (or 3.3 V)."""

    pin: int = 17
    """BCM (GPIO) number of the pin, not the physical header position.
    GPIO17 is physical pin 11."""

    pull_up: bool = True
    """True: the button connects the pin to ground and the internal pull-up is used.
    False: it connects the pin to 3.3 V and the internal pull-down is used."""

    bounce_ms: int = 30
    """After an edge, further edges for this long are contact bounce (ms). Tactile
    switches settle within 1-10 ms, worn or large ones within 20; 30 leaves margin and
    is far below the shortest deliberate tap (~80 ms). Debouncing is done by edgevoice
    itself and cannot be switched off: an RC-debounced button works with any value."""

    mode: ButtonMode = "push_to_talk"
    """``push_to_talk``: hold to talk, release to end. ``toggle``: press to start,
    press again to end."""

    long_press_ms: int = 2000
    """Holding this long toggles mute instead of starting a turn (in push-to-talk
    mode, only when muted: holding is talking there)."""

    def __post_init__(self) -> None:
        require(0 <= self.pin <= 27, "pin", "must be a BCM GPIO number in [0, 27]")
        require(
            5 <= self.bounce_ms <= 200,
            "bounce_ms",
            "must be in [5, 200] ms: every mechanical switch bounces, and without a "
            "debounce each bounce is a press (a tactile switch needs 10-30)",
        )
        require(
            self.mode in ("push_to_talk", "toggle"),
            "mode",
            "must be 'push_to_talk' or 'toggle'",
        )
        require(
            300 < self.long_press_ms <= 30_000,
            "long_press_ms",
            "must be above 300 ms and at most 30000 ms",
        )


class PressPlan(enum.Enum):
    """What one press means, decided when the button goes down."""

    START_NOW = "start_now"
    """push-to-talk: start at press, end at release."""
    INTERRUPT_AND_START = "interrupt_and_start"
    """push-to-talk during a reply: interrupt and start at press, end at release."""
    TAKE_OVER = "take_over"
    """push-to-talk while a turn is already open: end it at release."""
    START_ON_RELEASE = "start_on_release"
    """toggle: start at release of a short press."""
    END_ON_RELEASE = "end_on_release"
    """toggle: end at release of a short press."""
    INTERRUPT = "interrupt"
    """toggle during a reply: interrupt at press, nothing at release."""
    IGNORE = "ignore"
    """muted: a short press does nothing (a long press unmutes)."""


_D = DeviceState
_P = PressPlan

#: The meaning of a press for every (mode, device state). The one place these rules live.
PRESS_PLANS: dict[tuple[ButtonMode, DeviceState], PressPlan] = {
    ("push_to_talk", _D.IDLE): _P.START_NOW,
    ("push_to_talk", _D.ERROR): _P.START_NOW,
    ("push_to_talk", _D.OFFLINE): _P.START_NOW,
    ("push_to_talk", _D.LISTENING): _P.TAKE_OVER,
    ("push_to_talk", _D.THINKING): _P.INTERRUPT_AND_START,
    ("push_to_talk", _D.SPEAKING): _P.INTERRUPT_AND_START,
    ("push_to_talk", _D.MUTED): _P.IGNORE,
    ("push_to_talk", _D.FOLLOW_UP): _P.START_NOW,
    ("toggle", _D.IDLE): _P.START_ON_RELEASE,
    ("toggle", _D.ERROR): _P.START_ON_RELEASE,
    ("toggle", _D.OFFLINE): _P.START_ON_RELEASE,
    ("toggle", _D.LISTENING): _P.END_ON_RELEASE,
    ("toggle", _D.THINKING): _P.INTERRUPT,
    ("toggle", _D.SPEAKING): _P.INTERRUPT,
    ("toggle", _D.MUTED): _P.IGNORE,
    ("toggle", _D.FOLLOW_UP): _P.START_ON_RELEASE,
}

#: Plans whose turn is already open when the button goes down (push-to-talk).
_ENDS_AT_RELEASE = frozenset({_P.START_NOW, _P.INTERRUPT_AND_START, _P.TAKE_OVER})


class ButtonPhase(enum.Enum):
    """Where the physical button is in a press."""

    UP = "up"
    DOWN = "down"
    """Pressed, not yet long."""
    HELD_LONG = "held_long"
    """Held past ``long_press_ms``: mute was toggled; the release does nothing."""


class ButtonLogic:
    """The button's decisions as a pure state machine: edges and time in, events out.

    Call :meth:`on_press` / :meth:`on_release` with every *raw* edge from the pin
    (bounces included) and :meth:`tick` at (or after) :attr:`deadline`; each returns
    the events to emit, in order. ``now`` is monotonic seconds.
    """

    def __init__(self, settings: ButtonSettings) -> None:
        self._mode: ButtonMode = settings.mode
        self._long_press_s = settings.long_press_ms / 1000.0
        self._bounce_s = settings.bounce_ms / 1000.0
        self._state = DeviceState.IDLE
        self._muted = False
        self._phase = ButtonPhase.UP
        self._plan = PressPlan.IGNORE
        self._pressed_at = 0.0
        # debounce: the raw level, when it last changed, and the end of the lockout
        self._raw_down = False
        self._raw_changed_at = float("-inf")
        self._lockout_until = float("-inf")
        #: edges dropped as contact bounce (for diagnostics)
        self.bounces = 0

    @property
    def phase(self) -> ButtonPhase:
        return self._phase

    @property
    def deadline(self) -> float | None:
        """When :meth:`tick` must next be called, or None.

        Either the long-press instant or the moment a bounced level settles.
        """
        deadlines: list[float] = []
        if self._phase is ButtonPhase.DOWN and self._long_press_allowed():
            deadlines.append(self._pressed_at + self._long_press_s)
        settle = self._settle_at()
        if settle is not None:
            deadlines.append(settle)
        return min(deadlines) if deadlines else None

    def set_state(self, state: DeviceState) -> None:
        """Learn the device state; MUTED and leaving MUTED also set the mute view."""
        self._state = state
        self._muted = state is DeviceState.MUTED

    def on_press(self, now: float) -> list[TriggerEvent]:
        """A raw edge: the contact closed."""
        return self._edge(True, now)

    def on_release(self, now: float) -> list[TriggerEvent]:
        """A raw edge: the contact opened."""
        return self._edge(False, now)

    def tick(self, now: float) -> list[TriggerEvent]:
        """Commit a level that settled after a bounce; fire the long press when due."""
        events: list[TriggerEvent] = []
        settle = self._settle_at()
        if settle is not None and now >= settle:
            self._lockout_until = settle + self._bounce_s
            events = self._pressed(settle) if self._raw_down else self._released(settle)
        return events + self._long_press(now)

    # -- debounce ------------------------------------------------------------------------

    def _edge(self, down: bool, now: float) -> list[TriggerEvent]:
        # A level that settled before this edge counts first (the tick came late).
        events = self.tick(now) if self._settle_at() is not None else []
        if down != self._raw_down:
            self._raw_down = down
            self._raw_changed_at = now
        if now < self._lockout_until:
            self.bounces += 1
            logger.debug("%s at %.3f ignored (contact bounce)", "press" if down else "release", now)
            return events
        if down is self._debounced_down():
            return events  # a repeated edge: nothing changed
        self._lockout_until = now + self._bounce_s
        return events + (self._pressed(now) if down else self._released(now))

    def _debounced_down(self) -> bool:
        return self._phase is not ButtonPhase.UP

    def _settle_at(self) -> float | None:
        """When the raw level, if it differs from the debounced one, counts as real."""
        if self._raw_down is self._debounced_down():
            return None
        return max(self._lockout_until, self._raw_changed_at + self._bounce_s)

    # -- debounced presses -----------------------------------------------------------------

    def _pressed(self, now: float) -> list[TriggerEvent]:
        self._goto(ButtonPhase.DOWN)
        self._pressed_at = now
        self._plan = _P.IGNORE if self._muted else PRESS_PLANS[(self._mode, self._state)]
        logger.debug("press in %s/%s: %s", self._mode, self._state.value, self._plan.value)
        held = self._mode == "push_to_talk"
        if self._plan is _P.START_NOW:
            return [TurnStartRequested(SOURCE, held=held)]
        if self._plan is _P.INTERRUPT_AND_START:
            return [InterruptRequested(SOURCE), TurnStartRequested(SOURCE, held=held)]
        if self._plan is _P.TAKE_OVER:
            # the open turn (started by voice or the wake word) is held from now on
            return [TurnStartRequested(SOURCE, held=True)]
        if self._plan is _P.INTERRUPT:
            return [InterruptRequested(SOURCE)]
        return []

    def _released(self, now: float) -> list[TriggerEvent]:
        # A release can arrive before the tick that would have marked the press long
        # (the loop was busy): judge by the timestamps, not by whether tick ran.
        events = self._long_press(now)
        was_long = self._phase is ButtonPhase.HELD_LONG
        self._goto(ButtonPhase.UP)
        plan, self._plan = self._plan, _P.IGNORE
        if plan in _ENDS_AT_RELEASE:
            # push-to-talk releases end the turn even after a "long" hold: holding is
            # talking there, and a muted press never has one of these plans.
            return [*events, TurnEndRequested(SOURCE, "released")]
        if was_long:
            return events
        if plan is _P.START_ON_RELEASE:
            # toggle: the turn is held open until the next press ends it
            return [*events, TurnStartRequested(SOURCE, held=True)]
        if plan is _P.END_ON_RELEASE:
            return [*events, TurnEndRequested(SOURCE, "pressed")]
        return events

    def _long_press(self, now: float) -> list[TriggerEvent]:
        """Fire the long press if the button has been held long enough."""
        if not (self._phase is ButtonPhase.DOWN and self._long_press_allowed()):
            return []
        if now < self._pressed_at + self._long_press_s:
            return []
        self._goto(ButtonPhase.HELD_LONG)
        self._muted = not self._muted
        logger.info("long press: microphone %s", "muted" if self._muted else "unmuted")
        return [MuteToggled(self._muted)]

    def _long_press_allowed(self) -> bool:
        return self._mode == "toggle" or self._plan is _P.IGNORE

    def _goto(self, phase: ButtonPhase) -> None:
        logger.debug("button %s -> %s", self._phase.value, phase.value)
        self._phase = phase


class ButtonTrigger:
    """A gpiozero ``Button`` driving a :class:`ButtonLogic`; events go to ``emit``.

    gpiozero calls back from its own thread: the callbacks only take a timestamp and
    hop into the event loop with ``call_soon_threadsafe``; everything else runs there.
    """

    name = "button"

    def __init__(
        self,
        settings: ButtonSettings,
        pin_factory: Any = None,
        *,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.logic = ButtonLogic(settings)
        self._pin_factory = pin_factory
        self._clock: Clock = clock or MonotonicClock()
        self._button: Any = None
        self._emit: Emit | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def start(self, emit: Emit) -> None:
        if self._button is not None:
            return
        gpiozero = import_extra("gpiozero", "pi", "the GPIO button")
        s = self.settings
        try:
            button = gpiozero.Button(
                s.pin,
                pull_up=s.pull_up,
                bounce_time=None,  # ButtonLogic debounces (see the module docstring)
                pin_factory=self._pin_factory,
            )
        except gpiozero.GPIOZeroError as exc:
            raise TriggerUnavailableError(
                f"cannot use GPIO{s.pin} for the button: {exc}. Check that this is a "
                "Raspberry Pi with lgpio installed and that no other program uses the pin."
            ) from exc
        self._loop = asyncio.get_running_loop()
        self._emit = emit
        button.when_pressed = self._pressed_in_gpio_thread
        button.when_released = self._released_in_gpio_thread
        self._button = button
        logger.info("button on GPIO%d (%s, pull-%s)", s.pin, s.mode, "up" if s.pull_up else "down")

    async def stop(self) -> None:
        self._cancel_timer()
        button, self._button = self._button, None
        if button is not None:
            button.when_pressed = None
            button.when_released = None
            button.close()
        self._emit = None

    def set_state(self, state: DeviceState) -> None:
        self.logic.set_state(state)

    # -- gpiozero's threads: take the time, hop to the loop, nothing else --------------

    def _pressed_in_gpio_thread(self) -> None:
        self._to_loop(self._on_press, self._clock.now())

    def _released_in_gpio_thread(self) -> None:
        self._to_loop(self._on_release, self._clock.now())

    def _to_loop(self, handler: Callable[[float], None], now: float) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        # RuntimeError: the loop closed between the check and the call (shutdown).
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(handler, now)

    # -- the event loop -------------------------------------------------------------------

    def _on_press(self, now: float) -> None:
        self._deliver(self.logic.on_press(now))
        self._schedule_tick()

    def _on_release(self, now: float) -> None:
        self._deliver(self.logic.on_release(now))
        self._schedule_tick()

    def _on_tick(self) -> None:
        self._timer = None
        self._deliver(self.logic.tick(self._clock.now()))
        # Clocks may disagree by a hair with the loop's timer: try again if early.
        self._schedule_tick()

    def _schedule_tick(self) -> None:
        self._cancel_timer()
        deadline = self.logic.deadline
        if deadline is None or self._loop is None:
            return
        delay = max(0.0, deadline - self._clock.now())
        self._timer = self._loop.call_later(delay, self._on_tick)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _deliver(self, events: list[TriggerEvent]) -> None:
        emit = self._emit
        if emit is None:
            return
        for event in events:
            logger.debug("button event %s", event)
            emit(event)
