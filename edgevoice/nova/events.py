"""Nova Sonic's JSON events, sans I/O: builders for what we send, a parser for what we get.

Every event on the bidirectional stream is one JSON object ``{"event": {NAME: BODY}}``.
Input events are built here as plain dicts and serialised with :func:`encode_event`
(``json.dumps``, never a string template, so a quote in a system prompt or a tool
result cannot break the frame). Output events are parsed by :func:`parse_output_event`
into the frozen dataclasses below. The parser never raises: bytes that are not a
well-formed event become :class:`MalformedEventReceived`, well-formed events of a
kind we do not know become :class:`UnknownEventReceived`, so a model update or a
broken frame can never take a device's session down.

Names of parsed events are past tense (``TextReceived``), like every event in
edgevoice; each docstring names the Nova event it comes from.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

#: Sample rates Nova Sonic takes and gives (16-bit signed little-endian mono PCM).
INPUT_RATE_HZ: Final = 16_000
OUTPUT_RATE_HZ: Final = 24_000

MODEL_NOVA_SONIC: Final = "amazon.nova-sonic-v1:0"
MODEL_NOVA_2_SONIC: Final = "amazon.nova-2-sonic-v1:0"
KNOWN_MODELS: Final = (MODEL_NOVA_2_SONIC, MODEL_NOVA_SONIC)

# Roles, content types, generation stages and stop reasons of the schema.
ROLE_USER: Final = "USER"
ROLE_ASSISTANT: Final = "ASSISTANT"
ROLE_SYSTEM: Final = "SYSTEM"
ROLE_TOOL: Final = "TOOL"
TYPE_TEXT: Final = "TEXT"
TYPE_AUDIO: Final = "AUDIO"
TYPE_TOOL: Final = "TOOL"
STAGE_SPECULATIVE: Final = "SPECULATIVE"
STAGE_FINAL: Final = "FINAL"
STOP_PARTIAL_TURN: Final = "PARTIAL_TURN"
STOP_END_TURN: Final = "END_TURN"
STOP_INTERRUPTED: Final = "INTERRUPTED"
STOP_TOOL_USE: Final = "TOOL_USE"

TextRole = Literal["SYSTEM", "USER", "ASSISTANT"]
EndpointingSensitivity = Literal["HIGH", "MEDIUM", "LOW"]

Event = dict[str, Any]
"""An input event as sent: ``{"event": {NAME: BODY}}``."""


def encode_event(event: Mapping[str, Any]) -> bytes:
    """Serialise one event for the wire (compact UTF-8 JSON)."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _wrap(name: str, body: Mapping[str, Any]) -> Event:
    return {"event": {name: dict(body)}}


# --- input events ------------------------------------------------------------------


def session_start(
    *,
    max_tokens: int,
    top_p: float,
    temperature: float,
    endpointing_sensitivity: EndpointingSensitivity | None = None,
) -> Event:
    """``sessionStart``: inference settings; Nova 2 also takes turn detection."""
    body: dict[str, Any] = {
        "inferenceConfiguration": {
            "maxTokens": max_tokens,
            "topP": top_p,
            "temperature": temperature,
        }
    }
    if endpointing_sensitivity is not None:
        # Nova 2 Sonic rejects the flat form: it must be nested.
        body["turnDetectionConfiguration"] = {"endpointingSensitivity": endpointing_sensitivity}
    return _wrap("sessionStart", body)


def tool_spec(name: str, description: str, input_schema: Mapping[str, Any]) -> dict[str, Any]:
    """One entry of ``promptStart.toolConfiguration.tools``.

    Nova wants the JSON schema as a JSON *string* inside ``inputSchema.json``.
    """
    return {
        "toolSpec": {
            "name": name,
            "description": description,
            "inputSchema": {"json": json.dumps(dict(input_schema), separators=(",", ":"))},
        }
    }


def prompt_start(
    prompt_name: str,
    *,
    voice_id: str,
    tools: Sequence[Mapping[str, Any]] = (),
    output_rate_hz: int = OUTPUT_RATE_HZ,
) -> Event:
    """``promptStart``: output formats, the voice, and the tools the model may call."""
    body: dict[str, Any] = {
        "promptName": prompt_name,
        "textOutputConfiguration": {"mediaType": "text/plain"},
        "audioOutputConfiguration": {
            "mediaType": "audio/lpcm",
            "sampleRateHertz": output_rate_hz,
            "sampleSizeBits": 16,
            "channelCount": 1,
            "voiceId": voice_id,
            "encoding": "base64",
            "audioType": "SPEECH",
        },
    }
    if tools:
        body["toolUseOutputConfiguration"] = {"mediaType": "application/json"}
        body["toolConfiguration"] = {"tools": [dict(t) for t in tools]}
    return _wrap("promptStart", body)


def content_start_text(
    prompt_name: str, content_name: str, role: TextRole, *, interactive: bool = False
) -> Event:
    """``contentStart`` of a text block (system prompt, history message, typed input)."""
    return _wrap(
        "contentStart",
        {
            "promptName": prompt_name,
            "contentName": content_name,
            "type": TYPE_TEXT,
            "interactive": interactive,
            "role": role,
            "textInputConfiguration": {"mediaType": "text/plain"},
        },
    )


def content_start_audio(
    prompt_name: str, content_name: str, *, input_rate_hz: int = INPUT_RATE_HZ
) -> Event:
    """``contentStart`` of the one interactive audio block the user's voice streams into."""
    return _wrap(
        "contentStart",
        {
            "promptName": prompt_name,
            "contentName": content_name,
            "type": TYPE_AUDIO,
            "interactive": True,
            "role": ROLE_USER,
            "audioInputConfiguration": {
                "mediaType": "audio/lpcm",
                "sampleRateHertz": input_rate_hz,
                "sampleSizeBits": 16,
                "channelCount": 1,
                "audioType": "SPEECH",
                "encoding": "base64",
            },
        },
    )


def content_start_tool(prompt_name: str, content_name: str, tool_use_id: str) -> Event:
    """``contentStart`` of a tool result answering the ``toolUse`` with ``tool_use_id``."""
    return _wrap(
        "contentStart",
        {
            "promptName": prompt_name,
            "contentName": content_name,
            "interactive": False,
            "type": TYPE_TOOL,
            "role": ROLE_TOOL,
            "toolResultInputConfiguration": {
                "toolUseId": tool_use_id,
                "type": TYPE_TEXT,
                "textInputConfiguration": {"mediaType": "text/plain"},
            },
        },
    )


def text_input(prompt_name: str, content_name: str, text: str) -> Event:
    """``textInput``: text inside an open text block."""
    return _wrap(
        "textInput", {"promptName": prompt_name, "contentName": content_name, "content": text}
    )


def audio_input(prompt_name: str, content_name: str, pcm: bytes) -> Event:
    """``audioInput``: 16 kHz mono s16le PCM, base64 in the JSON."""
    return _wrap(
        "audioInput",
        {
            "promptName": prompt_name,
            "contentName": content_name,
            "content": base64.b64encode(pcm).decode("ascii"),
        },
    )


def tool_result(prompt_name: str, content_name: str, result_json: str) -> Event:
    """``toolResult``: the tool's answer, a JSON document as a string."""
    return _wrap(
        "toolResult",
        {"promptName": prompt_name, "contentName": content_name, "content": result_json},
    )


def content_end(prompt_name: str, content_name: str) -> Event:
    """``contentEnd``: closes the block named ``content_name``."""
    return _wrap("contentEnd", {"promptName": prompt_name, "contentName": content_name})


def prompt_end(prompt_name: str) -> Event:
    """``promptEnd``: no more content for this prompt."""
    return _wrap("promptEnd", {"promptName": prompt_name})


def session_end() -> Event:
    """``sessionEnd``: the last event we send on a stream."""
    return _wrap("sessionEnd", {})


def tool_result_block(
    prompt_name: str, content_name: str, tool_use_id: str, result_json: str
) -> list[Event]:
    """The three events that answer one ``toolUse``."""
    return [
        content_start_tool(prompt_name, content_name, tool_use_id),
        tool_result(prompt_name, content_name, result_json),
        content_end(prompt_name, content_name),
    ]


def split_utf8(text: str, max_bytes: int) -> list[str]:
    """Split ``text`` into pieces of at most ``max_bytes`` UTF-8 bytes.

    Never cuts inside a character; prefers to cut after a space so words survive.
    """
    if max_bytes < 4:
        raise ValueError("max_bytes must be >= 4 (one UTF-8 character)")
    pieces: list[str] = []
    rest = text
    while len(rest.encode("utf-8")) > max_bytes:
        raw = rest.encode("utf-8")[:max_bytes]
        cut = raw.decode("utf-8", errors="ignore")  # drops a split trailing character
        space = cut.rfind(" ")
        if space > len(cut) // 2:
            cut = cut[: space + 1]
        pieces.append(cut)
        rest = rest[len(cut) :]
    if rest or not pieces:
        pieces.append(rest)
    return pieces


def text_block(
    prompt_name: str,
    content_name: str,
    role: TextRole,
    text: str,
    *,
    interactive: bool = False,
    max_input_bytes: int = 1024,
) -> list[Event]:
    """A whole text block; text longer than one ``textInput`` allows is split."""
    return [
        content_start_text(prompt_name, content_name, role, interactive=interactive),
        *(text_input(prompt_name, content_name, p) for p in split_utf8(text, max_input_bytes)),
        content_end(prompt_name, content_name),
    ]


# --- output events -----------------------------------------------------------------


@dataclass(frozen=True)
class CompletionStarted:
    """``completionStart``: the model began a completion."""

    completion_id: str
    prompt_name: str = ""
    session_id: str = ""


@dataclass(frozen=True)
class ContentStarted:
    """``contentStart``: a text, audio or tool block from the model begins.

    ``generation_stage`` comes from the JSON string in ``additionalModelFields``:
    SPECULATIVE text is what the model plans to say, FINAL is what it said.
    """

    content_id: str
    type: str
    role: str
    generation_stage: str | None = None


@dataclass(frozen=True)
class TextReceived:
    """``textOutput``: a transcript (USER) or the assistant's words (ASSISTANT).

    ``interrupted`` is true when the text is Nova's barge-in marker, a JSON object
    ``{"interrupted": true}`` instead of words.
    """

    content_id: str
    role: str
    text: str
    interrupted: bool = False


@dataclass(frozen=True)
class AudioReceived:
    """``audioOutput``: a piece of the spoken reply, 24 kHz mono s16le PCM (decoded)."""

    content_id: str
    pcm: bytes


@dataclass(frozen=True)
class ToolUseRequested:
    """``toolUse``: the model asks to run ``tool_name`` with JSON ``arguments``."""

    content_id: str
    tool_use_id: str
    tool_name: str
    arguments: str


@dataclass(frozen=True)
class ContentEnded:
    """``contentEnd``: a block ends; ``stop_reason`` says why (END_TURN, INTERRUPTED...)."""

    content_id: str
    type: str = ""
    stop_reason: str = ""


@dataclass(frozen=True)
class CompletionEnded:
    """``completionEnd``: the completion is over; a stream that ends without it was lost."""

    completion_id: str = ""
    stop_reason: str = ""


@dataclass(frozen=True)
class UsageUpdated:
    """``usageEvent``: running token totals of this stream."""

    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class UnknownEventReceived:
    """A well-formed event of a kind this version does not know (ignored, logged)."""

    name: str


@dataclass(frozen=True)
class MalformedEventReceived:
    """Bytes that are not a well-formed Nova event; ``reason`` says what is wrong."""

    reason: str


OutputEvent = (
    CompletionStarted
    | ContentStarted
    | TextReceived
    | AudioReceived
    | ToolUseRequested
    | ContentEnded
    | CompletionEnded
    | UsageUpdated
    | UnknownEventReceived
    | MalformedEventReceived
)


class _Malformed(Exception):
    """Internal: raised by field readers, turned into MalformedEventReceived."""


def _str(body: Mapping[str, Any], key: str, *, required: bool = True) -> str:
    value = body.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise _Malformed(f"field {key!r} must be a string")
    return value


def _int(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Malformed(f"field {key!r} must be a non-negative integer")
    return value


def _generation_stage(body: Mapping[str, Any]) -> str | None:
    raw = body.get("additionalModelFields")
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            fields = json.loads(raw)
        except ValueError as exc:
            raise _Malformed("additionalModelFields is not JSON") from exc
    else:
        fields = raw
    if not isinstance(fields, dict):
        raise _Malformed("additionalModelFields is not an object")
    stage = fields.get("generationStage")
    if stage is not None and not isinstance(stage, str):
        raise _Malformed("generationStage must be a string")
    return stage


def is_interruption_marker(text: str) -> bool:
    """Whether ``text`` is Nova's barge-in marker ``{"interrupted": true}``.

    Decided by parsing JSON, never by matching text: spacing varies.
    """
    stripped = text.strip()
    if not stripped.startswith("{"):
        return False
    try:
        value = json.loads(stripped)
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("interrupted") is True


def _usage(body: Mapping[str, Any]) -> UsageUpdated:
    input_tokens = _int(body, "totalInputTokens")
    output_tokens = _int(body, "totalOutputTokens")
    if input_tokens is None or output_tokens is None:
        # Older shapes carry only the detailed totals: sum speech and text tokens.
        details = body.get("details")
        total = details.get("total") if isinstance(details, dict) else None
        if not isinstance(total, dict):
            raise _Malformed("usageEvent without totals")
        sums = []
        for side in ("input", "output"):
            part = total.get(side)
            if not isinstance(part, dict):
                raise _Malformed(f"usageEvent details.total.{side} missing")
            sums.append(sum(_int(part, k) or 0 for k in ("speechTokens", "textTokens")))
        input_tokens, output_tokens = sums
    return UsageUpdated(input_tokens=input_tokens, output_tokens=output_tokens)


def _parse_body(name: str, body: Mapping[str, Any]) -> OutputEvent:
    if name == "completionStart":
        return CompletionStarted(
            completion_id=_str(body, "completionId", required=False),
            prompt_name=_str(body, "promptName", required=False),
            session_id=_str(body, "sessionId", required=False),
        )
    if name == "contentStart":
        return ContentStarted(
            content_id=_str(body, "contentId"),
            type=_str(body, "type"),
            role=_str(body, "role", required=False),
            generation_stage=_generation_stage(body),
        )
    if name == "textOutput":
        text = _str(body, "content")
        return TextReceived(
            content_id=_str(body, "contentId", required=False),
            role=_str(body, "role", required=False),
            text=text,
            interrupted=is_interruption_marker(text),
        )
    if name == "audioOutput":
        try:
            pcm = base64.b64decode(_str(body, "content"), validate=True)
        except ValueError as exc:  # binascii.Error, or non-ASCII text
            raise _Malformed("audioOutput content is not base64") from exc
        if len(pcm) % 2:
            raise _Malformed("audioOutput has an odd number of bytes")
        return AudioReceived(content_id=_str(body, "contentId", required=False), pcm=pcm)
    if name == "toolUse":
        arguments = _str(body, "content", required=False) or "{}"
        return ToolUseRequested(
            content_id=_str(body, "contentId", required=False),
            tool_use_id=_str(body, "toolUseId"),
            tool_name=_str(body, "toolName"),
            arguments=arguments,
        )
    if name == "contentEnd":
        return ContentEnded(
            content_id=_str(body, "contentId"),
            type=_str(body, "type", required=False),
            stop_reason=_str(body, "stopReason", required=False),
        )
    if name == "completionEnd":
        return CompletionEnded(
            completion_id=_str(body, "completionId", required=False),
            stop_reason=_str(body, "stopReason", required=False),
        )
    if name == "usageEvent":
        return _usage(body)
    return UnknownEventReceived(name=name)


def parse_output_event(data: bytes | str) -> OutputEvent:
    """Parse one output event's JSON. Never raises (see the module docstring)."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return MalformedEventReceived("not JSON")
    if not isinstance(document, dict):
        return MalformedEventReceived("not a JSON object")
    event = document.get("event")
    if not isinstance(event, dict) or len(event) != 1:
        return MalformedEventReceived("expected {'event': {NAME: BODY}}")
    ((name, body),) = event.items()
    if not isinstance(body, dict):
        return MalformedEventReceived(f"body of {name!r} is not an object")
    try:
        return _parse_body(name, body)
    except _Malformed as exc:
        return MalformedEventReceived(f"{name}: {exc}")
