"""Device daemon → relay (upstream: nova) → the real AWS SDK → a local fake Bedrock.

Everything between the device's WAV microphone and its WAV speaker is the real
thing: Opus, WebSockets, the relay, the Nova Sonic SDK over HTTP/2 and TLS, and the
event-stream framing; only Bedrock itself is a fake (edgevoice_dev.testing.fake_bedrock).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("aws_sdk_bedrock_runtime",
                    reason="the Nova Sonic upstream needs Python >= 3.12 and the 'nova' extra")

import contextlib

from edgevoice_dev.testing.fake_bedrock import FakeBedrock, Reply, StreamPlan
from edgevoice_dev.testing.harness import device_config, run, running_relay

from edgevoice.audio.wavio import WavSink, WavSource, load_wav, write_wav
from edgevoice.config.relay import RelayConfig, UpstreamSettings
from edgevoice.device.daemon import DeviceDaemon, TurnTimeline
from edgevoice.device.observer import DeviceObserver
from edgevoice.nova.settings import NovaSettings
from edgevoice.protocol.messages import Message

pytestmark = pytest.mark.nova


def relay_config(**nova: object) -> RelayConfig:
    settings = NovaSettings(open_timeout_s=5.0, drain_timeout_s=0.5, stall_timeout_s=5.0,
                            system_prompt="You are a test.", **nova)  # type: ignore[arg-type]
    return RelayConfig(upstream=UpstreamSettings(kind="nova", nova=settings))


def speech_then_more(tmp_path: Path, gap_s: float, second: bool = True) -> Path:
    """hello.wav, a silence of ``gap_s``, then hello.wav again (a barge-in)."""
    from edgevoice.demo import bundled_speech
    pcm = np.frombuffer(load_wav(bundled_speech()), dtype=np.int16)
    parts = [pcm, np.zeros(int(16000 * gap_s), dtype=np.int16)]
    if second:
        parts.append(pcm)
    path = tmp_path / "mic.wav"
    write_wav(path, np.concatenate(parts).tobytes(), 16000)
    return path


async def one_conversation(tmp_path: Path, mic: Path, config: RelayConfig,
                           turns: int = 1, wait_s: float = 40) -> tuple[
                               list[TurnTimeline], DeviceDaemon, Path]:
    async with running_relay(tmp_path, config) as server:
        token = server.tokens.add("kitchen")
        out = tmp_path / "speaker.wav"
        done: list[TurnTimeline] = []
        finished = asyncio.Event()

        def turn_done(turn: TurnTimeline) -> None:
            done.append(turn)
            if len(done) >= turns:
                finished.set()

        cfg = device_config(f"ws://127.0.0.1:{server.port}/", "kitchen")
        cfg = replace(cfg, feedback=replace(cfg.feedback, earcons_enabled=False))
        daemon = DeviceDaemon(cfg, token, WavSource(mic, realtime=True, tail_silence_ms=8000),
                              WavSink(out, realtime=False), on_turn_done=turn_done,
                              capture_after_link=True)
        task = asyncio.create_task(daemon.run())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(finished.wait(), wait_s)
        daemon.stop()
        await task
        return done, daemon, out


def test_turn_with_transcripts_and_audio_reply(tmp_path: Path, fake: FakeBedrock) -> None:
    fake.script.push(StreamPlan(default_reply=Reply(
        user_text="what is the weather", assistant_text="It is sunny.", audio_chunks=10)))
    turns, _daemon, out = run(one_conversation(
        tmp_path, speech_then_more(tmp_path, 1.0, second=False), relay_config()), 60)
    assert turns and turns[0].outcome == "completed", turns
    assert ("user", "what is the weather") in turns[0].transcripts
    assert ("assistant", "It is sunny.") in turns[0].transcripts
    assert turns[0].downlink_frames >= 10 * 5  # 10 chunks of 100 ms = 50 frames of 20 ms
    assert out.stat().st_size > 44 + 24000 * 2 * 0.9  # ~1 s of reply audio
    stream = fake.received[0]
    assert stream.audio(), "Nova received the user's audio"
    names = stream.names()
    assert names[:2] == ["sessionStart", "promptStart"]


def test_barge_in_mid_reply_stops_the_device_output(tmp_path: Path, fake: FakeBedrock) -> None:
    # a 6 s reply paced in real time; the user speaks again 2 s into it
    fake.script.push(StreamPlan(default_reply=Reply(
        audio_chunks=60, chunk_interval_s=0.1, barge_in_signal="both")))
    turns, daemon, _out = run(one_conversation(
        tmp_path, speech_then_more(tmp_path, 2.0), relay_config(), turns=1), 60)
    assert turns, "no turn finished"
    first = turns[0]
    assert first.outcome == "interrupted", first.as_dict()
    assert daemon.counters.interrupts >= 1
    # the reply was cut: far less than its 6 s (300 frames) reached the speaker
    assert first.downlink_frames < 250


def test_tool_call_round_trip(tmp_path: Path, fake: FakeBedrock) -> None:
    fake.script.push(StreamPlan(replies=[Reply(
        tool_name="current_time", tool_args={}, assistant_text="It is noon.",
        audio_chunks=5)]))
    turns, _daemon, _out = run(one_conversation(
        tmp_path, speech_then_more(tmp_path, 1.0, second=False), relay_config()), 60)
    stream = fake.received[0]
    results = stream.bodies("toolResult")
    assert results, f"no toolResult in {stream.names()}"
    content = json.loads(results[0]["content"])
    assert "time" in json.dumps(content).lower()
    assert turns and ("assistant", "It is noon.") in turns[0].transcripts


def test_access_denied_reaches_the_device_as_an_error(tmp_path: Path, fake: FakeBedrock) -> None:
    fake.script.push(*[StreamPlan(http_status=403, error_type="AccessDeniedException",
                                  error_message="not allowed")] * 3)
    _turns, daemon, _out = run(one_conversation(
        tmp_path, speech_then_more(tmp_path, 1.0, second=False), relay_config(), wait_s=12),
        60)
    assert daemon.counters.errors.get("nova_access_denied", 0) >= 1, daemon.counters.errors


def test_relay_cli_with_nova_upstream_holds_a_conversation(
        tmp_path: Path, fake: FakeBedrock) -> None:
    """`edgevoice relay --config` (a real process) with upstream: nova, and a real daemon."""
    fake.script.push(StreamPlan(default_reply=Reply(assistant_text="Hi from Nova.",
                                                    audio_chunks=8)))
    tokens = tmp_path / "tokens.json"
    cfg = tmp_path / "relay.yaml"
    cfg.write_text(f"listen: {{port: 0}}\nauth: {{tokens_file: {tokens}}}\n"
                   "admin: {port: 0}\nupstream:\n  kind: nova\n  nova: {open_timeout_s: 5}\n")
    env = {**os.environ, **fake.env}
    token = subprocess.run([sys.executable, "-m", "edgevoice", "token", "add", "kitchen",
                            "--config", str(cfg)], capture_output=True, text=True, env=env,
                           check=True).stdout.strip()
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg.write_text(cfg.read_text().replace("listen: {port: 0}", f"listen: {{port: {port}}}"))
    relay = subprocess.Popen([sys.executable, "-m", "edgevoice", "relay", "--config", str(cfg)],
                             env=env, stderr=subprocess.PIPE, text=True)
    try:
        async def converse() -> list[TurnTimeline]:
            done: list[TurnTimeline] = []
            finished = asyncio.Event()
            for _ in range(100):
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", port)
                    w.close()
                    break
                except OSError:
                    await asyncio.sleep(0.1)
            config = device_config(f"ws://127.0.0.1:{port}/", "kitchen")
            daemon = DeviceDaemon(config, token,
                                  WavSource(speech_then_more(tmp_path, 1.0, False),
                                            tail_silence_ms=6000),
                                  WavSink(tmp_path / "out.wav", realtime=False),
                                  on_turn_done=lambda t: (done.append(t), finished.set()),
                                  capture_after_link=True)
            task = asyncio.create_task(daemon.run())
            await asyncio.wait_for(finished.wait(), 40)
            daemon.stop()
            await task
            return done
        turns = run(converse(), 60)
        assert turns and turns[0].outcome == "completed"
        assert ("assistant", "Hi from Nova.") in turns[0].transcripts
    finally:
        relay.terminate()
        _, err = relay.communicate(timeout=15)
    assert relay.returncode == 0, err[-2000:]


def two_utterances(tmp_path: Path, gap_s: float) -> Path:
    """Speech, a pause long enough for the reply, speech again."""
    return speech_then_more(tmp_path, gap_s)


def test_model_timeout_mid_conversation_resumes_transparently(
        tmp_path: Path, fake: FakeBedrock) -> None:
    # the first stream answers, then Bedrock reports a model timeout; the second turn
    # must be answered on a fresh stream without the device noticing
    fake.script.push(StreamPlan(replies=[Reply(assistant_text="First.", audio_chunks=4,
                                               after="model_timeout", after_chunks=4)]),
                     StreamPlan(default_reply=Reply(assistant_text="Second.", audio_chunks=4)))
    turns, daemon, _ = run(one_conversation(
        tmp_path, two_utterances(tmp_path, 4.0), relay_config(), turns=2, wait_s=45), 60)
    assert len(turns) == 2 and turns[1].outcome == "completed", [t.as_dict() for t in turns]
    assert ("assistant", "Second.") in turns[1].transcripts
    assert not daemon.counters.errors, daemon.counters.errors
    assert len(fake.received) >= 2
    # the resumed stream carries the conversation so far
    assert ("USER", "hello fake nova") in fake.received[1].text_inputs()


def test_rotation_carries_history_to_the_next_stream(tmp_path: Path, fake: FakeBedrock) -> None:
    fake.script.push(StreamPlan(default_reply=Reply(assistant_text="Rotated fine.",
                                                    audio_chunks=4)))
    turns, daemon, _ = run(one_conversation(
        tmp_path, two_utterances(tmp_path, 4.0),
        relay_config(rotate_after_s=2.0, rotate_hard_s=20.0), turns=2, wait_s=45), 60)
    assert [t.outcome for t in turns] == ["completed", "completed"]
    assert len(fake.received) >= 2, "the session was rotated onto a second stream"
    history = fake.received[1].text_inputs()
    assert history, "the new stream received the conversation history"
    assert not daemon.counters.errors


def test_malformed_events_from_the_service_do_not_break_the_turn(
        tmp_path: Path, fake: FakeBedrock) -> None:
    fake.script.push(StreamPlan(default_reply=Reply(assistant_text="Still here.",
                                                    audio_chunks=4, malformed_first=True)))
    turns, _daemon, _ = run(one_conversation(
        tmp_path, speech_then_more(tmp_path, 1.0, second=False), relay_config()), 60)
    assert turns and turns[0].outcome == "completed"
    assert ("assistant", "Still here.") in turns[0].transcripts


class _Earcons(DeviceObserver):
    def __init__(self, played: list[str]) -> None:
        self.played = played

    def earcon_played(self, kind: str, at: float) -> None:
        self.played.append(kind)


class RecordingDaemon(DeviceDaemon):
    """The shipped daemon, noting every control message the relay sends it and every
    earcon it sounds (through its public observer)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.received: list[object] = []
        self.played_earcons: list[str] = []
        self.relay_view: dict[str, Any] = {}
        super().__init__(*args, observers=[_Earcons(self.played_earcons)], **kwargs)

    def on_message(self, message: Message) -> None:
        self.received.append(message)
        super().on_message(message)


async def recorded_conversation(tmp_path: Path, mic: Path, config: RelayConfig,
                                wait_s: float) -> RecordingDaemon:
    async with running_relay(tmp_path, config) as server:
        token = server.tokens.add("kitchen")
        cfg = device_config(f"ws://127.0.0.1:{server.port}/", "kitchen")
        daemon = RecordingDaemon(cfg, token, WavSource(mic, realtime=True, tail_silence_ms=8000),
                                 WavSink(tmp_path / "out.wav", realtime=False),
                                 capture_after_link=True)
        task = asyncio.create_task(daemon.run())
        await asyncio.sleep(wait_s)
        daemon.stop()
        await task
        # what the relay's /devices and /metrics show for it
        daemon.relay_view = {r.device_id: r for r in server.fleet.records()}
        return daemon


def test_every_reply_message_carries_the_turn_it_answers(tmp_path: Path,
                                                         fake: FakeBedrock) -> None:
    from edgevoice.protocol.messages import ResponseEnd, ResponseStart, Transcript, TurnStart
    fake.script.push(StreamPlan(default_reply=Reply(audio_chunks=5)))
    daemon = run(recorded_conversation(
        tmp_path, speech_then_more(tmp_path, 1.0, second=False), relay_config(), 10), 60)
    replies = [m for m in daemon.received
               if isinstance(m, ResponseStart | ResponseEnd | Transcript)]
    assert replies, daemon.received
    turn_ids = {t.turn_id for t in daemon.received if isinstance(t, TurnStart)} or {
        m.turn_id for m in replies}
    assert all(m.turn_id is not None for m in replies), replies
    assert {m.turn_id for m in replies} <= turn_ids | {m.turn_id for m in replies}
    assert len({m.turn_id for m in replies}) == 1
    # the relay counted the audio it sent upstream for this device
    assert daemon.relay_view["kitchen"].upstream_audio_s > 0.5
    assert daemon.relay_view["kitchen"].nova_input_tokens > 0


def test_a_reply_cut_twice_reaches_the_device_as_an_error_after_its_audio(
        tmp_path: Path, fake: FakeBedrock, caplog: pytest.LogCaptureFixture) -> None:
    from edgevoice.protocol.messages import Error, ResponseEnd
    fake.script.push(
        StreamPlan(replies=[Reply(audio_chunks=8, after="drop", after_chunks=3)]),
        StreamPlan(replies=[Reply(after="exception", after_chunks=-1,
                                  exception_type="ModelStreamErrorException")]))
    caplog.set_level("WARNING")
    daemon = run(recorded_conversation(
        tmp_path, speech_then_more(tmp_path, 1.0, second=False),
        relay_config(reply_margin_s=1.0), 14), 60)
    kinds = [type(m).__name__ for m in daemon.received if isinstance(m, ResponseEnd | Error)]
    assert kinds == ["ResponseEnd", "Error"], daemon.received
    end = next(m for m in daemon.received if isinstance(m, ResponseEnd))
    assert end.reason == "error" and end.turn_id is not None
    assert daemon.counters.errors.get("nova_stream_lost") == 1, daemon.counters.errors
    # the device's side: a log line saying what happened, and the error earcon after
    # the cut reply's audio (played from the same buffer, so it never talks over it)
    assert "relay error nova_stream_lost" in caplog.text
    assert daemon.played_earcons.count("error") == 1, daemon.played_earcons
