"""Settings of the Nova Sonic upstream (the ``nova:`` section of the relay config).

Facts from AWS's Nova documentation (rechecked 2026-12-01) that the checks below apply:

* voices: Nova 2 Sonic offers tiffany, matthew (en-US), amy (en-GB), olivia (en-AU),
  kiara, arjun (en-IN and hi-IN), ambre, florian (fr-FR), beatrice, lorenzo (it-IT),
  tina, lennart (de-DE), lupe, carlos (es-US), carolina, leo (pt-BR); Nova Sonic (v1)
  offers tiffany, matthew, amy, ambre, florian, beatrice, lorenzo, greta, lennart,
  lupe, carlos. An unknown voice is refused here, not by the service mid-turn;
* Nova 2 decides the end of the user's turn after a pause of 1.5 s (``HIGH``),
  1.75 s (``MEDIUM``) or 2.0 s (``LOW``) endpointing sensitivity;
* replayed chat history: once per session, after the system prompt, each
  ``textInput`` at most 1 KB, the whole history under 40 KB;
* Nova Sonic v1 (``amazon.nova-sonic-v1:0``) is past its end of life (2026-09-14):
  it is still accepted here, with a warning, for as long as the service takes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Final, Literal

from edgevoice.config.base import require
from edgevoice.nova.events import KNOWN_MODELS, MODEL_NOVA_2_SONIC, MODEL_NOVA_SONIC
from edgevoice.tools.registry import ToolSettings

logger = logging.getLogger(__name__)

#: Voice ids per model, from AWS's Nova user guides (Nova 2 and Nova 1).
VOICES: Final[dict[str, frozenset[str]]] = {
    MODEL_NOVA_2_SONIC: frozenset(
        {
            "tiffany",
            "matthew",
            "amy",
            "olivia",
            "kiara",
            "arjun",
            "ambre",
            "florian",
            "beatrice",
            "lorenzo",
            "tina",
            "lennart",
            "lupe",
            "carlos",
            "carolina",
            "leo",
        }
    ),
    MODEL_NOVA_SONIC: frozenset(
        {
            "tiffany",
            "matthew",
            "amy",
            "ambre",
            "florian",
            "beatrice",
            "lorenzo",
            "greta",
            "lennart",
            "lupe",
            "carlos",
        }
    ),
}
#: Seconds of silence after which Nova 2 decides the user has finished, per
#: endpointing sensitivity (None: the model's default; assume the longest).
ENDPOINTING_PAUSE_S: Final[dict[str | None, float]] = {
    "HIGH": 1.5,
    "MEDIUM": 1.75,
    "LOW": 2.0,
    None: 2.0,
}
#: Nova Sonic v1's end of life (Bedrock model card).
NOVA_SONIC_V1_END_OF_LIFE: Final = "2026-09-14"


def voices_for(model_id: str) -> frozenset[str]:
    """The voices ``model_id`` offers (an inference-profile ARN: those of the model it names)."""
    for model, voices in VOICES.items():
        if model_id.endswith(model):
            return voices
    return VOICES[MODEL_NOVA_2_SONIC]


@dataclass(frozen=True)
class DeviceConversation:
    """What one device's assistant is like; unset fields take the ``nova:`` defaults."""

    system_prompt: str | None = None
    """Instructions sent at the start of every stream of this device."""
    voice_id: str | None = None
    """Voice of this device's replies."""
    tools: tuple[str, ...] | None = None
    """Names of the tools offered to this device (None: every tool the relay has)."""


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
    idle_close_s: float = 10.0
    """Close the stream after this long without speech or reply; the next turn reopens
    it with the conversation so far."""
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
    open_timeout_s: float = 5.0
    """Give up on a stream whose HTTP response has not arrived after this long; the device
    is told at most this long after the first failed attempt (retries go on)."""
    stall_timeout_s: float = 6.0
    """A reply with no event from Nova for this long is a stalled stream (replaced)."""
    reply_margin_s: float = 3.0
    """Nova's first event is due within its end-of-turn pause (1.5-2 s) plus this, after
    the device's turn ends; a silent stream past that is stalled (replaced)."""
    tool_ack_timeout_s: float = 6.0
    """After a tool result is sent, Nova's next event is due within this (else: stalled)."""
    response_wait_s: float = 10.0
    """After the user's turn, how long to wait for a reply before the turn is forgotten."""
    drain_timeout_s: float = 3.0
    """After closing a stream, how long to keep reading Nova's last events (usage)."""
    max_attempts: int = 4
    """Consecutive failed attempts to (re)open before the device is told."""
    tools: ToolSettings = field(default_factory=ToolSettings)
    """Function-calling tools offered to the model."""
    devices: dict[str, DeviceConversation] = field(default_factory=dict)
    """Per device id: its own system prompt, voice and tools (the others use the above)."""

    @property
    def end_of_turn_pause_s(self) -> float:
        """How long Nova waits in silence before it takes its turn."""
        return ENDPOINTING_PAUSE_S.get(self.endpointing_sensitivity, 2.0)

    @property
    def first_output_timeout_s(self) -> float:
        """Nova's first event after the user's turn is due within this."""
        return self.end_of_turn_pause_s + self.reply_margin_s

    def for_device(self, device_id: str) -> NovaSettings:
        """These settings with ``device_id``'s own prompt and voice applied."""
        own = self.devices.get(device_id)
        if own is None:
            return self
        return replace(
            self,
            system_prompt=self.system_prompt if own.system_prompt is None else own.system_prompt,
            voice_id=self.voice_id if own.voice_id is None else own.voice_id,
        )

    def tools_for(self, device_id: str) -> tuple[str, ...] | None:
        """Names of the tools ``device_id`` is offered (None: all)."""
        own = self.devices.get(device_id)
        return None if own is None else own.tools

    def warnings(self) -> list[str]:
        """Things that work but should change (logged at start-up, shown by --check-config)."""
        out: list[str] = []
        if self.model_id == MODEL_NOVA_SONIC or self.model_id.endswith(MODEL_NOVA_SONIC):
            out.append(
                f"model_id: {self.model_id} (Nova Sonic v1) reached its end of life on "
                f"{NOVA_SONIC_V1_END_OF_LIFE}; it works only while AWS still accepts it. "
                f"Use {MODEL_NOVA_2_SONIC}."
            )
        return out

    def __post_init__(self) -> None:
        require(bool(self.region.strip()), "region", "must not be empty")
        require(
            self.model_id in KNOWN_MODELS or self.model_id.startswith("arn:"),
            "model_id",
            f"must be one of {', '.join(KNOWN_MODELS)} (or an inference profile ARN)",
        )
        voices = voices_for(self.model_id)
        require(
            self.voice_id in voices,
            "voice_id",
            f"{self.voice_id!r} is not a voice of {self.model_id} "
            f"(one of {', '.join(sorted(voices))})",
        )
        for device_id, own in self.devices.items():
            require(bool(device_id.strip()), "devices", "device ids must not be empty")
            require(
                own.voice_id is None or own.voice_id in voices,
                f"devices.{device_id}.voice_id",
                f"{own.voice_id!r} is not a voice of {self.model_id} "
                f"(one of {', '.join(sorted(voices))})",
            )
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
        require(self.reply_margin_s > 0, "reply_margin_s", "must be > 0")
        require(self.tool_ack_timeout_s > 0, "tool_ack_timeout_s", "must be > 0")
        require(self.response_wait_s > 0, "response_wait_s", "must be > 0")
        require(self.drain_timeout_s >= 0, "drain_timeout_s", "must be >= 0")
        require(self.max_attempts >= 1, "max_attempts", "must be >= 1")
