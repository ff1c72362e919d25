"""Uplink: a turn's 20 ms frames, Opus-encoded and handed to the link in order."""

from __future__ import annotations

from typing import Protocol

from edgevoice.audio.base import FRAME_MS
from edgevoice.audio.opus import OpusEncoder
from edgevoice.clock import Clock
from edgevoice.device.observer import DeviceObserver
from edgevoice.device.records import DeviceCounters, TurnRecorder
from edgevoice.protocol.messages import AudioFlags, Message, TurnStart


class LinkPort(Protocol):
    """The part of :class:`~edgevoice.device.link.DeviceLink` the device's pieces use."""

    @property
    def connected(self) -> bool: ...

    @property
    def suspended(self) -> bool: ...

    def send(self, message: Message) -> bool: ...

    def send_audio(self, packet: bytes, timestamp_ms: int,
                   flags: AudioFlags = AudioFlags.NONE) -> bool: ...


class Uplink:
    """Opens a turn on the wire (TurnStart, then the pre-roll) and streams its frames.

    Frame timestamps count from the turn's first frame, which carries the START flag.
    """

    def __init__(self, encoder: OpusEncoder, link: LinkPort, clock: Clock,
                 counters: DeviceCounters, records: TurnRecorder,
                 observer: DeviceObserver) -> None:
        self.encoder = encoder
        self.link = link
        self.clock = clock
        self.counters = counters
        self.records = records
        self.observer = observer
        self._index = 0

    def begin(self, turn_id: int, trigger: str, preroll: tuple[bytes, ...], now: float) -> None:
        """Announce turn ``turn_id`` and send what was heard just before it."""
        self._index = 0
        self.observer.turn_begun(turn_id, trigger, now)
        self.link.send(TurnStart(turn_id, trigger))
        for pcm in preroll:
            self.send(pcm, now, preroll=True)

    def send(self, pcm: bytes, now: float, *, preroll: bool = False) -> None:
        """Encode one 20 ms frame of the open turn and queue it on the link."""
        entered = self.clock.now()
        flags = AudioFlags.START if self._index == 0 else AudioFlags.NONE
        packet = self.encoder.encode(pcm)
        sent = self.link.send_audio(packet, self._index * FRAME_MS, flags)
        if sent:
            self.counters.frames_sent += 1
        self._index += 1
        self.records.uplink_frame(now)
        self.observer.uplink_frame(entered, sent=sent, preroll=preroll)
