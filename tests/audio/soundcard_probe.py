"""Child process for test_soundcard.py: uses real PortAudio devices and reports back.

It runs in its own interpreter because PortAudio enumerates devices when
``sounddevice`` is first imported: the parent starts the virtual sound card and
passes its environment to this process, which imports sounddevice only then.

    python soundcard_probe.py devices
    python soundcard_probe.py capture SECONDS OUT.raw      (prints "ready" once capturing)
    python soundcard_probe.py capture-idle SECONDS OUT.raw (the same, with an idle gate)
    python soundcard_probe.py capture-wake SECONDS OUT.raw (the same, with the wake word)
    python soundcard_probe.py play WAV [RATE_HZ]
    python soundcard_probe.py unplug                       (prints "ready" once capturing)

The last line on stdout is a JSON report.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from edgevoice.audio.playback import PlaybackBuffer, PlaybackEnded, PlaybackEvent
from edgevoice.audio.silence import IdleGate, SilenceDetector, SpeechState
from edgevoice.audio.sounddevice_io import SoundDeviceSink, SoundDeviceSource, list_devices
from edgevoice.audio.wavio import load_wav
from edgevoice.errors import AudioDeviceError


def report(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def thread_names() -> list[str]:
    """The kernel's names of this process's threads now."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # ended meanwhile
            continue
    return sorted(names)


async def capture(seconds: float, out: Path) -> None:
    src = SoundDeviceSource("default", queue_frames=100)
    await src.open()
    # Audio flows only once the first block arrives (which can take a second or two
    # with PulseAudio): anything played before that is never captured.
    frames = [await src.read()]
    print("ready", flush=True)
    frames += [await src.read() for _ in range(int(seconds * 50))]
    threads = thread_names()
    await src.close()
    await asyncio.to_thread(out.write_bytes, b"".join(frames))
    assert src.plan is not None
    report(plan=dataclasses.asdict(src.plan), stats=dataclasses.asdict(src.stats),
           threads=threads)


async def capture_idle(seconds: float, out: Path) -> None:
    """As :func:`capture`, with the idle gate the daemon uses: armed while the silence
    detector is settled in QUIET, so quiet blocks reach the loop in batches."""
    src = SoundDeviceSource("default", queue_frames=100)
    detector = SilenceDetector()
    gate = IdleGate(detector.settings)
    src.set_idle_gate(gate)
    await src.open()
    frames = [await src.read()]
    print("ready", flush=True)
    wakeups_before, onsets = src.wakeups, []
    for _ in range(int(seconds * 50)):
        frame = await src.read()
        frames.append(frame)
        armed, was_quiet = gate.armed, detector.state is SpeechState.QUIET
        detector.process(frame)
        if was_quiet and detector.state is not SpeechState.QUIET:  # an onset began
            onsets.append(armed)
        if detector.settled_quiet:
            gate.arm(detector.noise_floor_dbfs)
        else:
            gate.disarm()
    wakeups = src.wakeups - wakeups_before
    await src.close()
    await asyncio.to_thread(out.write_bytes, b"".join(frames))
    report(stats=dataclasses.asdict(src.stats), wakeups=wakeups,
           blocks=(len(frames) - 1) * 20 // src.block_ms, onsets_while_armed=onsets)


async def capture_wake(seconds: float, out: Path) -> None:
    """As :func:`capture_idle`, with the wake word (real models) listening: the idle
    gate is armed as the daemon arms it (device/daemon.py), with the margin at which
    the wake word's quiet gate opens, while that gate is closed."""
    from edgevoice.triggers.wake import WakeSettings, WakeWordTrigger

    src = SoundDeviceSource("default", queue_frames=100)
    detector = SilenceDetector()
    gate = IdleGate(detector.settings)
    trigger = WakeWordTrigger(WakeSettings())
    src.set_idle_gate(gate)
    await src.open()
    frames = [await src.read()]
    print("ready", flush=True)
    wakeups_before, openings_while_armed, detections, armed_frames = src.wakeups, [], [], 0
    for index in range(int(seconds * 50)):
        frame = await src.read()
        frames.append(frame)
        armed, openings = gate.armed, trigger.gate_openings
        armed_frames += armed
        detector.process(frame)
        if trigger.process(frame, detector.level_dbfs, detector.noise_floor_dbfs):
            detections.append(index)
        if trigger.gate_openings > openings:
            openings_while_armed.append(armed)
        margin = trigger.listen_margin_db()
        if detector.settled_quiet and margin is not None:
            gate.arm(detector.noise_floor_dbfs, margin)
        else:
            gate.disarm()
    wakeups = src.wakeups - wakeups_before
    await src.close()
    trigger.close()
    await asyncio.to_thread(out.write_bytes, b"".join(frames[1:]))
    report(stats=dataclasses.asdict(src.stats), wakeups=wakeups,
           blocks=(len(frames) - 1) * 20 // src.block_ms, detections=detections,
           openings_while_armed=openings_while_armed, armed_frames=armed_frames)


async def play(wav: Path, rate_hz: int | None, block_ms: int = 20) -> None:
    loop = asyncio.get_running_loop()
    ended = asyncio.Event()

    def on_event(event: PlaybackEvent) -> None:  # called on PortAudio's thread
        if isinstance(event, PlaybackEnded):
            loop.call_soon_threadsafe(ended.set)

    sink = SoundDeviceSink("default", rate_hz, block_ms=block_ms)
    buffer = PlaybackBuffer(sink.sample_rate_hz, prefill_ms=60, on_event=on_event)
    blocks: list[int] = []
    buffer.on_pulled = lambda out: blocks.append(len(out))  # PortAudio's thread
    await sink.open(buffer)
    buffer.push(load_wav(wav, sink.sample_rate_hz))
    buffer.end_of_response()
    await asyncio.wait_for(ended.wait(), 30)
    await asyncio.sleep(0.3)  # let the device play out its own buffers
    threads = thread_names()
    await sink.close()
    report(
        threads=threads,
        block_samples=sorted(set(blocks)),
        rate_hz=sink.sample_rate_hz,
        channels=sink.plan.channels,
        underruns=buffer.stats.underruns,
        played_samples=buffer.stats.played_samples,
        callbacks_alive=sink.last_callback_at > 0,
    )


async def park(wav: Path) -> None:
    """Play ``wav``, let the sink park, play it again: both must be heard."""
    loop = asyncio.get_running_loop()
    ended = asyncio.Event()

    def on_event(event: PlaybackEvent) -> None:  # called on PortAudio's thread
        if isinstance(event, PlaybackEnded):
            loop.call_soon_threadsafe(ended.set)

    sink = SoundDeviceSink("default", park_after_ms=200)
    buffer = PlaybackBuffer(sink.sample_rate_hz, prefill_ms=60, on_event=on_event)
    await sink.open(buffer)
    await asyncio.sleep(0.5)  # the recorder is surely running by now
    pcm = load_wav(wav, sink.sample_rate_hz)
    states = []
    for _ in range(2):
        ended.clear()
        buffer.push(pcm)
        buffer.end_of_response()
        await asyncio.wait_for(ended.wait(), 30)
        states.append(sink.parked)  # just played: not parked
        await asyncio.sleep(0.8)  # well past park_after_ms
        states.append(sink.parked)
    callbacks_before = sink.last_callback_at
    await asyncio.sleep(0.3)
    idle_callbacks = sink.last_callback_at != callbacks_before
    await sink.close()
    report(parks=sink.parks, wakes=sink.wakes, states=states, active=sink.active,
           underruns=buffer.stats.underruns, played_samples=buffer.stats.played_samples,
           beep_samples=len(pcm) // 2,
           callbacks_while_parked=idle_callbacks)


async def unplug() -> None:
    src = SoundDeviceSource("default", stall_timeout_s=1.0)
    await src.open()
    await src.read()
    print("ready", flush=True)
    try:
        async with asyncio.timeout(30):
            while True:
                await src.read()
    except AudioDeviceError as exc:
        report(error=type(exc).__name__, message=str(exc))
    finally:
        await src.close()


def main(argv: list[str]) -> None:
    command = argv[0]
    if command == "devices":
        report(devices=[dataclasses.asdict(d) for d in list_devices()])
    elif command == "capture":
        asyncio.run(capture(float(argv[1]), Path(argv[2])))
    elif command == "capture-idle":
        asyncio.run(capture_idle(float(argv[1]), Path(argv[2])))
    elif command == "capture-wake":
        asyncio.run(capture_wake(float(argv[1]), Path(argv[2])))
    elif command == "play":
        # play WAV [RATE_HZ (0: the device's) [BLOCK_MS]]
        rate = int(argv[2]) if len(argv) > 2 else 0
        asyncio.run(play(Path(argv[1]), rate or None, int(argv[3]) if len(argv) > 3 else 20))
    elif command == "park":
        asyncio.run(park(Path(argv[1])))
    elif command == "unplug":
        asyncio.run(unplug())
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv[1:])
