"""The device's heartbeat as a schedule without I/O (``docs/protocol.md`` §6).

One heartbeat does three jobs, so that an idle device wakes its relay once per
``welcome.heartbeat_interval_ms`` and not once per job:

* it keeps the relay's idle timer (three intervals, close 4003) from firing;
* it carries the device's fleet ``stats`` when they are due: the ``stats`` message
  and the ``ping`` leave in one write (one TCP segment, one relay wake-up);
* it finds a relay that went away without closing: when nothing at all arrives
  within ``answer_timeout_s`` of a heartbeat, the relay is given up on.

:class:`Heartbeat` takes ``now`` and a count of the messages received so far and
says what to do (:class:`Beat`, :class:`RelaySilent` or nothing); the device's link
(``device/link.py``) runs it on a socket and the bench's simulated idle devices
(``edgevoice_dev/bench/loadgen.py``) run the same schedule, so the bench measures
what a daemon sends.
"""

from __future__ import annotations

from dataclasses import dataclass


def stats_every(heartbeat_interval_ms: int, stats_interval_s: float) -> int:
    """Which heartbeats carry the stats: every Nth, N returned (0: none).

    The stats ride the first heartbeat at or after ``stats_interval_s`` since the
    last ones (and the first heartbeat of a connection): with a 30 s heartbeat,
    ``stats_interval_s`` 30 → every heartbeat, 60 → every second one, 10 → every
    heartbeat (stats never go out more often than heartbeats).
    """
    if stats_interval_s <= 0:
        return 0
    if heartbeat_interval_ms <= 0:
        raise ValueError("heartbeat_interval_ms must be > 0")
    # integer milliseconds, so 30 s over a 30000 ms heartbeat is exactly 1
    stats_ms = round(stats_interval_s * 1000)
    return max(1, -(-stats_ms // heartbeat_interval_ms))


@dataclass(frozen=True)
class Beat:
    """Send a heartbeat now: ``stats`` first when ``with_stats``, then ``ping``, in
    one write. ``number`` counts the connection's heartbeats from 0."""

    number: int
    with_stats: bool


@dataclass(frozen=True)
class RelaySilent:
    """Nothing arrived for ``waited_s`` after a heartbeat: the relay is gone (or its
    route is); close the connection and reconnect."""

    waited_s: float


class Heartbeat:
    """When to send heartbeats on one connection, and when its relay counts as silent.

    The first heartbeat is due at once (``now`` at construction), then every
    ``interval_s`` on a fixed grid (restarted when the runner fell behind). Each
    heartbeat sent while no answer is outstanding starts an answer deadline of
    ``answer_timeout_s``; any message received after it (``heard`` moved) clears
    it. Any message, not only the ``pong``: a relay streaming a reply is alive even
    if its pong is queued behind the audio.
    """

    __slots__ = ("_answer_by", "_heard_mark", "_interval_s", "_stats_every", "_timeout_s",
                 "beats", "next_at")

    def __init__(self, interval_s: float, answer_timeout_s: float, stats_every: int,
                 now: float) -> None:
        if interval_s <= 0 or answer_timeout_s <= 0:
            raise ValueError("a heartbeat needs a positive interval and answer timeout")
        if stats_every < 0:
            raise ValueError("stats_every must be >= 0 (0: never)")
        self._interval_s = interval_s
        self._timeout_s = answer_timeout_s
        self._stats_every = stats_every
        #: when the next heartbeat is due
        self.next_at = now
        #: when the outstanding heartbeat must have been answered (None: none is)
        self._answer_by: float | None = None
        self._heard_mark = 0
        #: heartbeats sent on this connection
        self.beats = 0

    @property
    def wake_at(self) -> float:
        """When :meth:`poll` next has something to say."""
        if self._answer_by is None:
            return self.next_at
        return min(self.next_at, self._answer_by)

    def poll(self, now: float, heard: int) -> Beat | RelaySilent | None:
        """What to do at ``now``. ``heard`` counts the messages received on this
        connection so far (any counter that moves with each one)."""
        if self._answer_by is not None:
            if heard != self._heard_mark:
                self._answer_by = None
            elif now >= self._answer_by:
                return RelaySilent(round(now - self._answer_by + self._timeout_s, 3))
        if now < self.next_at:
            return None
        number = self.beats
        self.beats += 1
        self.next_at += self._interval_s
        if self.next_at <= now:  # fell behind (a suspended process): restart the grid
            self.next_at = now + self._interval_s
        if self._answer_by is None:
            self._answer_by = now + self._timeout_s
            self._heard_mark = heard
        return Beat(number, self._stats_every > 0 and number % self._stats_every == 0)
