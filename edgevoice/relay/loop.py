"""The relay's event loop: uvloop when it is installed (the ``relay`` extra), else asyncio's;
and the garbage collector set up for a long-running server.

Measured at bench row 14's load (100 conversing sessions, one core): the relay's CPU
fell from 47.8 % to 41.6 % of the core with uvloop, the same code otherwise (its
polling, socket reads and writes, and timers are C). Only the relay uses it: the
device keeps asyncio's loop, and nothing in the relay depends on which loop runs it.
The device was measured on both (bench row 2's conversation, alternating runs in one
window): no difference beyond the machine's noise (median 2.78 % of a core on uvloop,
2.54 % on asyncio's with WAV stand-ins; 5.42 % on both through the virtual sound card),
for 1.4-2.2 MB more resident memory (row 12's 55 MB target would be missed).

Before the loop starts, everything imported and configured so far is moved out of the
collector's reach (``gc.freeze``): a full collection then walks only what sessions
allocate. Measured at 150 conversing sessions: full collections held the loop up to
80-200 ms (gc callbacks), 156 of 301 replies glitched; frozen, none did.

Sessions live long too, and are allocated after the start: a full collection took
20-37 ms at 300 connected devices and about 130 ms at 1,000 (gc callbacks, a relay on
its own), longer than a device's 60 ms jitter buffer. :class:`HeapKeeper` does the
same again while the relay runs: when it is quiet (no turn in progress, so no reply
to hold up) and the collector has had to make a full pass since last time, it
collects and freezes what survived; the collector's own full passes then walk only
what came since (0.13-0.16 ms instead of 104-139 ms, measured with 1,000 devices).
Every ``max_age_s``, at a quiet moment if there is one within as long again, it does
it with the frozen objects too, so that their cycles are freed.

A relay at capacity is never quiet, so the collector's own full passes walked every
session's objects again and again: 18-22 ms each at 150-200 conversing sessions (bench
row 14's single steps), a reply frame's whole margin. So the keeper also freezes right
after each of the collector's own full passes (:meth:`HeapKeeper.after_full_pass`, from
``gc.callbacks``): what survived a full pass is long-lived (sessions, connections,
codecs), it costs nothing to freeze (the collector's lists are moved, not walked), and
the next full pass walks only what was promoted since. Its cycles are freed by the
pass over all, as those of the quiet moments' freezes are. Measured (bench row 14's
single steps, a loaded machine): the collector's second full pass held the loop
42.1 ms at 100 sessions before, 1.6 ms at 50 with this; the first still walks
everything the sessions made since the start. Echo conversations left about one
object of frozen cyclic garbage per turn for the pass over all to free.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory if uvloop is installed; None (asyncio's own) if not."""
    try:
        # optional (the relay extra): without it mypy has no stubs to find
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run the relay's main coroutine on the fastest loop installed."""
    gc.freeze()  # imports and configuration live as long as the process
    factory = loop_factory()
    logger.debug("event loop: %s", "uvloop" if factory is not None else "asyncio")
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


#: the collector's oldest generation: a pass over it walks every object not frozen
_OLDEST = 2


class HeapPass(enum.Enum):
    """What :class:`HeapKeeper` does now."""

    YOUNG = "young"  # collect what is not frozen, freeze what survived
    ALL = "all"  # the same with the frozen objects too (their cycles are freed)


def heap_due(*, now: float, last_all: float, full_passes: int, full_passes_seen: int,
             quiet: bool, max_age_s: float) -> HeapPass | None:
    """What to do now (pure). When quiet: everything once ``max_age_s`` passed since
    it was last done, else the objects the collector's own full passes walk, if it
    made one since last time. Not quiet: nothing, unless twice ``max_age_s`` passed
    (frozen cycles must be freed some time)."""
    age = now - last_all
    if age >= 2 * max_age_s or (quiet and age >= max_age_s):
        return HeapPass.ALL
    if quiet and full_passes > full_passes_seen:
        return HeapPass.YOUNG
    return None


class HeapKeeper:
    """Moves long-lived objects out of the collector's full passes, at quiet moments.

    :meth:`check` is called every few seconds by the relay's main loop with whether a
    turn is in progress; a collection's stall then falls where no reply waits for it.
    """

    def __init__(self, max_age_s: float = 1800.0,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.max_age_s = max_age_s
        self._now = now
        self._last_all = now()
        self._seen = self._full_passes()
        #: passes done here, objects they freed, and how long the last one held the
        #: loop, in seconds
        self.runs = 0
        self.freed = 0
        self.last_pause_s = 0.0
        #: the collector's own full passes after which what survived was frozen
        self.frozen_after_passes = 0

    @staticmethod
    def _full_passes() -> int:
        return int(gc.get_stats()[2]["collections"])

    def check(self, quiet: bool) -> HeapPass | None:
        """Collect and freeze if :func:`heap_due` says so; what it did."""
        due = heap_due(now=self._now(), last_all=self._last_all,
                       full_passes=self._full_passes(), full_passes_seen=self._seen,
                       quiet=quiet, max_age_s=self.max_age_s)
        if due is not None:
            self.collect(due)
        return due

    def after_full_pass(self, phase: str, info: dict[str, int]) -> None:
        """A ``gc.callbacks`` callback: freeze what survived the collector's full pass
        (its oldest generation), so that the next one walks only what came since."""
        if phase == "stop" and info.get("generation") == _OLDEST:
            gc.freeze()
            self.frozen_after_passes += 1

    def collect(self, what: HeapPass = HeapPass.ALL) -> None:
        started = time.perf_counter()
        if what is HeapPass.ALL:
            gc.unfreeze()
        freed = gc.collect()
        gc.freeze()
        self.last_pause_s = time.perf_counter() - started
        self.runs += 1
        self.freed += freed
        if what is HeapPass.ALL:
            self._last_all = self._now()
        self._seen = self._full_passes()
        if logger.isEnabledFor(logging.DEBUG):  # counting the frozen objects walks them all
            logger.debug("heap: collected %d objects (%s) and froze the rest in %.1f ms "
                         "(%d objects frozen)", freed, what.value, 1000 * self.last_pause_s,
                         gc.get_freeze_count())
