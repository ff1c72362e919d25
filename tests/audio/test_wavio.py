"""WAV sources and sinks, on a fake clock (nothing here waits in real time)."""

from __future__ import annotations

import asyncio
import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from edgevoice.audio.base import AudioSink, AudioSource
from edgevoice.audio.playback import PlaybackBuffer, PlaybackEnded, PlaybackEvent
from edgevoice.audio.wavio import (
    AudioFileError,
    WavSink,
    WavSource,
    load_wav,
    wav_info,
    write_wav,
)
from edgevoice.clock import FakeClock
from edgevoice.errors import AudioDeviceError, is_retryable

from ._signals import dominant_hz, from_pcm, level_dbfs, to_pcm, tone


def make_wav(
    path: Path,
    samples: np.ndarray,  # float in [-1, 1), shape (frames, channels)
    rate_hz: int,
    bits: int = 16,
    encoding: str = "int",
    extensible: bool = False,
    streamed: bool = False,
) -> Path:
    """Write a WAV by hand, in encodings the stdlib cannot produce."""
    _, channels = samples.shape
    flat = samples.reshape(-1)
    if encoding == "float":
        data = flat.astype("<f4" if bits == 32 else "<f8").tobytes()
    elif bits == 8:
        data = np.clip(np.round(flat * 128 + 128), 0, 255).astype(np.uint8).tobytes()
    elif bits == 24:
        v = np.clip(np.round(flat * 2**23), -(2**23), 2**23 - 1).astype(np.int32)
        data = v.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    else:
        scale = 2.0 ** (bits - 1)
        dtype = "<i2" if bits == 16 else "<i4"
        data = np.clip(np.round(flat * scale), -scale, scale - 1).astype(dtype).tobytes()
    tag = 3 if encoding == "float" else 1
    align = channels * bits // 8
    if extensible:
        guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt = (
            struct.pack(
                "<HHIIHHHHI", 0xFFFE, channels, rate_hz, rate_hz * align, align, bits, 22, bits, 0
            )
            + struct.pack("<H", tag)
            + guid_tail
        )
    else:
        fmt = struct.pack("<HHIIHH", tag, channels, rate_hz, rate_hz * align, align, bits)
    data_size = 0xFFFFFFFF if streamed else len(data)
    body = (
        b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"LIST"
        + struct.pack("<I", 3)
        + b"abc\x00"  # an odd-sized chunk to skip
        + b"data"
        + struct.pack("<I", data_size)
        + data
    )
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def sine(freq: float, seconds: float, rate: int, channels: int = 1, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = amp * np.sin(2 * np.pi * freq * t)
    return np.repeat(mono[:, None], channels, axis=1)


# -- reading ---------------------------------------------------------------------------


def test_16_bit_mono_at_16_khz_is_read_bit_exact(tmp_path: Path) -> None:
    pcm = to_pcm(tone(440.0, -10.0, 16_000))
    write_wav(tmp_path / "a.wav", pcm, 16_000)
    assert load_wav(tmp_path / "a.wav") == pcm


def test_16_bit_stereo_with_equal_channels_downmixes_bit_exact(tmp_path: Path) -> None:
    mono = np.round(sine(300.0, 0.5, 16_000)[:, 0] * 32768) / 32768
    make_wav(tmp_path / "s.wav", np.stack([mono, mono], axis=1), 16_000)
    assert load_wav(tmp_path / "s.wav") == to_pcm(mono * 32768)


@pytest.mark.parametrize(
    ("bits", "encoding", "extensible"),
    [
        (8, "int", False),
        (16, "int", True),
        (24, "int", False),
        (32, "int", False),
        (32, "float", False),
        (64, "float", True),
    ],
)
@pytest.mark.parametrize("rate", [8_000, 44_100, 48_000])
def test_other_encodings_and_rates_become_16_khz_mono(
    tmp_path: Path, bits: int, encoding: str, extensible: bool, rate: int
) -> None:
    path = make_wav(
        tmp_path / "x.wav", sine(1000.0, 1.0, rate, channels=2), rate, bits, encoding, extensible
    )
    info = wav_info(path)
    assert (info.rate_hz, info.channels, info.bits, info.encoding) == (rate, 2, bits, encoding)
    out = from_pcm(load_wav(path))
    assert abs(len(out) - 16_000) <= 1
    steady = out[2000:-2000]
    assert abs(dominant_hz(steady, 16_000) - 1000.0) < 3.0
    # A 0.5-amplitude sine: -6 dB peak, -9 dBFS RMS.
    assert abs(level_dbfs(steady) - (20 * np.log10(0.5) - 3.01)) < 0.3


def test_a_streamed_wav_with_unknown_data_size_is_read_to_the_end(tmp_path: Path) -> None:
    path = make_wav(tmp_path / "p.wav", sine(500.0, 0.25, 16_000), 16_000, streamed=True)
    assert len(load_wav(path)) == 4000 * 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a WAV file"),
        (b"ID3\x03 definitely an mp3 file", "not a WAV file"),
        (b"RIFF\x04\x00\x00\x00WAVE", "no 'fmt ' chunk"),
    ],
)
def test_non_wav_files_name_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(AudioFileError, match=message) as info:
        load_wav(path)
    assert str(path) in str(info.value)
    assert not is_retryable(info.value)


def test_unsupported_encoding_says_how_to_convert(tmp_path: Path) -> None:
    path = make_wav(
        tmp_path / "f16.wav", sine(500.0, 0.1, 16_000), 16_000, bits=16, encoding="float"
    )  # 16-bit float does not exist
    with pytest.raises(AudioFileError, match=r"unsupported WAV encoding.*sox"):
        load_wav(path)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(AudioFileError, match=r"nope\.wav: cannot read"):
        load_wav(tmp_path / "nope.wav")


# -- WavSource -------------------------------------------------------------------------


def test_source_yields_the_file_then_tail_silence_then_eof(tmp_path: Path) -> None:
    pcm = to_pcm(tone(440.0, -10.0, 16_000 // 10 + 100))  # 100 ms + a partial frame
    write_wav(tmp_path / "a.wav", pcm, 16_000)

    async def main() -> list[bytes]:
        src: AudioSource = WavSource(tmp_path / "a.wav", realtime=False, tail_silence_ms=100)
        await src.open()
        frames = []
        with pytest.raises(EOFError):
            while True:
                frames.append(await src.read())
        await src.close()
        assert src.stats.frames_captured == len(frames)
        return frames

    frames = asyncio.run(main())
    assert all(len(f) == 640 for f in frames)
    assert len(frames) == 6 + 5
    joined = b"".join(frames)
    assert joined[: len(pcm)] == pcm
    assert not any(joined[len(pcm) :])


def test_realtime_source_paces_frames_from_open_without_drift(tmp_path: Path) -> None:
    write_wav(tmp_path / "a.wav", bytes(640 * 50), 16_000)
    clock = FakeClock(start=1000.0)

    async def main() -> list[float]:
        src = WavSource(tmp_path / "a.wav", realtime=True, clock=clock, tail_silence_ms=0)
        await src.open()
        times = []
        for k in range(50):
            if k == 10:
                clock.advance(0.095)  # the consumer stalls for almost 5 frames
            await src.read()
            times.append(clock.now())
        return times

    times = asyncio.run(main())
    assert times[:10] == pytest.approx([1000.0 + 0.02 * (k + 1) for k in range(10)])
    # After a stall the queued frames come at once, then the original schedule resumes.
    assert times[10] == pytest.approx(1000.295)
    assert times[-1] == pytest.approx(1000.0 + 0.02 * 50)


def test_a_block_sized_source_hands_a_blocks_frames_over_at_its_end_without_waiting(
        tmp_path: Path) -> None:
    """As a sound card delivering 60 ms blocks: three frames at once, every 60 ms."""
    write_wav(tmp_path / "a.wav", bytes(640 * 12), 16_000)
    clock = FakeClock(start=1000.0)

    async def main() -> list[float]:
        src = WavSource(tmp_path / "a.wav", realtime=True, clock=clock, tail_silence_ms=0,
                        block_ms=60)
        await src.open()
        times = []
        for _ in range(12):
            await src.read()
            times.append(round(clock.now() - 1000.0, 6))
        return times

    assert asyncio.run(main()) == pytest.approx([0.06] * 3 + [0.12] * 3 + [0.18] * 3
                                                + [0.24] * 3)
    with pytest.raises(ValueError, match="multiple of 20"):
        WavSource(tmp_path / "a.wav", block_ms=50)


def test_fast_source_does_not_touch_the_clock(tmp_path: Path) -> None:
    write_wav(tmp_path / "a.wav", bytes(640 * 10), 16_000)
    clock = FakeClock()

    async def main() -> None:
        src = WavSource(tmp_path / "a.wav", realtime=False, clock=clock, tail_silence_ms=0)
        await src.open()
        for _ in range(10):
            await src.read()

    asyncio.run(main())
    assert clock.now() == 0.0


def test_looping_source_starts_over_after_the_tail(tmp_path: Path) -> None:
    pcm = to_pcm(tone(440.0, -10.0, 640))  # two frames
    write_wav(tmp_path / "a.wav", pcm, 16_000)

    async def main() -> list[bytes]:
        src = WavSource(tmp_path / "a.wav", realtime=False, tail_silence_ms=20, loop=True)
        await src.open()
        return [await src.read() for _ in range(7)]

    frames = asyncio.run(main())
    assert frames[3:6] == frames[0:3]
    assert frames[0] + frames[1] == pcm and frames[2] == bytes(640)


def test_reading_an_unopened_source_is_an_error(tmp_path: Path) -> None:
    src = WavSource(tmp_path / "a.wav")
    with pytest.raises(AudioDeviceError, match="not open"):
        asyncio.run(src.read())


def test_opening_a_bad_file_raises_naming_it(tmp_path: Path) -> None:
    (tmp_path / "t.wav").write_text("hello")
    with pytest.raises(AudioFileError, match=r"t\.wav"):
        asyncio.run(WavSource(tmp_path / "t.wav").open())


# -- WavSink ---------------------------------------------------------------------------

RATE = 24_000


class Ended:
    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.events: list[PlaybackEvent] = []

    def __call__(self, e: PlaybackEvent) -> None:
        self.events.append(e)
        if isinstance(e, PlaybackEnded):
            self.event.set()


def read_back(path: Path) -> tuple[int, bytes]:
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        return w.getframerate(), w.readframes(w.getnframes())


def test_fast_sink_writes_just_the_replies(tmp_path: Path) -> None:
    reply1 = to_pcm(tone(500.0, -10.0, RATE // 3, rate_hz=RATE))
    reply2 = to_pcm(tone(700.0, -10.0, RATE // 5, rate_hz=RATE))

    async def main() -> None:
        ended = Ended()
        buf = PlaybackBuffer(RATE, prefill_ms=60, on_event=ended)
        sink: AudioSink = WavSink(tmp_path / "out.wav", RATE, realtime=False)
        await sink.open(buf)
        for pcm in (reply1, reply2):
            ended.event.clear()
            for i in range(0, len(pcm), 1000):  # network-sized pieces
                buf.push(pcm[i : i + 1000])
                await asyncio.sleep(0)
            buf.end_of_response()
            await asyncio.wait_for(ended.event.wait(), 10)
        await sink.close()
        await sink.close()  # idempotent
        assert buf.stats.underruns == 0

    asyncio.run(main())
    rate, pcm = read_back(tmp_path / "out.wav")
    assert rate == RATE
    assert pcm == reply1 + reply2


def test_realtime_sink_writes_what_the_speaker_plays_from_the_first_start(
    tmp_path: Path,
) -> None:
    reply = to_pcm(tone(500.0, -10.0, RATE // 10, rate_hz=RATE))  # 100 ms
    clock = FakeClock()

    async def main() -> None:
        ended = Ended()
        buf = PlaybackBuffer(RATE, prefill_ms=60, on_event=ended, clock=clock.now)
        sink = WavSink(tmp_path / "out.wav", RATE, realtime=True, clock=clock)
        await sink.open(buf)
        for _ in range(20):  # 20 blocks of silence before the reply: not written
            await asyncio.sleep(0)
        assert sink.samples_written == 0
        buf.push(reply)
        buf.end_of_response()
        await asyncio.wait_for(ended.event.wait(), 10)
        clock.advance(0.1)  # 100 ms of silence after the reply, before the sink closes
        await sink.close()

    asyncio.run(main())
    rate, pcm = read_back(tmp_path / "out.wav")
    assert rate == RATE
    assert pcm.startswith(reply)
    assert len(pcm) % (2 * RATE // 50) == 0  # whole 20 ms blocks
    assert len(pcm) >= len(reply) + 2 * RATE // 10
    assert not any(pcm[len(reply) :])


def test_realtime_sink_sleeps_while_nothing_plays_and_keeps_real_time(tmp_path: Path) -> None:
    """No block is pulled while nothing is to be played (no wake-up every 20 ms); the
    silence that passed is written when the next reply arrives, on the 20 ms grid."""
    first = to_pcm(tone(500.0, -10.0, RATE // 25, rate_hz=RATE))  # 40 ms
    second = to_pcm(tone(700.0, -10.0, RATE // 25, rate_hz=RATE))
    clock = FakeClock()
    block = RATE // 50

    async def main() -> list[int]:
        ended = Ended()
        buf = PlaybackBuffer(RATE, prefill_ms=0, on_event=ended, clock=clock.now)
        pulls: list[int] = []
        real_pull = buf.pull

        def counted_pull(n: int) -> bytes:
            pulls.append(n)
            return real_pull(n)

        buf.pull = counted_pull  # type: ignore[method-assign]
        sink = WavSink(tmp_path / "out.wav", RATE, realtime=True, clock=clock)
        await sink.open(buf)
        buf.push(first)
        buf.end_of_response()
        await asyncio.wait_for(ended.event.wait(), 10)
        ended.event.clear()
        for _ in range(10):
            await asyncio.sleep(0)
        idle_pulls = len(pulls)
        for _ in range(50):  # one second passes with nothing to play
            clock.advance(0.02)
            await asyncio.sleep(0)
        assert len(pulls) == idle_pulls  # not one pull, not one wake-up
        buf.push(second)  # the next reply, mid-block
        buf.end_of_response()
        await asyncio.wait_for(ended.event.wait(), 10)
        await sink.close()
        return pulls

    asyncio.run(main())
    _, pcm = read_back(tmp_path / "out.wav")
    samples = np.frombuffer(pcm, dtype="<i2")
    assert pcm.startswith(first)
    at = pcm.index(second[:200]) // 2
    assert at % block == 0  # on the 20 ms grid
    # the second reply starts where a sound card would have played it: after the
    # silence that really passed (>= 1 s), not right after the first
    assert at >= len(first) // 2 + RATE
    assert not samples[len(first) // 2 : at].any()
    assert pcm[at * 2 : at * 2 + len(second)] == second


def test_sink_refuses_a_buffer_at_another_rate(tmp_path: Path) -> None:
    sink = WavSink(tmp_path / "o.wav", rate_hz=48_000)
    with pytest.raises(ValueError, match="48000 Hz"):
        asyncio.run(sink.open(PlaybackBuffer(24_000)))
