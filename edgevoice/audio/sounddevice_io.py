"""Real sound cards through PortAudio (``sounddevice``), and choosing a source or sink.

:class:`SoundDeviceSource` captures from a microphone at a rate the device supports
(16 kHz when it can) and delivers 20 ms frames of 16 kHz mono. Its PortAudio callback
does little on the audio thread: copy the block, hold it in a bounded list (the oldest
dropped and counted when the loop stalls) and wake the event loop -- per block, or,
while the daemon only waits for speech (or its wake word) to start, per batch of quiet
blocks (see :class:`SoundDeviceSource`). Down-mixing, resampling and re-framing happen on the
event loop, in :meth:`SoundDeviceSource.read`.
The device is asked for ``block_ms`` blocks (60 ms by default: three frames per
callback): each block costs a PortAudio wake-up, a sound-server round trip and an
event-loop wake-up, which dominate the CPU of a device listening to silence (measured
with ``edgevoice bench``: the PortAudio and sound-server threads alone cost 1.9 % of a
core here at 20 ms blocks, 0.6 % at 60 ms). The price is up to ``block_ms - 20`` ms more
before a frame reaches the detector.

:class:`SoundDeviceSink` plays a :class:`~edgevoice.audio.playback.PlaybackBuffer`:
its callback pulls one block (the buffer never blocks) and duplicates it to every
channel the device insists on. An output stream playing silence costs as much as one
playing speech (1.2 % of a core here for the PortAudio and sound-server threads), so
after ``park_after_ms`` of nothing to play the stream is closed ("parked"); the next
push into the buffer opens it again, which takes about 2 ms (measured on PulseAudio
through ALSA), well inside the jitter buffer's prefill. (Stopping and restarting one
stream instead upset PortAudio's ALSA poll loop on PulseAudio; a new stream does not.)

Devices are chosen by name (a case-insensitive part of it, as :func:`list_devices`
shows them) or ``"default"``, never by index: indexes change when a USB device is
plugged in. A device that vanishes surfaces as
:class:`~edgevoice.errors.AudioDeviceError` from ``read``; reopening with backoff is
the daemon's job.

``sounddevice`` is imported on first use because PortAudio enumerates devices once,
when it is initialised: the environment (``PULSE_SERVER``, ``ALSA_CONFIG_PATH``) must be
final by then. :func:`open_source` and :func:`open_sink` map a config string to a
source or sink (``wav:PATH``, ``wav+fast:PATH`` or a device name).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from edgevoice.audio.base import (
    CAPTURE_FRAME_BYTES,
    CAPTURE_FRAME_SAMPLES,
    CAPTURE_RATE_HZ,
    FRAME_MS,
    PLAYBACK_INPUT_RATE_HZ,
    SAMPLE_WIDTH_BYTES,
    AudioSink,
    AudioSource,
    SourceStats,
    frame_samples,
)
from edgevoice.audio.playback import PlaybackBuffer
from edgevoice.audio.resample import FrameFifo, Int16Array, StreamResampler
from edgevoice.audio.silence import IdleGate
from edgevoice.audio.wavio import WavSink, WavSource
from edgevoice.clock import Clock
from edgevoice.errors import AudioDeviceError, EdgevoiceError

logger = logging.getLogger(__name__)

#: Capture block length asked of the device by default (three 20 ms frames).
DEFAULT_CAPTURE_BLOCK_MS = 60
#: While the daemon only listens for speech to start, quiet blocks are handed to the
#: event loop this many ms at a time (one wake-up instead of five 60 ms ones).
DEFAULT_IDLE_BATCH_MS = 300
#: Silence an output stream plays before it is parked, by default: an open stream costs
#: 1.7 % of a core here playing silence (PortAudio's and the sound server's threads,
#: bench row 2), and a conversation's pauses are mostly shorter than 5 s.
DEFAULT_PARK_AFTER_MS = 1000
#: The speaker's rate unless configured: Opus decodes replies straight to it (no
#: resampler on the device), and it is what boards' sound chips, USB speakers and sound
#: servers run at, so nothing converts it further down. A device's "default" rate is
#: often 44.1 kHz (PortAudio's guess for ALSA's plugins, PulseAudio's included), which
#: costs a resampler in the daemon and another in the plugin or server.
PREFERRED_SPEAKER_RATE_HZ = 48_000
#: After :meth:`SoundDeviceSink.prepare` (a turn began), the stream is kept open until
#: the reply plays, for at most this long: parking in the middle of a turn would make
#: the reply wait for a reopened stream's lead-in.
PREPARE_HOLD_S = 30.0
#: Silence a reopened output stream plays before the buffer's audio (see ``_wake``).
DEFAULT_WAKE_LEAD_IN_MS = 160


#: The names PortAudio's callback threads are given (the kernel keeps 15 bytes), as
#: ``top -H``, ``ps -L`` and the device's per-thread CPU metric show them
#: (:mod:`edgevoice.health.system`).
CAPTURE_THREAD_NAME = "edgevoice-mic"
PLAYBACK_THREAD_NAME = "edgevoice-play"
#: prctl(2)'s PR_SET_NAME: names the calling thread
_PR_SET_NAME = 15
_prctl: Any = None


def name_this_thread(name: str) -> bool:
    """Name the calling thread in the kernel (Linux; elsewhere, or if it fails, False).

    PortAudio's callback threads are created by C code: Python knows no name for them,
    and the kernel shows each as the interpreter ("python"), indistinguishable from the
    event loop's. Named, a board's own CPU figures say which of them is busy. Touches
    nothing of Python's ``threading`` (a thread it did not start would stay registered
    there after it ended: a sink opens a new stream for every reply)."""
    global _prctl
    try:
        if _prctl is None:
            import ctypes
            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        return int(_prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)) == 0
    except (OSError, AttributeError):  # no libc prctl: not Linux
        return False


class PortAudioUnavailableError(EdgevoiceError):
    """The PortAudio library is missing. Retrying will not help: install it."""


def _sounddevice() -> ModuleType:
    try:
        return importlib.import_module("sounddevice")
    except OSError as exc:  # sounddevice raises OSError when libportaudio is missing
        raise PortAudioUnavailableError(
            f"PortAudio is not installed: apt-get install libportaudio2 [{exc}]"
        ) from exc


@dataclass(frozen=True)
class DeviceInfo:
    """One sound device as PortAudio sees it (for ``edgevoice doctor``)."""

    name: str
    hostapi: str
    max_input_channels: int
    max_output_channels: int
    default_samplerate_hz: int
    default_input: bool
    default_output: bool


def list_devices() -> list[DeviceInfo]:
    """Every device PortAudio knows, in its order."""
    sd = _sounddevice()
    hostapis = sd.query_hostapis()
    default_in, default_out = _default_indexes(sd)
    return [
        DeviceInfo(
            name=str(d["name"]),
            hostapi=str(hostapis[d["hostapi"]]["name"]),
            max_input_channels=int(d["max_input_channels"]),
            max_output_channels=int(d["max_output_channels"]),
            default_samplerate_hz=int(d["default_samplerate"]),
            default_input=i == default_in,
            default_output=i == default_out,
        )
        for i, d in enumerate(sd.query_devices())
    ]


def _default_indexes(sd: Any) -> tuple[int, int]:
    pair = sd.default.device
    ins, outs = int(pair[0]), int(pair[1])
    if ins < 0 or outs < 0:
        for api in sd.query_hostapis():  # PortAudio's own default: the first host API's
            ins = ins if ins >= 0 else int(api["default_input_device"])
            outs = outs if outs >= 0 else int(api["default_output_device"])
            break
    return ins, outs


@dataclass(frozen=True)
class StreamPlan:
    """How a device will be opened."""

    name: str
    rate_hz: int
    channels: int
    index: int | None = None  # PortAudio's index, valid only until PortAudio re-scans


def _find_device(sd: Any, spec: str, kind: str) -> tuple[int, dict[str, Any]]:
    """The device named ``spec`` ("default" or part of a name) with ``kind`` channels."""
    key = "max_input_channels" if kind == "input" else "max_output_channels"
    devices = [(i, dict(d)) for i, d in enumerate(sd.query_devices()) if d[key] > 0]
    if spec.strip().lower() == "default":
        default_in, default_out = _default_indexes(sd)
        wanted = default_in if kind == "input" else default_out
        for i, d in devices:
            if i == wanted:
                return i, d
        if devices:
            return devices[0]
        raise AudioDeviceError(f"no {kind} sound device at all (is the sound card connected?)")
    needle = spec.strip().lower()
    exact = [(i, d) for i, d in devices if str(d["name"]).lower() == needle]
    partial = [(i, d) for i, d in devices if needle in str(d["name"]).lower()]
    found = exact or partial
    if not found:
        names = ", ".join(repr(str(d["name"])) for _, d in devices) or "none"
        raise AudioDeviceError(f"no {kind} sound device matches {spec!r}; {kind} devices: {names}")
    if len(found) > 1:
        logger.warning(
            "%r matches several %s devices (%s); using %r",
            spec,
            kind,
            ", ".join(str(d["name"]) for _, d in found),
            found[0][1]["name"],
        )
    return found[0]


def speaker_rate_hz(configured_hz: int | None) -> int:
    """The rate the speaker is asked for first: ``audio.output_rate_hz``, else
    :data:`PREFERRED_SPEAKER_RATE_HZ`. A device that refuses it plays at its default."""
    return configured_hz or PREFERRED_SPEAKER_RATE_HZ


def candidate_rates(preferred_rate_hz: int | None, default_rate_hz: int) -> list[int]:
    """The rates a stream is tried at, in order: the preferred one, then the device's."""
    return list(dict.fromkeys(r for r in (preferred_rate_hz, default_rate_hz) if r))


def plan_stream(sd: Any, spec: str, kind: str, preferred_rate_hz: int | None) -> StreamPlan:
    """Pick the device, a rate it accepts (``preferred_rate_hz`` if it can) and mono if
    it can, else two channels. ``sd`` is the sounddevice module (or a stand-in with
    its ``query_devices``, ``query_hostapis``, ``default`` and ``check_*_settings``)."""
    index, device = _find_device(sd, spec, kind)
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    rates = candidate_rates(preferred_rate_hz, int(device["default_samplerate"]))
    for channels in (1, 2):
        for rate in rates:
            try:
                check(device=index, channels=channels, dtype="int16", samplerate=rate)
            except Exception:  # PortAudioError or ValueError: this combination won't do
                continue
            return StreamPlan(str(device["name"]), rate, channels, index)
    raise AudioDeviceError(
        f"{kind} device {device['name']!r} accepts neither {rates} Hz nor 1-2 channels "
        "of 16-bit audio"
    )


class _Stream(Protocol):
    """What this module needs of a PortAudio stream (lets tests substitute one)."""

    @property
    def active(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


class SoundDeviceSource:
    """An AudioSource capturing from a sound card (see the module docstring).

    Idle batching: while an :class:`~edgevoice.audio.silence.IdleGate` is set and
    armed (the daemon arms it while it only listens for speech to start), the callback
    holds quiet blocks and wakes the event loop once per ``idle_batch_ms`` instead of
    once per block; a block the gate says may start an utterance (or reach the wake
    word's models) wakes it at once.
    Every block still reaches :meth:`read`, in order: batching delays only frames that
    cannot start anything, and none is lost unless the loop stalls for longer than the
    bounded hold (``queue_frames``), which drops the oldest blocks and counts them.
    """

    def __init__(
        self,
        device: str = "default",
        *,
        queue_frames: int = 25,
        block_ms: int = DEFAULT_CAPTURE_BLOCK_MS,
        stall_timeout_s: float = 1.0,
        start_timeout_s: float = 5.0,
        idle_batch_ms: int = DEFAULT_IDLE_BATCH_MS,
    ) -> None:
        if block_ms < FRAME_MS or block_ms % FRAME_MS:
            raise ValueError(f"block_ms must be a multiple of {FRAME_MS} ms, got {block_ms}")
        self.device = device
        self.name = f"sounddevice:{device}"
        self.stats = SourceStats()
        self.block_ms = block_ms
        self.queue_frames = queue_frames
        # ``queue_frames`` counts 20 ms frames; the hold keeps whole blocks.
        self.queue_blocks = max(2, -(-queue_frames * FRAME_MS // block_ms))
        #: blocks held while the gate is armed before the loop is woken anyway
        self.batch_blocks = max(1, min(idle_batch_ms // block_ms, self.queue_blocks - 1))
        self.stall_timeout_s = stall_timeout_s
        # Some back ends take well over a second to deliver the first block (PulseAudio
        # through ALSA: ~1.8 s for a process's first stream, during which PortAudio's
        # thread used 1.4 s of CPU here, polling), so the first wait is longer.
        self.start_timeout_s = max(start_timeout_s, stall_timeout_s)
        self._started = False
        self.plan: StreamPlan | None = None
        self._stream: _Stream | None = None
        self._resampler: StreamResampler | None = None
        self._fifo = FrameFifo(CAPTURE_FRAME_SAMPLES)
        # Frames cut straight from 16 kHz mono blocks (no numpy): read before the FIFO,
        # filled only while the FIFO is empty, so the order holds.
        self._frames: collections.deque[bytes] = collections.deque()
        # Blocks the callback has captured and the loop has not taken yet. Shared with
        # PortAudio's thread: the lock is held only to append or to swap the list.
        self._lock = threading.Lock()
        self._held: list[bytes] = []
        self._spare: list[bytes] = []  # the loop's emptied list, swapped back in
        self._wake_scheduled = False  # a wake-up is on its way to the loop
        self._dropped_blocks = 0
        self._finished = False
        self._waiter: asyncio.Future[None] | None = None
        self._gate: IdleGate | None = None
        #: times the callback woke the event loop (one per block without batching)
        self.wakeups = 0

    def set_idle_gate(self, gate: IdleGate | None) -> None:
        """Batch quiet blocks while ``gate`` is armed (None: wake the loop per block)."""
        self._gate = gate

    async def open(self) -> None:
        if self._stream is not None:
            raise AudioDeviceError(f"audio source {self.name} is already open")
        loop = asyncio.get_running_loop()
        stats, lock = self.stats, self._lock
        frames_per_block = self.block_ms // FRAME_MS
        with lock:
            self._held, self._spare = [], []
            self._wake_scheduled = self._finished = False
            self._dropped_blocks = 0

        def wake() -> None:  # PortAudio's thread, with the lock held
            self._wake_scheduled = True
            self.wakeups += 1
            with contextlib.suppress(RuntimeError):  # the loop is closing: drop it
                loop.call_soon_threadsafe(self._woken)

        named = False

        def on_block(indata: Any, frames: int, time_info: Any, status: Any) -> None:
            # PortAudio's thread: count, copy, hold; wake the loop when it is needed.
            nonlocal named
            if not named:
                named = True
                name_this_thread(CAPTURE_THREAD_NAME)
            if status.input_overflow:
                stats.overflows += 1
            stats.last_frame_at = time.monotonic()
            block = bytes(indata)
            gate = self._gate
            # (read without the lock: a stale view can only wake the loop early)
            pending = len(self._held)
            if gate is None or self._wake_scheduled or pending + 1 >= self.batch_blocks:
                urgent = True  # the loop takes this block now anyway: no need to measure
            else:
                if not pending:
                    gate.batch_began()
                urgent = gate.may_start(block, frames_per_block)
            with lock:
                held = self._held
                if len(held) >= self.queue_blocks:  # the loop stalls: oldest out
                    del held[0]
                    self._dropped_blocks += 1
                held.append(block)
                if not self._wake_scheduled and (urgent or len(held) >= self.batch_blocks):
                    wake()

        def on_finished() -> None:
            with lock:
                self._finished = True
                if not self._wake_scheduled:
                    wake()

        plan, stream = await asyncio.to_thread(self._start_stream, on_block, on_finished)
        self.plan, self._stream = plan, stream
        # None: the device delivers 16 kHz mono already, frames are cut from its blocks.
        self._resampler = (None if plan.rate_hz == CAPTURE_RATE_HZ
                           else StreamResampler(plan.rate_hz, CAPTURE_RATE_HZ))
        self._fifo.clear()
        self._frames.clear()
        self._started = False
        self.stats.opens += 1
        logger.info(
            "audio source %s open: %r at %d Hz, %d channel(s)%s",
            self.name,
            plan.name,
            plan.rate_hz,
            plan.channels,
            "" if plan.rate_hz == CAPTURE_RATE_HZ else f", resampled to {CAPTURE_RATE_HZ} Hz",
        )

    def _woken(self) -> None:
        """The callback has blocks for the loop (on the loop's thread)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _start_stream(self, on_block: Any, on_finished: Any) -> tuple[StreamPlan, _Stream]:
        """Resolve the device and start capturing (in a worker thread: may block)."""
        sd = _sounddevice()
        plan = plan_stream(sd, self.device, "input", CAPTURE_RATE_HZ)
        try:
            # Raw: the callback gets a plain buffer, not a numpy array made per block.
            stream = sd.RawInputStream(
                device=plan.index,
                samplerate=plan.rate_hz,
                channels=plan.channels,
                dtype="int16",
                blocksize=frame_samples(plan.rate_hz, self.block_ms),
                callback=on_block,
                finished_callback=on_finished,
            )
            stream.start()
        except sd.PortAudioError as exc:
            raise AudioDeviceError(f"cannot open input device {plan.name!r}: {exc}") from exc
        return plan, stream

    async def read(self) -> bytes:
        # Most calls return a frame cut from a block already delivered, without
        # suspending: one event-loop wake-up per device block (or per batch), not per
        # frame.
        while True:
            frame = self.read_nowait()
            if frame is not None:
                return frame
            await self._wait_for_blocks()

    def read_nowait(self) -> bytes | None:
        """The next frame if one was captured already, else None (never waits).

        Lets the daemon hand the detector every frame captured before a button press
        or a request, before it acts on it."""
        frame = self._next_frame()
        if frame is None and self._take_held():
            frame = self._next_frame()
        if frame is not None:
            self.stats.frames_captured += 1
        return frame

    def _next_frame(self) -> bytes | None:
        frames = self._frames
        return frames.popleft() if frames else self._fifo.pop()

    def _take_held(self) -> bool:
        """Move the blocks the callback holds into the frame FIFO; False if none."""
        plan = self.plan
        if self._stream is None or plan is None:
            raise AudioDeviceError(f"audio source {self.name} is not open")
        with self._lock:
            blocks, self._held = self._held, self._spare
            self._wake_scheduled = False
            dropped, finished = self._dropped_blocks, self._finished
        self.stats.frames_dropped = dropped * self.block_ms // FRAME_MS
        direct = plan.channels == 1 and self._resampler is None
        fifo = self._fifo
        for block in blocks:
            if direct and not len(fifo) and not len(block) % CAPTURE_FRAME_BYTES:
                self._frames.extend(block[i:i + CAPTURE_FRAME_BYTES]
                                    for i in range(0, len(block), CAPTURE_FRAME_BYTES))
            else:
                fifo.push(self._convert(block))
        taken = bool(blocks)
        blocks.clear()
        self._spare = blocks
        if taken:
            self._started = True
        elif finished:
            raise AudioDeviceError(f"input device {plan.name!r} stopped (unplugged?)")
        return taken

    async def _wait_for_blocks(self) -> None:
        stream, plan = self._stream, self.plan
        if stream is None or plan is None:
            raise AudioDeviceError(f"audio source {self.name} is not open")
        timeout = self.stall_timeout_s if self._started else self.start_timeout_s
        # The gate holds quiet blocks for up to a batch: that is not a stall.
        batch_s = self.batch_blocks * self.block_ms / 1000
        timeout = max(timeout, 2 * batch_s) if self._gate is not None else timeout
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        with self._lock:
            pending = bool(self._held) or self._finished
        if pending:  # it came in between: no need to sleep
            self._waiter = None
            return
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise AudioDeviceError(
                f"input device {plan.name!r} delivered no audio for {timeout:g} s "
                f"(stream {'active' if _active(stream) else 'stopped'}): unplugged or stalled?"
            ) from None
        finally:
            self._waiter = None

    def _convert(self, block: bytes) -> bytes | Int16Array:
        assert self.plan is not None
        if self.plan.channels == 1 and self._resampler is None:
            return block  # already 16 kHz mono: the FIFO cuts it into frames
        samples = np.frombuffer(block, dtype=np.int16)
        if self.plan.channels > 1:
            wide = samples.reshape(-1, self.plan.channels).astype(np.int32)
            samples = (wide.sum(axis=1) // self.plan.channels).astype(np.int16)
        if self._resampler is None:
            return samples
        return self._resampler.process(samples)

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        await asyncio.to_thread(_stop_and_close, stream)
        self._fifo.clear()
        self._frames.clear()
        with self._lock:
            self._held.clear()
        logger.info("audio source %s closed", self.name)


class SoundDeviceSink:
    """An AudioSink playing a PlaybackBuffer on a sound card.

    ``rate_hz`` None means :data:`PREFERRED_SPEAKER_RATE_HZ` if the device takes it,
    else the device's default rate, resolved when the sink is made (the daemon needs
    ``sample_rate_hz`` to build the buffer before ``open``).
    ``park_after_ms``: close the stream after this much time with nothing to play, and
    open it again on the next push (None: keep it running).
    """

    def __init__(self, device: str = "default", rate_hz: int | None = None, *,
                 park_after_ms: int | None = DEFAULT_PARK_AFTER_MS,
                 wake_lead_in_ms: int = DEFAULT_WAKE_LEAD_IN_MS,
                 block_ms: int = FRAME_MS) -> None:
        if block_ms < FRAME_MS or block_ms % FRAME_MS:
            raise ValueError(f"block_ms must be a multiple of {FRAME_MS} ms, got {block_ms}")
        #: audio PortAudio asks the callback for at once (each block is a wake-up of
        #: PortAudio's and the sound server's threads)
        self.block_ms = block_ms
        self.device = device
        self.name = f"sounddevice:{device}"
        self.plan = self._plan(rate_hz)
        self.sample_rate_hz = self.plan.rate_hz
        #: blocks the device reported it had to play before we delivered them
        self.underflows = 0
        #: monotonic time of the last output callback (0 = never): the audio thread lives
        self.last_callback_at = 0.0
        #: times the stream was parked for lack of anything to play, and woken again
        self.parks = 0
        self.wakes = 0
        self.park_after_s = None if park_after_ms is None else park_after_ms / 1000.0
        self.wake_lead_in_ms = wake_lead_in_ms
        self._buffer: PlaybackBuffer | None = None
        self._stream: _Stream | None = None
        self._open = False  # between open() and close(), parked or not
        # monotonic time the callback last had something to play
        self._last_audio_at = 0.0
        # Held while a stream is opened or closed: a push waits for a park in progress.
        self._stream_lock = threading.Lock()
        self._park_task: asyncio.Task[None] | None = None
        # prepare() holds the stream open until a reply plays (monotonic deadline)
        self._held_until = 0.0
        # set (on the loop) when a parked stream is reopened: the park task waits on it
        self._reopened: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _plan(self, rate_hz: int | None) -> StreamPlan:
        return plan_stream(_sounddevice(), self.device, "output", speaker_rate_hz(rate_hz))

    async def open(self, buffer: PlaybackBuffer) -> None:
        if buffer.rate_hz != self.sample_rate_hz:
            raise ValueError(
                f"{self.name} plays {self.sample_rate_hz} Hz but the buffer holds "
                f"{buffer.rate_hz} Hz audio"
            )
        if self._open:
            raise AudioDeviceError(f"audio sink {self.name} is already open")
        self._buffer = buffer
        stream = await asyncio.to_thread(self._start_stream, self._callback(buffer))
        with self._stream_lock:
            self._stream, self._open = stream, True
        self._last_audio_at = time.monotonic()
        buffer.on_data = self._wake
        if self.park_after_s is not None:
            self._loop, self._reopened = asyncio.get_running_loop(), asyncio.Event()
            self._park_task = asyncio.create_task(self._park_when_idle(self.park_after_s),
                                                  name="sink-park")
        logger.info(
            "audio sink %s open: %r at %d Hz, %d channel(s)",
            self.name,
            self.plan.name,
            self.plan.rate_hz,
            self.plan.channels,
        )

    def _callback(self, buffer: PlaybackBuffer, lead_in_ms: int = 0) -> Any:
        writer = OutputBlockWriter(buffer, self.plan.channels,
                                   lead_in_blocks(lead_in_ms, self.block_ms))
        named = False

        def on_block(outdata: Any, frames: int, time_info: Any, status: Any) -> None:
            # PortAudio's thread: the buffer's pull never waits.
            nonlocal named
            if not named:  # every stream (a reopened one too) has a thread of its own
                named = True
                name_this_thread(PLAYBACK_THREAD_NAME)
            if status.output_underflow:
                self.underflows += 1
            now = self.last_callback_at = time.monotonic()
            if writer.fill(outdata, frames):
                self._last_audio_at = now

        return on_block

    async def _park_when_idle(self, after_s: float) -> None:
        """Close the stream once nothing was played for ``after_s`` (checked from the
        loop, twice per ``after_s``, while it is open; a parked sink waits for the
        reopening without any wake-up), unless :meth:`prepare` holds it for a reply."""
        reopened = self._reopened
        assert reopened is not None
        while True:
            if self._stream is None:  # parked: nothing to check until it reopens
                reopened.clear()
                if self._stream is None:
                    await reopened.wait()
                continue
            await asyncio.sleep(after_s / 2)
            buffer = self._buffer
            now = time.monotonic()
            if buffer is not None and buffer.playing:
                self._held_until = 0.0  # the reply it was held for is playing
            if (self._stream is None or buffer is None or buffer.busy
                    or now < self._held_until or now - self._last_audio_at < after_s):
                continue
            await asyncio.to_thread(self._park)

    def _park(self) -> None:
        with self._stream_lock:
            stream, buffer = self._stream, self._buffer
            if stream is None or buffer is None or buffer.busy:
                return  # closed, or a push came in meanwhile
            self._stream = None
            self.parks += 1
            _stop_and_close(stream)
        logger.debug("audio sink %s parked: nothing to play", self.name)

    def prepare(self) -> None:
        """Sound is coming soon (a turn began): reopen a parked stream now, so that it
        has settled by the time the reply arrives, and keep it open until the reply
        plays (at most :data:`PREPARE_HOLD_S`). From the event loop's thread."""
        self._held_until = time.monotonic() + PREPARE_HOLD_S
        self._wake()

    def _wake(self) -> None:
        """Reopen a parked stream (from the pushing thread: the buffer got audio).

        Opening takes about 2 ms here, but PulseAudio drops the first ~140 ms a new
        stream plays (measured through ALSA's pulse plugin), so a reopened stream plays
        ``wake_lead_in_ms`` of silence before it pulls from the buffer: a sound that
        woke the stream is late by that much rather than clipped. :meth:`prepare`
        ahead of a reply avoids both."""
        if self._stream is not None or not self._open:
            return  # the common case: playing already
        with self._stream_lock:
            if self._stream is not None or not self._open or self._buffer is None:
                return
            on_block = self._callback(self._buffer, self.wake_lead_in_ms)
            try:  # the device as found at open (resolving it costs a device scan) ...
                self._stream = self._start_stream(on_block, resolve=False)
            except AudioDeviceError:
                try:  # ... unless it moved meanwhile
                    self._stream = self._start_stream(on_block)
                except AudioDeviceError as exc:  # vanished: say so, play nothing
                    logger.warning("audio sink %s could not reopen: %s", self.name, exc)
                    return
            self._last_audio_at = time.monotonic()
            self.wakes += 1
        loop, reopened = self._loop, self._reopened
        if loop is not None and reopened is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(reopened.set)
        logger.debug("audio sink %s woken", self.name)

    def _start_stream(self, on_block: Any, *, resolve: bool = True) -> _Stream:
        sd = _sounddevice()
        plan = self.plan
        if resolve or plan.index is None:
            # Resolve again: the index from construction time may be stale by now.
            plan = plan_stream(sd, self.device, "output", self.sample_rate_hz)
            if plan.rate_hz != self.sample_rate_hz:
                raise AudioDeviceError(
                    f"output device {plan.name!r} no longer accepts {self.sample_rate_hz} Hz"
                )
            self.plan = plan
        try:
            # Raw: the callback gets a plain buffer, not a numpy array made per block.
            stream = sd.RawOutputStream(
                device=plan.index,
                samplerate=plan.rate_hz,
                channels=plan.channels,
                dtype="int16",
                blocksize=frame_samples(plan.rate_hz, self.block_ms),
                callback=on_block,
            )
            stream.start()
        except sd.PortAudioError as exc:
            raise AudioDeviceError(f"cannot open output device {plan.name!r}: {exc}") from exc
        stream_: _Stream = stream
        return stream_

    @property
    def parked(self) -> bool:
        """Whether the stream is closed for lack of anything to play."""
        return self._open and self._stream is None

    @property
    def active(self) -> bool:
        """Whether the output stream is running (or parked, ready to run)."""
        if not self._open:
            return False
        stream = self._stream
        return stream is None or _active(stream)

    async def close(self) -> None:
        task, self._park_task = self._park_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with self._stream_lock:  # a push racing with close must not reopen it
            stream, self._stream = self._stream, None
            was_open, self._open = self._open, False
        if stream is not None:
            await asyncio.to_thread(_stop_and_close, stream)
        if was_open:
            logger.info("audio sink %s closed", self.name)


def lead_in_blocks(lead_in_ms: int, block_ms: int) -> int:
    """Blocks of silence that cover ``lead_in_ms`` (at least that long)."""
    return -(-lead_in_ms // block_ms)


class OutputBlockWriter:
    """Fills PortAudio's raw output buffer from a :class:`PlaybackBuffer`, one callback
    at a time (the sink's audio thread).

    A raw stream hands the callback a plain buffer, not a numpy array made per block:
    most blocks a device plays are silence between replies (issue 15: the array
    sounddevice builds for every block was a quarter of the output thread's Python
    time), and those are written from one preallocated zero block without pulling.
    Blocks with audio are pulled into a numpy view of the buffer and, for a device that
    insists on more channels, duplicated to each of them.
    """

    __slots__ = ("_buffer", "_channels", "_silence", "lead_in_blocks")

    def __init__(self, buffer: PlaybackBuffer, channels: int, lead_in_blocks: int = 0) -> None:
        self._buffer = buffer
        self._channels = channels
        self._silence = b""
        #: blocks of silence still to play before pulling (a reopened stream's lead-in)
        self.lead_in_blocks = lead_in_blocks

    def fill(self, out: Any, frames: int) -> bool:
        """Write ``frames`` frames (s16le, interleaved) into ``out``, a writable buffer of
        exactly that size; True when there was something to play (or about to be)."""
        buffer = self._buffer
        if self.lead_in_blocks:  # a stream just reopened: let the sound server settle
            self.lead_in_blocks -= 1
            self._write_silence(out, frames)
            return True
        if buffer.skip_if_idle():
            self._write_silence(out, frames)
            return False
        samples = np.frombuffer(out, dtype=np.int16)
        channels = self._channels
        if channels == 1:
            played = buffer.pull_into(samples)
        else:
            block = samples.reshape(-1, channels)
            played = buffer.pull_into(block[:, 0])
            block[:, 1:] = block[:, :1]
        return bool(played) or buffer.busy

    def _write_silence(self, out: Any, frames: int) -> None:
        size = frames * self._channels * SAMPLE_WIDTH_BYTES
        if len(self._silence) != size:
            self._silence = bytes(size)
        out[:size] = self._silence


def _active(stream: _Stream) -> bool:
    try:
        return bool(stream.active)
    except Exception:  # a stream whose device vanished may fail even this
        return False


def _stop_and_close(stream: _Stream) -> None:
    # A stream whose device vanished may refuse to stop; it must still be closed.
    with contextlib.suppress(Exception):
        stream.stop()
    with contextlib.suppress(Exception):
        stream.close()


def open_source(spec: str, *, queue_frames: int = 25, clock: Clock | None = None,
                block_ms: int = DEFAULT_CAPTURE_BLOCK_MS) -> AudioSource:
    """Make (not open) the source a config string names: ``wav:PATH`` (real time),
    ``wav+fast:PATH`` (as fast as read), or a sound device name / ``default``."""
    kind, _, rest = spec.partition(":")
    if kind == "wav" and rest:
        return WavSource(Path(rest), realtime=True, clock=clock, block_ms=block_ms)
    if kind == "wav+fast" and rest:
        return WavSource(Path(rest), realtime=False, clock=clock)
    return SoundDeviceSource(spec, queue_frames=queue_frames, block_ms=block_ms)


def open_sink(spec: str, rate_hz: int | None = None, *, clock: Clock | None = None,
              park_after_ms: int | None = DEFAULT_PARK_AFTER_MS,
              block_ms: int = FRAME_MS) -> AudioSink:
    """Make (not open) the sink a config string names: ``wav:PATH`` (writes what a
    speaker would play, at real time), ``wav+fast:PATH`` (writes only the replies, as
    fast as they come), or a sound device name / ``default``. A device sink resolves
    the device now, to know its rate."""
    kind, _, rest = spec.partition(":")
    if kind in ("wav", "wav+fast") and rest:
        return WavSink(
            Path(rest),
            rate_hz=rate_hz or PLAYBACK_INPUT_RATE_HZ,
            realtime=kind == "wav",
            clock=clock,
        )
    return SoundDeviceSink(spec, rate_hz, park_after_ms=park_after_ms, block_ms=block_ms)
