"""The relay's admin endpoint: ``/healthz``, ``/metrics`` and the fleet view ``/devices``.

The relay implements :class:`RelayHealthSource`; :class:`FleetTracker` is the
bookkeeping it can use for the fleet view (who connected, from where, what they
last reported). The admin endpoint has its own token and follows the same exposure
rule as the device endpoint (:mod:`edgevoice.health.http`): open on loopback,
token required on every route anywhere else.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from prometheus_client.core import GaugeMetricFamily, Metric, SummaryMetricFamily

from edgevoice.clock import Clock, MonotonicClock
from edgevoice.config.base import require
from edgevoice.health import exposition
from edgevoice.health.http import (
    HttpApi,
    Request,
    Response,
    Routes,
    health_response,
    json_response,
)
from edgevoice.health.system import SystemStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelayAdminSettings:
    """Where the relay's admin endpoint listens."""

    bind: str = "127.0.0.1"
    """Address to listen on. Beyond loopback (e.g. 0.0.0.0) a token_file is required."""
    port: int = 8766
    """TCP port of the admin endpoint."""
    token_file: str | None = None
    """File holding the admin bearer token (not a device token)."""

    def __post_init__(self) -> None:
        require(bool(self.bind.strip()), "bind", "must not be empty")
        require(0 <= self.port <= 65535, "port", "must be 0..65535")


@dataclass(frozen=True)
class DeviceRecord:
    """One device the relay has seen since it started."""

    device_id: str
    connected: bool
    #: wall-clock time of the last message or connection change, ISO 8601
    last_seen: str
    #: "host:port" of the (last) connection
    address: str | None = None
    #: current or last session
    session_id: str | None = None
    #: the device's last ``stats`` message, as received
    last_stats: Mapping[str, object] | None = None
    #: times it connected
    connections: int = 0
    nova_input_tokens: int = 0
    nova_output_tokens: int = 0
    #: seconds of audio sent upstream for this device (speech, replays, silence)
    upstream_audio_s: float = 0.0
    #: announcements queued and played (relay/announce.py); None: never had one
    announcements: Mapping[str, object] | None = None


@dataclass(frozen=True)
class RelaySnapshot:
    """The relay's numbers at one instant; counters count since it started."""

    version: str
    uptime_s: float
    sessions_active: int = 0
    sessions_total: int = 0
    #: sessions kept after their device dropped / continued by a resume / given up
    sessions_held: int = 0
    sessions_resumed: int = 0
    sessions_expired: int = 0
    #: audio frames received from devices
    frames_in: int = 0
    #: audio frames sent to devices
    frames_out: int = 0
    #: frames lost to full queues or rate limits
    frames_dropped: int = 0
    #: upstream latency (end of user speech to first reply audio): turns measured ...
    upstream_latency_count: int = 0
    #: ... and the sum of their latencies
    upstream_latency_sum_s: float = 0.0
    #: upstream failures by UpstreamError code ("throttled", "auth", ...)
    upstream_errors: Mapping[str, int] = field(default_factory=dict)
    #: device connections refused for a bad or missing token
    auth_failures: int = 0
    #: connections refused or closed by a limit, by kind (bad_token, auth_throttled,
    #: bad_handshake, pending_evicted, ping_flood, slow_reader, rate_limited, ...)
    refusals: Mapping[str, int] = field(default_factory=dict)
    #: devices disconnected because they did not read what was sent to them
    slow_readers: int = 0
    #: TCP connections open now, and those of them still before their hello
    connections_open: int = 0
    connections_pending: int = 0
    #: sessions in a turn or a reply now
    turns_active: int = 0
    #: turns refused with a retryable relay_busy error, by reason (capacity: the
    #: max_active_turns count; load: the event loop was overloaded)
    turns_refused: Mapping[str, int] = field(default_factory=dict)
    #: the event loop's last measured second (while turns are active): overloaded or
    #: not, and the share of a core its thread used
    overloaded: bool = False
    loop_cpu_ratio: float = 0.0
    #: the most turns in flight admission allows since the loop was last overloaded
    #: (relay/admission.py); 0: no such limit now
    turn_load_limit: int = 0
    system: SystemStats = field(default_factory=SystemStats)


class RelayHealthSource(Protocol):
    """What the relay gives its admin endpoint."""

    def snapshot(self) -> RelaySnapshot:
        """The current numbers (cheap: called on every request)."""

    def devices(self) -> list[DeviceRecord]:
        """Every device seen since start, connected or not."""

    def health_problems(self, now: float) -> list[str]:
        """Reasons the relay is unhealthy at monotonic ``now``; empty when healthy."""


class FleetTracker:
    """Keeps the :class:`DeviceRecord` of every device seen since start.

    Only authenticated devices reach it, so it grows with the number of issued
    tokens, not with the number of connection attempts. A device that reconnects
    before its old connection is noticed as closed keeps the new session:
    :meth:`disconnected` ignores a session that is no longer current.
    Times are wall-clock Unix seconds.
    """

    def __init__(self) -> None:
        self._records: dict[str, DeviceRecord] = {}
        #: the last whole second formatted for last_seen, and its text: an idle fleet's
        #: stats arrive dozens a second (bench row 13), formatting each was a twentieth
        #: of the relay's CPU (py-spy)
        self._seen_second = -1
        self._seen_text = ""

    def _seen(self, at: float) -> str:
        second = int(at)
        if second != self._seen_second:
            self._seen_second, self._seen_text = second, exposition.iso_utc(second)
        return self._seen_text

    def connected(self, device_id: str, *, session_id: str, address: str | None, at: float) -> None:
        """A device authenticated and opened ``session_id``."""
        old = self._records.get(device_id)
        base = old or DeviceRecord(device_id, connected=False, last_seen="")
        self._records[device_id] = replace(
            base,
            connected=True,
            last_seen=exposition.iso_utc(at),
            address=address,
            session_id=session_id,
            connections=base.connections + 1,
        )
        logger.debug("device %s connected (session %s)", device_id, session_id)

    def disconnected(self, device_id: str, *, session_id: str, at: float) -> None:
        """The connection that carried ``session_id`` closed."""
        record = self._records.get(device_id)
        if record is None or record.session_id != session_id:
            return  # a stale connection of a device that already reconnected
        self._records[device_id] = replace(
            record, connected=False, last_seen=exposition.iso_utc(at)
        )
        logger.debug("device %s disconnected (session %s)", device_id, session_id)

    def stats_received(self, device_id: str, stats: Mapping[str, object], *, at: float) -> None:
        """The device sent a ``stats`` message."""
        record = self._records.get(device_id)
        if record is not None:
            # what replace() makes, built directly: every idle device sends its stats
            # once a heartbeat, and replace() walks the dataclass's fields to copy each
            # (bench row 13)
            self._records[device_id] = DeviceRecord(**{
                **record.__dict__, "last_stats": dict(stats), "last_seen": self._seen(at)})

    def tokens_used(self, device_id: str, *, input_tokens: int, output_tokens: int,
                    upstream_audio_s: float = 0.0) -> None:
        """Add Nova Sonic token usage and audio sent upstream to the device's totals."""
        record = self._records.get(device_id)
        if record is not None:
            self._records[device_id] = replace(
                record,
                nova_input_tokens=record.nova_input_tokens + input_tokens,
                nova_output_tokens=record.nova_output_tokens + output_tokens,
                upstream_audio_s=record.upstream_audio_s + upstream_audio_s,
            )

    def record(self, device_id: str) -> DeviceRecord | None:
        """One device's record (None: never seen here); no sorting, no copying."""
        return self._records.get(device_id)

    def records(self) -> list[DeviceRecord]:
        """All devices, sorted by id."""
        return [self._records[k] for k in sorted(self._records)]


# --------------------------------------------------------------------------- renderings


def devices_document(devices: list[DeviceRecord]) -> list[dict[str, object]]:
    """The ``/devices`` JSON list, sorted by device id."""
    out: list[dict[str, object]] = []
    for d in sorted(devices, key=lambda d: d.device_id):
        entry: dict[str, object] = {
            "device_id": d.device_id,
            "connected": d.connected,
            "last_seen": d.last_seen,
            "address": d.address,
            "session_id": d.session_id,
            "last_stats": dict(d.last_stats) if d.last_stats is not None else None,
            "connections": d.connections,
            "nova_input_tokens": d.nova_input_tokens,
            "nova_output_tokens": d.nova_output_tokens,
            "upstream_audio_s": round(d.upstream_audio_s, 2),
        }
        if d.announcements is not None:  # only for devices that had one
            entry["announcements"] = dict(d.announcements)
        out.append(entry)
    return out


def relay_metrics(
    snapshot: RelaySnapshot, devices: list[DeviceRecord], problems: list[str]
) -> list[Metric]:
    """The ``/metrics`` families (``edgevoice_relay_`` names)."""
    gauge, counter = exposition.gauge, exposition.counter
    build = GaugeMetricFamily(
        "edgevoice_relay_build_info", "Version of the running relay (always 1).", labels=["version"]
    )
    build.add_metric([snapshot.version], 1)
    latency = SummaryMetricFamily(
        "edgevoice_relay_upstream_latency_seconds",
        "From the end of user speech to the first reply audio from the upstream.",
        count_value=snapshot.upstream_latency_count,
        sum_value=snapshot.upstream_latency_sum_s,
    )
    tokens_in = exposition.labelled_counter(
        "edgevoice_relay_nova_input_tokens",
        "Nova Sonic input tokens used, by device.",
        "device",
        {d.device_id: d.nova_input_tokens for d in devices},
    )
    tokens_out = exposition.labelled_counter(
        "edgevoice_relay_nova_output_tokens",
        "Nova Sonic output tokens used, by device.",
        "device",
        {d.device_id: d.nova_output_tokens for d in devices},
    )
    upstream_audio = exposition.labelled_counter(
        "edgevoice_relay_upstream_audio_seconds",
        "Seconds of audio sent to the upstream (what Nova bills input audio on), by device.",
        "device",
        {d.device_id: d.upstream_audio_s for d in devices},
    )
    families: list[Metric] = [
        build,
        *gauge(
            "edgevoice_relay_uptime_seconds", "Seconds since the relay started.", snapshot.uptime_s
        ),
        *gauge(
            "edgevoice_relay_healthy", "1 when /healthz answers 200, else 0.", float(not problems)
        ),
        *gauge(
            "edgevoice_relay_sessions_active", "Device sessions open now.", snapshot.sessions_active
        ),
        counter("edgevoice_relay_sessions", "Device sessions opened.", snapshot.sessions_total),
        counter(
            "edgevoice_relay_sessions_held",
            "Sessions kept open after their device dropped, for a resume.",
            snapshot.sessions_held,
        ),
        counter(
            "edgevoice_relay_sessions_resumed",
            "Sessions a device resumed within the window.",
            snapshot.sessions_resumed,
        ),
        counter(
            "edgevoice_relay_sessions_expired",
            "Held sessions given up when the window ran out.",
            snapshot.sessions_expired,
        ),
        *gauge(
            "edgevoice_relay_devices_connected",
            "Devices connected now.",
            sum(1 for d in devices if d.connected),
        ),
        *gauge("edgevoice_relay_devices_seen", "Devices seen since start.", len(devices)),
        counter(
            "edgevoice_relay_frames_in", "Audio frames received from devices.", snapshot.frames_in
        ),
        counter("edgevoice_relay_frames_out", "Audio frames sent to devices.", snapshot.frames_out),
        counter(
            "edgevoice_relay_frames_dropped",
            "Audio frames lost to full queues or limits.",
            snapshot.frames_dropped,
        ),
        latency,
        exposition.labelled_counter(
            "edgevoice_relay_upstream_errors",
            "Upstream failures, by error code.",
            "code",
            snapshot.upstream_errors,
        ),
        counter(
            "edgevoice_relay_auth_failures",
            "Device connections refused for a bad or missing token.",
            snapshot.auth_failures,
        ),
        exposition.labelled_counter(
            "edgevoice_relay_refusals",
            "Connections refused or closed by a limit, by kind.",
            "kind",
            snapshot.refusals,
        ),
        counter(
            "edgevoice_relay_slow_readers",
            "Devices disconnected because they did not read what was sent to them.",
            snapshot.slow_readers,
        ),
        *gauge("edgevoice_relay_connections_open", "TCP connections open now.",
               snapshot.connections_open),
        *gauge("edgevoice_relay_connections_pending",
               "Connections that have not finished their handshake and hello.",
               snapshot.connections_pending),
        *gauge("edgevoice_relay_turns_active", "Devices in a turn or being answered now.",
               snapshot.turns_active),
        exposition.labelled_counter(
            "edgevoice_relay_turns_refused",
            "Turns refused with a retryable relay_busy error, by reason (capacity: "
            "max_active_turns; load: the event loop was overloaded).",
            "reason",
            snapshot.turns_refused,
        ),
        *gauge("edgevoice_relay_overloaded",
               "1 while the event loop counts as overloaded (new turns are refused).",
               float(snapshot.overloaded)),
        *gauge("edgevoice_relay_turn_load_limit",
               "Most turns in flight admitted since the event loop was last overloaded "
               "(rises back to max_active_turns while the load allows; 0: no such limit).",
               snapshot.turn_load_limit),
        *gauge("edgevoice_relay_loop_cpu_ratio",
               "Share of one core the event loop's thread used in its last measured "
               "second (measured while turns are active).",
               snapshot.loop_cpu_ratio),
        tokens_in,
        tokens_out,
        upstream_audio,
    ]
    families.extend(exposition.system_metrics(snapshot.system, prefix="edgevoice_relay_"))
    return families


# --------------------------------------------------------------------------- endpoint


def relay_admin_api(
    source: RelayHealthSource,
    settings: RelayAdminSettings,
    token: str | None,
    *,
    clock: Clock | None = None,
    source_file: str = "config",
    extra_routes: Routes | None = None,
) -> HttpApi:
    """The relay admin endpoint, not yet started. Raises ConfigError per the exposure rule."""
    now = (clock or MonotonicClock()).now

    async def healthz(request: Request) -> Response:
        return health_response(source.health_problems(now()))

    async def metrics(request: Request) -> Response:
        problems = source.health_problems(now())
        return exposition.metrics_response([
            *relay_metrics(source.snapshot(), source.devices(), problems),
            *exposition.endpoint_metrics(api, "edgevoice_relay_admin")])

    async def devices(request: Request) -> Response:
        return json_response(200, devices_document(source.devices()))

    routes = {
        ("GET", "/healthz"): healthz,
        ("GET", "/metrics"): metrics,
        ("GET", "/devices"): devices,
        **(extra_routes or {}),
    }
    api: HttpApi | None = None
    api = HttpApi.from_settings(routes, settings, token, name="admin", source=source_file)
    return api
