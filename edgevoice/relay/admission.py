"""Admission control: whether the relay takes one more turn (issue 15, bench row 15).

A turn the relay cannot serve in time makes every reply stutter, not only its own:
all sessions share one event loop. So a new turn is refused (a retryable
``relay_busy`` error; the device plays its error cue and the user tries again) when
any of these limits is reached, and admitted turns keep their pace:

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
  Refusing new turns only while a window reads overloaded let the load swing: the
  turns in flight drained, the next window read normal, and the slots refilled up to
  the count the machine could not serve (bench row 15 with a busy loop on the relay's
  core: 222 of 255 admitted replies glitched). So an overloaded window also sets a
  **load limit** below the turns then in flight (:data:`BACKOFF` of them), which
  rises by :data:`RECOVERY` of itself per window without overload until it reaches
  the count again: the relay settles just under what the machine serves now.

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
#: An overloaded window holds new turns to this share of the turns then in flight ...
BACKOFF = 0.8
#: ... and each window without overload raises that hold by this share of itself (at
#: least one turn): about 30 s from half the count back to all of it.
RECOVERY = 1 / 32


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
                 "overloaded", "windows", "windows_overloaded", "worst_lag_s")

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
        #: windows that ended, and those that ended overloaded (for /metrics)
        self.windows = self.windows_overloaded = 0
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
        self.windows += 1
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
    """The count limit, the ramp, the load gauge and the load limit it sets, asked once
    per turn start."""

    __slots__ = ("_ramp", "gauge", "load_limit", "max_active_turns", "probe", "refused")

    def __init__(self, max_active_turns: int, limits: LoadLimits,
                 active: Callable[[], int], *, ramp_s: float = 0.0,
                 now: float = 0.0) -> None:
        """``active()``: how many sessions are in a turn or a reply (counting may stop
        at ``max_active_turns``); asked once per window while the probe runs."""
        self.max_active_turns = max_active_turns
        rate = max_active_turns / ramp_s if max_active_turns and ramp_s > 0 else 0.0
        self._ramp = TokenBucket(rate, max(1.0, rate), now) if rate else None
        self.gauge = LoadGauge(limits)
        #: at most this many turns in flight since the loop was last overloaded (None:
        #: no such limit now; see the module docstring)
        self.load_limit: int | None = None
        self.probe = (LoadProbe(self.gauge, active, self.window_ended) if limits.enabled
                      else None)
        #: turns refused, by reason (every reason present from the start, for /metrics)
        self.refused: dict[str, int] = {reason.value: 0 for reason in Refusal}

    @property
    def counts_active(self) -> bool:
        """Whether :meth:`decide` needs the number of busy sessions (else 0 will do)."""
        return bool(self.max_active_turns) or self.probe is not None

    def decide(self, active_others: int, now: float) -> Refusal | None:
        """None to admit a turn at ``now`` while ``active_others`` other sessions are
        busy; else why not. Counts the refusal."""
        if self.probe is not None:
            self.probe.start()
        reason: Refusal | None = None
        if self.max_active_turns and active_others >= self.max_active_turns:
            reason = Refusal.CAPACITY
        elif self.gauge.overloaded or (self.load_limit is not None
                                       and active_others >= self.load_limit):
            reason = Refusal.LOAD
        elif (self._ramp is not None and active_others > 0
              and not self._ramp.take(1.0, now)):
            reason = Refusal.RAMP
        if reason is not None:
            self.refused[reason.value] += 1
        return reason

    def window_ended(self, active: int) -> None:
        """The gauge decided a window with ``active`` turns in flight: set, lower,
        raise or lift the load limit."""
        limit = self.load_limit
        if self.gauge.overloaded:
            cut = max(1, int(active * BACKOFF))
            if limit is None or cut < limit:
                self.load_limit = cut
                logger.warning("overloaded with %d turns in flight: new turns held to %d "
                               "until the load allows more", active, cut)
            return
        if limit is None:
            return
        limit += max(1, round(limit * RECOVERY))
        ceiling = self.max_active_turns
        if (ceiling and limit >= ceiling) or (not ceiling and limit > 2 * active):
            self.load_limit = None  # past the count, or far past what is asked: gone
            logger.info("load limit lifted: %d turns in flight", active)
        else:
            self.load_limit = limit

    def close(self) -> None:
        if self.probe is not None:
            self.probe.stop()


class LoadProbe:
    """The timer that feeds a :class:`LoadGauge`: a :class:`LoopLagProbe` run every
    ``period_s`` while ``active()`` says a session is in a turn or a reply (asked at
    the end of each window, and handed to ``on_window``), with the loop thread's CPU
    time read at each run."""

    __slots__ = ("_active", "_gauge", "_on_window", "_timer")

    def __init__(self, gauge: LoadGauge, active: Callable[[], int],
                 on_window: Callable[[int], None],
                 period_s: float = PROBE_PERIOD_S) -> None:
        self._gauge = gauge
        self._active = active
        self._on_window = on_window
        self._timer = LoopLagProbe(period_s=period_s, clock=LOOP_CLOCK, observer=self._ran)

    @property
    def running(self) -> bool:
        return self._timer.running

    def start(self) -> None:
        """Run from now on (idempotent); called at each turn start."""
        if self._timer.running:
            return
        self._gauge.begin(LOOP_CLOCK.now(), time.thread_time())
        self._timer.start()

    def stop(self) -> None:
        self._timer.stop()
        self._gauge.pause()

    def _ran(self, due_s: float, ran_s: float) -> bool:
        gauge = self._gauge
        windows = gauge.windows
        gauge.sample(due_s, ran_s, time.thread_time())
        if gauge.windows == windows:
            return True
        active = self._active()  # a window ended: once a second
        self._on_window(active)
        if not active:
            gauge.pause()
            return False
        return True
