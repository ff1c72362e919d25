"""Pure pieces of the relay's per-connection limits: Opus packet duration, token buckets.

A limit counted in packets can be cheated by packing more audio into each packet
(one Opus packet may carry up to 120 ms), so uplink audio is metered in *audio
time*, read from the packet's TOC byte (RFC 6716 §3.1), not in packets.
"""

from __future__ import annotations

from edgevoice.errors import RemoteProtocolError

#: Frame duration in tenths of a millisecond per TOC ``config`` (RFC 6716 table 2):
#: SILK 0-11 (10/20/40/60 ms), hybrid 12-15 (10/20 ms), CELT 16-31 (2.5/5/10/20 ms).
_FRAME_TENTHS_MS = (
    [100, 200, 400, 600] * 3 + [100, 200] * 2 + [25, 50, 100, 200] * 4)


def opus_packet_duration_ms(packet: bytes) -> float:
    """Audio duration of one Opus packet, from its TOC byte (and frame count byte).

    Raises :class:`RemoteProtocolError` for a packet too short to say.
    """
    if not packet:
        raise RemoteProtocolError("empty Opus packet (payloads are 1 to 1275 bytes)")
    toc = packet[0]
    frame = _FRAME_TENTHS_MS[toc >> 3]
    code = toc & 0x03
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    else:
        if len(packet) < 2:
            raise RemoteProtocolError("Opus code-3 packet without its frame count")
        frames = packet[1] & 0x3F
        if frames == 0:
            raise RemoteProtocolError("Opus code-3 packet of zero frames")
    return frames * frame / 10


class TokenBucket:
    """``rate`` units a second, bursts of ``burst``; pure (takes ``now``).

    :meth:`grant` adds a one-off allowance beyond the burst (a resume's catch-up).
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = now

    @property
    def available(self) -> float:
        return self._tokens

    def take(self, amount: float, now: float) -> bool:
        """Take ``amount`` if there is that much; False (and nothing taken) if not."""
        if self._tokens < self.burst:
            self._tokens = min(self.burst, self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = now
        if self._tokens < amount:
            return False
        self._tokens -= amount
        return True

    def grant(self, amount: float) -> None:
        self._tokens += amount


class UplinkMeter:
    """What one device session may send: messages, audio time and pings; pure.

    The relay asks :meth:`over` for every message before parsing it, and
    :meth:`audio_over` for every parsed audio frame; a reason back means the device
    exceeded a budget (the relay closes with 1008).
    """

    #: pings a connection may send in a burst
    PING_BURST = 10

    def __init__(self, *, max_messages_per_s: int, max_audio_ms_per_s: int,
                 max_pings_per_s: int, now: float) -> None:
        self.max_messages_per_s = max_messages_per_s
        self.max_audio_ms_per_s = max_audio_ms_per_s
        self.max_pings_per_s = max_pings_per_s
        self.messages = TokenBucket(max_messages_per_s, max_messages_per_s, now)
        #: milliseconds of uplink audio: refills at max_audio_ms_per_s, bursts of 2 s
        self.audio_ms = TokenBucket(max_audio_ms_per_s, 2 * max_audio_ms_per_s, now)
        self.pings = TokenBucket(max_pings_per_s, max(self.PING_BURST, max_pings_per_s), now)

    def over(self, now: float) -> str | None:
        """Why one more message (any kind) is over budget; asked before it is parsed."""
        if not self.messages.take(1.0, now):
            return f"over {self.max_messages_per_s} messages/s"
        return None

    def audio_over(self, duration_ms: float, now: float) -> str | None:
        """Why one more uplink packet of ``duration_ms`` (from its TOC) is over budget;
        asked once the frame has been parsed and its duration checked."""
        if not self.audio_ms.take(duration_ms, now):
            return f"over {self.max_audio_ms_per_s} ms of audio/s"
        return None

    def ping_over(self, now: float) -> str | None:
        """Why one more ``ping`` message is over budget."""
        if not self.pings.take(1.0, now):
            return f"over {self.max_pings_per_s} pings/s"
        return None

    def catch_up(self, messages: float, audio_ms: float) -> None:
        """A resumed device may send what it queued while away (§7.4)."""
        self.messages.grant(messages)
        self.audio_ms.grant(audio_ms)


__all__ = ["TokenBucket", "UplinkMeter", "opus_packet_duration_ms"]
