"""The ``triggers:`` section of the device configuration, composed of each trigger's own."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgevoice.triggers.bargein import BargeInSettings
from edgevoice.triggers.button import ButtonSettings
from edgevoice.triggers.wake import WakeSettings


@dataclass(frozen=True)
class TriggerSettings:
    """How each trigger behaves. Which of them start turns is ``turn.start``."""

    button: ButtonSettings = field(default_factory=ButtonSettings)
    """A GPIO push button."""

    wake: WakeSettings = field(default_factory=WakeSettings)
    """A wake word."""

    barge_in: BargeInSettings = field(default_factory=BargeInSettings)
    """Interrupting the reply by talking over it."""
