"""Nova Sonic events: builders produce the schema, the parser never crashes."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgevoice.nova import events as nova


def body(event: dict[str, Any], name: str) -> dict[str, Any]:
    assert list(event) == ["event"] and list(event["event"]) == [name]
    inner = event["event"][name]
    assert isinstance(inner, dict)
    return inner


def roundtrip(event: dict[str, Any]) -> dict[str, Any]:
    decoded = json.loads(nova.encode_event(event))
    assert decoded == event
    return decoded


def test_session_start_nests_turn_detection_for_nova_2() -> None:
    plain = body(nova.session_start(max_tokens=1024, top_p=0.9, temperature=0.7), "sessionStart")
    assert plain == {"inferenceConfiguration": {"maxTokens": 1024, "topP": 0.9, "temperature": 0.7}}
    tuned = body(
        nova.session_start(
            max_tokens=10, top_p=0.5, temperature=0.1, endpointing_sensitivity="HIGH"
        ),
        "sessionStart",
    )
    assert tuned["turnDetectionConfiguration"] == {"endpointingSensitivity": "HIGH"}
    assert "endpointingSensitivity" not in tuned  # the flat form is rejected by Nova 2


def test_prompt_start_declares_audio_output_and_tools() -> None:
    spec = nova.tool_spec("get_weather", 'Weather "now".', {"type": "object", "required": []})
    start = body(
        roundtrip(nova.prompt_start("p1", voice_id="tiffany", tools=[spec])), "promptStart"
    )
    assert start["promptName"] == "p1"
    assert start["audioOutputConfiguration"] == {
        "mediaType": "audio/lpcm",
        "sampleRateHertz": 24000,
        "sampleSizeBits": 16,
        "channelCount": 1,
        "voiceId": "tiffany",
        "encoding": "base64",
        "audioType": "SPEECH",
    }
    assert start["textOutputConfiguration"] == {"mediaType": "text/plain"}
    assert start["toolUseOutputConfiguration"] == {"mediaType": "application/json"}
    (tool,) = start["toolConfiguration"]["tools"]
    assert isinstance(tool["toolSpec"]["inputSchema"]["json"], str)
    assert json.loads(tool["toolSpec"]["inputSchema"]["json"]) == {"type": "object", "required": []}
    bare = body(nova.prompt_start("p1", voice_id="matthew"), "promptStart")
    assert "toolConfiguration" not in bare and "toolUseOutputConfiguration" not in bare


def test_content_blocks_of_every_kind() -> None:
    audio = body(nova.content_start_audio("p", "a"), "contentStart")
    assert audio["type"] == "AUDIO" and audio["role"] == "USER" and audio["interactive"] is True
    assert audio["audioInputConfiguration"]["sampleRateHertz"] == 16000
    assert audio["audioInputConfiguration"]["encoding"] == "base64"
    system = body(nova.content_start_text("p", "s", "SYSTEM"), "contentStart")
    assert (
        system["type"] == "TEXT" and system["role"] == "SYSTEM" and system["interactive"] is False
    )
    tool = body(nova.content_start_tool("p", "t", "use-1"), "contentStart")
    assert tool["role"] == "TOOL" and tool["type"] == "TOOL"
    assert tool["toolResultInputConfiguration"]["toolUseId"] == "use-1"
    pcm = bytes(range(256)) * 2
    sent = body(nova.audio_input("p", "a", pcm), "audioInput")
    assert base64.b64decode(sent["content"]) == pcm
    names = [next(iter(e["event"])) for e in nova.tool_result_block("p", "t", "use-1", "{}")]
    assert names == ["contentStart", "toolResult", "contentEnd"]
    assert body(nova.session_end(), "sessionEnd") == {}
    assert body(nova.prompt_end("p"), "promptEnd") == {"promptName": "p"}


def test_text_with_quotes_and_newlines_survives_the_wire() -> None:
    nasty = 'He said "stop" \\ then\n left {"interrupted": true} ü 日本'
    sent = roundtrip(nova.text_input("p", "c", nasty))
    assert body(sent, "textInput")["content"] == nasty


@given(st.text(max_size=3000), st.integers(min_value=4, max_value=1500))
@settings(max_examples=200)
def test_split_utf8_respects_the_byte_limit_and_loses_nothing(text: str, limit: int) -> None:
    pieces = nova.split_utf8(text, limit)
    assert "".join(pieces) == text
    assert all(len(p.encode("utf-8")) <= limit for p in pieces)
    assert all(pieces) or pieces == [""]


def test_text_block_splits_long_text_into_several_inputs() -> None:
    block = nova.text_block("p", "c", "USER", "word " * 700)  # 3500 bytes
    names = [next(iter(e["event"])) for e in block]
    assert names[0] == "contentStart" and names[-1] == "contentEnd"
    inputs = [body(e, "textInput")["content"] for e in block[1:-1]]
    assert len(inputs) == 4
    assert all(len(t.encode()) <= 1024 for t in inputs)
    assert "".join(inputs) == "word " * 700


def output(name: str, **fields: Any) -> bytes:
    return json.dumps({"event": {name: fields}}).encode()


def test_parse_every_output_event() -> None:
    stage = json.dumps({"generationStage": "SPECULATIVE"})
    assert nova.parse_output_event(
        output("completionStart", sessionId="s", promptName="p", completionId="c")
    ) == nova.CompletionStarted(completion_id="c", prompt_name="p", session_id="s")
    assert nova.parse_output_event(
        output(
            "contentStart",
            contentId="x",
            type="TEXT",
            role="ASSISTANT",
            additionalModelFields=stage,
        )
    ) == nova.ContentStarted("x", "TEXT", "ASSISTANT", "SPECULATIVE")
    assert nova.parse_output_event(
        output("textOutput", contentId="x", role="USER", content="hi")
    ) == nova.TextReceived("x", "USER", "hi", interrupted=False)
    pcm = b"\x01\x00\x02\x00"
    assert nova.parse_output_event(
        output("audioOutput", contentId="a", content=base64.b64encode(pcm).decode())
    ) == nova.AudioReceived("a", pcm)
    assert nova.parse_output_event(
        output("toolUse", contentId="t", toolUseId="u", toolName="current_time", content='{"a":1}')
    ) == nova.ToolUseRequested("t", "u", "current_time", '{"a":1}')
    assert nova.parse_output_event(
        output("contentEnd", contentId="x", type="AUDIO", stopReason="INTERRUPTED")
    ) == nova.ContentEnded("x", "AUDIO", "INTERRUPTED")
    assert nova.parse_output_event(
        output("completionEnd", completionId="c", stopReason="END_TURN")
    ) == nova.CompletionEnded("c", "END_TURN")
    assert nova.parse_output_event(
        output("usageEvent", totalInputTokens=10, totalOutputTokens=4, totalTokens=14)
    ) == nova.UsageUpdated(10, 4)


def test_usage_falls_back_to_detailed_totals() -> None:
    detailed = {
        "total": {
            "input": {"speechTokens": 7, "textTokens": 3},
            "output": {"speechTokens": 5, "textTokens": 1},
        }
    }
    assert nova.parse_output_event(output("usageEvent", details=detailed)) == nova.UsageUpdated(
        10, 6
    )


@pytest.mark.parametrize(
    "content",
    ['{ "interrupted" : true }', '{"interrupted":true}', '\n{"interrupted": true, "x": 1}  '],
)
def test_barge_in_marker_is_recognised_by_parsing(content: str) -> None:
    event = nova.parse_output_event(
        output("textOutput", contentId="x", role="ASSISTANT", content=content)
    )
    assert isinstance(event, nova.TextReceived) and event.interrupted


@pytest.mark.parametrize(
    "content",
    [
        '{"interrupted": false}',
        '{"interrupted": "true"}',
        'I was not { "interrupted" : true } at all',
        "interrupted",
        "[true]",
    ],
)
def test_text_that_merely_mentions_interruption_is_text(content: str) -> None:
    event = nova.parse_output_event(
        output("textOutput", contentId="x", role="ASSISTANT", content=content)
    )
    assert isinstance(event, nova.TextReceived) and not event.interrupted


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1,2]", "not a JSON object"),
        (b'{"event": {}}', "expected"),
        (b'{"event": {"a": {}, "b": {}}}', "expected"),
        (b'{"event": {"textOutput": "x"}}', "not an object"),
        (b'{"event": {"textOutput": {"content": 5}}}', "content"),
        (b'{"event": {"audioOutput": {"content": "@@"}}}', "base64"),
        (b'{"event": {"audioOutput": {"content": "AAEC"}}}', "odd number"),
        (
            b'{"event": {"contentStart": {"contentId": "x", "type": "TEXT", '
            b'"additionalModelFields": "{oops"}}}',
            "additionalModelFields",
        ),
        (
            b'{"event": {"usageEvent": {"totalInputTokens": -1, "totalOutputTokens": 1}}}',
            "non-negative",
        ),
        (
            b'{"event": {"usageEvent": {"totalInputTokens": true, "totalOutputTokens": 1}}}',
            "integer",
        ),
        (b'{"event": {"toolUse": {"toolName": "x"}}}', "toolUseId"),
    ],
)
def test_malformed_events_are_reported_not_raised(raw: bytes, reason: str) -> None:
    event = nova.parse_output_event(raw)
    assert isinstance(event, nova.MalformedEventReceived)
    assert reason in event.reason


def test_unknown_event_kinds_are_reported_by_name() -> None:
    assert nova.parse_output_event(output("brandNewEvent", x=1)) == nova.UnknownEventReceived(
        "brandNewEvent"
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
event_names = st.sampled_from(
    [
        "completionStart",
        "contentStart",
        "textOutput",
        "audioOutput",
        "toolUse",
        "contentEnd",
        "completionEnd",
        "usageEvent",
        "other",
    ]
)


@given(st.binary(max_size=400))
@settings(max_examples=300)
def test_garbage_bytes_never_raise(raw: bytes) -> None:
    assert isinstance(nova.parse_output_event(raw), nova.OutputEvent)


@given(
    event_names,
    st.dictionaries(
        st.sampled_from(
            [
                "contentId",
                "type",
                "role",
                "content",
                "toolUseId",
                "toolName",
                "stopReason",
                "additionalModelFields",
                "totalInputTokens",
                "totalOutputTokens",
                "details",
            ]
        ),
        json_values,
        max_size=6,
    ),
)
@settings(max_examples=500)
def test_well_formed_json_with_wrong_fields_never_raises(name: str, fields: dict[str, Any]) -> None:
    event = nova.parse_output_event(json.dumps({"event": {name: fields}}))
    assert isinstance(event, nova.OutputEvent)
