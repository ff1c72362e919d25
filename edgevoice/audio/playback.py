"""The playback jitter buffer between the network side and the audio callback.

Reply audio is pushed in (from the event loop, in whatever bursts the network
delivers) and pulled out by an audio callback thread in fixed blocks at the output
device's pace. The buffer owns the playback policy:

* **prefill**: a response starts playing only once the prefill is buffered (or the
  response is known to be complete), so network jitter does not cause a stutter at
  the first word. With ``prefill_min_ms`` the prefill adapts: after each drained
  response it becomes what that response needed (what it started with minus the least
  audio left over at any pull, plus a 10 ms margin), lowered at most one 20 ms frame a
  response, never below ``prefill_min_ms``, and back to ``prefill_ms`` after an
  underrun. A reply streamed at real time then starts a frame sooner once the link
  has shown it delivers in time (bench row 3), and a jittery link keeps the full one;
* **underrun**: when a playing response runs dry, silence is played, the underrun is
  counted, and playing resumes after another prefill;
* **overflow**: beyond ``max_ms`` the oldest audio is dropped and counted;
* **flush** (barge-in): everything buffered is discarded at once; the very next pull
  returns silence;
* **end of response**: what is left is drained, then :class:`PlaybackEnded` is sent;
* **cues** (earcons): :meth:`PlaybackBuffer.play_cue` mixes a short sound on top of
  whatever plays instead of queueing it, and a response that starts playing cuts it
  (after a 5 ms fade): a cue never delays a reply. (Queued in front of the reply, the
  225 ms "done" earcon used to hold every answer back by that much.)

``pull`` never waits: it takes a lock held only for a copy, so a slow producer can
never stall the audio thread. Samples live in one preallocated ring; a pull allocates
nothing but its output (``pull_into`` not even that).

Events are delivered through ``on_event`` **from whichever thread caused them**:
:class:`PlaybackStarted` and a drained :class:`PlaybackEnded` from the audio
callback's thread, a flushed :class:`PlaybackEnded` from the thread that called
:meth:`PlaybackBuffer.flush`. The callback must be quick and must not block; from
asyncio code, wrap it with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import collections
import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edgevoice.audio.base import SAMPLE_WIDTH_BYTES
from edgevoice.audio.level import SILENCE_DBFS as SILENCE_DBFS  # a silent block's level
from edgevoice.audio.level import pcm_dbfs
from edgevoice.errors import IllegalTransitionError

logger = logging.getLogger(__name__)

#: How quickly a cue cut by a starting response fades out.
CUE_FADE_MS = 5
#: Adaptive prefill: audio kept in hand beyond the least a response needed, and the
#: most it is lowered after one response (one 20 ms frame).
PREFILL_MARGIN_MS = 10
PREFILL_STEP_MS = 20


@dataclass(frozen=True)
class PlaybackStarted:
    """The first sample of a response reached the output."""

    at: float


@dataclass(frozen=True)
class PlaybackEnded:
    """A response finished: drained after ``end_of_response`` or ``flushed``."""

    at: float
    flushed: bool


PlaybackEvent = PlaybackStarted | PlaybackEnded


@dataclass
class PlaybackStats:
    """Counters for /stats and /metrics. Samples are at the buffer's rate."""

    #: times a playing response ran dry before its end
    underruns: int = 0
    #: silence played because of those underruns
    underrun_samples: int = 0
    #: oldest samples thrown away because the buffer was full
    dropped_samples: int = 0
    #: samples discarded by flush (barge-in)
    flushed_samples: int = 0
    #: real (non-silence) samples handed to the output
    played_samples: int = 0
    #: responses that started playing
    responses_started: int = 0
    #: the prefill the next response waits for, in samples (adapts with prefill_min_ms)
    prefill_samples: int = 0


class PlaybackState(enum.Enum):
    IDLE = "idle"
    """No response: pulls return silence."""
    PREFILLING = "prefilling"
    """A response is arriving; waiting for ``prefill_ms`` or its end."""
    PLAYING = "playing"
    """Audio flows to the output."""
    STARVED = "starved"
    """A playing response ran dry; waiting for another prefill or its end."""


P = PlaybackState

#: Every legal transition.
TRANSITIONS: dict[PlaybackState, frozenset[PlaybackState]] = {
    P.IDLE: frozenset({P.PREFILLING}),
    P.PREFILLING: frozenset({P.PLAYING, P.IDLE}),  # IDLE: flushed before it started
    P.PLAYING: frozenset({P.STARVED, P.IDLE}),  # IDLE: drained or flushed
    P.STARVED: frozenset({P.PLAYING, P.IDLE}),
}


Int16Array = npt.NDArray[np.int16]


class PlaybackBuffer:
    """A thread-safe jitter buffer of mono int16 samples at ``rate_hz``."""

    def __init__(
        self,
        rate_hz: int,
        prefill_ms: int = 60,
        max_ms: int = 10_000,
        on_event: Callable[[PlaybackEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        prefill_min_ms: int | None = None,
    ) -> None:
        if rate_hz <= 0:
            raise ValueError(f"rate_hz must be positive, got {rate_hz}")
        if not 0 <= prefill_ms < max_ms:
            raise ValueError(f"need 0 <= prefill_ms < max_ms, got {prefill_ms} and {max_ms}")
        self.rate_hz = rate_hz
        # At least one sample, so a starved response does not "resume" on nothing.
        self.prefill_samples = max(1, rate_hz * prefill_ms // 1000)
        self.prefill_max_samples = self.prefill_samples
        if prefill_min_ms is not None and not 0 <= prefill_min_ms <= prefill_ms:
            raise ValueError(f"need 0 <= prefill_min_ms <= prefill_ms, got {prefill_min_ms}")
        self.prefill_min_samples = (self.prefill_samples if prefill_min_ms is None
                                    else max(1, rate_hz * prefill_min_ms // 1000))
        self._prefill_margin = rate_hz * PREFILL_MARGIN_MS // 1000
        self._prefill_step = rate_hz * PREFILL_STEP_MS // 1000
        # This response: the least audio left beyond a pull (None: not measured), and
        # whether it ran dry.
        self._slack: int | None = None
        self._underran = False
        self._started_with = 0  # audio buffered when it started playing
        self.capacity_samples = rate_hz * max_ms // 1000
        self.on_event = on_event
        #: Called (no arguments, from the pushing thread) after every push and
        #: end_of_response: lets a consumer that is not a real-time device wait for
        #: data instead of polling.
        self.on_data: Callable[[], None] | None = None
        #: Called (from the pulling thread, usually the sound card's) with every block
        #: as it goes to the speaker, silence included: the echo canceller's reference.
        #: It must be quick and must not keep the array.
        self.on_pulled: Callable[[Int16Array], None] | None = None
        #: Output volume, a gain in 0..1 applied as each block is pulled, so a change
        #: (config, or the local API) is heard at once, buffered audio included.
        self.gain = 1.0
        self.stats = PlaybackStats(prefill_samples=self.prefill_samples)
        self._clock = clock
        self._lock = threading.Lock()
        self._ring: Int16Array = np.zeros(self.capacity_samples, dtype=np.int16)
        # Running totals; the ring index is total % capacity. Python ints never wrap.
        self._written = 0
        self._read = 0
        # Where each response whose end is known ends (values of _written), oldest first:
        # the next reply may arrive while the previous one is still draining.
        self._end_marks: collections.deque[int] = collections.deque()
        self._state = P.IDLE
        self._last_block_dbfs = SILENCE_DBFS
        self._overflowing = False
        # The cue being mixed in (an earcon) and how far it has played.
        self._cue: Int16Array | None = None
        self._cue_pos = 0
        self._cue_fade = max(1, rate_hz * CUE_FADE_MS // 1000)
        self._mix = np.zeros(0, dtype=np.int32)

    # -- producer side ---------------------------------------------------------------

    def push(self, pcm: bytes | bytearray | memoryview) -> None:
        """Append reply audio (s16le mono at ``rate_hz``). Never blocks for long."""
        if len(pcm) % SAMPLE_WIDTH_BYTES:
            raise ValueError(f"s16le PCM must have an even length, got {len(pcm)} bytes")
        samples = np.frombuffer(pcm, dtype=np.int16)
        cap = self.capacity_samples
        with self._lock:
            if len(samples) > cap:
                # Only the newest capacity's worth can be kept; the skipped head is
                # counted as dropped through the overflow below.
                self._written += len(samples) - cap
                samples = samples[-cap:]
            n = len(samples)
            overflow = self._written - self._read + n - cap
            if overflow > 0:
                self.stats.dropped_samples += overflow
                self._read += overflow
                # Responses dropped whole collapse into the one being played.
                marks = self._end_marks
                while len(marks) > 1 and marks[1] <= self._read:
                    marks.popleft()
            start = self._written % cap
            first = min(n, cap - start)
            self._ring[start : start + first] = samples[:first]
            self._ring[: n - first] = samples[first:]
            self._written += n
            if self._state is P.IDLE and n:
                self._goto(P.PREFILLING)
        if (overflow > 0) != self._overflowing:  # log when overflow starts and stops
            self._overflowing = overflow > 0
            if self._overflowing:
                logger.warning(
                    "playback: buffer full (%d ms), dropping the oldest audio",
                    self.capacity_samples * 1000 // self.rate_hz,
                )
            else:
                logger.debug("playback: buffer no longer full")
        self._notify_data()

    def end_of_response(self) -> None:
        """No more audio for this response: play what is left, then end it."""
        with self._lock:
            last = self._end_marks[-1] if self._end_marks else None
            if (self._state is P.IDLE and self._written == self._read) or last == self._written:
                logger.debug("playback: end of response with nothing (new) to play")
            else:
                self._end_marks.append(self._written)
        self._notify_data()

    def play_cue(self, pcm: bytes | bytearray | memoryview) -> None:
        """Mix a short sound (an earcon) into the output from the next pull on, on top of
        whatever plays; it replaces a cue still playing. Not part of any response: no
        events, not flushed by :meth:`flush`, cut when a response starts playing."""
        if len(pcm) % SAMPLE_WIDTH_BYTES:
            raise ValueError(f"s16le PCM must have an even length, got {len(pcm)} bytes")
        cue = np.frombuffer(pcm, dtype=np.int16).copy()
        with self._lock:
            self._cue, self._cue_pos = (cue if len(cue) else None), 0
        self._notify_data()

    @property
    def cue_playing(self) -> bool:
        """Whether a cue is still being mixed in."""
        return self._cue is not None

    @property
    def busy(self) -> bool:
        """Whether anything is to be played: a response (even prefilling) or a cue."""
        return self._state is not P.IDLE or self._cue is not None

    def flush(self) -> int:
        """Discard everything now (barge-in). Returns the samples discarded."""
        event: PlaybackEnded | None = None
        with self._lock:
            discarded = self._written - self._read
            self._read = self._written
            self._end_marks.clear()
            self._slack = None  # a cut response says nothing of the link (an underrun does)
            self.stats.flushed_samples += discarded
            if self._state in (P.PLAYING, P.STARVED):
                event = PlaybackEnded(at=self._clock(), flushed=True)
            if self._state is not P.IDLE:
                self._goto(P.IDLE)
        logger.debug("playback: flushed %d samples", discarded)
        if event is not None:
            self._emit(event)
        return discarded

    # -- consumer side (the audio thread) -----------------------------------------------

    def pull_into(self, out: Int16Array) -> int:
        """Fill ``out`` (a 1-D int16 array or view) with the next samples, silence where
        there is nothing to play. Never blocks. Returns how many were real audio."""
        n = len(out)
        events: list[PlaybackEvent] = []
        filled = 0
        cap = self.capacity_samples
        with self._lock:
            while True:  # at least once: a zero-length pull still ends a drained response
                state = self._state
                buffered = self._written - self._read
                if state is P.IDLE:
                    break
                if state is P.PREFILLING or state is P.STARVED:
                    if buffered < self.prefill_samples and not self._end_marks:
                        break
                    if state is P.PREFILLING:
                        if filled >= n:  # block full: the next response starts next pull
                            break
                        self.stats.responses_started += 1
                        self._started_with = buffered
                        events.append(PlaybackStarted(at=self._clock()))
                        if self._cue is not None:  # the answer does not wait for a cue
                            self._cut_cue(filled)
                    self._goto(P.PLAYING)
                # PLAYING: copy up to the end of this response.
                end = self._end_marks[0] if self._end_marks else None
                available = buffered
                if end is not None:  # (an overflow may have dropped past it)
                    available = max(0, end - self._read)
                else:  # how close this pull came to running dry
                    slack = buffered - (n - filled)
                    if self._slack is None or slack < self._slack:
                        self._slack = slack
                take = min(n - filled, available)
                start = self._read % cap
                first = min(take, cap - start)
                out[filled : filled + first] = self._ring[start : start + first]
                out[filled + first : filled + take] = self._ring[: take - first]
                filled += take
                self._read += take
                if end is not None and self._read >= end:
                    events.append(PlaybackEnded(at=self._clock(), flushed=False))
                    self._end_marks.popleft()
                    self._adapt_prefill()
                    self._goto(P.IDLE)
                    if self._written > self._read:  # the next response is already here
                        self._goto(P.PREFILLING)
                    continue
                if filled < n:
                    self.stats.underruns += 1
                    self._underran = True
                    self._goto(P.STARVED)
                break
            if self._state is P.STARVED:
                self.stats.underrun_samples += n - filled
            self.stats.played_samples += filled
            if n:
                out[filled:] = 0
                cued = self._mix_cue(out) if self._cue is not None else 0
                if self.gain != 1.0 and (filled or cued):
                    np.multiply(out, self.gain, out=out, casting="unsafe")
                # an all-silent block (most pulls while idle) needs no measuring
                self._last_block_dbfs = pcm_dbfs(out) if filled or cued else SILENCE_DBFS
                filled = max(filled, cued)
        if self.on_pulled is not None:
            self.on_pulled(out)
        for event in events:
            self._emit(event)
        return filled

    def skip_if_idle(self) -> bool:
        """For a sound card's callback: True when a pull now would give nothing but
        silence and change nothing (no response, not even prefilling; no cue; no
        ``on_pulled`` to feed), counting the block as a silent one; the caller then
        outputs silence without pulling. False: :meth:`pull_into` as usual.

        Read without the lock: a push racing with it is either seen (False) or taken by
        the next pull, as it would be if this pull had come first. Most of a device's
        output blocks are silence between replies (issue 15): they cost a check, no
        samples copied, no level measured."""
        if self._state is P.IDLE and self._cue is None and self.on_pulled is None:
            self._last_block_dbfs = SILENCE_DBFS
            return True
        return False

    def pull(self, n_samples: int) -> bytes:
        """:meth:`pull_into` a new block of ``n_samples``, as s16le bytes."""
        out = np.empty(n_samples, dtype=np.int16)
        self.pull_into(out)
        return out.tobytes()

    # -- observation ------------------------------------------------------------------

    @property
    def state(self) -> PlaybackState:
        return self._state

    @property
    def playing(self) -> bool:
        """Between PlaybackStarted and PlaybackEnded (including while starved)."""
        return self._state in (P.PLAYING, P.STARVED)

    @property
    def buffered_samples(self) -> int:
        return self._written - self._read

    @property
    def buffered_ms(self) -> float:
        return 1000.0 * self.buffered_samples / self.rate_hz

    @property
    def last_block_dbfs(self) -> float:
        """RMS level of the last block pulled (silence included), dBFS: what the
        speaker is emitting now, for estimating how much of it reaches the mic."""
        return self._last_block_dbfs

    def playable_samples(self) -> int:
        """How many samples a pull would deliver as real audio right now: 0 while a
        response is still prefilling (a cue being mixed in counts). For consumers that
        are not real-time devices."""
        with self._lock:
            buffered = self._written - self._read
            cue_left = len(self._cue) - self._cue_pos if self._cue is not None else 0
            if self._state is P.IDLE:
                return cue_left
            if (
                self._state is not P.PLAYING
                and buffered < self.prefill_samples
                and not self._end_marks
            ):
                return cue_left
            return max(buffered, cue_left)

    # -- internals --------------------------------------------------------------------

    def _cut_cue(self, at: int) -> None:
        """A response starts at sample ``at`` of this pull: fade the cue out there
        (the fade is what is left of it; ``_mix_cue`` plays it)."""
        cue = self._cue
        assert cue is not None
        start = self._cue_pos + at  # where the cue will be when the response starts
        fade = cue[start : start + self._cue_fade].astype(np.float64)
        fade *= np.linspace(1.0, 0.0, len(fade), endpoint=False)
        self._cue = np.concatenate([cue[self._cue_pos : start], fade.astype(np.int16)])
        self._cue_pos = 0

    def _mix_cue(self, out: Int16Array) -> int:
        """Add the cue's next samples to ``out`` (saturating); how many were mixed."""
        cue = self._cue
        assert cue is not None
        take = min(len(out), len(cue) - self._cue_pos)
        if len(self._mix) < take:
            self._mix = np.zeros(take, dtype=np.int32)
        mix = self._mix[:take]
        np.add(out[:take], cue[self._cue_pos : self._cue_pos + take], out=mix, dtype=np.int32)
        np.clip(mix, -32768, 32767, out=mix)
        out[:take] = mix
        self._cue_pos += take
        if self._cue_pos >= len(cue):
            self._cue, self._cue_pos = None, 0
        return take

    def _adapt_prefill(self) -> None:
        """A response drained: set the next one's prefill from how this one went."""
        current = self.prefill_samples
        if self._underran:
            new = self.prefill_max_samples
        elif self._slack is None:
            return
        else:
            # it needed what it started with less what it never touched, plus a margin
            new = max(current, self._started_with) - self._slack + self._prefill_margin
            new = max(new, current - self._prefill_step)
        new = min(max(new, self.prefill_min_samples), self.prefill_max_samples)
        self._slack, self._underran = None, False
        if new != current:
            logger.debug("playback: prefill %d -> %d samples", current, new)
        self.prefill_samples = self.stats.prefill_samples = new

    def _goto(self, new: PlaybackState) -> None:
        if new not in TRANSITIONS[self._state]:
            raise IllegalTransitionError(
                f"playback buffer: illegal transition {self._state.name} -> {new.name}"
            )
        logger.debug("playback: %s -> %s", self._state.name, new.name)
        self._state = new

    def _emit(self, event: PlaybackEvent) -> None:
        logger.debug("playback: %s", event)
        if self.on_event is not None:
            self.on_event(event)

    def _notify_data(self) -> None:
        if self.on_data is not None:
            self.on_data()
