"""Tell systemd that a service is ready, what it is doing, and that it is still alive.

Three pieces, from pure to I/O:

* :class:`WatchdogPolicy` decides, from plain timestamps, whether a keep-alive is
  due (every half of ``WatchdogSec=``) and whether the service is healthy enough
  to send one: the event loop must have turned promptly recently and, on the
  device, audio capture must have delivered a frame recently. A service that is
  wedged therefore stops feeding the watchdog and systemd restarts it.
* :class:`LoopLagProbe` is a periodic event-loop callback that measures how late
  the loop runs it; it reports the last time the loop turned on time.
* :class:`SystemdNotifier` sends ``READY=1``, ``STATUS=``, ``STOPPING=1`` and the
  keep-alives over ``$NOTIFY_SOCKET`` (through the ``sdnotify`` package) and runs
  the watchdog as an asyncio task. Without ``$NOTIFY_SOCKET`` every call is a no-op,
  so the daemon runs the same way from a shell.

Before ``ready()`` the keep-alive is ``EXTEND_TIMEOUT_USEC=`` instead of
``WATCHDOG=1``: systemd arms the watchdog only once a ``Type=notify`` service is
ready, and the device is ready only once its audio is open, which may take hours
when its sound card is missing. Extending the start timeout while healthy lets a
start-up that is merely waiting last forever, while a start-up that hangs is still
killed once ``TimeoutStartSec=`` runs out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sdnotify

from edgevoice.clock import Clock, MonotonicClock
from edgevoice.config.base import require

if TYPE_CHECKING:
    from edgevoice.audio.base import AudioSource

logger = logging.getLogger(__name__)

#: A probe returns the monotonic time of the last sign of life of what it watches
#: (0.0 or less: never alive yet).
Probe = Callable[[], float]

#: longest STATUS= text sent, in UTF-8 bytes (systemd accepts more; a status line
#: that long is already unreadable in ``systemctl status``)
STATUS_MAX_BYTES = 512

# asyncio may run a timer up to its clock resolution early; a keep-alive that is due
# within this margin counts as due, so one early wake-up does not skip a whole period.
_DUE_TOLERANCE_S = 0.005


@dataclass(frozen=True)
class WatchdogSettings:
    """When the service counts as too unhealthy to feed the systemd watchdog."""

    stall_after_s: float = 5.0
    """Withhold keep-alives once audio capture has delivered no frame for this long."""

    loop_stall_after_s: float = 5.0
    """Withhold keep-alives once the event loop has not turned on time for this long."""

    def __post_init__(self) -> None:
        require(self.stall_after_s > 0, "stall_after_s", "must be > 0")
        require(self.loop_stall_after_s > 0, "loop_stall_after_s", "must be > 0")


@dataclass(frozen=True)
class WatchdogVerdict:
    """What :meth:`WatchdogPolicy.decide` concluded at one instant."""

    healthy: bool
    """Whether every probe showed life recently enough."""
    ping: bool
    """Whether a keep-alive should be sent now (healthy and due)."""
    reason: str
    """Why the service is unhealthy; empty when healthy."""
    next_check_at: float
    """When to ask again (monotonic seconds)."""


def watchdog_usec_from_env(environ: Mapping[str, str], pid: int) -> int | None:
    """The watchdog timeout systemd set for process ``pid``, or None.

    systemd exports ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``) to the main process
    when the unit has ``WatchdogSec=``. A ``WATCHDOG_PID`` naming another process
    means the watchdog belongs to it (we were started by a wrapper): not ours.
    """
    raw = environ.get("WATCHDOG_USEC", "").strip()
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        logger.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw)
        return None
    if usec <= 0:
        return None
    raw_pid = environ.get("WATCHDOG_PID", "").strip()
    if raw_pid:
        try:
            owner = int(raw_pid)
        except ValueError:
            logger.warning("ignoring the watchdog: WATCHDOG_PID=%r is not a pid", raw_pid)
            return None
        if owner != pid:
            logger.debug("the systemd watchdog belongs to pid %d, not to us", owner)
            return None
    return usec


class WatchdogPolicy:
    """Decides when to feed the systemd watchdog. Pure: every call takes ``now``.

    Keep-alives are due every half of the watchdog timeout, so one late or lost
    datagram never lets the timeout expire. While any probe shows the service
    stuck, no keep-alive is sent, however due; systemd then kills and restarts the
    service once the timeout runs out.
    """

    def __init__(self, watchdog_usec: int | None, settings: WatchdogSettings | None = None) -> None:
        self.settings = settings or WatchdogSettings()
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        #: monotonic time of the last keep-alive sent, None before the first
        self.last_ping_at: float | None = None

    @property
    def enabled(self) -> bool:
        """Whether systemd asked for keep-alives at all."""
        return self.watchdog_usec is not None

    @property
    def interval_s(self) -> float:
        """Seconds between keep-alives: half the watchdog timeout (inf when disabled)."""
        if self.watchdog_usec is None:
            return math.inf
        return self.watchdog_usec / 2_000_000

    @property
    def recheck_s(self) -> float:
        """How soon to look again while unhealthy, so keep-alives resume promptly."""
        return min(self.interval_s / 4, 1.0)

    def health(self, now: float, loop_turned_at: float, last_frame_at: float | None) -> str:
        """Why the service is unhealthy at ``now``, or ``""`` when it is healthy.

        ``loop_turned_at`` is when the event loop last turned on time;
        ``last_frame_at`` is when capture last delivered a frame (0.0: never), or
        None where nothing is captured (the relay).
        """
        s = self.settings
        if loop_turned_at <= 0:
            return "the event-loop probe has never run (was it started?)"
        if now - loop_turned_at > s.loop_stall_after_s:
            return f"event loop has not turned on time for {now - loop_turned_at:.1f} s"
        if last_frame_at is not None:
            if last_frame_at <= 0:
                return "audio capture has not delivered a frame yet"
            if now - last_frame_at > s.stall_after_s:
                return f"audio capture stalled: no frame for {now - last_frame_at:.1f} s"
        return ""

    def decide(
        self, now: float, loop_turned_at: float, last_frame_at: float | None
    ) -> WatchdogVerdict:
        """Whether to send a keep-alive at ``now``, and when to ask again."""
        reason = self.health(now, loop_turned_at, last_frame_at)
        if not self.enabled:
            return WatchdogVerdict(not reason, False, reason, math.inf)
        if reason:
            return WatchdogVerdict(False, False, reason, now + self.recheck_s)
        due_at = now if self.last_ping_at is None else self.last_ping_at + self.interval_s
        if now + _DUE_TOLERANCE_S >= due_at:
            return WatchdogVerdict(True, True, "", now + self.interval_s)
        return WatchdogVerdict(True, False, "", due_at)

    def pinged(self, now: float) -> None:
        """Record that a keep-alive went out at ``now``."""
        self.last_ping_at = now


def sanitize_status(text: str) -> str:
    """``text`` made fit for one ``STATUS=`` line.

    Line breaks and other control characters become spaces: the notification
    protocol is one ``KEY=value`` per line, so an error message containing
    ``"\\nREADY=1"`` would otherwise forge a notification. Long texts are cut at a
    character boundary to :data:`STATUS_MAX_BYTES` of UTF-8.
    """
    cleaned = "".join(
        " " if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch for ch in text
    ).strip()
    if len(cleaned.encode("utf-8")) <= STATUS_MAX_BYTES:
        return cleaned
    budget = STATUS_MAX_BYTES - len("...")
    cut = cleaned.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
    return cut.rstrip() + "..."


def _wire(state: str) -> str:
    """``state`` re-spelt so that ``sdnotify`` puts its UTF-8 bytes on the wire.

    sdnotify encodes with latin-1 and silently drops anything latin-1 cannot
    encode, while systemd ignores a ``STATUS=`` that is not valid UTF-8. Spelling
    each UTF-8 byte as the latin-1 character of the same value satisfies both, and
    keeps every character (no transliteration needed).
    """
    return state.encode("utf-8").decode("latin-1")


def capture_probe(source: AudioSource) -> Probe:
    """A probe reporting when ``source`` last delivered a frame."""
    return lambda: source.stats.last_frame_at


class LoopLagProbe:
    """Measures event-loop lag with a callback that reschedules itself every period.

    Each run records how late it ran. Calling the probe returns the last time the
    loop ran it no later than ``max_lag_s`` after it was due: a blocked loop, or one
    so busy that every turn is late, stops advancing that time.

    ``observer``, if given, is told each run's due and actual time (the probe's
    clock, seconds) and returns whether the probe goes on; False stops it until the
    next :meth:`start` (the relay's admission gauge samples the loop only while
    turns are active, so an idle relay gets no wake-ups from it).
    """

    __slots__ = ("_clock", "_handle", "_observer", "_on_time_at", "lag_s", "max_lag_s",
                 "period_s", "turns", "worst_lag_s")

    def __init__(
        self, *, period_s: float = 0.5, max_lag_s: float = 1.0, clock: Clock | None = None,
        observer: Callable[[float, float], bool] | None = None,
    ) -> None:
        if period_s <= 0 or max_lag_s <= 0:
            raise ValueError("period_s and max_lag_s must be > 0")
        self.period_s = period_s
        self.max_lag_s = max_lag_s
        self._clock = clock or MonotonicClock()
        self._observer = observer
        self._handle: asyncio.TimerHandle | None = None
        self._on_time_at = 0.0
        #: lag of the most recent run, seconds
        self.lag_s = 0.0
        #: largest lag seen since start, seconds
        self.worst_lag_s = 0.0
        #: how many times the callback ran
        self.turns = 0

    def __call__(self) -> float:
        return self._on_time_at

    @property
    def running(self) -> bool:
        return self._handle is not None

    def start(self) -> None:
        """Begin measuring on the running event loop. Idempotent."""
        if self._handle is not None:
            return
        self._on_time_at = self._clock.now()
        self._schedule(asyncio.get_running_loop())

    def stop(self) -> None:
        """Stop measuring. Idempotent."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        due_at = self._clock.now() + self.period_s
        self._handle = loop.call_later(self.period_s, self._tick, loop, due_at)

    def _tick(self, loop: asyncio.AbstractEventLoop, due_at: float) -> None:
        now = self._clock.now()
        self.turns += 1
        self.lag_s = max(0.0, now - due_at)
        self.worst_lag_s = max(self.worst_lag_s, self.lag_s)
        if self.lag_s <= self.max_lag_s:
            self._on_time_at = now
        else:
            logger.debug("event loop ran %.3f s late", self.lag_s)
        if self._observer is not None and not self._observer(due_at, now):
            self._handle = None
            return
        self._schedule(loop)


class SystemdNotifier:
    """The sd_notify side of a service: readiness, status text and the watchdog.

    Reads ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID`` from the
    environment when created. Sends are best effort and never raise: a failed send
    is logged, the connection is dropped and remade on the next send (systemd
    re-executing itself replaces the socket the old connection points at).
    Thread-safe: ``status()`` may be called from any thread.
    """

    def __init__(
        self,
        *,
        settings: WatchdogSettings | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.address = os.environ.get("NOTIFY_SOCKET") or None
        self.policy = WatchdogPolicy(watchdog_usec_from_env(os.environ, os.getpid()), settings)
        self._clock = clock or MonotonicClock()
        self._lock = threading.Lock()
        self._sd: Any = None
        self._send_failing = False
        self._ready = False
        self._stopping = False
        self._last_status: str | None = None
        #: the latest verdict of the watchdog task (None before its first check)
        self.last_verdict: WatchdogVerdict | None = None
        #: keep-alives sent, and checks at which one was due but withheld
        self.pings_sent = 0
        self.pings_withheld = 0
        #: notifications dropped because the receiving queue was full
        self.dropped = 0

    @property
    def enabled(self) -> bool:
        """Whether a service manager is listening (``$NOTIFY_SOCKET`` is set)."""
        return self.address is not None

    @property
    def last_ping_at(self) -> float | None:
        """Monotonic time the watchdog was last fed; None without a watchdog or before."""
        return self.policy.last_ping_at

    @property
    def last_status(self) -> str | None:
        """The last status text sent, as sent."""
        return self._last_status

    def ready(self, status: str | None = None) -> None:
        """Report start-up complete (``READY=1``), optionally with a status text."""
        lines = ["READY=1"]
        with self._lock:
            self._ready = True
            text = self._status_line(status)
        if text is not None:
            lines.append(text)
        self._send("\n".join(lines))
        if self.enabled:  # the service logs its own "ready" line
            logger.debug("reported ready to systemd")

    def status(self, text: str) -> None:
        """Set the one-line status ``systemctl status`` shows; repeats are not resent."""
        with self._lock:
            line = self._status_line(text)
        if line is not None:
            self._send(line)

    def stopping(self, status: str | None = None) -> None:
        """Report that the service is shutting down (``STOPPING=1``)."""
        lines = ["STOPPING=1"]
        with self._lock:
            self._stopping = True
            text = self._status_line(status)
        if text is not None:
            lines.append(text)
        self._send("\n".join(lines))

    def watchdog_task(
        self, loop_alive_probe: Probe, audio_probe: Probe | None = None
    ) -> asyncio.Task[None]:
        """Start :meth:`run_watchdog` as a task on the running loop."""
        return asyncio.get_running_loop().create_task(
            self.run_watchdog(loop_alive_probe, audio_probe), name="systemd-watchdog"
        )

    async def run_watchdog(self, loop_alive_probe: Probe, audio_probe: Probe | None = None) -> None:
        """Feed the watchdog for as long as both probes show life; runs until cancelled.

        ``loop_alive_probe`` is usually a started :class:`LoopLagProbe`;
        ``audio_probe`` (device only) is :func:`capture_probe` of the audio source.
        While capture is closed on purpose, pass a probe that reports the current
        time instead. Returns at once when systemd asked for no watchdog.
        """
        policy = self.policy
        if not (self.enabled and policy.enabled):
            logger.debug("no systemd watchdog requested")
            return
        logger.debug("feeding the systemd watchdog every %.1f s", policy.interval_s)
        healthy = True
        while True:
            now = self._clock.now()
            last_frame_at = audio_probe() if audio_probe is not None else None
            verdict = policy.decide(now, loop_alive_probe(), last_frame_at)
            self.last_verdict = verdict
            if verdict.healthy != healthy:
                healthy = verdict.healthy
                if healthy:
                    logger.info("healthy again: feeding the systemd watchdog")
                else:
                    logger.warning("not feeding the systemd watchdog: %s", verdict.reason)
            if verdict.ping and not self._stopping:
                self._send(self._keepalive())
                policy.pinged(now)
                self.pings_sent += 1
            elif not verdict.healthy:
                self.pings_withheld += 1
            await self._clock.sleep(max(0.0, verdict.next_check_at - self._clock.now()))

    def close(self) -> None:
        """Drop the connection to the notification socket. Idempotent."""
        with self._lock:
            self._disconnect()

    # ------------------------------------------------------------------ internals

    def _keepalive(self) -> str:
        if self._ready:
            return "WATCHDOG=1"
        # Not ready yet, so systemd's watchdog is not armed: stretch the start
        # timeout by one full watchdog period instead (see the module docstring).
        return f"EXTEND_TIMEOUT_USEC={self.policy.watchdog_usec}"

    def _status_line(self, text: str | None) -> str | None:
        """``STATUS=...`` for ``text``, or None when it repeats the last one. Locked."""
        if text is None:
            return None
        clean = sanitize_status(text)
        if clean == self._last_status:
            return None
        self._last_status = clean
        return f"STATUS={clean}"

    def _send(self, state: str) -> None:
        if self.address is None:
            return
        with self._lock:
            # One retry on a fresh connection: the first failure is usually a
            # connection to a socket that systemd has since replaced.
            for _attempt in range(2):
                if self._sd is None:
                    self._sd = self._connect()
                    if self._sd is None:
                        return
                try:
                    self._sd.notify(_wire(state))
                except BlockingIOError:
                    # The receiver's queue is full (the kernel keeps only
                    # net.unix.max_dgram_qlen datagrams, often 10). Waiting would
                    # freeze the event loop that moves audio: drop this one instead.
                    self.dropped += 1
                    return
                except OSError as exc:
                    self._disconnect()
                    if not self._send_failing:
                        logger.warning("cannot notify systemd at %s: %s", self.address, exc)
                        self._send_failing = True
                    continue
                if self._send_failing:
                    logger.info("notifying systemd again")
                    self._send_failing = False
                return

    def _connect(self) -> Any:
        try:
            # debug=True makes sdnotify raise instead of swallowing errors, so a
            # dead socket is noticed and reconnected.
            notifier = sdnotify.SystemdNotifier(debug=True)
            sock = getattr(notifier, "socket", None)
            if sock is not None:
                sock.setblocking(False)  # never let a full queue block the loop
            return notifier
        except (OSError, TypeError, IndexError) as exc:
            if not self._send_failing:
                logger.warning("cannot connect to systemd at %s: %s", self.address, exc)
                self._send_failing = True
            return None

    def _disconnect(self) -> None:
        sd, self._sd = self._sd, None
        sock = getattr(sd, "socket", None)
        if sock is not None:
            sock.close()
