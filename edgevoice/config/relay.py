"""The relay's configuration file, ``config/relay.yaml``, composed from the settings
each module owns (the device's is :mod:`edgevoice.config.model`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edgevoice.audio.opus import OpusSettings
from edgevoice.config.loader import load_file
from edgevoice.config.model import LogLevel
from edgevoice.discovery.mdns import RelayDiscoverySettings
from edgevoice.health.relay import RelayAdminSettings
from edgevoice.nova.settings import NovaSettings
from edgevoice.relay.announce import AnnounceSettings
from edgevoice.relay.auth import AuthSettings
from edgevoice.relay.settings import DOWNLINK_OPUS, LimitsSettings, ListenSettings
from edgevoice.relay.shared import ClusterSettings
from edgevoice.service.notify import WatchdogSettings
from edgevoice.upstream.echo import EchoSettings
from edgevoice.web.gate import WebSettings


@dataclass(frozen=True)
class UpstreamSettings:
    """Where the relay sends each device's speech."""

    kind: Literal["echo", "nova"] = "echo"
    """echo: speak the user's words back (no cloud). nova: Amazon Nova Sonic on Bedrock."""
    echo: EchoSettings = field(default_factory=EchoSettings)
    nova: NovaSettings = field(default_factory=NovaSettings)


@dataclass(frozen=True)
class RelayConfig:
    """config/relay.yaml"""

    log_level: LogLevel = "info"
    """debug, info, warning or error."""
    listen: ListenSettings = field(default_factory=ListenSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    downlink_opus: OpusSettings = field(default_factory=lambda: DOWNLINK_OPUS)
    """Opus encoder for the replies sent to devices (24 kHz); lower complexity, more
    devices. FEC off: over TCP a reply frame is never lost on its own."""
    admin: RelayAdminSettings = field(default_factory=RelayAdminSettings)
    watchdog: WatchdogSettings = field(default_factory=WatchdogSettings)
    web: WebSettings = field(default_factory=WebSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    """Several relays behind a load balancer: drain on SIGTERM, shared state."""
    announce: AnnounceSettings = field(default_factory=AnnounceSettings)
    discovery: RelayDiscoverySettings = field(default_factory=RelayDiscoverySettings)
    """Advertise the relay on the LAN (mDNS/DNS-SD) for devices with relay.url: auto."""


def load_relay_config(path: str | Path) -> RelayConfig:
    return load_file(path, RelayConfig)
