"""The daemon seen from the health endpoint: snapshots, problems and actions.

Adapts a daemon's public probe (:class:`edgevoice.device.observer.DeviceProbe`) to
:class:`edgevoice.health.device.DeviceHealthSource`; it only reads the daemon's
counters and never changes its state except through the two action hooks.
"""

from __future__ import annotations

from collections.abc import Callable

from edgevoice import __version__
from edgevoice.device.observer import DeviceProbe
from edgevoice.device.records import TurnTimeline
from edgevoice.device.status import AUDIO_NOT_OPENED
from edgevoice.health.device import (
    LINK_CONNECTED,
    DeviceSnapshot,
    TurnRecord,
    describe_problems,
)
from edgevoice.health.http import HealthSettings
from edgevoice.health.system import SystemSampler


def _span(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round((b - a) * 1000.0, 1)


def turn_record(turn: TurnTimeline) -> TurnRecord:
    """The latency breakdown of one turn, as the health endpoint reports it."""
    import datetime
    return TurnRecord(
        turn_id=turn.turn_id,
        trigger=turn.trigger,
        started_at=datetime.datetime.fromtimestamp(turn.wall_start, datetime.UTC)
        .isoformat(timespec="milliseconds"),
        trigger_to_first_uplink_ms=_span(turn.started_at, turn.first_uplink),
        first_uplink_to_first_downlink_ms=_span(turn.first_uplink, turn.first_downlink),
        first_downlink_to_playback_ms=_span(turn.first_downlink, turn.playback_start),
        playback_ms=_span(turn.playback_start, turn.playback_end),
        total_ms=_span(turn.started_at, turn.playback_end or turn.turn_end),
        outcome=str(turn.outcome),
    )


class DaemonHealth:
    """Implements DeviceHealthSource over a running daemon's public probe."""

    def __init__(self, daemon: DeviceProbe, settings: HealthSettings,
                 last_watchdog_at: Callable[[], float | None] = lambda: None,
                 sampler: SystemSampler | None = None) -> None:
        self.daemon = daemon
        self.settings = settings
        self.last_watchdog_at = last_watchdog_at
        self.sampler = sampler or SystemSampler.for_this_machine()

    def snapshot(self) -> DeviceSnapshot:
        s = self.daemon.stats()
        return DeviceSnapshot(
            version=__version__,
            uptime_s=s.uptime_s,
            device_id=s.device_id,
            state=s.turn_state,
            link_state=(LINK_CONNECTED if s.link_connected
                        else "resuming" if s.link_suspended else s.link_state),
            session_id=s.session_id,
            relay_rtt_ms=None if s.rtt_ms is None else round(s.rtt_ms, 2),
            reconnects=s.reconnects,
            resumes=s.resumes,
            frames_replayed=s.frames_replayed,
            frames_captured=s.frames_captured,
            frames_sent=s.frames_sent,
            frames_received=s.frames_received,
            frames_dropped=s.source_frames_dropped + s.link_frames_dropped,
            playback_underruns=s.playback_underruns,
            input_level_dbfs=s.input_level_dbfs,
            noise_floor_dbfs=s.noise_floor_dbfs,
            turns_total=s.turns_total,
            turns=tuple(turn_record(t) for t in self.daemon.turn_history()),
            system=self.sampler.sample(),
            hooks=self.daemon.hook_counters(),
            timers=self.daemon.timer_counters(),
            wake=self.daemon.wake_counters(),
        )

    def health_problems(self, now: float) -> list[str]:
        s = self.daemon.stats()
        last_audio = s.last_frame_at or s.started_at
        problems = describe_problems(now, self.settings, last_audio_at=last_audio,
                                     relay_down_since=s.relay_down_since,
                                     last_watchdog_at=self.last_watchdog_at())
        if s.audio_problem and s.audio_problem != AUDIO_NOT_OPENED:
            problems.insert(0, s.audio_problem)
        return problems

    def request_turn(self) -> bool:
        return self.daemon.request_turn("api")

    def request_interrupt(self) -> bool:
        return self.daemon.request_interrupt("api")

    def volume(self) -> float | None:
        return self.daemon.volume

    def set_volume(self, volume: float) -> bool:
        self.daemon.set_volume(volume)
        return True
