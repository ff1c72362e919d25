"""The daemon's public probe: what happened, pushed to observers, and its figures.

Instruments (the bench's per-hop timestamps, tests, a future tracer) subclass
:class:`DeviceObserver`, override the events they need and pass the instance to
:class:`~edgevoice.device.daemon.DeviceDaemon` (``observers=``). Every event carries
the daemon clock's reading (``time.monotonic`` on a real device, so comparable across
processes on one machine). Events are called in the event loop, synchronously, at
the moment they describe: an observer must be quick and must not raise.

The read side is :class:`DeviceProbe`: :meth:`DeviceProbe.stats` returns one frozen
:class:`DaemonStats` and :meth:`DeviceProbe.turn_history` the closed turns; the
health endpoint (``/healthz``, ``/stats``, ``/metrics``) and the stats pushed to the
relay read only these.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from edgevoice.protocol.messages import Welcome

if TYPE_CHECKING:
    from edgevoice.device.records import TurnTimeline


class DeviceObserver:
    """Base of the daemon's observers: every event is a no-op until overridden."""

    def link_up(self, welcome: Welcome, at: float) -> None:
        """The relay answered (a new session, or ``welcome.resume.resumed``)."""

    def turn_begun(self, turn_id: int, trigger: str, at: float) -> None:
        """A turn opened; its pre-roll frames follow at once (``preroll=True``)."""

    def uplink_frame(self, entered_at: float, *, sent: bool, preroll: bool) -> None:
        """A 20 ms frame entered the send path at ``entered_at`` (before Opus);
        ``sent``: the link took it (False: offline, counted by the link)."""

    def response_started(self, at: float) -> None:
        """The relay announced a reply."""

    def remote_interrupt(self, at: float) -> None:
        """The relay said the reply was interrupted (before playback is flushed)."""

    def playback_pushed(self, samples: int, at: float) -> None:
        """``samples`` of reply audio at the output rate went into the playback buffer
        (earcons are mixed in as cues and are not reported)."""

    def playback_flushed(self, at: float) -> None:
        """The playback buffer was emptied at once (barge-in, button, relay)."""

    def turn_closed(self, turn: TurnTimeline) -> None:
        """A turn ended; ``turn.outcome`` says how."""

    def earcon_played(self, kind: str, at: float) -> None:
        """An earcon (the turn machine's ``kind``: listening, done, error, ...) sounded."""


class Observers(DeviceObserver):
    """Several observers as one, called in order."""

    def __init__(self, observers: Iterable[DeviceObserver] = ()) -> None:
        self.observers = list(observers)

    def add(self, observer: DeviceObserver) -> None:
        self.observers.append(observer)

    def link_up(self, welcome: Welcome, at: float) -> None:
        for o in self.observers:
            o.link_up(welcome, at)

    def turn_begun(self, turn_id: int, trigger: str, at: float) -> None:
        for o in self.observers:
            o.turn_begun(turn_id, trigger, at)

    def uplink_frame(self, entered_at: float, *, sent: bool, preroll: bool) -> None:
        for o in self.observers:
            o.uplink_frame(entered_at, sent=sent, preroll=preroll)

    def response_started(self, at: float) -> None:
        for o in self.observers:
            o.response_started(at)

    def remote_interrupt(self, at: float) -> None:
        for o in self.observers:
            o.remote_interrupt(at)

    def playback_pushed(self, samples: int, at: float) -> None:
        for o in self.observers:
            o.playback_pushed(samples, at)

    def playback_flushed(self, at: float) -> None:
        for o in self.observers:
            o.playback_flushed(at)

    def turn_closed(self, turn: TurnTimeline) -> None:
        for o in self.observers:
            o.turn_closed(turn)

    def earcon_played(self, kind: str, at: float) -> None:
        for o in self.observers:
            o.earcon_played(kind, at)


@dataclass(frozen=True)
class DaemonStats:
    """The daemon's figures at one moment (what /stats, /metrics and the relay see)."""

    device_id: str
    uptime_s: float
    #: the turn machine's state (idle, listening, thinking, speaking, muted)
    turn_state: str
    #: what the user sees (DeviceState: adds offline and error)
    device_state: str
    #: what STATUS= says
    status: str
    ready: bool
    audio_problem: str | None
    session_id: str | None
    link_connected: bool
    link_suspended: bool
    #: the link's own state name (connecting, backoff, ...)
    link_state: str
    rtt_ms: float | None
    reconnects: int
    resumes: int
    frames_replayed: int
    relay_down_since: float | None
    frames_captured: int
    #: monotonic time of the last captured frame (0: none yet)
    last_frame_at: float
    source_frames_dropped: int
    link_frames_dropped: int
    frames_sent: int
    frames_received: int
    frames_concealed: int
    playback_underruns: int
    input_level_dbfs: float
    noise_floor_dbfs: float
    turns_total: int
    interrupts: int
    audio_reopens: int
    suspensions: int
    started_at: float


class DeviceProbe(Protocol):
    """What the health endpoint and instruments may read and ask of a running daemon."""

    def stats(self) -> DaemonStats: ...

    def turn_history(self) -> tuple[TurnTimeline, ...]: ...

    def add_observer(self, observer: DeviceObserver) -> None: ...

    def request_turn(self, source: str = "api") -> bool: ...

    def request_interrupt(self, source: str = "api") -> bool: ...

    @property
    def volume(self) -> float: ...

    def set_volume(self, volume: float) -> None: ...

    def hook_counters(self) -> dict[str, int]:
        """The event hook's runs, failures, timeouts and dropped events (device/hooks.py)."""
        ...

    def timer_counters(self) -> dict[str, int]:
        """Timers pending, rung and missed (device/timers.py)."""
        ...

    def wake_counters(self) -> dict[str, int]:
        """The wake word's frames, detections and quiet-gate counters (triggers/wake.py)."""
        ...
