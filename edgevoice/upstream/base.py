"""The interface every speech upstream implements (echo, offline, Nova Sonic).

The relay opens one :class:`UpstreamSession` per connected device. The session is
told when the device's turn starts and ends and is fed the device's audio as
16 kHz mono signed 16-bit little-endian PCM, 20 ms (640 bytes) per call. It answers
through :meth:`UpstreamSession.events` with the events below; the relay turns them
into wire messages, re-encodes ``AudioOutput`` (24 kHz mono s16le PCM, any length)
to Opus and paces it to the device in real time, so an upstream never paces audio
itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

#: ``call_device(name, args, timeout_s)`` -> the device's result (DeviceContext)
CallDevice = Callable[[str, Mapping[str, Any], float], Awaitable[dict[str, Any]]]

UPSTREAM_INPUT_RATE_HZ = 16_000
UPSTREAM_OUTPUT_RATE_HZ = 24_000


@dataclass(frozen=True)
class HistoryLine:
    """One final line of a device's conversation, kept across sessions and relays."""

    role: Literal["user", "assistant"]
    text: str


@dataclass(frozen=True)
class DeviceContext:
    """What an upstream may know about the device it serves."""

    device_id: str
    session_id: str
    #: IANA time zone of the device (for the date/time tool), e.g. "Europe/Berlin".
    timezone: str = "UTC"
    #: Returns the device's latest stats snapshot (for the device-status tool).
    status: Callable[[], Mapping[str, object]] = field(default=lambda: {})
    #: The conversation so far, oldest first, when the relay keeps it beyond a session
    #: (several relays sharing a store: docs/scale-out.md); empty otherwise. An
    #: upstream starts the new session from it (Nova: its history events).
    history: tuple[HistoryLine, ...] = ()
    #: Runs one of the device's own functions (``timer.set`` ...; docs/protocol.md
    #: §12): ``await call_device(name, args, timeout_s)``. None: no such path.
    call_device: CallDevice | None = None


@dataclass(frozen=True)
class ResponseStarted:
    """The upstream began answering."""


@dataclass(frozen=True)
class AudioOutput:
    """A piece of the spoken reply: 24 kHz mono s16le PCM, any whole number of samples."""

    pcm: bytes


@dataclass(frozen=True)
class TranscriptReceived:
    """Text of what the user said or what the assistant says."""

    role: Literal["user", "assistant"]
    text: str
    final: bool = True


@dataclass(frozen=True)
class ResponseInterrupted:
    """The user barged in: drop every queued reply frame now."""


@dataclass(frozen=True)
class ResponseEnded:
    """The reply is complete (all its audio has been emitted as AudioOutput)."""

    reason: str = "end_turn"


@dataclass(frozen=True)
class UpstreamFailed:
    """The upstream failed; ``code`` is stable, ``message`` is plain language."""

    code: str
    message: str
    retryable: bool


@dataclass(frozen=True)
class UsageReported:
    """Token usage the upstream billed for this session so far (totals)."""

    input_tokens: int
    output_tokens: int
    #: seconds of audio sent upstream so far (input audio is billed by its length)
    audio_input_s: float = 0.0


@dataclass(frozen=True)
class ToolCalled:
    """A function-calling tool ran (for metrics and logs)."""

    name: str
    ok: bool
    duration_ms: float


UpstreamEvent = (
    ResponseStarted
    | AudioOutput
    | TranscriptReceived
    | ResponseInterrupted
    | ResponseEnded
    | UpstreamFailed
    | UsageReported
    | ToolCalled
)


class UpstreamSession(Protocol):
    """One device's conversation with the upstream."""

    async def start_turn(self) -> None:
        """The device started a turn: its audio follows."""

    async def send_audio(self, pcm: bytes) -> None:
        """20 ms of the user's voice, 16 kHz mono s16le. Must not block for long."""

    async def end_turn(self) -> None:
        """The device ended its turn (end of speech, button released, ...)."""

    async def interrupt(self) -> None:
        """The device interrupted the reply locally (button press, barge-in)."""

    def events(self) -> AsyncIterator[UpstreamEvent]:
        """Events from the upstream, until the session is closed."""

    async def close(self) -> None:
        """End the session and release everything it holds. Idempotent."""


class Upstream(Protocol):
    """A factory of sessions, one per connected device."""

    name: str

    async def open_session(self, context: DeviceContext) -> UpstreamSession: ...

    async def aclose(self) -> None:
        """Release shared resources (clients, thread pools)."""
