"""The daemon seen from the health endpoint: snapshots, problems and actions.

Adapts :class:`edgevoice.device.daemon.DeviceDaemon` to
:class:`edgevoice.health.device.DeviceHealthSource`; it only reads the daemon's
counters and never changes its state except through the two action hooks.
"""

from __future__ import annotations

from collections.abc import Callable

from edgevoice import __version__
from edgevoice.device.daemon import DeviceDaemon, TurnTimeline
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
        outcome=turn.outcome,
    )


class DaemonHealth:
    """Implements DeviceHealthSource over a running daemon."""

    def __init__(self, daemon: DeviceDaemon, settings: HealthSettings,
                 last_watchdog_at: Callable[[], float | None] = lambda: None,
                 sampler: SystemSampler | None = None) -> None:
        self.daemon = daemon
        self.settings = settings
        self.last_watchdog_at = last_watchdog_at
        self.sampler = sampler or SystemSampler.for_this_machine()

    def snapshot(self) -> DeviceSnapshot:
        d = self.daemon
        link = d.link.stats
        source = d.source.stats
        return DeviceSnapshot(
            version=__version__,
            uptime_s=round(d.clock.now() - d.started_at, 1),
            device_id=d.device_id,
            state=d.machine.state.value,
            link_state=(LINK_CONNECTED if d.link.connected
                        else "resuming" if d.link.suspended else d.link.state.value),
            session_id=d.session_id,
            relay_rtt_ms=None if link.rtt_ms is None else round(link.rtt_ms, 2),
            reconnects=link.reconnects,
            resumes=link.resumes,
            frames_replayed=link.frames_replayed,
            frames_captured=source.frames_captured,
            frames_sent=d.counters.frames_sent,
            frames_received=d.counters.frames_received,
            frames_dropped=source.frames_dropped + d.link.dropped,
            playback_underruns=d.playback.stats.underruns,
            input_level_dbfs=d.detector.level_dbfs,
            noise_floor_dbfs=d.detector.noise_floor_dbfs,
            turns_total=d.counters.turns,
            turns=tuple(turn_record(t) for t in d.turns),
            system=self.sampler.sample(),
        )

    def health_problems(self, now: float) -> list[str]:
        d = self.daemon
        last_audio = d.source.stats.last_frame_at or d.started_at
        problems = describe_problems(now, self.settings, last_audio_at=last_audio,
                                     relay_down_since=d.link.stats.down_since,
                                     last_watchdog_at=self.last_watchdog_at())
        if d.audio_problem and d.audio_problem != "audio not opened yet":
            problems.insert(0, d.audio_problem)
        return problems

    def request_turn(self) -> bool:
        return self.daemon.request_turn("api")

    def request_interrupt(self) -> bool:
        return self.daemon.request_interrupt("api")
