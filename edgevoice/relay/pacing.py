"""One timer paces every session's downlink (issue 15, bench row 14).

A session sends its reply frames as soon as they are due (up to
``PACING_LEAD_FRAMES`` ahead of real time). Most frames are due the moment the
upstream hands them over, and the session sends them there and then; only a reply
that arrives faster than real time, or a connection whose send buffer is full,
leaves something waiting. Those sessions ask :class:`SharedTick` to call them
again: one ``call_later`` for the whole relay every ``period_s`` while anyone
waits, instead of a task waking on its own timer for each frame of each session.

A frame may go out up to one period after it was due: with a 20 ms period and a
60 ms lead it is still 40 ms ahead of the device's playback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

logger = logging.getLogger(__name__)

#: How often waiting sessions are looked at, in seconds: one reply frame.
TICK_PERIOD_S = 0.02


class Paced(Protocol):
    """A sender with something that is not due yet (or cannot be written yet)."""

    def pump_downlink(self, now: float) -> bool:
        """Send what is due at ``now``; True while something still waits."""
        ...


class SharedTick:
    """Calls every waiting :class:`Paced` once per period, on one timer.

    Nothing runs while nobody waits (an idle relay gets no wake-ups from it). A
    sender's order is its own: the tick only tells it the time; senders are
    called in the order they first asked, so none starves another.
    """

    __slots__ = ("_handle", "_now", "_period_s", "_waiting", "ticks")

    def __init__(self, now: Callable[[], float], period_s: float = TICK_PERIOD_S) -> None:
        self._now = now
        self._period_s = period_s
        self._waiting: dict[Paced, None] = {}
        self._handle: asyncio.TimerHandle | None = None
        #: times the tick fired (for /stats and tests)
        self.ticks = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def want(self, paced: Paced) -> None:
        """Call ``paced`` again at the next tick (idempotent)."""
        self._waiting[paced] = None
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self._period_s, self._fire)

    def forget(self, paced: Paced) -> None:
        self._waiting.pop(paced, None)

    def _fire(self) -> None:
        self._handle = None
        self.ticks += 1
        waiting, self._waiting = self._waiting, {}
        now = self._now()
        for paced in waiting:
            try:
                still = paced.pump_downlink(now)
            except Exception:  # one session's bug must not stop everyone's reply
                logger.exception("downlink pacing failed for %r", paced)
                continue
            if still:
                self._waiting[paced] = None
        if self._waiting and self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self._period_s, self._fire)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._waiting.clear()
