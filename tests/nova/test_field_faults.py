"""What the world does to a Nova conversation, through the real AWS SDK and the fake Bedrock.

Every fault is injected before, during and after a reply; each must end in an
answer (the question replayed once into a fresh stream) or in an ``error`` at the
device within its deadline, never in silence. Open failures must be named with
the codes of docs/nova-sonic.md's troubleshooting table, quickly, and without
"Task exception was never retrieved" in the log.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip(
    "aws_sdk_bedrock_runtime",
    reason="the Nova Sonic upstream needs Python >= 3.12 and the 'nova' extra",
)

from edgevoice_dev.testing.fake_bedrock import FakeBedrock, Reply, StreamPlan

from edgevoice.nova.settings import DeviceConversation
from edgevoice.nova.upstream import NovaSettings, NovaUpstream
from edgevoice.tools.builtin import current_time_tool
from edgevoice.tools.registry import ToolRegistry
from edgevoice.upstream.base import (
    DeviceContext,
    ResponseEnded,
    ResponseStarted,
    UpstreamEvent,
    UpstreamFailed,
)

from .test_upstream import Device, audio_of, contains_in_order, settings

#: Slack for a busy shared test machine on top of each deadline.
SLACK_S = 2.0

FAULTS: dict[str, dict[str, Any]] = {
    "stream_error": {"after": "exception", "exception_type": "ModelStreamErrorException"},
    "throttled": {"after": "exception", "exception_type": "ThrottlingException"},
    "reset": {"after": "drop"},
    "ended": {"after": "end"},
}
WHEN = {"before": -1, "during": 2, "after": 5}


@pytest.fixture
def run(fake: FakeBedrock, caplog: pytest.LogCaptureFixture) -> Callable[..., Any]:
    """Run ``scenario(device)`` against a fresh upstream; no unretrieved task may be logged."""

    def runner(scenario: Callable[[Device], Any], nova: NovaSettings | None = None) -> Any:
        async def main() -> Any:
            upstream = NovaUpstream(nova or settings(), ToolRegistry([current_time_tool()]))
            session = await upstream.open_session(DeviceContext("kitchen", "s1"))
            device = Device(session)
            try:
                return await scenario(device)
            finally:
                await device.close()
                await upstream.aclose()
                gc.collect()  # tasks nobody awaited report now, while the loop runs
                await asyncio.sleep(0.05)

        caplog.set_level(logging.DEBUG, logger="asyncio")
        result = asyncio.run(main())
        assert "never retrieved" not in caplog.text
        return result

    return runner


def failures(device: Device) -> list[UpstreamFailed]:
    return device.of(UpstreamFailed)


@pytest.mark.parametrize("when", list(WHEN))
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_around_a_reply_still_gets_the_question_answered(
    fake: FakeBedrock, run: Any, fault: str, when: str
) -> None:
    bad = Reply(audio_chunks=5, after_chunks=WHEN[when], **FAULTS[fault])
    fake.script.push(StreamPlan(replies=[bad]))
    nova = settings(reply_margin_s=1.0, endpointing_sensitivity="HIGH")
    bound_s = nova.open_timeout_s + nova.first_output_timeout_s + SLACK_S

    async def scenario(device: Device) -> list[UpstreamEvent]:
        said = await device.say()
        asked = time.monotonic()
        await device.wait_for(lambda: bool(device.of(ResponseEnded)), within_s=bound_s)
        assert time.monotonic() - asked < bound_s
        if when != "after":
            assert contains_in_order(audio_of(fake.received[1]), said)  # replayed
        await device.say(first_tag=100)  # and the conversation goes on
        await device.wait_for(lambda: len(device.of(ResponseEnded)) == 2, within_s=bound_s)
        return device.events

    events = run(scenario, nova)
    assert [e.reason for e in events if isinstance(e, ResponseEnded)] == ["end_turn", "end_turn"]
    assert [e for e in events if isinstance(e, UpstreamFailed)] == []
    assert len(fake.received) == 2


def test_a_fault_that_repeats_after_the_replay_ends_the_reply_with_an_error(
    fake: FakeBedrock, run: Any
) -> None:
    fake.script.push(
        StreamPlan(replies=[Reply(audio_chunks=5, after="drop", after_chunks=2)]),
        StreamPlan(
            replies=[
                Reply(
                    after="exception", after_chunks=-1, exception_type="ModelStreamErrorException"
                )
            ]
        ),
    )
    nova = settings(reply_margin_s=1.0, endpointing_sensitivity="HIGH")
    bound_s = nova.open_timeout_s + nova.first_output_timeout_s + SLACK_S

    async def scenario(device: Device) -> float:
        await device.say()
        asked = time.monotonic()
        await device.wait_for(lambda: bool(failures(device)), within_s=bound_s)
        return time.monotonic() - asked

    took = run(scenario, nova)
    assert took < bound_s


def test_a_stream_that_never_answers_is_replaced_and_the_next_turn_answered(
    fake: FakeBedrock, run: Any
) -> None:
    fake.script.push(StreamPlan(default_reply=None))  # HTTP 200, takes input, says nothing
    nova = settings(reply_margin_s=1.0, endpointing_sensitivity="HIGH")
    bound_s = nova.first_output_timeout_s + nova.open_timeout_s + SLACK_S

    async def scenario(device: Device) -> None:
        await device.say()
        asked = time.monotonic()
        await device.wait_for(lambda: bool(device.of(ResponseEnded)), within_s=bound_s)
        assert time.monotonic() - asked < bound_s
        await device.say(first_tag=50)
        await device.wait_for(lambda: len(device.of(ResponseEnded)) == 2)
        assert device.session.stats.stalls == 1

    run(scenario, nova)
    assert len(fake.received) == 2 and fake.received[0].utterances == 0


def test_two_streams_that_never_answer_end_in_nova_stalled(fake: FakeBedrock, run: Any) -> None:
    fake.script.push(StreamPlan(default_reply=None), StreamPlan(default_reply=None))
    nova = settings(reply_margin_s=1.0, endpointing_sensitivity="HIGH")
    bound_s = nova.first_output_timeout_s + nova.open_timeout_s + nova.first_output_timeout_s

    async def scenario(device: Device) -> tuple[UpstreamFailed, float]:
        await device.say()
        asked = time.monotonic()
        await device.wait_for(lambda: bool(failures(device)), within_s=bound_s + SLACK_S)
        return failures(device)[0], time.monotonic() - asked

    failed, took = run(scenario, nova)
    assert (failed.code, failed.retryable) == ("nova_stalled", True)
    assert took < bound_s + SLACK_S


def test_an_unacknowledged_tool_result_replaces_the_stream(fake: FakeBedrock, run: Any) -> None:
    fake.script.push(StreamPlan(replies=[Reply(tool_name="current_time", ignore_tool_result=True)]))
    nova = settings(tool_ack_timeout_s=1.0, reply_margin_s=1.0)

    async def scenario(device: Device) -> None:
        await device.say()
        await device.wait_for(lambda: bool(device.of(ResponseEnded)), within_s=10)
        assert device.session.stats.stalls == 1

    run(scenario, nova)
    assert "toolResult" in fake.received[0].names()
    assert len(fake.received) == 2 and fake.received[1].utterances == 1


# --- opening -----------------------------------------------------------------------------


def open_failure(run: Any, nova: NovaSettings | None = None) -> tuple[UpstreamFailed, float]:
    async def scenario(device: Device) -> tuple[UpstreamFailed, float]:
        started = time.monotonic()
        await device.say(5)
        await device.wait_for(lambda: bool(failures(device)), within_s=20)
        return failures(device)[0], time.monotonic() - started

    result: tuple[UpstreamFailed, float] = run(scenario, nova)
    return result


def test_no_credentials_is_named_at_once(
    fake: FakeBedrock, run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    failed, took = open_failure(run)
    assert (failed.code, failed.retryable) == ("nova_no_credentials", False)
    assert "AWS_ACCESS_KEY_ID" in failed.message
    assert took < 1.0 + SLACK_S
    assert fake.received == []  # nothing unsigned ever left the relay


def test_access_denied_is_named(fake: FakeBedrock, run: Any) -> None:
    fake.script.push(StreamPlan(http_status=403, error_message="not authorized"))
    failed, took = open_failure(run)
    assert (failed.code, failed.retryable) == ("nova_access_denied", False)
    assert took < 1.0 + SLACK_S


def test_quota_throttling_is_named_within_open_timeout_of_the_first_failure(
    fake: FakeBedrock, run: Any
) -> None:
    fake.script.push(*[StreamPlan(http_status=429) for _ in range(20)])
    nova = settings(open_timeout_s=2.0, max_attempts=20)
    failed, took = open_failure(run, nova)
    assert (failed.code, failed.retryable) == ("nova_throttled", True)
    assert took < nova.open_timeout_s + SLACK_S
    assert len(fake.received) >= 2  # it kept trying meanwhile


def test_no_http_answer_is_named_within_twice_open_timeout(fake: FakeBedrock, run: Any) -> None:
    fake.script.push(*[StreamPlan(open_delay_s=60) for _ in range(5)])
    nova = settings(open_timeout_s=1.5)
    failed, took = open_failure(run, nova)
    assert (failed.code, failed.retryable) == ("nova_timeout", True)
    assert took < 2 * nova.open_timeout_s + SLACK_S


# --- per device -------------------------------------------------------------------------


def test_each_device_gets_its_own_prompt_voice_and_tools(fake: FakeBedrock) -> None:
    nova = settings(
        devices={
            "kitchen": DeviceConversation(
                system_prompt="You help in the kitchen.", voice_id="tiffany", tools=()
            ),
            "office": DeviceConversation(system_prompt="You help in the office."),
        }
    )

    async def main() -> None:
        upstream = NovaUpstream(nova, ToolRegistry([current_time_tool()]))
        devices = []
        for name in ("kitchen", "office", "garage"):
            session = await upstream.open_session(DeviceContext(name, name))
            devices.append(Device(session))
        for i, device in enumerate(devices):
            await device.say(8, first_tag=i * 40)
            await device.wait_for(lambda d=device: bool(d.of(ResponseEnded)))
        for device in devices:
            await device.close()
        await upstream.aclose()

    asyncio.run(main())
    seen = {}
    for stream in fake.received:
        (start,) = stream.bodies("promptStart")
        voice = start["audioOutputConfiguration"]["voiceId"]
        tools = [t["toolSpec"]["name"] for t in start.get("toolConfiguration", {}).get("tools", [])]
        system = next(text for role, text in stream.text_inputs() if role == "SYSTEM")
        seen[system] = (voice, tools)
    assert seen == {
        "You help in the kitchen.": ("tiffany", []),
        "You help in the office.": ("matthew", ["current_time"]),
        "You are a test.": ("matthew", ["current_time"]),
    }


def test_upstream_audio_is_what_nova_received(fake: FakeBedrock, run: Any) -> None:
    async def scenario(device: Device) -> float:
        await device.say(50)
        await device.wait_for(lambda: bool(device.of(ResponseStarted)))
        await device.wait_for(lambda: bool(device.of(ResponseEnded)))
        await asyncio.sleep(1.0)  # nobody speaks: nothing more is sent
        return device.session.stats.upstream_audio_s

    counted = run(scenario)
    received = sum(len(stream.audio()) for stream in fake.received) / 32_000
    assert abs(counted - received) < 0.021
    assert counted < 1.0 + 2.5  # one second of speech, then only the silence Nova waits for
