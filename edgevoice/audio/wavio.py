"""WAV files standing in for the microphone and the speaker.

:class:`WavSource` is an :class:`~edgevoice.audio.base.AudioSource` that plays a file
as if it were spoken into the mic: converted to 16 kHz mono, cut into 20 ms frames,
paced at real time (or as fast as the consumer reads), then followed by a stretch of
silence so a silence detector can see the utterance end. :class:`WavSink` is an
:class:`~edgevoice.audio.base.AudioSink` that records what the device would play.

The reader is a small RIFF parser rather than the stdlib ``wave`` module, because
``wave`` reads neither float samples nor (before Python 3.12) WAVE_FORMAT_EXTENSIBLE
headers, which many tools write. Files are small fixtures, so they are read whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import soxr

from edgevoice.audio.base import (
    CAPTURE_FRAME_BYTES,
    CAPTURE_RATE_HZ,
    FRAME_MS,
    PLAYBACK_INPUT_RATE_HZ,
    SAMPLE_WIDTH_BYTES,
    SourceStats,
    frame_samples,
)
from edgevoice.audio.playback import PlaybackBuffer
from edgevoice.clock import Clock, MonotonicClock
from edgevoice.errors import AudioDeviceError, EdgevoiceError

logger = logging.getLogger(__name__)

_FORMAT_PCM = 0x0001
_FORMAT_FLOAT = 0x0003
_FORMAT_EXTENSIBLE = 0xFFFE
_STREAMED_SIZE = 0xFFFFFFFF  # data size written by tools that could not seek back


class AudioFileError(EdgevoiceError, ValueError):
    """An audio file is missing, unreadable or in a format we cannot read.

    Not an :class:`~edgevoice.errors.AudioDeviceError`: reopening the same file
    cannot fix it, so it must not be retried.
    """


@dataclass(frozen=True)
class WavInfo:
    """What a WAV header says."""

    rate_hz: int
    channels: int
    encoding: Literal["int", "float"]
    bits: int
    frames: int

    @property
    def duration_ms(self) -> float:
        return 1000.0 * self.frames / self.rate_hz


def _parse(path: Path) -> tuple[WavInfo, bytes]:
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise AudioFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if len(blob) < 12 or blob[:4] != b"RIFF" or blob[8:12] != b"WAVE":
        raise AudioFileError(f"{path}: not a WAV file (no RIFF/WAVE header)")
    fmt: tuple[int, int, int, int, int] | None = None  # tag, channels, rate, align, bits
    data: bytes | None = None
    pos = 12
    while pos + 8 <= len(blob):
        chunk_id = blob[pos : pos + 4]
        (size,) = struct.unpack_from("<I", blob, pos + 4)
        body = pos + 8
        if chunk_id == b"fmt ":
            if size < 16:
                raise AudioFileError(f"{path}: WAV 'fmt ' chunk too short ({size} bytes)")
            tag, channels, rate, _byte_rate, align, bits = struct.unpack_from("<HHIIHH", blob, body)
            if tag == _FORMAT_EXTENSIBLE and size >= 40:
                # The real format is the first two bytes of the sub-format GUID.
                (tag,) = struct.unpack_from("<H", blob, body + 24)
            fmt = (tag, channels, rate, align, bits)
        elif chunk_id == b"data":
            end = len(blob) if size == _STREAMED_SIZE else min(len(blob), body + size)
            data = blob[body:end]
            break  # anything after the samples (LIST, id3) is of no interest
        pos = body + size + (size & 1)
    if fmt is None:
        raise AudioFileError(f"{path}: WAV file has no 'fmt ' chunk before its data")
    if data is None:
        raise AudioFileError(f"{path}: WAV file has no 'data' chunk")
    tag, channels, rate, align, bits = fmt
    supported = (tag == _FORMAT_PCM and bits in (8, 16, 24, 32)) or (
        tag == _FORMAT_FLOAT and bits in (32, 64)
    )
    if not supported or channels < 1 or rate < 1 or align != channels * bits // 8:
        raise AudioFileError(
            f"{path}: unsupported WAV encoding (format tag {tag:#06x}, {bits} bits, "
            f"{channels} channels); convert it, e.g. `sox {path} -b 16 -e signed out.wav`"
        )
    data = data[: len(data) - len(data) % align]  # a truncated last frame is dropped
    info = WavInfo(
        rate_hz=rate,
        channels=channels,
        encoding="float" if tag == _FORMAT_FLOAT else "int",
        bits=bits,
        frames=len(data) // align,
    )
    return info, data


def wav_info(path: str | Path) -> WavInfo:
    """Read a WAV header (and check that the file is one we can play)."""
    return _parse(Path(path))[0]


def _to_float(info: WavInfo, data: bytes) -> npt.NDArray[np.float64]:
    """Samples as float64 in [-1, 1), shape (frames, channels)."""
    raw: npt.NDArray[np.float64]
    if info.encoding == "float":
        raw = np.frombuffer(data, dtype="<f4" if info.bits == 32 else "<f8").astype(np.float64)
    elif info.bits == 8:  # 8-bit WAV is unsigned, centred on 128
        raw = (np.frombuffer(data, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    elif info.bits == 16:
        raw = np.frombuffer(data, dtype="<i2").astype(np.float64) / 32768.0
    elif info.bits == 24:
        b = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        value = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        value = np.where(value >= 1 << 23, value - (1 << 24), value)
        raw = value.astype(np.float64) / float(1 << 23)
    else:
        raw = np.frombuffer(data, dtype="<i4").astype(np.float64) / float(1 << 31)
    return raw.reshape(-1, info.channels)


def load_wav(path: str | Path, rate_hz: int = CAPTURE_RATE_HZ) -> bytes:
    """A WAV file as mono s16le PCM at ``rate_hz``.

    Channels are averaged, the rate is converted with soxr (HQ). A 16-bit mono file
    already at ``rate_hz`` comes back bit-exact.
    """
    path = Path(path)
    info, data = _parse(path)
    if (info.encoding, info.bits, info.channels, info.rate_hz) == ("int", 16, 1, rate_hz):
        return data
    samples = _to_float(info, data).mean(axis=1)
    if info.rate_hz != rate_hz and len(samples):
        samples = soxr.resample(samples, info.rate_hz, rate_hz, quality="HQ")
    pcm = np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2")
    return pcm.tobytes()


def write_wav(path: str | Path, pcm: bytes, rate_hz: int) -> None:
    """Write mono s16le PCM as a 16-bit WAV file."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(SAMPLE_WIDTH_BYTES)
        w.setframerate(rate_hz)
        w.writeframes(pcm)


class WavSource:
    """An AudioSource that reads a WAV file as if it were the microphone.

    After the file: ``tail_silence_ms`` of silence, then ``EOFError`` (or, with
    ``loop``, the file again). With ``realtime``, frame *k* is returned no earlier
    than ``(k + 1) * 20 ms`` after ``open()`` (as a device delivers a frame once it
    has been captured); due times are computed from the start, so lateness does not
    accumulate. Otherwise frames come as fast as they are read.

    ``block_ms`` (a multiple of 20) stands in for a sound card's capture block: in real
    time the frames of a block are all returned at its end, back to back, as a
    :class:`~edgevoice.audio.sounddevice_io.SoundDeviceSource` cuts them from the block
    its callback delivered (one wake-up per block, not per frame).
    """

    def __init__(
        self,
        path: str | Path,
        realtime: bool = True,
        clock: Clock | None = None,
        tail_silence_ms: int = 1500,
        loop: bool = False,
        block_ms: int = FRAME_MS,
    ) -> None:
        if block_ms < FRAME_MS or block_ms % FRAME_MS:
            raise ValueError(f"block_ms must be a multiple of {FRAME_MS} ms, got {block_ms}")
        if tail_silence_ms < 0:
            raise ValueError(f"tail_silence_ms must be >= 0, got {tail_silence_ms}")
        self.path = Path(path)
        self.name = f"wav:{self.path}"
        self.stats = SourceStats()
        self.realtime = realtime
        self.loop = loop
        self._frames_per_block = block_ms // FRAME_MS
        self._clock: Clock = clock if clock is not None else MonotonicClock()
        self._tail_frames = -(-tail_silence_ms // FRAME_MS)
        self._pcm: bytes | None = None
        self._file_frames = 0
        self._index = 0  # frame within the current pass (file + tail)
        self._emitted = 0  # frames since open, for pacing
        self._started_at = 0.0

    async def open(self) -> None:
        pcm = await asyncio.to_thread(load_wav, self.path, CAPTURE_RATE_HZ)
        remainder = len(pcm) % CAPTURE_FRAME_BYTES
        if remainder:  # pad the last partial frame with silence
            pcm += bytes(CAPTURE_FRAME_BYTES - remainder)
        self._pcm = pcm
        self._file_frames = len(pcm) // CAPTURE_FRAME_BYTES
        self._index = 0
        self._emitted = 0
        self._started_at = self._clock.now()
        self.stats.opens += 1
        logger.info(
            "audio source %s open: %.2f s of audio, then %d ms of silence%s",
            self.name,
            self._file_frames * FRAME_MS / 1000,
            self._tail_frames * FRAME_MS,
            ", looping" if self.loop else "",
        )

    async def read(self) -> bytes:
        pcm = self._pcm
        if pcm is None:
            raise AudioDeviceError(f"audio source {self.name} is not open")
        if self._index >= self._file_frames + self._tail_frames:
            if not self.loop:
                raise EOFError(f"end of {self.path}")
            self._index = 0
        if self.realtime:
            per_block = self._frames_per_block
            block_end = (self._emitted // per_block + 1) * per_block
            due = self._started_at + block_end * FRAME_MS / 1000
            delay = due - self._clock.now()
            if delay > 0:
                await self._clock.sleep(delay)
        else:
            await asyncio.sleep(0)  # as fast as possible, but let others run
        i = self._index
        if i < self._file_frames:
            frame = pcm[i * CAPTURE_FRAME_BYTES : (i + 1) * CAPTURE_FRAME_BYTES]
        else:
            frame = bytes(CAPTURE_FRAME_BYTES)
        self._index += 1
        self._emitted += 1
        self.stats.frames_captured += 1
        self.stats.last_frame_at = self._clock.now()
        return frame

    async def close(self) -> None:
        if self._pcm is not None:
            logger.info("audio source %s closed", self.name)
        self._pcm = None


class WavSink:
    """An AudioSink that writes what the device would play to a 16-bit WAV file.

    ``realtime``: pulls a 20 ms block every 20 ms while anything plays, like a sound
    card (and sleeps while nothing does, writing the silence that passed), and writes
    every block from the first :class:`~edgevoice.audio.playback.PlaybackStarted`
    on (underrun and inter-response silence included), so the file sounds exactly
    like the speaker would have. Otherwise it pulls only audio that is ready, as soon
    as it is pushed, so the file holds just the replies, back to back.
    """

    def __init__(
        self,
        path: str | Path,
        rate_hz: int = PLAYBACK_INPUT_RATE_HZ,
        realtime: bool = True,
        clock: Clock | None = None,
    ) -> None:
        self.path = Path(path)
        self.name = f"wav:{self.path}" if realtime else f"wav+fast:{self.path}"
        self.sample_rate_hz = rate_hz
        self.realtime = realtime
        self._clock: Clock = clock if clock is not None else MonotonicClock()
        self._block = frame_samples(rate_hz)
        self._writer: wave.Wave_write | None = None
        self._task: asyncio.Task[None] | None = None
        self._buffer: PlaybackBuffer | None = None
        self._wake = asyncio.Event()
        # real-time pacing: when block 0 was due, and the blocks done so far
        self._paced_from = 0.0
        self._paced_blocks = 0
        #: samples written to the file so far
        self.samples_written = 0

    def prepare(self) -> None:
        """Nothing to get ready: a file is always open."""

    async def open(self, buffer: PlaybackBuffer) -> None:
        if buffer.rate_hz != self.sample_rate_hz:
            raise ValueError(
                f"{self.name} plays {self.sample_rate_hz} Hz but the buffer holds "
                f"{buffer.rate_hz} Hz audio"
            )
        if self._task is not None:
            raise AudioDeviceError(f"audio sink {self.name} is already open")
        try:
            writer = wave.open(str(self.path), "wb")  # noqa: SIM115 (open until close())
        except OSError as exc:
            raise AudioFileError(f"{self.path}: cannot write: {exc.strerror or exc}") from exc
        writer.setnchannels(1)
        writer.setsampwidth(SAMPLE_WIDTH_BYTES)
        writer.setframerate(self.sample_rate_hz)
        self._writer = writer
        self._buffer = buffer
        self.samples_written = 0
        if self.realtime:
            self._task = asyncio.create_task(self._pace(buffer, writer), name=self.name)
        else:
            loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            wake = self._wake

            def on_data() -> None:
                # Pushes may come from any thread: hand the wake-up to the loop.
                loop.call_soon_threadsafe(wake.set)

            buffer.on_data = on_data
            self._task = asyncio.create_task(self._drain(buffer, writer), name=self.name)
        logger.info("audio sink %s open at %d Hz", self.name, self.sample_rate_hz)

    async def _pace(self, buffer: PlaybackBuffer, writer: wave.Wave_write) -> None:
        """A block every 20 ms while anything is to be played; while nothing is, no
        wake-up at all (as a parked sound card): the silence that passed meanwhile is
        written in one go when the next sound arrives, so the file keeps real time.
        Blocks stay on the 20 ms grid counted from the start, as before."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def on_data() -> None:
            # pushes may come from any thread: hand the wake-up to the loop
            loop.call_soon_threadsafe(wake.set)

        buffer.on_data = on_data
        start = self._paced_from = self._clock.now()
        self._paced_blocks = k = 0
        while True:
            if not buffer.busy:
                wake.clear()
                if not buffer.busy:  # a push between the test and clear() set busy
                    await wake.wait()
                k = self._catch_up(buffer, writer)
            k += 1
            delay = start + k * FRAME_MS / 1000 - self._clock.now()
            if delay > 0:
                await self._clock.sleep(delay)
            block = buffer.pull(self._block)
            self._paced_blocks = k
            if buffer.stats.responses_started:
                self._write(writer, block)

    def _catch_up(self, buffer: PlaybackBuffer, writer: wave.Wave_write) -> int:
        """Write the silent blocks that fell due while nothing played; the block count."""
        due = int((self._clock.now() - self._paced_from) / (FRAME_MS / 1000))
        k = self._paced_blocks
        if due > k:
            if buffer.stats.responses_started:
                self._write(writer, bytes((due - k) * self._block * SAMPLE_WIDTH_BYTES))
            self._paced_blocks = k = due
        return k

    async def _drain(self, buffer: PlaybackBuffer, writer: wave.Wave_write) -> None:
        while True:
            self._wake.clear()
            # a cue (earcon) is mixed in on top of whatever plays: write it too, as the
            # speaker would have played it, a block at a time
            while (ready := buffer.playable_samples()) > 0 or buffer.cue_playing:
                self._write(writer, buffer.pull(min(ready, self._block) or self._block))
                await asyncio.sleep(0)
            buffer.pull(0)  # lets a drained response end (emits PlaybackEnded)
            await self._wake.wait()

    def _write(self, writer: wave.Wave_write, block: bytes) -> None:
        writer.writeframesraw(block)
        self.samples_written += len(block) // SAMPLE_WIDTH_BYTES

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        buffer, writer = self._buffer, self._writer
        if buffer is not None:
            buffer.on_data = None
            if self.realtime and writer is not None and not buffer.busy:
                self._catch_up(buffer, writer)  # the silence played since the last sound
        self._buffer = None
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()  # patches the header with the final sizes
            logger.info(
                "audio sink %s closed: %.2f s written",
                self.name,
                self.samples_written / self.sample_rate_hz,
            )
