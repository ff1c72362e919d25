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


__all__ = ["TokenBucket", "opus_packet_duration_ms"]
