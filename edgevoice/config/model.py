"""The device's configuration file, composed from the settings each module owns.

``DeviceConfig`` is ``config/device.yaml`` (``RelayConfig``, ``config/relay.yaml``, is in
:mod:`edgevoice.config.relay`, so a device process loads none of the relay's modules).
Each section is a frozen dataclass defined next to the code it configures; this
module only puts them together and checks what spans sections.
"""

from __future__ import annotations

import re
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edgevoice.audio.aec import AecSettings
from edgevoice.audio.opus import OpusSettings
from edgevoice.audio.silence import SilenceSettings
from edgevoice.config.base import require
from edgevoice.config.loader import load_file
from edgevoice.device.hooks import HookSettings
from edgevoice.device.link import RelaySettings
from edgevoice.device.timers import TimerSettings
from edgevoice.device.turn import TurnSettings
from edgevoice.discovery.mdns import DeviceDiscoverySettings
from edgevoice.feedback.settings import FeedbackSettings
from edgevoice.health.http import HealthSettings
from edgevoice.service.notify import WatchdogSettings
from edgevoice.triggers.settings import TriggerSettings

LogLevel = Literal["debug", "info", "warning", "error"]
_DEVICE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


@dataclass(frozen=True)
class AudioSettings:
    """Sound devices of the board."""

    input: str = "default"
    """Microphone: a sound device name (or part of it, as `edgevoice doctor` lists them),
    "default", or wav:PATH to read a WAV file at real time (wav+fast:PATH: as fast as possible)."""
    output: str = "default"
    """Speaker: a sound device name, "default", or wav:PATH to write what would be played."""
    output_rate_hz: int | None = None
    """Output sample rate; empty: 48000 (replies decode straight to it) if the device
    takes it, else the device's own default rate."""
    capture_queue_frames: int = 25
    """Captured 20 ms frames waiting for the event loop (25 = 500 ms); the oldest are dropped."""
    capture_block_ms: int = 60
    """Microphone audio the sound card hands over at once, in milliseconds (a multiple of
    20). Each block wakes PortAudio, the sound server and the daemon: 60 ms costs a third
    of what 20 ms does while listening, for up to 40 ms later detection."""
    speaker_block_ms: int = 20
    """Speaker audio the sound card takes at once, in milliseconds (a multiple of 20 up
    to 100). Each block wakes PortAudio and the sound server: an open speaker stream
    costs 1.5 % of a core at 20 ms, 0.6 % at 40 ms (PulseAudio, bench machine), for a
    reply that starts up to one block later and a barge-in that leaves up to one block
    playing. 40 suits a board short of CPU."""
    speaker_park_after_ms: int = 1000
    """Close the speaker's stream after this long with nothing to play (an open stream costs
    as much CPU playing silence as speech); it reopens when a turn begins (and stays open
    until the reply plays) or a sound comes. 0 keeps it running."""
    playback_prefill_ms: int = 60
    """Reply audio buffered before playback starts, in milliseconds (jitter buffer): the
    most it waits for; see playback_prefill_min_ms."""
    playback_prefill_min_ms: int = 20
    """The least prefill, in milliseconds: after each reply the prefill follows how close
    that reply came to running dry (lowered one 20 ms frame at a time while audio came
    early enough, back to playback_prefill_ms after an underrun). Equal to
    playback_prefill_ms: a fixed prefill."""
    playback_max_ms: int = 30_000
    """Most reply audio buffered, in milliseconds; beyond it the oldest is dropped."""
    reopen_max_ms: int = 30_000
    """Longest wait between attempts to reopen a vanished sound device, in milliseconds."""

    def __post_init__(self) -> None:
        require(bool(self.input.strip()), "input", "must name a device or wav:PATH")
        require(bool(self.output.strip()), "output", "must name a device or wav:PATH")
        require(self.output_rate_hz is None or 8000 <= self.output_rate_hz <= 192_000,
                "output_rate_hz", "must be between 8000 and 192000")
        require(self.capture_queue_frames >= 2, "capture_queue_frames", "must be >= 2")
        require(20 <= self.capture_block_ms <= 200 and self.capture_block_ms % 20 == 0,
                "capture_block_ms", "must be a multiple of 20 between 20 and 200")
        require(20 <= self.speaker_block_ms <= 100 and self.speaker_block_ms % 20 == 0,
                "speaker_block_ms", "must be a multiple of 20 between 20 and 100")
        require(self.speaker_park_after_ms == 0 or self.speaker_park_after_ms >= 100,
                "speaker_park_after_ms", "must be 0 (never) or >= 100")
        require(0 <= self.playback_prefill_ms <= 1000, "playback_prefill_ms", "must be 0..1000")
        require(0 <= self.playback_prefill_min_ms <= self.playback_prefill_ms,
                "playback_prefill_min_ms", "must be 0..playback_prefill_ms")
        require(self.playback_max_ms >= 1000, "playback_max_ms", "must be >= 1000")
        require(self.reopen_max_ms >= 100, "reopen_max_ms", "must be >= 100")


@dataclass(frozen=True)
class DeviceConfig:
    """config/device.yaml"""

    device_id: str | None = None
    """This device's name at the relay. Empty: the name its token was issued for (a
    token is NAME.SECRET); when set, it must match that name."""
    timezone: str = "UTC"
    """IANA time zone of the device, e.g. Europe/Berlin (for the date and time tool)."""
    log_level: LogLevel = "info"
    """debug, info, warning or error."""
    relay: RelaySettings = field(default_factory=RelaySettings)
    audio: AudioSettings = field(default_factory=AudioSettings)
    silence: SilenceSettings = field(default_factory=SilenceSettings)
    opus: OpusSettings = field(default_factory=OpusSettings)
    """The microphone's encoder (device -> relay, 16 kHz)."""
    turn: TurnSettings = field(default_factory=TurnSettings)
    triggers: TriggerSettings = field(default_factory=TriggerSettings)
    feedback: FeedbackSettings = field(default_factory=FeedbackSettings)
    aec: AecSettings = field(default_factory=AecSettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    watchdog: WatchdogSettings = field(default_factory=WatchdogSettings)
    hooks: HookSettings = field(default_factory=HookSettings)
    timers: TimerSettings = field(default_factory=TimerSettings)
    discovery: DeviceDiscoverySettings = field(default_factory=DeviceDiscoverySettings)
    """With relay.url: auto, how the relay is found on the LAN (mDNS/DNS-SD)."""

    def __post_init__(self) -> None:
        require(self.device_id is None or bool(_DEVICE_ID.match(self.device_id)), "device_id",
                "must be lowercase letters, digits and dashes, 1-63 characters")
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            require(False, "timezone", f"unknown time zone {self.timezone!r}")


def load_device_config(path: str | Path) -> DeviceConfig:
    return load_file(path, DeviceConfig)
