"""The Trigger seam: how button presses, wake words and barge-in reach the daemon.

A trigger turns something that happened on the hardware or in the audio into one of
the frozen events below; the daemon's turn state machine consumes them. Triggers
never decide what the daemon does next: they report what the user asked for, and
the state machine accepts or ignores it. That keeps every rule about turns in one
place and lets a trigger be tested alone.

Two shapes exist:

* :class:`Trigger` -- event sources with their own threads or callbacks (a GPIO
  button). ``start(emit)`` hands them the daemon's ``emit``; they must call it in the
  event loop's thread (gpiozero calls back from its own threads, so they marshal
  with ``loop.call_soon_threadsafe``).
* :class:`AudioTrigger` -- triggers fed with every captured 20 ms frame (wake word,
  voice barge-in). ``process(frame)`` *returns* its events instead of emitting them,
  so the daemon learns about a wake word synchronously, on the very frame that
  completed it, and can cut its pre-roll buffer there.

Every trigger is told the device state through ``set_state`` (see
:class:`~edgevoice.feedback.states.DeviceState`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Protocol, runtime_checkable

from edgevoice.errors import EdgevoiceError
from edgevoice.feedback.states import DeviceState


@dataclass(frozen=True)
class TurnStartRequested:
    """The user asked to start talking (button press, wake word)."""

    source: str
    """Which trigger asked: ``"button"``, ``"wake"``, ``"api"``..."""

    held: bool = False
    """The turn stays open until the trigger ends it (push-to-talk held, toggle on):
    the silence detector's end of speech does not end it, ``max_turn_ms`` still does."""

    rewind_frames: int = field(default=0, compare=False)
    """The turn's audio began this many captured frames back, counting the frame that
    produced this event (the wake phrase ended there): the daemon sends them from its
    short buffer first. 0: the turn starts with the next frame. Not part of equality:
    it says where the audio starts, not what is asked."""


@dataclass(frozen=True)
class TurnEndRequested:
    """The user signalled the end of their turn (button released or pressed again).

    May arrive when no turn is open (the silence detector already ended it): the daemon
    ignores it then.
    """

    source: str
    reason: str
    """Why, for logs: ``"released"`` (push-to-talk), ``"pressed"`` (toggle)."""


@dataclass(frozen=True)
class InterruptRequested:
    """The user wants the assistant to stop talking (or stop preparing a reply) now."""

    source: str
    """``"button"``, ``"wake"`` or ``"voice"`` (barge-in over the reply)."""


@dataclass(frozen=True)
class MuteToggled:
    """The user toggled the microphone mute; ``muted`` is the state they asked for."""

    muted: bool


TriggerEvent = TurnStartRequested | TurnEndRequested | InterruptRequested | MuteToggled

#: The daemon's sink for events; must be called in the event loop's thread.
Emit = Callable[[TriggerEvent], None]


class TriggerUnavailableError(EdgevoiceError):
    """A trigger or feedback device cannot work here: an optional dependency (extra)
    is not installed, a model file is missing, or there is no GPIO. Not retryable:
    the operator must install something or change the configuration."""


@runtime_checkable
class Trigger(Protocol):
    """Something that turns user actions into :data:`TriggerEvent`s."""

    name: str

    async def start(self, emit: Emit) -> None:
        """Begin reporting events through ``emit`` (called in the event loop's thread)."""

    async def stop(self) -> None:
        """Stop reporting and release hardware. Idempotent."""

    def set_state(self, state: DeviceState) -> None:
        """Learn what the device is doing now (decides e.g. whether a press interrupts)."""


@runtime_checkable
class AudioTrigger(Trigger, Protocol):
    """A trigger fed with every captured frame (16 kHz mono s16le, 20 ms, 640 bytes).

    ``process`` runs in the event loop for every frame, so it must be cheap (well under
    a millisecond on a Pi Zero 2 W) and must not block. It returns the events caused by
    this frame; audio triggers do not call ``emit``.
    """

    def process(self, frame: bytes, level_dbfs: float | None = None,
                noise_floor_dbfs: float | None = None) -> list[TriggerEvent]:
        """Feed one captured frame; return the events it caused (usually none).

        ``level_dbfs`` is the frame's RMS level and ``noise_floor_dbfs`` the room's
        noise floor, as the silence detector measured them for this very frame (the
        level is computed once per frame for every consumer); None: not measured, the
        trigger measures what it needs itself."""


@runtime_checkable
class QuietListener(Protocol):
    """An audio trigger that, at times, only stores the frames of a quiet room.

    A device waiting in a quiet room may then hand it those frames late, in batches
    (fewer event-loop wake-ups, issue 15): every frame still arrives, in order, so
    what it decides is the same; only a frame that it would act on must come at once.
    """

    def listen_margin_db(self) -> float | None:
        """Now, how far above the room's noise floor (dB, the silence detector's) a
        frame must be for this trigger to need it at once; None: it needs every frame
        at once (it is working on the audio)."""


def import_extra(module: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or say which ``edgevoice[extra]`` provides it.

    Heavy or platform-specific packages (gpiozero, the wake-word runtime) are imported
    only when the feature is enabled, so a relay or a laptop never needs them.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TriggerUnavailableError(
            f"{purpose} needs the Python package {module!r}, which is not installed "
            f"({exc}). Install it with: pip install 'edgevoice[{extra}]', "
            f"or disable {purpose} in the configuration."
        ) from exc
