"""Shared pieces of the reliability tests: signals, a recording link listener, waits."""

from __future__ import annotations

import asyncio
import json
import math
import os
import struct
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgevoice_dev.testing.timeouts import scaled

from edgevoice.protocol.connection import AudioReceived
from edgevoice.protocol.messages import Message, Welcome


def record(name: str, figures: dict[str, object]) -> None:
    """Append measured figures to $RELIABILITY_FIGURES (a JSON-lines file), if set.

    docs/reliability.md quotes them; nothing asserts on them.
    """
    path = os.environ.get("RELIABILITY_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"test": name, **figures}) + "\n")


def write_voice_like(path: Path, *, lead_ms: int = 600, voiced_ms: int = 3000,
                     rate_hz: int = 16_000, level_dbfs: float = -18.0) -> Path:
    """A WAV with ``lead_ms`` of near-silence, then ``voiced_ms`` of a warbling tone.

    The energy detector takes it for one long utterance with no pause in it, so
    the turn's frames are exactly the voiced part (plus pre-roll and hangover).
    """
    amplitude = 32767 * 10 ** (level_dbfs / 20)
    samples: list[int] = []
    lead = rate_hz * lead_ms // 1000
    samples.extend(int(3 * math.sin(i)) for i in range(lead))  # a faint floor
    for i in range(rate_hz * voiced_ms // 1000):
        t = i / rate_hz
        envelope = 0.6 + 0.4 * math.sin(2 * math.pi * 3.0 * t)
        pitch = 180 + 40 * math.sin(2 * math.pi * 0.7 * t)
        samples.append(int(amplitude * envelope * math.sin(2 * math.pi * pitch * t)))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate_hz)
        w.writeframes(struct.pack(f"<{len(samples)}h", *samples))
    return path


@dataclass
class LinkEvents:
    """Everything a link told its listener, in order (a LinkListener for tests)."""

    events: list[tuple[str, object]] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    audio: list[AudioReceived] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def _add(self, kind: str, detail: object) -> None:
        self.events.append((kind, detail))
        self.changed.set()

    def link_up(self, welcome: Welcome) -> None:
        self._add("up", welcome)

    def link_down(self, reason: str, retry_in_s: float | None) -> None:
        self._add("down", reason)

    def link_suspended(self, reason: str, retry_in_s: float | None,
                       resume_within_s: float) -> None:
        self._add("suspended", resume_within_s)

    def on_message(self, message: Message) -> None:
        self.messages.append(message)
        self._add("message", message)

    def on_audio(self, received: AudioReceived) -> None:
        self.audio.append(received)
        self._add("audio", received.frame.seq)

    def kinds(self) -> list[str]:
        return [k for k, _ in self.events if k in ("up", "down", "suspended")]

    def ups(self) -> list[Welcome]:
        return [d for k, d in self.events if k == "up" and isinstance(d, Welcome)]

    async def wait_for(self, predicate: Callable[[], bool], within_s: float = 10.0) -> None:
        async def loop() -> None:
            while not predicate():
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(loop(), scaled(within_s))


async def wait_until(predicate: Callable[[], bool], within_s: float = 10.0,
                     step: float = 0.02) -> None:
    """Poll ``predicate`` (for state owned by other tasks) until true or time out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + scaled(within_s)
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(step)
