"""Settings of the Nova Sonic upstream (the ``nova:`` section of the relay config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from edgevoice.config.base import require
from edgevoice.nova.events import KNOWN_MODELS
from edgevoice.tools.registry import ToolSettings

DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly voice assistant on a small speaker. Answer briefly, in one to "
    "three short sentences, in plain spoken language without lists or markup."
)


@dataclass(frozen=True)
class NovaSettings:
    """How the relay talks to Amazon Nova Sonic on AWS Bedrock."""

    region: str = "us-east-1"
    """AWS region of the Bedrock endpoint (Nova Sonic is not offered everywhere)."""
    model_id: str = "amazon.nova-2-sonic-v1:0"
    """amazon.nova-2-sonic-v1:0 (Nova 2 Sonic) or amazon.nova-sonic-v1:0 (Nova Sonic)."""
    voice_id: str = "matthew"
    """Voice of the replies, e.g. matthew, tiffany, amy."""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    """Instructions sent at the start of every stream."""
    max_tokens: int = 1024
    """Upper bound of tokens the model generates per response."""
    top_p: float = 0.9
    """Nucleus sampling threshold, 0..1."""
    temperature: float = 0.7
    """Sampling temperature, 0..1."""
    endpointing_sensitivity: Literal["HIGH", "MEDIUM", "LOW"] | None = None
    """Nova 2 only: how quickly the model decides the user finished (None: model default)."""
    endpoint_url: str | None = None
    """Override the Bedrock endpoint (tests, VPC endpoints); None uses the region's."""
    rotate_after_s: float = 360.0
    """Replace the stream by a fresh one at the first pause past this age (AWS ends it at 8 min)."""
    rotate_hard_s: float = 450.0
    """Replace the stream at this age even during the user's turn (its audio is buffered)."""
    idle_close_s: float = 60.0
    """Close the stream after this long without speech or reply (streams cost while open)."""
    tool_timeout_s: float = 5.0
    """A tool that takes longer answers the model with an error result."""
    history_max_messages: int = 40
    """Most messages of earlier conversation replayed into a new stream."""
    history_max_bytes: int = 40_000
    """Most bytes of earlier conversation replayed into a new stream (Nova allows < 40 KB)."""
    replay_buffer_s: float = 8.0
    """Seconds of the user's latest speech kept to replay into a replacement stream."""
    pending_audio_max_s: float = 10.0
    """Most seconds of speech held while a stream is opening; older frames are dropped."""
    open_timeout_s: float = 10.0
    """Give up on a stream whose HTTP response has not arrived after this long."""
    stall_timeout_s: float = 15.0
    """A reply with no event from Nova for this long is treated as a lost stream."""
    response_wait_s: float = 10.0
    """After the user's turn, how long to wait for a reply before the turn is forgotten."""
    drain_timeout_s: float = 3.0
    """After closing a stream, how long to keep reading Nova's last events (usage)."""
    max_attempts: int = 4
    """Consecutive failed attempts to (re)open before the device is told."""
    tools: ToolSettings = field(default_factory=ToolSettings)
    """Function-calling tools offered to the model."""

    def __post_init__(self) -> None:
        require(bool(self.region.strip()), "region", "must not be empty")
        require(
            self.model_id in KNOWN_MODELS or self.model_id.startswith("arn:"),
            "model_id",
            f"must be one of {', '.join(KNOWN_MODELS)} (or an inference profile ARN)",
        )
        require(bool(self.voice_id.strip()), "voice_id", "must not be empty")
        require(1 <= self.max_tokens <= 10_000, "max_tokens", "must be between 1 and 10000")
        require(0.0 <= self.top_p <= 1.0, "top_p", "must be between 0 and 1")
        require(0.0 <= self.temperature <= 1.0, "temperature", "must be between 0 and 1")
        require(
            self.endpoint_url is None or self.endpoint_url.startswith("https://"),
            "endpoint_url",
            "must start with https:// (the bidirectional stream needs HTTP/2 over TLS)",
        )
        require(self.rotate_after_s >= 1.0, "rotate_after_s", "must be >= 1")
        require(
            self.rotate_after_s <= self.rotate_hard_s < 480.0,
            "rotate_hard_s",
            "must be >= rotate_after_s and < 480 (AWS ends a stream after 8 minutes)",
        )
        require(self.idle_close_s > 0, "idle_close_s", "must be > 0")
        require(self.tool_timeout_s > 0, "tool_timeout_s", "must be > 0")
        require(1 <= self.history_max_messages <= 40, "history_max_messages", "must be 1..40")
        require(
            1024 <= self.history_max_bytes <= 40_000,
            "history_max_bytes",
            "must be between 1024 and 40000 (Nova's limit)",
        )
        require(0 <= self.replay_buffer_s <= 30, "replay_buffer_s", "must be 0..30")
        require(0 < self.pending_audio_max_s <= 60, "pending_audio_max_s", "must be 0..60")
        require(self.open_timeout_s > 0, "open_timeout_s", "must be > 0")
        require(self.stall_timeout_s > 0, "stall_timeout_s", "must be > 0")
        require(self.response_wait_s > 0, "response_wait_s", "must be > 0")
        require(self.drain_timeout_s >= 0, "drain_timeout_s", "must be >= 0")
        require(self.max_attempts >= 1, "max_attempts", "must be >= 1")
