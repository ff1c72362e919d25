"""A real device daemon and a real relay on 127.0.0.1: one turn through the echo upstream."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import websockets
from edgevoice_dev.testing.harness import run, running_relay
from edgevoice_dev.testing.signals import aligned_envelope_correlation, read_wav_mono
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from edgevoice.audio.wavio import WavSink, WavSource
from edgevoice.config.model import DeviceConfig
from edgevoice.demo import run_demo
from edgevoice.device.daemon import DeviceDaemon, TurnTimeline
from edgevoice.protocol.messages import SUBPROTOCOL, CloseCode, Hello, encode_message


def test_reply_wav_contains_the_spoken_input(tmp_path: Path, speech_wav: Path) -> None:
    out = tmp_path / "reply.wav"
    result = run(run_demo(speech_wav, out, fast=True, timeout_s=45))
    assert result.ok, result.reason  # type: ignore[attr-defined]
    turn = result.timeline  # type: ignore[attr-defined]
    m = turn.milestones_ms()
    assert m["first_uplink"] is not None and m["turn_end"] is not None
    assert m["first_downlink"] is not None and m["playback_end"] is not None
    assert m["first_downlink"] >= m["turn_end"]  # echo answers after the turn
    ref, ref_rate = read_wav_mono(speech_wav)
    got, got_rate = read_wav_mono(out)
    assert len(got) / got_rate > 0.5 * len(ref) / ref_rate
    assert aligned_envelope_correlation(ref, ref_rate, got, got_rate) >= 0.8


def test_garbage_device_is_dropped_while_another_completes_its_turn(
        tmp_path: Path, speech_wav: Path) -> None:
    async def scenario() -> tuple[TurnTimeline | None, int | None, bool]:
        async with running_relay(tmp_path) as server:
            good_token = server.tokens.add("good")
            bad_token = server.tokens.add("bad")
            url = f"ws://127.0.0.1:{server.port}/"
            done: asyncio.Future[TurnTimeline] = asyncio.get_running_loop().create_future()
            config = replace(DeviceConfig(), device_id="good",
                             relay=replace(DeviceConfig().relay, url=url))
            daemon = DeviceDaemon(config, good_token, WavSource(speech_wav, realtime=True),
                                  WavSink(tmp_path / "good.wav", realtime=False),
                                  on_turn_done=lambda t: done.done() or done.set_result(t),
                                  capture_after_link=True)
            task = asyncio.create_task(daemon.run())
            await asyncio.sleep(0.5)
            # the bad device: valid token and hello, then garbage
            async with connect(url, subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                               additional_headers={"Authorization": f"Bearer {bad_token}"},
                               proxy=None) as ws:
                await ws.send(encode_message(Hello(device="bad")))
                await ws.recv()
                await ws.send("{not json")
                with pytest.raises(websockets.ConnectionClosed):
                    for _ in range(10):
                        await ws.recv()
                bad_code = ws.close_code
            still_connected = daemon.link.connected
            turn = await asyncio.wait_for(done, 30)
            daemon.stop()
            await task
            return turn, bad_code, still_connected

    turn, bad_code, still_connected = run(scenario())  # type: ignore[misc]
    assert bad_code == CloseCode.PROTOCOL_ERROR
    assert still_connected
    assert turn is not None and turn.outcome == "completed"


@pytest.mark.parametrize("token", [None, "good.wrongsecretwrongsecretwrongsecretwrong", "nonsense"])
def test_wrong_or_missing_token_gets_401(tmp_path: Path, token: str | None) -> None:
    async def scenario() -> int:
        async with running_relay(tmp_path) as server:
            server.tokens.add("good")
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            try:
                async with connect(f"ws://127.0.0.1:{server.port}/", proxy=None,
                                   subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                                   additional_headers=headers):
                    return 101
            except InvalidStatus as exc:
                assert not server.sessions  # refused before any session exists
                return exc.response.status_code
    assert run(scenario()) == 401


def test_audio_before_hello_closes_with_protocol_error(tmp_path: Path) -> None:
    async def scenario() -> int | None:
        async with running_relay(tmp_path) as server:
            token = server.tokens.add("d1")
            async with connect(f"ws://127.0.0.1:{server.port}/", proxy=None,
                               subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                               additional_headers={"Authorization": f"Bearer {token}"}) as ws:
                await ws.send(bytes([1, 1, 0, 0]) + bytes(8) + b"opus")
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()
                return ws.close_code
    assert run(scenario()) == CloseCode.PROTOCOL_ERROR


def test_demo_cli_json_on_a_wav_it_has_never_seen(tmp_path: Path) -> None:
    from edgevoice_dev.testing.speech import synthesize
    stereo44k = tmp_path / "unseen.wav"
    mono = synthesize("Please turn on the kitchen lights and play some jazz.", voice="rms",
                      path=tmp_path / "mono.wav")
    subprocess.run(["sox", str(mono), "-r", "44100", "-c", "2", str(stereo44k)], check=True)
    out = tmp_path / "out.wav"
    proc = subprocess.run([sys.executable, "-m", "edgevoice", "demo", "--input", str(stereo44k),
                           "--output", str(out), "--json", "--fast"],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] and result["turn"]["outcome"] == "completed"
    assert out.exists()
    ref, rate = read_wav_mono(stereo44k)
    got, got_rate = read_wav_mono(out)
    assert aligned_envelope_correlation(ref, rate, got, got_rate) >= 0.8
