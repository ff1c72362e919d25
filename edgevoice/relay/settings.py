"""Settings of the relay's WebSocket listener and its per-connection limits."""

from __future__ import annotations

from dataclasses import dataclass

from edgevoice.audio.opus import OpusSettings
from edgevoice.config.base import require

#: The reply's encoder: re-encoding every session's reply is most of the relay's CPU.
#: Complexity 3 costs about half of 5 (bench row 4) and speech at 32 kbps stays clear.
#: No in-band FEC: the downlink runs over TCP, where a frame is never lost on its own
#: (a slow reader is closed, a resumed session replays what it missed), so the copy of
#: each frame was never used and cost a quarter of the encoder's time (120 vs 87 us a
#: frame here).
DOWNLINK_OPUS = OpusSettings(bitrate_bps=32_000, complexity=3, fec=False)


@dataclass(frozen=True)
class ListenSettings:
    """Where the relay accepts devices."""

    host: str = "127.0.0.1"
    """Address to bind; 0.0.0.0 for every interface."""
    port: int = 8780
    """TCP port for device WebSockets (0 picks a free one)."""
    tls_cert_file: str | None = None
    """PEM certificate chain; with tls_key_file the relay speaks wss:// itself."""
    tls_key_file: str | None = None
    """PEM private key for tls_cert_file."""

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, "port", "must be 0..65535")
        require((self.tls_cert_file is None) == (self.tls_key_file is None), "tls_key_file",
                "tls_cert_file and tls_key_file go together")


@dataclass(frozen=True)
class LimitsSettings:
    """What one device may cost the relay."""

    handshake_timeout_ms: int = 10_000
    """Close a connection that has not said hello within this many milliseconds."""
    heartbeat_interval_ms: int = 60_000
    """Devices ping this often (their stats ride along in the same write); silence for
    three intervals closes the connection. Each heartbeat is one relay wake-up (a read,
    a parse and a written pong): at 60 s a thousand idle devices take about 1 % of a
    relay core on the bench machine (bench row 13). Shorter finds a silently dead
    relay sooner (interval + relay.ping_timeout_ms at worst) for more relay CPU
    (docs/protocol.md §6 weighs it)."""
    ping_interval_ms: int = 0
    """WebSocket keepalive pings from the relay, this often; 0 (the default): none. The
    device's protocol heartbeat already reaches the relay every ``heartbeat_interval_ms``
    and a connection silent for three of them is closed (4003), so a dead or half-open
    device is found within 180 s by default without a second timer and a ping frame per
    connection (idle relay CPU, bench row 13). Devices send none either by default:
    their heartbeat finds a relay that went away."""
    ping_timeout_ms: int = 20_000
    """WebSocket keepalive: close when a ping is not answered within this."""
    max_messages_per_s: int = 200
    """Messages per second from one device before it is closed (1008)."""
    downlink_queue_ms: int = 60_000
    """Reply audio queued per device, in milliseconds; beyond it the oldest is dropped."""
    send_timeout_ms: int = 5_000
    """A device that does not read for this long is disconnected."""
    max_devices: int = 1000
    """Simultaneous device sessions (attached or held for a resume)."""
    max_pending_connections: int = 256
    """TCP connections that have not yet finished their handshake (HTTP upgrade and
    hello); beyond it the oldest of them is dropped, so a slow-loris cannot keep a
    fresh device from connecting."""
    max_pings_per_s: int = 2
    """Pings (WebSocket ping frames and ``ping`` messages together) per second from
    one connection, bursts of ten; beyond → closed 1008."""
    max_audio_ms_per_s: int = 1_500
    """Uplink audio, in milliseconds of audio (read from each Opus packet) per second,
    bursts of two seconds' worth; beyond → closed 1008. Real time is 1000."""
    max_write_buffer_bytes: int = 262_144
    """Bytes waiting in one connection's send buffer (the peer is not reading) before
    it is closed; counted as a slow reader."""
    shutdown_timeout_ms: int = 5_000
    """On SIGTERM, give connections and upstreams this long to close, then drop them."""
    resume_window_ms: int = 10_000
    """A dropped device's session (its upstream, its queued reply) is kept this long,
    in milliseconds, for the device to resume it (docs/protocol.md §7). 0: never."""
    resume_buffer_ms: int = 10_000
    """Reply audio kept after it was sent, to re-send what a resuming device missed,
    in milliseconds."""
    max_active_turns: int = 150
    """Devices in a turn or being answered at once; a turn beyond it is refused with a
    retryable ``relay_busy`` error instead of making every reply stutter (measure yours
    with `edgevoice bench`: conversational capacity). 0: no limit."""
    turn_ramp_ms: int = 6_000
    """New turns are admitted at most ``max_active_turns`` per this many milliseconds
    (bursts of a second's worth), so turns that would all start together (a wave of
    replies ending, devices retrying after a refusal, a fleet back after an outage)
    are spread out instead of having their replies all encoded at once. 0: no ramp."""
    overload_lag_ms: int = 10
    """Load-based admission: a turn is also refused (``relay_busy``, retryable) while the
    relay's event loop is overloaded, measured once a second while turns are active: a
    fifth of its probes ran more than this many milliseconds late, or its thread used
    ``overload_cpu_pct`` of a core. Catches a ``max_active_turns`` set for a faster
    machine, and a core shared with other work. 0: count limit only."""
    overload_cpu_pct: int = 85
    """See ``overload_lag_ms``: the share of one core, in percent, at which the event
    loop counts as overloaded."""

    def __post_init__(self) -> None:
        require(self.handshake_timeout_ms >= 100, "handshake_timeout_ms", "must be >= 100")
        require(self.heartbeat_interval_ms >= 100, "heartbeat_interval_ms", "must be >= 100")
        require(self.ping_interval_ms == 0 or self.ping_interval_ms >= 100,
                "ping_interval_ms", "must be 0 (off) or >= 100")
        require(self.ping_timeout_ms >= 100, "ping_timeout_ms", "must be >= 100")
        require(self.max_messages_per_s >= 60, "max_messages_per_s",
                "must be >= 60 (audio alone is 50 per second)")
        require(self.downlink_queue_ms >= 1000, "downlink_queue_ms", "must be >= 1000")
        require(self.send_timeout_ms >= 100, "send_timeout_ms", "must be >= 100")
        require(self.max_devices >= 1, "max_devices", "must be >= 1")
        require(self.max_pending_connections >= 1, "max_pending_connections", "must be >= 1")
        require(self.max_pings_per_s >= 1, "max_pings_per_s", "must be >= 1")
        require(self.max_audio_ms_per_s >= 1_000, "max_audio_ms_per_s",
                "must be >= 1000 (real time)")
        require(self.max_write_buffer_bytes >= 65_536, "max_write_buffer_bytes",
                "must be >= 65536")
        require(self.shutdown_timeout_ms >= 100, "shutdown_timeout_ms", "must be >= 100")
        require(0 <= self.resume_window_ms <= 300_000, "resume_window_ms", "must be 0..300000")
        require(1_000 <= self.resume_buffer_ms <= 120_000, "resume_buffer_ms",
                "must be 1000..120000")
        require(self.max_active_turns >= 0, "max_active_turns", "must be >= 0 (0: no limit)")
        require(0 <= self.turn_ramp_ms <= 600_000, "turn_ramp_ms", "must be 0..600000")
        require(self.overload_lag_ms >= 0, "overload_lag_ms", "must be >= 0 (0: off)")
        require(10 <= self.overload_cpu_pct <= 100, "overload_cpu_pct", "must be 10..100")
