"""The echo upstream: speaks the user's utterance back, for demos and tests.

No cloud, no model: when the device's turn ends, the audio of the turn is resampled
from 16 kHz to 24 kHz and emitted as the reply. It exercises the full downlink path
(PCM → Opus → pacing → device) exactly as a real upstream does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import soxr

from edgevoice.config.base import require
from edgevoice.queues import DropOldestQueue
from edgevoice.upstream.base import (
    UPSTREAM_INPUT_RATE_HZ,
    UPSTREAM_OUTPUT_RATE_HZ,
    AudioOutput,
    DeviceContext,
    ResponseEnded,
    ResponseStarted,
    TranscriptReceived,
    UpstreamEvent,
)

logger = logging.getLogger(__name__)

_CLOSED = object()


@dataclass(frozen=True)
class EchoSettings:
    """The echo upstream (no cloud needed)."""

    max_utterance_ms: int = 30_000
    """Longest utterance kept for the echo, in milliseconds; older audio is dropped."""
    reply_gain_db: float = 0.0
    """Gain applied to the echoed audio, in dB."""
    chunk_ms: int = 200
    """The reply is emitted in pieces of this length, in milliseconds, as real upstreams do."""

    def __post_init__(self) -> None:
        require(1000 <= self.max_utterance_ms <= 120_000, "max_utterance_ms",
                "must be between 1000 and 120000")
        require(-40.0 <= self.reply_gain_db <= 20.0, "reply_gain_db", "must be in -40..20 dB")
        require(20 <= self.chunk_ms <= 5000, "chunk_ms", "must be in 20..5000 ms")


class EchoSession:
    def __init__(self, settings: EchoSettings, context: DeviceContext) -> None:
        self.settings = settings
        self.context = context
        frames = settings.max_utterance_ms // 20
        self._turn: DropOldestQueue[bytes] = DropOldestQueue(frames)
        self._events: DropOldestQueue[object] = DropOldestQueue(1024)
        self._in_turn = False
        self._closed = False
        #: replies given in this conversation, counting those of earlier sessions
        #: (context.history), so a client can see whether its history survived
        self._replies = sum(1 for line in context.history if line.role == "assistant")

    async def start_turn(self) -> None:
        self._turn.clear()
        self._in_turn = True

    async def send_audio(self, pcm: bytes) -> None:
        if self._in_turn:
            self._turn.put_nowait(pcm)

    async def end_turn(self) -> None:
        if not self._in_turn:
            return
        self._in_turn = False
        frames = []
        while len(self._turn):
            frames.append(self._turn.get_nowait())
        if not frames:
            self._events.put_nowait(ResponseEnded("end_turn"))  # nothing to say back
            return
        pcm16 = np.frombuffer(b"".join(frames), dtype=np.int16)
        reply = soxr.resample(pcm16, UPSTREAM_INPUT_RATE_HZ, UPSTREAM_OUTPUT_RATE_HZ, quality="HQ")
        if self.settings.reply_gain_db:
            gain = 10 ** (self.settings.reply_gain_db / 20)
            reply = np.clip(reply.astype(np.float32) * gain, -32768, 32767).astype(np.int16)
        data = reply.astype("<i2").tobytes()
        self._replies += 1
        self._events.put_nowait(TranscriptReceived("user", f"({len(frames) * 20} ms of audio)"))
        self._events.put_nowait(TranscriptReceived("assistant", f"(echo #{self._replies})"))
        self._events.put_nowait(ResponseStarted())
        step = UPSTREAM_OUTPUT_RATE_HZ * self.settings.chunk_ms // 1000 * 2
        for i in range(0, len(data), step):
            self._events.put_nowait(AudioOutput(data[i:i + step]))
        self._events.put_nowait(ResponseEnded())
        logger.debug("%s: echoing %d ms", self.context.device_id, len(frames) * 20)

    async def interrupt(self) -> None:
        pass  # the relay drops queued reply frames; nothing is generated later

    async def events(self) -> AsyncIterator[UpstreamEvent]:
        while True:
            item = await self._events.get()
            if item is _CLOSED:
                return
            yield item  # type: ignore[misc]

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._events.put_nowait(_CLOSED)


class EchoUpstream:
    name = "echo"

    def __init__(self, settings: EchoSettings | None = None) -> None:
        self.settings = settings or EchoSettings()

    async def open_session(self, context: DeviceContext) -> EchoSession:
        await asyncio.sleep(0)
        return EchoSession(self.settings, context)

    async def aclose(self) -> None:
        pass
