"""Downlink playback: reply audio decoded, resampled and buffered for the speaker.

Owns the Opus decoder (straight to the output rate when Opus has it, else 24 kHz and
a resampler) and the playback buffer,
and counts the replies the buffer holds (the next may arrive while the last drains).
Earcons are cues mixed in on top (:meth:`PlaybackBuffer.play_cue`): they make no
playback events, so every playback event is a reply's. After a local stop
(barge-in, button) the rest of that reply is dropped until the relay announces the
next one (:class:`DownlinkMode`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable

from edgevoice.audio.base import AudioSink
from edgevoice.audio.opus import OPUS_RATES_HZ, OpusDecodeError, OpusDecoder
from edgevoice.audio.playback import PlaybackBuffer, PlaybackEnded, PlaybackEvent
from edgevoice.audio.resample import StreamResampler
from edgevoice.clock import Clock
from edgevoice.device.observer import DeviceObserver
from edgevoice.device.records import DeviceCounters
from edgevoice.protocol.connection import AudioReceived
from edgevoice.protocol.messages import DOWNLINK_FORMAT

logger = logging.getLogger(__name__)

#: A gap longer than this is not concealed: invented audio would only confuse.
MAX_CONCEALED_FRAMES = 5


class DownlinkMode(enum.Enum):
    """Whether reply audio arriving now is played."""

    ACCEPTING = "accepting"
    DISCARDING = "discarding"
    """Playback was stopped on the device: drop the rest of that reply."""


class ResponseEnd(enum.Enum):
    """What the relay's end of a response means for playback."""

    IGNORED = "ignored"
    """The reply was already stopped (locally or as interrupted): nothing to do."""
    DRAINING = "draining"
    """The buffer plays out what it holds; its end is a playback event."""
    EMPTY = "empty"
    """The response carried no audio at all: the turn has no reply to wait for."""


#: Called in the event loop for each playback event of a reply, with the loop's now.
ReplyEventHandler = Callable[[PlaybackEvent, float], None]


class Downlink:
    """Decode → resample → playback buffer, with a record of what is playing."""

    def __init__(self, sink: AudioSink, *, prefill_ms: int, max_ms: int, clock: Clock,
                 counters: DeviceCounters, observer: DeviceObserver,
                 on_reply_event: ReplyEventHandler,
                 prefill_min_ms: int | None = None) -> None:
        self.sink = sink
        sink_rate_hz = sink.sample_rate_hz
        self.clock = clock
        self.counters = counters
        self.observer = observer
        self.on_reply_event = on_reply_event
        # libopus decodes any stream to any of its own rates: straight to the speaker's
        # when it is one (48 kHz on most cards), so no resampler runs and none holds
        # audio back (soxr releases in bursts: 1-2 % of reply frames waited a frame for
        # the next, bench row 3). Other rates: 24 kHz, then soxr at LQ (steadier than
        # HQ, whose bursts are a whole block; ample for speech).
        decode_rate_hz = (sink_rate_hz if sink_rate_hz in OPUS_RATES_HZ
                          else DOWNLINK_FORMAT.sample_rate_hz)
        self.decoder = OpusDecoder(decode_rate_hz)
        self.resampler = StreamResampler(decode_rate_hz, sink_rate_hz, quality="LQ")
        self.playback = PlaybackBuffer(sink_rate_hz, prefill_ms=prefill_ms, max_ms=max_ms,
                                       on_event=self._event_threadsafe,
                                       prefill_min_ms=prefill_min_ms)
        self.mode = DownlinkMode.ACCEPTING
        #: replies the playback buffer holds (announced and not yet ended)
        self._replies = 0
        self._response_frames = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop playback events are delivered in (the buffer may call from the
        audio thread)."""
        self._loop = loop

    @property
    def reply_playing(self) -> bool:
        """A reply is queued or playing (earcons must not talk over it)."""
        return self._replies > 0

    def prepare(self) -> None:
        """A turn began: a parked speaker reopens now, long before the reply."""
        self.sink.prepare()

    # ---------------------------------------------------------------- replies

    def response_start(self) -> None:
        self._replies += 1
        self.mode = DownlinkMode.ACCEPTING
        self._response_frames = 0
        self.decoder.reset()
        self.resampler.reset()

    def response_end(self, reason: str) -> ResponseEnd:
        if self.mode is DownlinkMode.DISCARDING or reason == "interrupted":
            return ResponseEnd.IGNORED
        self.playback.end_of_response()
        if self._response_frames:
            return ResponseEnd.DRAINING
        self._replies = max(0, self._replies - 1)
        return ResponseEnd.EMPTY

    def audio(self, received: AudioReceived) -> bool:
        """Play one downlink frame (concealing a short gap before it); False: dropped."""
        if self.mode is DownlinkMode.DISCARDING:
            return False
        self.counters.frames_received += 1
        self._response_frames += 1
        try:
            pieces = self.decoder.decode_after_gap(received.frame.payload, received.missing,
                                                   MAX_CONCEALED_FRAMES)
            self.counters.frames_concealed += len(pieces) - 1
            for pcm in pieces:
                self._play(pcm)
        except OpusDecodeError as exc:
            logger.warning("undecodable downlink frame %d: %s", received.frame.seq, exc)
            self._play(self.decoder.conceal())
        return True

    def stop(self, reason: str) -> None:
        """Silence now: flush the buffer and drop the rest of this reply."""
        self.playback.flush()
        self.observer.playback_flushed(self.clock.now())
        self._replies = 0
        self.resampler.reset()
        self.mode = DownlinkMode.DISCARDING
        self.counters.interrupts += 1
        logger.info("playback stopped (%s)", reason)

    def play_earcon(self, pcm: bytes) -> bool:
        """Mix an earcon in; False (not played) while a reply is queued or playing.

        Mixed in, not queued: a reply that arrives meanwhile cuts it instead of
        waiting behind it (the "done" cue used to delay every answer by 225 ms).
        """
        if self.reply_playing:
            return False
        self.playback.play_cue(pcm)
        return True

    def _play(self, pcm: bytes) -> None:
        out = self.resampler.process_bytes(pcm)
        if out:
            self._push(out)

    def _push(self, pcm: bytes) -> None:
        self.playback.push(pcm)
        self.observer.playback_pushed(len(pcm) // 2, self.clock.now())

    # ---------------------------------------------------------------- events

    def _event_threadsafe(self, event: PlaybackEvent) -> None:
        # PlaybackBuffer may call this from the audio thread: hop onto the loop.
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.on_playback_event, event)

    def on_playback_event(self, event: PlaybackEvent) -> None:
        """A reply's playback event, in the loop (a flush's arrives after the count
        was reset: it is still the flushed reply's)."""
        if isinstance(event, PlaybackEnded) and self._replies:
            self._replies -= 1
        self.on_reply_event(event, self.clock.now())
