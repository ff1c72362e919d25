"""What the device is doing, as one value the daemon broadcasts to triggers and feedback.

The daemon's turn state machine owns the truth; it calls ``set_state`` on every
trigger and on the LED controller whenever that truth changes. Triggers use it to
decide what a press or a wake word means (a press while SPEAKING interrupts); the
LED shows it. Keeping it one small enum, rather than a bundle of booleans, means
each consumer handles every state explicitly and mypy notices a forgotten one.
"""

from __future__ import annotations

import enum


class DeviceState(enum.StrEnum):
    """The user-visible state of the device. Values are stable strings (logs, /stats)."""

    IDLE = "idle"
    """Waiting for a trigger (button, wake word, API)."""
    LISTENING = "listening"
    """A turn is open: the user's audio is being sent."""
    THINKING = "thinking"
    """The user's turn ended; waiting for the first audio of the reply."""
    SPEAKING = "speaking"
    """The reply is playing."""
    ERROR = "error"
    """The last turn failed (upstream error, audio error); cleared by the next turn."""
    OFFLINE = "offline"
    """The relay is unreachable; the daemon is reconnecting."""
    MUTED = "muted"
    """The user muted the microphone: no trigger may open a turn until unmuted."""
    FOLLOW_UP = "follow_up"
    """A reply just ended and the device listens for a follow-up: speaking now starts
    a turn without the wake word or the button (``turn.follow_up_s``)."""
