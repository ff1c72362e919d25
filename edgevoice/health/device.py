"""The device daemon's health endpoint: ``/healthz``, ``/stats``, ``/metrics`` and two actions.

The daemon implements :class:`DeviceHealthSource`; this module only turns its
snapshots into JSON and Prometheus text, and its action hooks into ``POST`` routes:

=================  ==================================================================
``GET /healthz``   200 ``{"status":"ok"}`` or 503 ``{"status":"unhealthy","problems":[…]}``
``GET /stats``     the whole :class:`DeviceSnapshot` as JSON, plus health
``GET /metrics``   the same as Prometheus text (``edgevoice_`` names)
``POST /trigger``  start a turn as if the button was pressed (202, or 409 if refused)
``POST /interrupt``  stop the reply now (202, or 409 if there was nothing to stop)
``GET|POST /volume``  the output volume; POST ``{"volume": 0.4}`` sets it (0..1)
=================  ==================================================================

Who may call what is :mod:`edgevoice.health.http`'s exposure rule; with a token
configured the two actions always need it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from edgevoice.clock import Clock, MonotonicClock
from edgevoice.device.hooks import EventHub, event_stream_handler
from edgevoice.health import exposition
from edgevoice.health.http import (
    Handler,
    HealthSettings,
    HttpApi,
    Request,
    Response,
    health_response,
    json_response,
)
from edgevoice.health.system import SystemStats

if TYPE_CHECKING:  # prometheus-client is imported at the first scrape (see exposition)
    from prometheus_client.core import Metric

#: ``DeviceSnapshot.link_state`` value that means the relay link is up.
LINK_CONNECTED = "connected"
#: Turns kept in ``/stats``.
RECENT_TURNS = 20

_STAGES = (
    "trigger_to_first_uplink",
    "first_uplink_to_first_downlink",
    "first_downlink_to_playback",
    "playback",
    "total",
)


@dataclass(frozen=True)
class TurnRecord:
    """Where the time of one finished turn went. The daemon fills it; ms are None
    for stages the turn never reached (e.g. no reply)."""

    turn_id: int
    #: what started it: "button", "wake_word", "api", "always_on", ...
    trigger: str
    #: wall-clock start, ISO 8601 (see :func:`edgevoice.health.exposition.iso_utc`)
    started_at: str
    trigger_to_first_uplink_ms: float | None = None
    first_uplink_to_first_downlink_ms: float | None = None
    first_downlink_to_playback_ms: float | None = None
    playback_ms: float | None = None
    total_ms: float | None = None
    #: "completed", "interrupted", "no_speech", "error:<code>", ...
    outcome: str = "completed"

    def stage_ms(self) -> dict[str, float | None]:
        """The five durations by stage name (the ``stage`` label of the metrics)."""
        return {
            "trigger_to_first_uplink": self.trigger_to_first_uplink_ms,
            "first_uplink_to_first_downlink": self.first_uplink_to_first_downlink_ms,
            "first_downlink_to_playback": self.first_downlink_to_playback_ms,
            "playback": self.playback_ms,
            "total": self.total_ms,
        }


@dataclass(frozen=True)
class DeviceSnapshot:
    """Everything the device reports about itself at one instant. Counters count
    since the daemon started; None means "not known (yet)"."""

    version: str
    uptime_s: float
    device_id: str = ""
    #: what the daemon is doing: "idle", "listening", "thinking", "speaking", ...
    state: str = "idle"
    #: relay link: "connected" (:data:`LINK_CONNECTED`), "connecting", "backoff", ...
    link_state: str = "disconnected"
    session_id: str | None = None
    relay_rtt_ms: float | None = None
    reconnects: int = 0
    #: link drops survived by resuming the session (nothing lost)
    resumes: int = 0
    #: audio frames re-sent to the relay after a resume
    frames_replayed: int = 0
    #: 20 ms frames delivered by the microphone
    frames_captured: int = 0
    #: audio frames sent to the relay
    frames_sent: int = 0
    #: audio frames received from the relay
    frames_received: int = 0
    #: frames lost to full queues, anywhere on the device
    frames_dropped: int = 0
    playback_underruns: int = 0
    #: RMS level of the latest captured frame
    input_level_dbfs: float | None = None
    #: the silence detector's adaptive noise floor
    noise_floor_dbfs: float | None = None
    turns_total: int = 0
    #: the most recent turns, oldest first (only the last :data:`RECENT_TURNS` are shown)
    turns: tuple[TurnRecord, ...] = ()
    system: SystemStats = field(default_factory=SystemStats)
    #: lines ALSA / PortAudio printed on stderr, by kind ("alsa_underrun", ...): captured
    #: by edgevoice.logs rather than printed raw into the journal
    audio_library_messages: dict[str, int] = field(default_factory=dict)
    #: the event hook's runs and failures (device/hooks.py): runs, failures, timeouts,
    #: dropped (events it never saw: its queue was full)
    hooks: dict[str, int] = field(default_factory=dict)
    #: timers (device/timers.py): pending, rung, missed (due while the daemon was down
    #: for longer than timers.late_ring_max_s)
    timers: dict[str, int] = field(default_factory=dict)
    #: the wake word (triggers/wake.py): frames heard, detections, and its quiet gate's
    #: frames_gated, frames_replayed and gate_openings
    wake: dict[str, int] = field(default_factory=dict)


class DeviceHealthSource(Protocol):
    """What the device daemon gives its health endpoint."""

    def snapshot(self) -> DeviceSnapshot:
        """The current numbers (cheap: called on every request)."""

    def health_problems(self, now: float) -> list[str]:
        """Plain-language reasons the daemon is unhealthy at monotonic ``now``;
        empty when healthy. :func:`describe_problems` builds the usual ones."""

    def request_turn(self) -> bool:
        """Start a turn as the API trigger; False if one cannot start now."""

    def request_interrupt(self) -> bool:
        """Stop the current reply; False if nothing was playing."""

    def volume(self) -> float | None:
        """The output volume, 0..1 (None: there is no speaker yet)."""

    def set_volume(self, volume: float) -> bool:
        """Set the output volume (0..1; ValueError outside); False: no speaker yet."""


def describe_problems(
    now: float,
    settings: HealthSettings,
    *,
    last_audio_at: float,
    relay_down_since: float | None,
    last_watchdog_at: float | None,
) -> list[str]:
    """The standard reasons for an unhealthy device, from monotonic timestamps.

    ``last_audio_at`` is the last captured frame's time (the daemon's start time if
    none arrived yet); ``relay_down_since`` is when the link was lost (None while
    connected); ``last_watchdog_at`` is when the systemd watchdog was last fed
    (None when there is no watchdog).
    """
    problems = []
    silent_s = now - last_audio_at
    if silent_s > settings.no_audio_after_s:
        problems.append(f"no audio for {silent_s:.0f} s")
    if relay_down_since is not None:
        down_s = now - relay_down_since
        if down_s > settings.relay_unreachable_after_s:
            problems.append(f"relay unreachable for {down_s:.0f} s")
    if last_watchdog_at is not None:
        late_s = now - last_watchdog_at
        if late_s > settings.watchdog_late_after_s:
            problems.append(f"watchdog late: last fed {late_s:.0f} s ago")
    return problems


# --------------------------------------------------------------------------- renderings


def _json_safe(value: object) -> object:
    """JSON has no infinities (digital silence is -inf dBFS) nor NaN: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def stats_document(snapshot: DeviceSnapshot, problems: list[str]) -> dict[str, object]:
    """The ``/stats`` JSON object: the snapshot's fields, plus ``healthy`` and ``problems``."""
    document = dataclasses.asdict(
        dataclasses.replace(snapshot, turns=snapshot.turns[-RECENT_TURNS:])
    )
    document["healthy"] = not problems
    document["problems"] = list(problems)
    safe = _json_safe(document)
    assert isinstance(safe, dict)
    return safe


def _ms_to_s(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000.0


def device_metrics(snapshot: DeviceSnapshot, problems: list[str]) -> list[Metric]:
    """The ``/metrics`` families for one snapshot."""
    from prometheus_client.core import GaugeMetricFamily

    gauge, counter = exposition.gauge, exposition.counter
    build = GaugeMetricFamily(
        "edgevoice_build_info", "Version of the running daemon (always 1).", labels=["version"]
    )
    build.add_metric([snapshot.version], 1)
    link_state = GaugeMetricFamily(
        "edgevoice_link_state", "Current relay link state (1 on the current one).", labels=["state"]
    )
    link_state.add_metric([snapshot.link_state], 1)
    families: list[Metric] = [
        build,
        *gauge("edgevoice_uptime_seconds", "Seconds since the daemon started.", snapshot.uptime_s),
        *gauge("edgevoice_healthy", "1 when /healthz answers 200, else 0.", float(not problems)),
        *gauge(
            "edgevoice_link_up",
            "1 while connected to the relay.",
            float(snapshot.link_state == LINK_CONNECTED),
        ),
        link_state,
        *gauge(
            "edgevoice_relay_rtt_seconds",
            "Latest heartbeat round trip to the relay.",
            _ms_to_s(snapshot.relay_rtt_ms),
        ),
        counter("edgevoice_reconnects", "Relay reconnections.", snapshot.reconnects),
        counter(
            "edgevoice_link_resumes",
            "Link drops survived by resuming the session.",
            snapshot.resumes,
        ),
        counter(
            "edgevoice_frames_replayed",
            "Audio frames re-sent to the relay after a resume.",
            snapshot.frames_replayed,
        ),
        counter(
            "edgevoice_frames_captured",
            "Audio frames from the microphone.",
            snapshot.frames_captured,
        ),
        counter("edgevoice_frames_sent", "Audio frames sent to the relay.", snapshot.frames_sent),
        counter(
            "edgevoice_frames_received",
            "Audio frames received from the relay.",
            snapshot.frames_received,
        ),
        counter(
            "edgevoice_frames_dropped", "Audio frames lost to full queues.", snapshot.frames_dropped
        ),
        counter(
            "edgevoice_playback_underruns",
            "Times playback ran out of audio mid-reply.",
            snapshot.playback_underruns,
        ),
        *gauge(
            "edgevoice_input_level_dbfs",
            "RMS level of the latest microphone frame.",
            snapshot.input_level_dbfs,
        ),
        *gauge(
            "edgevoice_noise_floor_dbfs",
            "Adaptive noise floor of the silence detector.",
            snapshot.noise_floor_dbfs,
        ),
        counter("edgevoice_turns", "Finished turns.", snapshot.turns_total),
    ]
    if snapshot.turns:
        last = GaugeMetricFamily(
            "edgevoice_last_turn_seconds",
            "Duration of each stage of the most recent turn.",
            labels=["stage"],
        )
        for stage, ms in snapshot.turns[-1].stage_ms().items():
            if ms is not None:
                last.add_metric([stage], ms / 1000.0)
        families.append(last)
    if snapshot.hooks:
        families.append(exposition.labelled_counter(
            "edgevoice_hook_events", "Event hook runs by outcome (runs, failures, timeouts, "
            "dropped).", "outcome", snapshot.hooks))
    if snapshot.timers:
        families.extend(gauge("edgevoice_timers_pending", "Timers set and not yet rung.",
                              snapshot.timers.get("pending", 0)))
        families.append(exposition.labelled_counter(
            "edgevoice_timers_fired", "Timers that fell due, by outcome (rung, missed).",
            "outcome", {k: v for k, v in snapshot.timers.items() if k != "pending"}))
    if snapshot.wake:
        wake = snapshot.wake
        families.append(counter("edgevoice_wake_detections", "Wake words detected.",
                                wake.get("detections", 0)))
        families.append(exposition.labelled_counter(
            "edgevoice_wake_frames", "Microphone frames the wake word heard (heard), of them "
            "those its quiet gate kept from the models at the room's noise floor (gated), "
            "and those run late as an opening gate's pre-roll (replayed).", "kind",
            {"heard": wake.get("frames", 0), "gated": wake.get("frames_gated", 0),
             "replayed": wake.get("frames_replayed", 0)}))
        families.append(counter("edgevoice_wake_gate_openings",
                                "Times the wake word's quiet gate opened.",
                                wake.get("gate_openings", 0)))
    families.extend(exposition.system_metrics(snapshot.system, prefix="edgevoice_"))
    return families


# --------------------------------------------------------------------------- endpoint


def device_health_api(
    source: DeviceHealthSource,
    settings: HealthSettings,
    token: str | None,
    *,
    clock: Clock | None = None,
    source_file: str = "config",
    events: EventHub | None = None,
) -> HttpApi:
    """The device endpoint, not yet started. Raises ConfigError per the exposure rule.

    With ``events``, ``GET /events`` streams them as server-sent events.
    """
    now = (clock or MonotonicClock()).now

    async def healthz(request: Request) -> Response:
        return health_response(source.health_problems(now()))

    async def stats(request: Request) -> Response:
        snapshot = source.snapshot()
        return json_response(200, stats_document(snapshot, source.health_problems(now())))

    async def metrics(request: Request) -> Response:
        snapshot = source.snapshot()
        return exposition.metrics_response([
            *device_metrics(snapshot, source.health_problems(now())),
            *exposition.endpoint_metrics(api, "edgevoice_health")])

    def action(hook: Callable[[], bool], refused: str) -> Handler:
        async def handle(request: Request) -> Response:
            if hook():
                return json_response(202, {"accepted": True})
            return json_response(409, {"accepted": False, "reason": refused})

        return handle

    def volume_document() -> dict[str, float | None]:
        volume = source.volume()
        return {"volume": None if volume is None else round(volume, 3)}

    async def get_volume(request: Request) -> Response:
        return json_response(200, volume_document())

    async def set_volume(request: Request) -> Response:
        try:
            payload = json.loads(request.body or b"null")
            volume = payload.get("volume") if isinstance(payload, dict) else None
            if isinstance(volume, bool) or not isinstance(volume, int | float):
                raise ValueError('expected {"volume": a number from 0 to 1}')
            if not source.set_volume(float(volume)):
                return json_response(409, {"error": "no speaker yet"})
        except ValueError as exc:
            return json_response(400, {"error": str(exc)})
        return json_response(200, volume_document())

    routes = {
        ("GET", "/healthz"): healthz,
        ("GET", "/stats"): stats,
        ("GET", "/metrics"): metrics,
        ("POST", "/trigger"): action(source.request_turn, "a turn cannot start now"),
        ("POST", "/interrupt"): action(source.request_interrupt, "nothing to interrupt"),
        ("GET", "/volume"): get_volume,
        ("POST", "/volume"): set_volume,
    }
    if events is not None:
        routes[("GET", "/events")] = event_stream_handler(events)
    api: HttpApi | None = None
    api = HttpApi.from_settings(routes, settings, token, name="health", source=source_file)
    return api
