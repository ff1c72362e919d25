"""`edgevoice demo`: a relay (echo upstream) and a device on 127.0.0.1, one turn.

No hardware and no cloud: a WAV file is the microphone, another WAV file is the
speaker. Prints when each step of the turn happened. Exit 0 when the reply played
to its end, non-zero with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
import wave
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from edgevoice.audio.wavio import WavSink, WavSource
from edgevoice.config.model import DeviceConfig
from edgevoice.config.relay import RelayConfig
from edgevoice.device.daemon import DeviceDaemon, TurnTimeline
from edgevoice.relay.app import build_server
from edgevoice.relay.auth import AuthSettings
from edgevoice.relay.settings import LimitsSettings, ListenSettings

DEMO_DEVICE = "demo"


def bundled_speech() -> Path:
    """The speech WAV shipped with the package."""
    return Path(str(resources.files("edgevoice") / "data" / "hello.wav"))


@dataclass
class DemoResult:
    ok: bool
    reason: str
    timeline: TurnTimeline | None
    relay_url: str
    input: str
    output: str
    reply_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "reason": self.reason, "relay": self.relay_url,
            "input": self.input, "output": self.output,
            "reply_seconds": round(self.reply_seconds, 3),
            "turn": self.timeline.as_dict() if self.timeline else None,
        }


def _wav_seconds(path: Path) -> float:
    try:
        with wave.open(str(path), "rb") as w:
            return w.getnframes() / float(w.getframerate())
    except (OSError, wave.Error, EOFError):
        return 0.0


async def run_demo(input_wav: Path, output_wav: Path, *, fast: bool = False,
                   timeout_s: float = 60.0,
                   device_config: DeviceConfig | None = None) -> DemoResult:
    with tempfile.TemporaryDirectory(prefix="edgevoice-demo-") as tmp:
        # --fast sends the input as fast as it can be read: lift the relay's
        # real-time limits on uplink audio, which would rightly refuse that
        limits = LimitsSettings(max_audio_ms_per_s=3_600_000, max_messages_per_s=100_000) \
            if fast else LimitsSettings()
        relay_config = RelayConfig(listen=ListenSettings(host="127.0.0.1", port=0),
                                   auth=AuthSettings(tokens_file=str(Path(tmp) / "tokens.json")),
                                   limits=limits)
        server = build_server(relay_config)
        token = server.tokens.add(DEMO_DEVICE)
        await server.start()
        url = f"ws://127.0.0.1:{server.port}/"
        base = device_config or DeviceConfig()
        config = replace(base, device_id=DEMO_DEVICE, relay=replace(base.relay, url=url))
        done: asyncio.Future[TurnTimeline] = asyncio.get_running_loop().create_future()

        def turn_done(turn: TurnTimeline) -> None:
            if not done.done():
                done.set_result(turn)

        source = WavSource(input_wav, realtime=not fast)
        sink = WavSink(output_wav, rate_hz=24_000, realtime=not fast)
        daemon = DeviceDaemon(config, token, source, sink, on_turn_done=turn_done,
                              capture_after_link=True)
        task = asyncio.create_task(daemon.run())
        timeline: TurnTimeline | None = None
        try:
            timeline = await asyncio.wait_for(asyncio.shield(done), timeout_s)
        except TimeoutError:
            pass
        finally:
            daemon.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
            await server.close()
    if timeline is None:
        reason = "no turn completed in time: was there speech in the input?"
        ok = False
    elif timeline.outcome != "completed":
        reason, ok = f"the turn ended as {timeline.outcome}", False
    else:
        reason, ok = "reply played to the end", True
    return DemoResult(ok, reason, timeline, url, str(input_wav), str(output_wav),
                      _wav_seconds(output_wav))


def print_timeline(result: DemoResult, out: TextIO) -> None:
    print(f"edgevoice demo: relay {result.relay_url} (echo upstream), device {DEMO_DEVICE!r}",
          file=out)
    print(f"  microphone: {result.input}", file=out)
    print(f"  speaker:    {result.output}", file=out)
    turn = result.timeline
    if turn is not None:
        labels = {
            "speech_start": "speech start detected", "first_uplink": "first uplink frame sent",
            "speech_end": "speech end detected", "turn_end": "turn end sent",
            "first_downlink": "first downlink audio received",
            "playback_start": "playback started", "playback_end": "playback ended",
        }
        print(f"\n  turn {turn.turn_id} (trigger: {turn.trigger})", file=out)
        print(f"  {'ms':>8}  event", file=out)
        rows = [(v, labels[k]) for k, v in turn.milestones_ms().items() if v is not None]
        for ms, label in sorted(rows):
            print(f"  {ms:8.1f}  {label}", file=out)
        print(f"\n  uplink frames: {turn.uplink_frames}, downlink frames: "
              f"{turn.downlink_frames}", file=out)
        m = turn.milestones_ms()
        if m["turn_end"] is not None and m["first_downlink"] is not None:
            print(f"  turn end -> first reply audio: {m['first_downlink'] - m['turn_end']:.1f} ms",
                  file=out)
    print(f"  reply written: {result.reply_seconds:.2f} s of audio in {result.output}", file=out)
    print(f"  result: {'OK' if result.ok else 'FAILED'}: {result.reason}", file=out)


def main_demo(input_wav: str | None, output_wav: str, as_json: bool, fast: bool,
              timeout_s: float) -> int:
    source = Path(input_wav) if input_wav else bundled_speech()
    if not source.is_file():
        print(f"edgevoice demo: {source}: no such file", file=sys.stderr)
        return 2
    result = asyncio.run(run_demo(source, Path(output_wav), fast=fast, timeout_s=timeout_s))
    if as_json:
        print(json.dumps(result.as_dict(), indent=None))
    else:
        print_timeline(result, sys.stdout)
    return 0 if result.ok else 1
