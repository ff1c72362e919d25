"""Sound-device plumbing without PortAudio: a scripted stream and a fake device list.

(The same classes against real PortAudio devices: test_soundcard.py.)
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from edgevoice.audio.playback import PlaybackBuffer
from edgevoice.audio.silence import IdleGate, SilenceSettings
from edgevoice.audio.sounddevice_io import (
    PREFERRED_SPEAKER_RATE_HZ,
    OutputBlockWriter,
    SoundDeviceSink,
    SoundDeviceSource,
    StreamPlan,
    lead_in_blocks,
    open_sink,
    open_source,
    plan_stream,
)
from edgevoice.audio.wavio import WavSink, WavSource
from edgevoice.errors import AudioDeviceError

from ._signals import dominant_hz, from_pcm, level_dbfs, tone


class ScriptedStream:
    def __init__(self) -> None:
        self.active = False
        self.closed = False

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def close(self) -> None:
        self.closed = True


class ScriptedSource(SoundDeviceSource):
    """A SoundDeviceSource whose 'device' is fed by the test instead of PortAudio."""

    def __init__(self, rate_hz: int, channels: int, block_ms: int = 20, **kwargs: Any) -> None:
        super().__init__("scripted", block_ms=block_ms, **kwargs)
        self.device_plan = StreamPlan("scripted mic", rate_hz, channels)
        self.stream = ScriptedStream()
        self.on_block: Any = None
        self.on_finished: Any = None

    def _start_stream(self, on_block: Any, on_finished: Any) -> tuple[StreamPlan, Any]:
        self.on_block, self.on_finished = on_block, on_finished
        self.stream.start()
        return self.device_plan, self.stream

    def deliver(self, samples: np.ndarray, overflow: bool = False) -> None:
        """What PortAudio's thread does: one callback per ``block_ms`` block."""
        status = SimpleNamespace(input_overflow=overflow)
        block = self.device_plan.rate_hz * self.block_ms // 1000
        for i in range(0, len(samples) - block + 1, block):
            self.on_block(samples[i : i + block], block, None, status)


def device_samples(rate: int, channels: int, seconds: float) -> np.ndarray:
    mono = np.round(tone(1000.0, -12.0, int(rate * seconds), rate_hz=rate)).astype(np.int16)
    return np.repeat(mono[:, None], channels, axis=1)


@pytest.mark.parametrize(("rate", "channels"), [(16_000, 1), (48_000, 2), (44_100, 1)])
def test_device_blocks_become_16_khz_20_ms_frames(rate: int, channels: int) -> None:
    async def main() -> list[bytes]:
        src = ScriptedSource(rate, channels, queue_frames=200)
        await src.open()
        # From PortAudio's own thread, as in real life.
        feeder = threading.Thread(target=src.deliver, args=(device_samples(rate, channels, 1.0),))
        feeder.start()
        frames = [await src.read() for _ in range(45)]
        feeder.join()
        await src.close()
        assert src.stream.closed and src.stats.opens == 1
        assert src.stats.frames_captured == 45 and src.stats.last_frame_at > 0
        return frames

    frames = asyncio.run(main())
    assert {len(f) for f in frames} == {640}
    pcm = from_pcm(b"".join(frames))[1600:]
    assert abs(dominant_hz(pcm, 16_000) - 1000.0) < 3
    assert abs(level_dbfs(pcm) - (-12.0)) < 0.3


def test_16_khz_mono_capture_is_passed_through_bit_exact() -> None:
    samples = device_samples(16_000, 1, 0.2)

    async def main() -> bytes:
        src = ScriptedSource(16_000, 1, queue_frames=50)
        await src.open()
        src.deliver(samples)  # from the loop's thread: same effect, queued in order
        return b"".join([await src.read() for _ in range(10)])

    assert asyncio.run(main()) == samples[:3200, 0].tobytes()


def test_a_slow_reader_loses_the_oldest_blocks_and_counts_them() -> None:
    async def main() -> ScriptedSource:
        src = ScriptedSource(16_000, 1, queue_frames=5)
        await src.open()
        marked = np.zeros((320 * 8, 1), dtype=np.int16)
        for k in range(8):
            marked[320 * k : 320 * (k + 1)] = k
        src.deliver(marked)
        await asyncio.sleep(0)  # let the handed-over blocks land in the queue
        first = await src.read()
        assert np.frombuffer(first, dtype=np.int16)[0] == 3  # blocks 0-2 were dropped
        return src

    src = asyncio.run(main())
    assert src.stats.frames_dropped == 3


def test_60_ms_blocks_are_cut_into_frames_without_waking_the_loop_per_frame() -> None:
    samples = device_samples(16_000, 1, 0.36)  # six 60 ms blocks

    async def main() -> tuple[bytes, int]:
        src = ScriptedSource(16_000, 1, block_ms=60, queue_frames=50)
        await src.open()
        src.deliver(samples)
        await asyncio.sleep(0)  # the six handed-over blocks land in the queue
        loop = asyncio.get_running_loop()
        turns = 0

        def count() -> None:  # a callback that runs once per event-loop iteration
            nonlocal turns
            turns += 1
            handle[0] = loop.call_soon(count)

        handle = [loop.call_soon(count)]
        frames = [await src.read() for _ in range(18)]
        handle[0].cancel()
        return b"".join(frames), turns

    pcm, turns = asyncio.run(main())
    assert pcm == samples[:, 0].tobytes()  # bit-exact, in order
    assert turns <= 6  # at most one loop iteration per block, none per frame


def test_dropped_blocks_are_counted_as_the_frames_they_held() -> None:
    async def main() -> ScriptedSource:
        src = ScriptedSource(16_000, 1, block_ms=60, queue_frames=6)  # room for 2 blocks
        await src.open()
        src.deliver(device_samples(16_000, 1, 0.24))  # four blocks
        await asyncio.sleep(0)
        await src.read()
        return src

    src = asyncio.run(main())
    assert src.stats.frames_dropped == 6  # two blocks of three frames


def test_block_length_must_be_whole_frames() -> None:
    with pytest.raises(ValueError, match="multiple of 20"):
        SoundDeviceSource("default", block_ms=50)


def test_overflow_flags_are_counted() -> None:
    async def main() -> ScriptedSource:
        src = ScriptedSource(16_000, 1)
        await src.open()
        src.deliver(device_samples(16_000, 1, 0.06), overflow=True)
        await src.read()
        return src

    assert asyncio.run(main()).stats.overflows == 3


def test_a_device_that_stops_delivering_raises_audio_device_error() -> None:
    async def main() -> None:
        src = ScriptedSource(16_000, 1, stall_timeout_s=0.05, start_timeout_s=30)
        await src.open()
        src.deliver(device_samples(16_000, 1, 0.04))
        await src.read()
        await src.read()
        src.stream.active = False  # unplugged: PortAudio just stops calling back
        await src.read()

    with pytest.raises(AudioDeviceError, match=r"no audio for 0\.05 s.*stopped"):
        asyncio.run(main())


def test_a_device_that_never_starts_raises_after_the_start_timeout() -> None:
    async def main() -> None:
        src = ScriptedSource(16_000, 1, stall_timeout_s=0.01, start_timeout_s=0.1)
        await src.open()
        await src.read()

    with pytest.raises(AudioDeviceError, match=r"no audio for 0\.1 s \(stream active\)"):
        asyncio.run(main())


def test_a_finished_stream_raises_audio_device_error_at_once() -> None:
    async def main() -> None:
        src = ScriptedSource(16_000, 1, stall_timeout_s=60)
        await src.open()
        src.on_finished()
        await src.read()

    with pytest.raises(AudioDeviceError, match="stopped"):
        asyncio.run(main())


def test_reading_a_closed_source_raises() -> None:
    async def main() -> None:
        src = ScriptedSource(16_000, 1)
        await src.open()
        await src.close()
        await src.close()  # idempotent
        await src.read()

    with pytest.raises(AudioDeviceError, match="not open"):
        asyncio.run(main())


# -- choosing a device -------------------------------------------------------------------


class FakePortAudio:
    """The few sounddevice functions plan_stream uses, over a made-up device list."""

    class PortAudioError(Exception):
        pass

    def __init__(self, devices: list[dict[str, Any]], rates: dict[str, set[int]]) -> None:
        self.devices = devices
        self.rates = rates  # device name -> rates it accepts
        self.default = SimpleNamespace(device=[-1, -1])

    def query_devices(self) -> list[dict[str, Any]]:
        return self.devices

    def query_hostapis(self) -> list[dict[str, Any]]:
        return [{"name": "ALSA", "default_input_device": 1, "default_output_device": 2}]

    def _check(self, device: int, channels: int, dtype: str, samplerate: int) -> None:
        d = self.devices[device]
        if samplerate not in self.rates[d["name"]] or channels < d.get("min_channels", 1):
            raise self.PortAudioError("Invalid sample rate")

    check_input_settings = _check
    check_output_settings = _check


def dev(name: str, ins: int, outs: int, rate: int = 48_000, **more: Any) -> dict[str, Any]:
    return {
        "name": name,
        "max_input_channels": ins,
        "max_output_channels": outs,
        "default_samplerate": float(rate),
        "hostapi": 0,
        **more,
    }


PA = FakePortAudio(
    [
        dev("HDMI 0", 0, 8),
        dev("USB PnP Sound Device: Audio (hw:1,0)", 1, 0, 44_100),
        dev("seeed-2mic-voicecard: bcm2835 (hw:2,0)", 2, 2, 48_000, min_channels=2),
        dev("pulse", 32, 32, 44_100),
    ],
    {
        "HDMI 0": {48_000},
        "USB PnP Sound Device: Audio (hw:1,0)": {44_100, 48_000},
        "seeed-2mic-voicecard: bcm2835 (hw:2,0)": {16_000, 48_000},
        "pulse": {8_000, 16_000, 24_000, 44_100, 48_000},
    },
)


def test_a_device_is_found_by_part_of_its_name_ignoring_case() -> None:
    plan = plan_stream(PA, "usb pnp", "input", 16_000)
    assert plan.name.startswith("USB PnP") and plan.index == 1


def test_16_khz_is_preferred_else_the_devices_default_rate() -> None:
    assert plan_stream(PA, "pulse", "input", 16_000).rate_hz == 16_000
    assert plan_stream(PA, "USB", "input", 16_000).rate_hz == 44_100


def test_a_speaker_runs_at_48_khz_where_it_can_whatever_its_default_else_at_its_default(
) -> None:
    assert plan_stream(PA, "pulse", "output", PREFERRED_SPEAKER_RATE_HZ).rate_hz == 48_000
    only_44k = FakePortAudio([dev("old dac", 0, 2, 44_100)], {"old dac": {44_100}})
    assert plan_stream(only_44k, "old dac", "output", PREFERRED_SPEAKER_RATE_HZ).rate_hz == 44_100


def test_a_device_that_needs_two_channels_gets_two() -> None:
    plan = plan_stream(PA, "seeed", "input", 16_000)
    assert (plan.rate_hz, plan.channels) == (16_000, 2)


def test_default_is_portaudios_default_device_for_that_direction() -> None:
    assert plan_stream(PA, "default", "input", None).index == 1
    assert plan_stream(PA, "default", "output", None).rate_hz == 48_000  # HDMI 0's rate


def test_an_unknown_name_lists_the_devices_there_are() -> None:
    with pytest.raises(AudioDeviceError, match=r"no input sound device matches 'jabra'.*USB PnP"):
        plan_stream(PA, "jabra", "input", 16_000)


def test_an_output_only_device_is_not_a_microphone() -> None:
    with pytest.raises(AudioDeviceError, match="HDMI"):
        plan_stream(PA, "HDMI", "input", 16_000)


# -- config strings --------------------------------------------------------------------------


def test_specs_pick_wav_files_or_devices(tmp_path: Path) -> None:
    src = open_source(f"wav:{tmp_path}/in.wav")
    assert isinstance(src, WavSource) and src.realtime and src.path == tmp_path / "in.wav"
    fast = open_source(f"wav+fast:{tmp_path}/in.wav")
    assert isinstance(fast, WavSource) and not fast.realtime
    dev_src = open_source("USB PnP", queue_frames=7)
    assert isinstance(dev_src, SoundDeviceSource) and dev_src.device == "USB PnP"
    assert dev_src.queue_frames == 7
    sink = open_sink(f"wav:{tmp_path}/out.wav")
    assert isinstance(sink, WavSink) and sink.realtime and sink.sample_rate_hz == 24_000
    fast_sink = open_sink(f"wav+fast:{tmp_path}/out.wav", rate_hz=48_000)
    assert isinstance(fast_sink, WavSink) and not fast_sink.realtime
    assert fast_sink.sample_rate_hz == 48_000


class _QuietStream:
    """A stream that plays nothing (the test pulls the buffer as its callback would)."""

    active = True

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


class _StandInSink(SoundDeviceSink):
    """A sink with a stand-in stream: opens and closes are counted, nothing is played."""

    def __init__(self, park_after_ms: int) -> None:
        self.callbacks: list[Any] = []
        super().__init__("default", 16_000, park_after_ms=park_after_ms)

    def _plan(self, rate_hz: int | None) -> StreamPlan:
        return StreamPlan("stand-in", rate_hz or 16_000, 1, 0)

    def _start_stream(self, on_block: Any, *, resolve: bool = True) -> Any:
        self.callbacks.append(on_block)
        return _QuietStream()


def test_a_prepared_speaker_stays_open_until_the_reply_plays_then_parks() -> None:
    """A turn can outlast park_after_ms: the stream a turn opened must still be open when
    the reply comes (a reopened stream's lead-in would delay it); afterwards it parks."""
    from edgevoice.audio.playback import PlaybackBuffer

    async def main() -> list[bool]:
        sink = _StandInSink(park_after_ms=100)
        buffer = PlaybackBuffer(16_000, prefill_ms=0)
        await sink.open(buffer)
        seen = []
        await asyncio.sleep(0.3)
        seen.append(sink.parked)  # nothing to play: parked
        sink.prepare()  # a turn began
        await asyncio.sleep(0.4)  # the user talks on, far past park_after_ms
        seen.append(sink.parked)  # held open for the reply
        buffer.push(bytes(3200))  # the reply (100 ms) ...
        buffer.end_of_response()
        while buffer.busy:  # ... played by the stream's thread
            buffer.pull(320)
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.4)
        seen.append(sink.parked)  # played: parks again
        buffer.push(bytes(640))  # a sound reopens it
        seen.append(sink.parked)
        await sink.close()
        return [*seen, sink.parks == 2, sink.wakes == 2]

    assert asyncio.run(main()) == [True, False, True, False, True, True]


def test_a_reopened_speakers_lead_in_is_at_least_as_long_whatever_the_block() -> None:
    assert lead_in_blocks(160, 20) == 8
    assert lead_in_blocks(160, 40) == 4
    assert lead_in_blocks(160, 60) == 3  # 180 ms: never shorter than asked
    assert lead_in_blocks(0, 40) == 0
    with pytest.raises(ValueError, match="multiple of 20"):
        SoundDeviceSink("default", 16_000, block_ms=30)


# -- the output callback: raw buffers, silence without a pull ------------------------------


def _speech(n_samples: int, seed: int = 3) -> bytes:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n_samples) * 3000).astype(np.int16).tobytes()


def test_an_idle_speaker_block_is_silence_written_over_whatever_the_buffer_held() -> None:
    buffer = PlaybackBuffer(16_000, prefill_ms=0)
    writer = OutputBlockWriter(buffer, channels=1)
    out = bytearray(b"\xff" * 640)  # PortAudio's buffer is not cleared for us
    assert writer.fill(out, 320) is False
    assert out == bytes(640)
    assert buffer.stats.played_samples == 0 and buffer.last_block_dbfs == -100.0


def test_a_reply_pushed_right_after_silent_blocks_plays_from_its_first_sample() -> None:
    """The idle shortcut must never swallow the start of a reply: the block after the
    push carries it (prefill 0), and the playback events fire as with a plain pull."""
    events: list[object] = []
    buffer = PlaybackBuffer(16_000, prefill_ms=0, on_event=events.append)
    writer = OutputBlockWriter(buffer, channels=1)
    out = bytearray(640)
    for _ in range(3):
        assert writer.fill(out, 320) is False
    reply = _speech(480)
    buffer.push(reply)
    buffer.end_of_response()
    assert writer.fill(out, 320) is True
    assert bytes(out) == reply[:640]
    assert buffer.last_block_dbfs > -40.0  # measured: the echo guard sees it playing
    assert writer.fill(out, 320) is True
    assert bytes(out) == reply[640:] + bytes(320)
    assert [type(e).__name__ for e in events] == ["PlaybackStarted", "PlaybackEnded"]
    assert writer.fill(out, 320) is False  # drained: idle again
    assert buffer.last_block_dbfs == -100.0


def test_a_cue_after_silence_is_mixed_into_the_next_block() -> None:
    buffer = PlaybackBuffer(16_000)
    writer = OutputBlockWriter(buffer, channels=1)
    out = bytearray(640)
    writer.fill(out, 320)
    cue = _speech(160, seed=5)
    buffer.play_cue(cue)
    assert writer.fill(out, 320) is True
    assert bytes(out) == cue + bytes(320)


def test_a_stereo_device_gets_the_reply_on_both_channels_and_silence_on_both() -> None:
    buffer = PlaybackBuffer(16_000, prefill_ms=0)
    writer = OutputBlockWriter(buffer, channels=2)
    reply = _speech(320)
    buffer.push(reply)
    out = bytearray(b"\x01" * 1280)
    assert writer.fill(out, 320) is True
    both = np.frombuffer(bytes(out), dtype=np.int16).reshape(-1, 2)
    assert both[:, 0].tobytes() == reply and both[:, 1].tobytes() == reply
    out[:] = b"\x01" * 1280
    buffer.flush()
    assert writer.fill(out, 320) is False
    assert out == bytes(1280)


def test_a_reopened_stream_plays_its_lead_in_before_the_waiting_audio() -> None:
    buffer = PlaybackBuffer(16_000, prefill_ms=0)
    writer = OutputBlockWriter(buffer, channels=1, lead_in_blocks=2)
    reply = _speech(320)
    buffer.push(reply)
    out = bytearray(b"\x01" * 640)
    assert [writer.fill(out, 320), bytes(out) == bytes(640)] == [True, True]
    assert [writer.fill(out, 320), bytes(out) == bytes(640)] == [True, True]
    assert writer.fill(out, 320) is True
    assert bytes(out) == reply


def test_with_an_echo_reference_every_block_is_pulled_so_the_reference_keeps_time() -> None:
    """on_pulled (the echo canceller's reference) needs every block, silence included:
    the idle shortcut does not apply to it."""
    buffer = PlaybackBuffer(16_000, prefill_ms=0)
    pulled: list[int] = []
    buffer.on_pulled = lambda block: pulled.append(len(block))
    writer = OutputBlockWriter(buffer, channels=1)
    out = bytearray(b"\x01" * 640)
    assert writer.fill(out, 320) is False
    assert out == bytes(640) and pulled == [320]


# -- idle batching: fewer event-loop wake-ups while the device waits for speech -----------


def room_blocks(n_blocks: int, level_dbfs: float = -60.0, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(960 * n_blocks) * 32768 * 10 ** (level_dbfs / 20)
    return np.clip(np.round(noise), -32768, 32767).astype(np.int16)[:, None]


def armed_gate(floor_dbfs: float = -60.0) -> IdleGate:
    gate = IdleGate(SilenceSettings())
    gate.arm(floor_dbfs)
    return gate


def test_quiet_blocks_wake_the_loop_once_per_batch_while_the_gate_is_armed() -> None:
    samples = room_blocks(10)

    async def main() -> tuple[bytes, list[int]]:
        src = ScriptedSource(16_000, 1, block_ms=60, idle_batch_ms=300)
        src.set_idle_gate(armed_gate())
        await src.open()
        async def read_all() -> list[bytes]:
            return [await src.read() for _ in range(30)]

        reader = asyncio.ensure_future(read_all())
        await asyncio.sleep(0)  # the reader waits for the first block
        wakeups = []
        for k in range(10):  # block by block, the loop running in between
            src.deliver(samples[960 * k : 960 * (k + 1)])
            await asyncio.sleep(0.001)
            wakeups.append(src.wakeups)
        return b"".join(await reader), wakeups

    pcm, wakeups = asyncio.run(main())
    assert pcm == samples[:, 0].tobytes()  # every frame, bit-exact, in order
    assert wakeups == [0, 0, 0, 0, 1, 1, 1, 1, 1, 2]  # per five blocks, not per block


def test_a_disarmed_gate_wakes_the_loop_for_every_block() -> None:
    async def main() -> int:
        src = ScriptedSource(16_000, 1, block_ms=60)
        gate = armed_gate()
        gate.disarm()  # the detector left QUIET: every block matters now
        src.set_idle_gate(gate)
        await src.open()
        for k in range(4):
            src.deliver(room_blocks(1, seed=k))
            for _ in range(3):  # the block's frames, before the next block comes
                await src.read()
        return src.wakeups

    assert asyncio.run(main()) == 4


def test_speech_starting_mid_batch_wakes_the_loop_at_once_and_nothing_is_cut() -> None:
    quiet = room_blocks(2)
    onset = room_blocks(1, seed=9)
    onset[320:, 0] = np.round(tone(300.0, -20.0, 640)).astype(np.int16)  # from frame 2
    samples = np.concatenate([quiet, onset])

    async def main() -> tuple[list[int], bytes]:
        src = ScriptedSource(16_000, 1, block_ms=60, idle_batch_ms=300)
        src.set_idle_gate(armed_gate())
        await src.open()
        wakeups: list[int] = []
        for k in range(3):  # block by block, as PortAudio's thread delivers them
            src.deliver(samples[960 * k : 960 * (k + 1)])
            wakeups.append(src.wakeups)
        frames = [await src.read() for _ in range(9)]
        return wakeups, b"".join(frames)

    wakeups, pcm = asyncio.run(main())
    assert wakeups == [0, 0, 1]  # the quiet blocks wait; the onset's block does not
    assert pcm == samples[:, 0].tobytes()  # the held quiet frames come first, all of them


def test_a_stalled_loop_keeps_the_newest_blocks_and_counts_the_ones_it_dropped() -> None:
    """The loop does not run while PortAudio keeps calling back (a stall): the hold is
    bounded, the oldest go, and the newest (where speech starts) are kept."""
    async def main() -> tuple[ScriptedSource, list[bytes]]:
        src = ScriptedSource(16_000, 1, block_ms=60, queue_frames=15)  # 5 blocks
        src.set_idle_gate(armed_gate())
        await src.open()
        marked = room_blocks(8)
        marked[960 * 7 :, 0] = np.round(tone(300.0, -20.0, 960)).astype(np.int16)
        feeder = threading.Thread(target=src.deliver, args=(marked,))
        feeder.start()
        feeder.join()  # all eight delivered before the loop ran once
        frames = [await src.read() for _ in range(15)]
        assert b"".join(frames) == marked[960 * 3 :, 0].tobytes()
        return src, frames

    src, _ = asyncio.run(main())
    assert src.stats.frames_dropped == 9  # three blocks of three frames


def test_the_gate_does_not_count_as_a_stall_within_two_batches() -> None:
    async def main() -> bytes:
        src = ScriptedSource(16_000, 1, block_ms=60, idle_batch_ms=300,
                             stall_timeout_s=0.05, start_timeout_s=0.05)
        src.set_idle_gate(armed_gate())
        await src.open()
        src.deliver(room_blocks(1))  # held: not a batch yet
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, src.deliver, room_blocks(4, seed=2))  # the batch completes
        return await src.read()

    assert len(asyncio.run(main())) == 640
