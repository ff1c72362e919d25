"""NovaUpstream with the real AWS SDK client against the local fake Bedrock endpoint.

Every scenario goes through HTTP/2, TLS, SigV4-signed event-stream frames and the
SDK's own deserialisers, so what passes here is what the relay runs.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import json
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

pytest.importorskip(
    "aws_sdk_bedrock_runtime",
    reason="the Nova Sonic upstream needs Python >= 3.12 and the 'nova' extra",
)

from edgevoice_dev.testing.fake_bedrock import (
    FakeBedrock,
    ReceivedStream,
    Reply,
    StreamPlan,
    reply_chunk_pcm,
)

from edgevoice.nova import events as nova
from edgevoice.nova.session import SessionState
from edgevoice.nova.upstream import (
    NovaSession,
    NovaSettings,
    NovaUpstream,
    _Close,
    _StreamRunner,
)
from edgevoice.tools.builtin import current_time_tool
from edgevoice.tools.registry import Tool, ToolRegistry
from edgevoice.upstream.base import (
    AudioOutput,
    DeviceContext,
    ResponseEnded,
    ResponseInterrupted,
    ResponseStarted,
    ToolCalled,
    TranscriptReceived,
    UpstreamEvent,
    UpstreamFailed,
    UsageReported,
)

E = TypeVar("E")
FRAME = 640
SILENCE = bytes(FRAME)


def speech(tag: int = 0) -> bytes:
    """A loud 20 ms frame; ``tag`` makes frames tell-apart-able in recordings."""
    return (3000 + tag).to_bytes(2, "little", signed=True) * (FRAME // 2)


def settings(**overrides: Any) -> NovaSettings:
    values: dict[str, Any] = {
        "open_timeout_s": 3.0,
        "drain_timeout_s": 0.5,
        "stall_timeout_s": 3.0,
        "system_prompt": "You are a test.",
    }
    values.update(overrides)
    return NovaSettings(**values)


class Device:
    """Plays the relay's part: feeds a session and records what comes back."""

    def __init__(self, session: NovaSession) -> None:
        self.session = session
        self.events: list[UpstreamEvent] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._collect())

    async def _collect(self) -> None:
        async for event in self.session.events():
            self.events.append(event)
            self._changed.set()

    def of(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]

    async def wait_for(self, predicate: Callable[[], bool], within_s: float = 8.0) -> None:
        async with asyncio.timeout(within_s):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def say(self, frames: int = 15, first_tag: int = 0) -> list[bytes]:
        """Speak ``frames`` distinct frames at real time, as a device would."""
        sent = [speech(first_tag + i) for i in range(frames)]
        await self.session.start_turn()
        for frame in sent:
            await self.session.send_audio(frame)
            await asyncio.sleep(0.02)
        await self.session.end_turn()
        return sent

    async def close(self) -> None:
        await self.session.close()
        await self._reader


@pytest.fixture
def run_with(fake: FakeBedrock) -> Callable[..., Any]:
    """Run ``scenario(device)`` against a fresh upstream; returns its result."""

    def runner(
        scenario: Callable[[Device], Any],
        nova_settings: NovaSettings | None = None,
        tools: ToolRegistry | None = None,
    ) -> Any:
        async def main() -> Any:
            upstream = NovaUpstream(nova_settings or settings(), tools or ToolRegistry())
            session = await upstream.open_session(
                DeviceContext("kitchen", "s1", timezone="Europe/Berlin")
            )
            device = Device(session)
            try:
                return await scenario(device)
            finally:
                await device.close()
                await upstream.aclose()

        return asyncio.run(main())

    return runner


def audio_of(stream: ReceivedStream) -> list[bytes]:
    pcm = stream.audio()
    return [pcm[i : i + FRAME] for i in range(0, len(pcm), FRAME)]


def contains_in_order(haystack: list[bytes], needles: list[bytes]) -> bool:
    it = iter(haystack)
    return all(any(item == needle for item in it) for needle in needles)


# --- scenarios -------------------------------------------------------------------------


def test_a_turn_gets_transcripts_and_a_spoken_reply(fake: FakeBedrock, run_with: Any) -> None:
    async def scenario(device: Device) -> list[bytes]:
        said = await device.say(15)
        await device.wait_for(lambda: bool(device.of(ResponseEnded)))
        await asyncio.sleep(0.3)  # let silence flow after the turn
        return said

    said = run_with(scenario)
    (stream,) = fake.received
    assert stream.model_id == "amazon.nova-2-sonic-v1:0"
    assert "authorization" in stream.headers  # SigV4-signed by the SDK
    names = stream.names()
    assert names[:2] == ["sessionStart", "promptStart"]
    assert stream.text_inputs()[0] == ("SYSTEM", "You are a test.")
    assert names[-3:] == ["contentEnd", "promptEnd", "sessionEnd"]
    assert stream.end_frame and stream.input_closed and stream.errors == []
    frames = audio_of(stream)
    assert contains_in_order(frames, said)
    assert frames.count(SILENCE) >= 5  # continuous audio: silence after the turn
    assert set(frames) <= {*said, SILENCE}


def test_reply_events_arrive_in_order(fake: FakeBedrock, run_with: Any) -> None:
    async def scenario(device: Device) -> list[UpstreamEvent]:
        await device.say()
        # the reply's end reports the audio sent so far (no tokens yet): the token
        # report Nova sends after the assistant's transcript is the last event
        await device.wait_for(lambda: any(e.input_tokens for e in device.of(UsageReported)))
        return device.events

    events = run_with(scenario)
    # usage reports carry the audio sent so far too: keep those that report tokens
    events = [
        dataclasses.replace(e, audio_input_s=0.0) if isinstance(e, UsageReported) else e
        for e in events
        if not isinstance(e, UsageReported) or e.input_tokens
    ]
    assert events == [
        TranscriptReceived("user", "hello fake nova"),
        ResponseStarted(),
        *(AudioOutput(reply_chunk_pcm(i, 2400)) for i in range(3)),
        ResponseEnded("end_turn"),
        TranscriptReceived("assistant", "Hello from the fake Nova."),
        UsageReported(120, 80),
    ]


@pytest.mark.parametrize("signal", ["both", "text", "stop_reason"])
def test_barge_in_mid_reply(fake: FakeBedrock, run_with: Any, signal: str) -> None:
    fake.script.push(
        StreamPlan(
            replies=[Reply(audio_chunks=60, chunk_interval_s=0.05, barge_in_signal=signal)]  # type: ignore[arg-type]
        )
    )

    async def scenario(device: Device) -> list[UpstreamEvent]:
        await device.say()
        await device.wait_for(lambda: len(device.of(AudioOutput)) >= 2)
        await device.say(10, first_tag=100)  # the user talks over the reply
        await device.wait_for(lambda: bool(device.of(ResponseInterrupted)))
        await device.wait_for(lambda: len(device.of(ResponseStarted)) == 2)  # answered anew
        await device.wait_for(lambda: bool(device.of(ResponseEnded)))
        # the final assistant transcript may trail the end of the reply's audio
        await device.wait_for(lambda: len(device.of(TranscriptReceived)) >= 4)
        return device.events

    events = run_with(scenario)
    kinds = [type(e).__name__ for e in events if not isinstance(e, AudioOutput | UsageReported)]
    assert kinds == [
        "TranscriptReceived",  # the question
        "ResponseStarted",
        "ResponseInterrupted",  # once, though Nova may signal it twice
        "TranscriptReceived",  # what the assistant got to say
        "TranscriptReceived",  # the interruption
        "ResponseStarted",
        "ResponseEnded",
        "TranscriptReceived",
    ]
    first_reply = events[: events.index(ResponseInterrupted())]
    assert 2 <= len([e for e in first_reply if isinstance(e, AudioOutput)]) < 60
    assert len(fake.received) == 1


def test_tool_call_round_trip(fake: FakeBedrock, run_with: Any) -> None:
    fake.script.push(StreamPlan(replies=[Reply(tool_name="current_time")]))
    fixed = datetime.datetime(2025, 6, 14, 13, 30, tzinfo=datetime.UTC)
    tools = ToolRegistry([current_time_tool(now=lambda: fixed)])

    async def scenario(device: Device) -> None:
        await device.say()
        await device.wait_for(lambda: bool(device.of(ResponseEnded)))

    run_with(scenario, tools=tools)
    (stream,) = fake.received
    prompt = stream.bodies("promptStart")[0]
    assert [t["toolSpec"]["name"] for t in prompt["toolConfiguration"]["tools"]] == ["current_time"]
    (result,) = stream.bodies("toolResult")
    assert json.loads(result["content"])["time"] == "15:30"  # Europe/Berlin, summer


def test_a_slow_or_failing_tool_answers_with_an_error_and_the_reply_goes_on(
    fake: FakeBedrock, run_with: Any
) -> None:
    fake.script.push(StreamPlan(replies=[Reply(tool_name="slow"), Reply(tool_name="broken")]))

    async def slow(args: dict[str, Any], ctx: DeviceContext) -> dict[str, Any]:
        await asyncio.sleep(30)
        return {}

    async def broken(args: dict[str, Any], ctx: DeviceContext) -> dict[str, Any]:
        raise RuntimeError("nope")

    tools = ToolRegistry(
        [
            Tool("slow", "Slow.", {"type": "object"}, slow),
            Tool("broken", "Broken.", {"type": "object"}, broken),
        ]
    )

    async def scenario(device: Device) -> list[ToolCalled]:
        await device.say()
        await device.wait_for(lambda: len(device.of(ResponseEnded)) == 1)
        await device.say()
        await device.wait_for(lambda: len(device.of(ResponseEnded)) == 2)
        return device.of(ToolCalled)

    calls = run_with(scenario, nova_settings=settings(tool_timeout_s=0.3), tools=tools)
    assert [(c.name, c.ok) for c in calls] == [("slow", False), ("broken", False)]
    results = [json.loads(r["content"]) for r in fake.received[0].bodies("toolResult")]
    assert "did not answer" in results[0]["error"]
    assert "failed" in results[1]["error"]


def test_rotation_carries_history_and_buffered_audio(fake: FakeBedrock, run_with: Any) -> None:
    # The second stream answers its request slowly, so the user speaks during the switch.
    fake.script.push(StreamPlan(), StreamPlan(open_delay_s=0.5))

    async def scenario(device: Device) -> list[bytes]:
        await device.say()
        await device.wait_for(lambda: bool(device.of(ResponseEnded)))
        await fake.wait_for_async(lambda: len(fake.received) == 2, within_s=5)
        said = await device.say(10, first_tag=200)
        await device.wait_for(lambda: len(device.of(ResponseEnded)) == 2)
        return said

    said = run_with(scenario, nova_settings=settings(rotate_after_s=1.5, rotate_hard_s=3.0))
    old, new = fake.received[:2]
    assert old.names()[-3:] == ["contentEnd", "promptEnd", "sessionEnd"]
    assert new.text_inputs() == [
        ("SYSTEM", "You are a test."),
        ("USER", "hello fake nova"),
        ("ASSISTANT", "Hello from the fake Nova."),
    ]
    history_starts = [
        b for b in new.bodies("contentStart") if b.get("type") == "TEXT" and b["role"] != "SYSTEM"
    ]
    assert all(b["interactive"] is False for b in history_starts)
    assert contains_in_order(audio_of(new), said)  # nothing said during the switch lost
    assert not any(frame in audio_of(old) for frame in said)
    assert new.utterances == 1


def test_model_timeout_resumes_transparently(fake: FakeBedrock, run_with: Any) -> None:
    fake.script.push(StreamPlan(replies=[Reply(), Reply(after="model_timeout", after_chunks=-1)]))

    async def scenario(device: Device) -> list[bytes]:
        await device.say()
        await device.wait_for(lambda: len(device.of(ResponseEnded)) == 1)
        said = await device.say(12, first_tag=300)
        await device.wait_for(lambda: len(device.of(ResponseEnded)) == 2)
        return said

    said = run_with(scenario, nova_settings=settings(replay_buffer_s=2.0))
    assert len(fake.received) == 2
    _first, second = fake.received
    assert contains_in_order(audio_of(second), said)  # the question was replayed
    assert ("USER", "hello fake nova") in second.text_inputs()


def test_model_timeout_reaches_the_device_only_as_a_finished_reply(
    fake: FakeBedrock, run_with: Any
) -> None:
    fake.script.push(StreamPlan(replies=[Reply(after="model_timeout", after_chunks=-1)]))

    async def scenario(device: Device) -> list[UpstreamEvent]:
        await device.say()
        await device.wait_for(lambda: bool(device.of(ResponseEnded)))
        return device.events

    events = run_with(scenario)
    assert not [e for e in events if isinstance(e, UpstreamFailed)]


def test_access_denied_is_reported_not_retried(fake: FakeBedrock, run_with: Any) -> None:
    fake.script.push(
        StreamPlan(http_status=403, error_type="AccessDeniedException", error_message="denied")
    )

    async def scenario(device: Device) -> UpstreamFailed:
        await device.say(5)
        await device.wait_for(lambda: bool(device.of(UpstreamFailed)))
        await asyncio.sleep(0.3)
        assert device.session.state is SessionState.CLOSED
        (failed,) = device.of(UpstreamFailed)
        return failed

    failed = run_with(scenario)
    assert failed.code == "nova_access_denied"
    assert failed.retryable is False
    assert "bedrock:InvokeModelWithBidirectionalStream" in failed.message
    assert len(fake.received) == 1


def test_unknown_model_is_reported(fake: FakeBedrock, run_with: Any) -> None:
    async def scenario(device: Device) -> UpstreamFailed:
        await device.say(5)
        await device.wait_for(lambda: bool(device.of(UpstreamFailed)))
        return device.of(UpstreamFailed)[0]

    arn = "arn:aws:bedrock:us-east-1::foundation-model/amazon.nova-9-sonic"
    failed = run_with(scenario, nova_settings=settings(model_id=arn))
    assert (failed.code, failed.retryable) == ("nova_unknown_model", False)


def test_throttling_is_retried_until_it_clears(fake: FakeBedrock, run_with: Any) -> None:
    fake.script.push(
        StreamPlan(http_status=429), StreamPlan(exception_on_start=("ThrottlingException", "slow"))
    )

    async def scenario(device: Device) -> None:
        await device.say()
        await device.wait_for(lambda: bool(device.of(ResponseEnded)), within_s=12)

    run_with(scenario, nova_settings=settings(open_timeout_s=8.0))
    assert len(fake.received) == 3
    assert fake.received[2].utterances == 1


def test_a_refused_stream_times_out_and_is_retried(fake: FakeBedrock, run_with: Any) -> None:
    fake.script.push(StreamPlan(refuse=True))

    async def scenario(device: Device) -> None:
        await device.say()
        await device.wait_for(lambda: bool(device.of(ResponseEnded)), within_s=10)

    run_with(scenario, nova_settings=settings(open_timeout_s=0.5))
    assert len(fake.received) == 2


@pytest.mark.parametrize("after", ["drop", "stall", "end", "exception"])
def test_a_reply_cut_off_mid_way_is_answered_again_from_a_fresh_stream(
    fake: FakeBedrock, run_with: Any, after: str
) -> None:
    cut = Reply(
        audio_chunks=5,
        after=after,
        after_chunks=2,  # type: ignore[arg-type]
        exception_type="ModelStreamErrorException",
        exception_message="stream error",
    )
    fake.script.push(StreamPlan(replies=[cut]))

    async def scenario(device: Device) -> list[UpstreamEvent]:
        said = await device.say()
        await device.wait_for(lambda: bool(device.of(ResponseEnded)), within_s=8)
        await device.say()
        await device.wait_for(lambda: len(device.of(ResponseEnded)) == 2, within_s=8)
        assert contains_in_order(audio_of(fake.received[1]), said)  # the question, replayed
        return device.events

    events = run_with(scenario, nova_settings=settings(stall_timeout_s=0.6))
    assert [e.reason for e in events if isinstance(e, ResponseEnded)] == ["end_turn", "end_turn"]
    assert len([e for e in events if isinstance(e, ResponseStarted)]) == 2
    assert not [e for e in events if isinstance(e, UpstreamFailed)]
    assert len(fake.received) == 2
    # the replacement's history has the conversation so far, not the replayed question
    assert ("USER", "hello fake nova") not in fake.received[1].text_inputs()


def test_idle_close_then_reopen_with_history(fake: FakeBedrock, run_with: Any) -> None:
    async def scenario(device: Device) -> None:
        await device.say()
        await device.wait_for(lambda: bool(device.of(ResponseEnded)))
        await fake.wait_for_async(lambda: "sessionEnd" in fake.received[0].names(), within_s=5)
        await asyncio.sleep(0.2)
        assert device.session.state is SessionState.CLOSED
        assert device.session.stats.idle_closes == 1
        await device.say()
        await device.wait_for(lambda: len(device.of(ResponseEnded)) == 2)

    run_with(scenario, nova_settings=settings(idle_close_s=0.8))
    first, second = fake.received
    assert first.input_closed
    assert ("USER", "hello fake nova") in second.text_inputs()


def test_malformed_and_unknown_events_do_not_break_the_session(
    fake: FakeBedrock, run_with: Any
) -> None:
    fake.script.push(StreamPlan(replies=[Reply(malformed_first=True)]))

    async def scenario(device: Device) -> tuple[int, int]:
        await device.say()
        await device.wait_for(lambda: bool(device.of(ResponseEnded)))
        stats = device.session.stats
        return stats.malformed_events, stats.unknown_events

    malformed, unknown = run_with(scenario)
    assert malformed >= 4 and unknown >= 1


def test_completion_once_per_stream_and_explicit_endpoint(fake: FakeBedrock, run_with: Any) -> None:
    fake.script.push(StreamPlan(completion_per_reply=False))

    async def scenario(device: Device) -> None:
        await device.say()
        await device.wait_for(lambda: bool(device.of(ResponseEnded)))
        await device.say()
        await device.wait_for(lambda: len(device.of(ResponseEnded)) == 2)

    run_with(scenario, nova_settings=settings(endpoint_url=fake.endpoint_url))
    assert len(fake.received) == 1


# --- audio events queued together leave as one ------------------------------------------


def _pcm_of(encoded: bytes) -> tuple[str, bytes]:
    """(event name, its audio) of one encoded input event."""
    (name, body), = json.loads(encoded)["event"].items()
    return name, base64.b64decode(body["content"]) if name == "audioInput" else b""


def test_audio_events_waiting_together_are_joined_up_to_100_ms_and_never_across_content(
) -> None:
    async def main() -> list[tuple[str, bytes]]:
        upstream = NovaUpstream(settings(), ToolRegistry())
        session = await upstream.open_session(DeviceContext("kitchen", "s1"))
        runner = _StreamRunner(session, 99)
        frames = [speech(i) for i in range(9)]
        runner.send_audio("p", "a", tuple(frames[:7]))  # 140 ms
        runner.send((nova.content_end("p", "a"),))  # a barrier: not audio
        runner.send_audio("p", "a", (frames[7],))
        runner.send_audio("p", "b", (frames[8],))  # another content block
        sent = []
        while len(runner.outbox):
            item = runner.outbox.get_nowait()
            assert not isinstance(item, _Close)
            sent.append(_pcm_of(item if isinstance(item, bytes) else runner._coalesced(item)))
        assert session.stats.audio_events_sent == 4
        await upstream.aclose()
        return sent

    frames = [speech(i) for i in range(9)]
    assert asyncio.run(main()) == [
        ("audioInput", b"".join(frames[:5])),  # 100 ms: the most one event carries
        ("audioInput", b"".join(frames[5:7])),
        ("contentEnd", b""),
        ("audioInput", frames[7]),
        ("audioInput", frames[8]),
    ]


def test_a_capture_blocks_frames_reach_nova_as_one_event_and_a_lone_frame_is_not_held(
    fake: FakeBedrock, run_with: Any
) -> None:
    """The relay hands over a capture block's three frames at once (one device write):
    one audioInput event. A frame that comes alone leaves at once, joined to nothing."""
    block = [speech(1), speech(2), speech(3)]
    lone = speech(4)

    async def scenario(device: Device) -> float:
        session = device.session
        await session.start_turn()
        await session.send_audio(speech(0))  # once Nova has this, the stream is open
        await fake.wait_for_async(
            lambda: bool(fake.received) and speech(0) in fake.received[0].audio(), within_s=8)
        assert session.state is SessionState.OPEN
        for frame in block:  # no suspension between them: as from one data callback
            await session.send_audio(frame)
        await asyncio.sleep(0.1)
        await session.send_audio(lone)
        sent_at = asyncio.get_running_loop().time()
        await fake.wait_for_async(lambda: lone in fake.received[0].audio(), within_s=2)
        return asyncio.get_running_loop().time() - sent_at

    waited = run_with(scenario)
    events = [base64.b64decode(b["content"]) for b in fake.received[0].bodies("audioInput")]
    # the three frames in one event, in order (a silence frame queued with them may lead)
    assert any(b"".join(block) in event for event in events), [len(e) for e in events]
    assert waited < 1.0


def test_the_fake_hears_audio_frame_by_frame_whatever_the_events_carry(
    fake: FakeBedrock, run_with: Any
) -> None:
    """Nova hears a stream, not events: speech and the silence after it, joined into
    100 ms events, end the utterance after the fake's 15 silent frames, before the
    session had to fill any silence of its own (700 ms of audio sent at once)."""
    quiet = bytes(FRAME)

    async def scenario(device: Device) -> int:
        await device.session.start_turn()
        for frame in [speech(i) for i in range(12)] + [quiet] * 23:  # no suspension
            await device.session.send_audio(frame)
        await fake.wait_for_async(lambda: bool(fake.received)
                                  and fake.received[0].utterances == 1, within_s=5)
        return device.session.stats.silence_frames

    assert run_with(scenario) == 0  # ended by what was sent, not by the session's fill
    events = [base64.b64decode(b["content"]) for b in fake.received[0].bodies("audioInput")]
    assert any(speech(11) in e and quiet in e for e in events)  # speech and silence together
