"""The relay seen from its admin endpoint: snapshot, fleet and problems."""

from __future__ import annotations

import dataclasses
import time

from edgevoice import __version__
from edgevoice.health.relay import DeviceRecord, RelaySnapshot
from edgevoice.health.system import SystemSampler
from edgevoice.relay.announce import Announcer
from edgevoice.relay.server import RelayServer


class RelayHealth:
    """Implements RelayHealthSource over a running RelayServer."""

    def __init__(self, server: RelayServer, sampler: SystemSampler | None = None,
                 announcer: Announcer | None = None) -> None:
        self.server = server
        self.sampler = sampler or SystemSampler.for_this_machine()
        self.announcer = announcer

    def snapshot(self) -> RelaySnapshot:
        s = self.server
        c = s.counters
        return RelaySnapshot(
            version=__version__,
            uptime_s=round(time.time() - s.started_at, 1),
            sessions_active=len(s.table),
            sessions_total=c.sessions_total,
            sessions_held=c.sessions_held,
            sessions_resumed=c.sessions_resumed,
            sessions_expired=c.sessions_expired,
            frames_in=c.frames_in,
            frames_out=c.frames_out,
            frames_dropped=c.frames_dropped,
            upstream_latency_count=c.upstream_latency_count,
            upstream_latency_sum_s=c.upstream_latency_sum_s,
            upstream_errors=dict(c.upstream_errors),
            auth_failures=c.auth_failures,
            refusals=dict(c.refusals),
            slow_readers=c.slow_readers,
            connections_open=s.connections_open,
            connections_pending=s.connections_pending,
            turns_active=s.busy_count(),
            turns_refused=dict(s.admission.refused),
            overloaded=s.admission.gauge.overloaded,
            loop_cpu_ratio=round(s.admission.gauge.cpu_share, 3),
            turn_load_limit=s.admission.load_limit or 0,
            system=self.sampler.sample(),
        )

    def devices(self) -> list[DeviceRecord]:
        records = self.server.fleet.records()
        if self.announcer is None:
            return records
        return [dataclasses.replace(r, announcements=self.announcer.state(r.device_id))
                for r in records]

    def health_problems(self, now: float) -> list[str]:
        if self.server.draining:
            return ["draining: finishing replies, then sending devices to other relays"]
        if not self.server.listening:
            return ["not listening for devices"]
        return []
