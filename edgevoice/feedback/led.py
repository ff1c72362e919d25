"""The status LED: one light pattern per device state.

=========  ==============================  ===========================================
state      pattern                         why
=========  ==============================  ===========================================
IDLE       off                             nothing to say; no light in a dark bedroom
LISTENING  on                              "I hear you": steady while the turn is open
THINKING   blink 0.25 s on / 0.25 s off    waiting for the reply
SPEAKING   pulse, 0.6 s up / 0.6 s down    the assistant talks (plain LED: blink 0.6/0.6)
ERROR      fast blink 0.1 s / 0.1 s        something failed; look at the logs
OFFLINE    slow blink 1 s on / 1 s off     the relay is unreachable; reconnecting
MUTED      blip 0.1 s every 3 s            the microphone is off (a reminder, not a glare)
FOLLOW_UP  pulse, 0.2 s up / 0.2 s down    "still listening": talk on without the wake word
=========  ==============================  ===========================================

:func:`pattern_for` is the table; :class:`LedController` plays a pattern with
gpiozero's ``LED``/``PWMLED``, whose ``blink``/``pulse`` run in gpiozero's own
background thread, so nothing here needs a timer in the event loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from edgevoice.feedback.settings import FeedbackSettings
from edgevoice.feedback.states import DeviceState
from edgevoice.triggers.base import TriggerUnavailableError, import_extra

logger = logging.getLogger(__name__)

PatternKind = Literal["off", "on", "blink", "pulse"]


@dataclass(frozen=True)
class LedPattern:
    """How the LED shows a state. Times are in milliseconds."""

    kind: PatternKind
    on_ms: int = 0
    """blink: time lit. pulse: time to fade in."""
    off_ms: int = 0
    """blink: time dark. pulse: time to fade out."""


_PATTERNS: dict[DeviceState, LedPattern] = {
    DeviceState.IDLE: LedPattern("off"),
    DeviceState.LISTENING: LedPattern("on"),
    DeviceState.THINKING: LedPattern("blink", on_ms=250, off_ms=250),
    DeviceState.SPEAKING: LedPattern("pulse", on_ms=600, off_ms=600),
    DeviceState.ERROR: LedPattern("blink", on_ms=100, off_ms=100),
    DeviceState.OFFLINE: LedPattern("blink", on_ms=1000, off_ms=1000),
    DeviceState.MUTED: LedPattern("blink", on_ms=100, off_ms=2900),
    DeviceState.FOLLOW_UP: LedPattern("pulse", on_ms=200, off_ms=200),
}


def pattern_for(state: DeviceState) -> LedPattern:
    """The LED pattern that shows ``state``."""
    return _PATTERNS[state]


class LedController:
    """Drives an LED on ``settings.led_pin`` to show the device state.

    With ``led_pwm`` a ``PWMLED`` is used (software PWM; pulses fade smoothly); without,
    a plain ``LED`` blinks where a pulse was asked for. Call :meth:`close` at exit so
    the pin is released and the LED left dark.
    """

    def __init__(self, settings: FeedbackSettings, pin_factory: Any = None) -> None:
        self.settings = settings
        gpiozero = import_extra("gpiozero", "pi", "the status LED")
        cls = gpiozero.PWMLED if settings.led_pwm else gpiozero.LED
        try:
            self._led: Any = cls(settings.led_pin, pin_factory=pin_factory)
        except gpiozero.GPIOZeroError as exc:
            raise TriggerUnavailableError(
                f"cannot use GPIO{settings.led_pin} for the LED: {exc}. Check that this is "
                "a Raspberry Pi with lgpio installed and that no other program uses the pin."
            ) from exc
        self._state: DeviceState | None = None
        self._pattern = LedPattern("off")

    @property
    def led(self) -> Any:
        """The gpiozero device (for tests and diagnostics)."""
        return self._led

    @property
    def pattern(self) -> LedPattern:
        """The pattern being shown."""
        return self._pattern

    def set_state(self, state: DeviceState) -> None:
        """Show ``state``. Repeating the current state does not restart its rhythm."""
        if state is self._state or self._led is None:
            return
        self._state = state
        self._show(pattern_for(state))

    def close(self) -> None:
        """Turn the LED off and release the pin. Idempotent."""
        led, self._led = self._led, None
        if led is not None:
            led.off()
            led.close()

    def _show(self, pattern: LedPattern) -> None:
        led = self._led
        logger.debug("LED %s -> %s", self._state, pattern)
        self._pattern = pattern
        on_s, off_s = pattern.on_ms / 1000.0, pattern.off_ms / 1000.0
        if pattern.kind == "off":
            led.off()
        elif pattern.kind == "on":
            led.on()
        elif pattern.kind == "pulse" and self.settings.led_pwm:
            led.pulse(fade_in_time=on_s, fade_out_time=off_s, background=True)
        else:
            # blink, and pulse on a plain LED (which cannot dim)
            led.blink(on_time=on_s, off_time=off_s, background=True)
