"""Admission control: whether the relay takes one more turn (issue 15, bench row 15).

A turn the relay cannot serve in time makes every reply stutter, not only its own:
all sessions share one event loop. So a new turn is refused (a retryable
``relay_busy`` error; the device plays its error cue and the user tries again) when
either of two limits is reached, and admitted turns keep their pace:

- **a count**: ``limits.max_active_turns`` sessions already in a turn or a reply;
- **a ramp**: new turns are admitted at most ``max_active_turns`` per
  ``turn_ramp_ms`` (bursts of a second's worth). Turns that all start together have
  their replies encoded together: a relay whose slots all free at once (a wave of
  replies ending) and are all refilled at once keeps its load in waves, each wave's
  replies at up to twice the load of an even mix (measured, bench row 15: 215 of 448
  admitted replies glitched). Filling the slots over a few seconds spreads the turns
  out again. The ramp once applied past half the count only; from a standing start
  (a relay just started, a fleet back after an outage) the lower half then came in
  at once, and its replies overlapped the next ones: 49 and 51 of 226 admitted
  replies glitched on a slower machine, 0 of 232 and 0 of 272 with the ramp over
  the whole count.
  A relay with no other turn active admits the turn without asking the ramp (a
  small count, 1 or 2 on a Pi, would otherwise make a quick exchange wait);
- **the loop's measured load**: a probe timer notes how late the event loop runs it
  and how much of a core the loop's thread uses. A relay on a slower board than the
  count was set for, or sharing its core with other work, is overloaded before the
  count is reached; the count alone cannot know that.

:class:`LoadGauge` decides from the probe's samples and does no I/O;
:class:`LoadProbe` is the timer that feeds it, running only while some session is in
a turn or a reply (an idle relay gets no wake-ups from it).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from edgevoice.clock import MonotonicClock
from edgevoice.protocol.limits import TokenBucket
from edgevoice.service.notify import LoopLagProbe

logger = logging.getLogger(__name__)

#: The clock the probe's due and run times are read from (monotonic, as the loop's).
LOOP_CLOCK = MonotonicClock()

#: How often the probe runs while turns are active, in seconds.
PROBE_PERIOD_S = 0.05
#: One decision per window of probes, in seconds; it holds until the next window ends.
WINDOW_S = 1.0
#: Share of a window's probes that may run late before the loop counts as overloaded.
LATE_SHARE = 0.2


class Refusal(enum.Enum):
    """Why a turn was refused (the ``reason`` label of the relay's counter)."""

    CAPACITY = "capacity"  # max_active_turns reached
    RAMP = "ramp"  # too many turns started in the last seconds
    LOAD = "load"  # the event loop is late or its core is full


#: What the device's ``relay_busy`` error says (it is retryable either way).
REFUSAL_TEXT = {
    Refusal.CAPACITY: "the relay is at capacity: try again in a few seconds",
    Refusal.RAMP: "the relay is busy starting other turns: try again in a few seconds",
    Refusal.LOAD: "the relay is overloaded: try again in a few seconds",
}

@dataclass(frozen=True)
class LoadLimits:
    """When the loop counts as overloaded. ``lag_ms`` 0: never (count limit only)."""

    lag_ms: float
    cpu_share: float
    late_share: float = LATE_SHARE
    window_s: float = WINDOW_S

    @property
    def enabled(self) -> bool:
        return self.lag_ms > 0


class LoadGauge:
    """Whether the event loop has room for another turn, from the probe's samples.

    Each window of ``window_s`` ends with a decision that holds until the next window
    ends: *overloaded* when at least ``late_share`` of its probes ran more than
    ``lag_ms`` late, or the loop's thread used ``cpu_share`` of a core or more. A
    window that starts after a pause (no probes: no turns) starts afresh.
    """

    __slots__ = ("_cpu0", "_late", "_limits", "_n", "_start", "_worst", "cpu_share", "late_share",
                 "overloaded", "windows_overloaded", "worst_lag_s")

    def __init__(self, limits: LoadLimits) -> None:
        self._limits = limits
        self._start: float | None = None
        self._cpu0 = 0.0
        self._n = self._late = 0
        #: the decision of the last whole window, and what it was made from
        self.overloaded = False
        self.cpu_share = 0.0
        self.late_share = 0.0
        #: the latest any probe ran in the last whole window, in seconds
        self.worst_lag_s = 0.0
        #: windows that ended overloaded (for /metrics)
        self.windows_overloaded = 0
        self._worst = 0.0

    def begin(self, now_s: float, cpu_s: float) -> None:
        """Start a window at ``now_s`` (the loop's thread had used ``cpu_s``)."""
        self._start, self._cpu0 = now_s, cpu_s
        self._n = self._late = 0
        self._worst = 0.0

    def sample(self, due_s: float, ran_s: float, cpu_s: float) -> None:
        """A probe due at ``due_s`` ran at ``ran_s``; the loop's thread CPU is ``cpu_s``."""
        if self._start is None:
            self.begin(ran_s, cpu_s)
            return
        lag = ran_s - due_s
        self._n += 1
        if lag * 1000 > self._limits.lag_ms:
            self._late += 1
        if lag > self._worst:
            self._worst = lag
        elapsed = ran_s - self._start
        if elapsed < self._limits.window_s:
            return
        self.cpu_share = (cpu_s - self._cpu0) / elapsed
        self.late_share = self._late / self._n
        self.worst_lag_s = self._worst
        was = self.overloaded
        self.overloaded = (self.late_share >= self._limits.late_share
                           or self.cpu_share >= self._limits.cpu_share)
        if self.overloaded:
            self.windows_overloaded += 1
        if self.overloaded != was:
            logger.warning(
                "%s: %.0f %% of the event loop's probes ran over %g ms late (worst %.1f ms), "
                "its thread used %.0f %% of a core", "overloaded, refusing new turns"
                if self.overloaded else "load back to normal, admitting turns again",
                100 * self.late_share, self._limits.lag_ms, 1000 * self._worst,
                100 * self.cpu_share)
        self.begin(ran_s, cpu_s)

    def pause(self) -> None:
        """Nothing to measure (no turns): the next sample starts a new window, and an
        idle loop is not overloaded."""
        self._start = None
        self.overloaded = False
        self.cpu_share = self.late_share = 0.0


class TurnAdmission:
    """The count limit and the load gauge, asked once per turn start."""

    __slots__ = ("_ramp", "gauge", "max_active_turns", "probe", "refused")

    def __init__(self, max_active_turns: int, limits: LoadLimits,
                 any_active: Callable[[], bool], *, ramp_s: float = 0.0,
                 now: float = 0.0) -> None:
        self.max_active_turns = max_active_turns
        rate = max_active_turns / ramp_s if max_active_turns and ramp_s > 0 else 0.0
        self._ramp = TokenBucket(rate, max(1.0, rate), now) if rate else None
        self.gauge = LoadGauge(limits)
        self.probe = LoadProbe(self.gauge, any_active) if limits.enabled else None
        #: turns refused, by reason (every reason present from the start, for /metrics)
        self.refused: dict[str, int] = {reason.value: 0 for reason in Refusal}

    def decide(self, active_others: int, now: float) -> Refusal | None:
        """None to admit a turn at ``now`` while ``active_others`` other sessions are
        busy; else why not. Counts the refusal."""
        if self.probe is not None:
            self.probe.start()
        reason: Refusal | None = None
        if self.max_active_turns and active_others >= self.max_active_turns:
            reason = Refusal.CAPACITY
        elif self.gauge.overloaded:
            reason = Refusal.LOAD
        elif (self._ramp is not None and active_others > 0
              and not self._ramp.take(1.0, now)):
            reason = Refusal.RAMP
        if reason is not None:
            self.refused[reason.value] += 1
        return reason

    def close(self) -> None:
        if self.probe is not None:
            self.probe.stop()


class LoadProbe:
    """The timer that feeds a :class:`LoadGauge`: a :class:`LoopLagProbe` run every
    ``period_s`` while ``any_active()`` says a session is in a turn or a reply (asked
    once per window), with the loop thread's CPU time read at each run."""

    __slots__ = ("_any_active", "_gauge", "_next_check", "_timer")

    def __init__(self, gauge: LoadGauge, any_active: Callable[[], bool],
                 period_s: float = PROBE_PERIOD_S) -> None:
        self._gauge = gauge
        self._any_active = any_active
        self._next_check = 0.0
        self._timer = LoopLagProbe(period_s=period_s, clock=LOOP_CLOCK, observer=self._ran)

    @property
    def running(self) -> bool:
        return self._timer.running

    def start(self) -> None:
        """Run from now on (idempotent); called at each turn start."""
        if self._timer.running:
            return
        now = LOOP_CLOCK.now()
        self._gauge.begin(now, time.thread_time())
        self._next_check = now + WINDOW_S
        self._timer.start()

    def stop(self) -> None:
        self._timer.stop()
        self._gauge.pause()

    def _ran(self, due_s: float, ran_s: float) -> bool:
        self._gauge.sample(due_s, ran_s, time.thread_time())
        if ran_s >= self._next_check:
            self._next_check = ran_s + WINDOW_S
            if not self._any_active():
                self._gauge.pause()
                return False
        return True
