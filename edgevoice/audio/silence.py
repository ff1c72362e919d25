"""The silence detector: decides, frame by frame, where an utterance starts and ends.

A pure core: it is fed 20 ms frames of 16 kHz s16le PCM and answers with a
:class:`FrameDecision` (send this frame or not, and maybe an event). It never reads a
clock or touches a device; time is counted in frames.

How it decides:

* the level of each frame is its RMS in dBFS (0 dBFS = a full-scale square wave, so a
  full-scale sine reads -3 dBFS; digital silence reads :data:`SILENCE_DBFS`), measured
  by :mod:`edgevoice.audio.level`;
* an adaptive noise floor follows the level while nobody speaks: quickly down, slowly
  up, and not at all from the first loud frame until the utterance has ended. During a
  short warm-up the floor is just the average level and no utterance can start, so a
  steady noise present from the start becomes the floor instead of a false turn;
* hysteresis: an utterance starts only after ``onset_ms`` of frames louder than the
  floor by ``onset_db`` (and louder than ``min_speech_dbfs``, and louder than a known
  interfering level by ``echo_margin_db`` when one is given), and it ends only after
  ``hangover_ms`` of frames quieter than the lower ``release_db`` threshold;
* pre-roll: the frames before the onset are kept in a small ring so that when speech
  is confirmed the first syllable can still be sent.

:class:`IdleGate` is what a capture thread may ask while the detector is QUIET: could
this block start an utterance? If not, its frames can wait (batched) before the
detector sees them: they change nothing but the floor and the pre-roll ring, and
they still reach the detector, all of them, in order.

States and their legal transitions are listed once, in :data:`TRANSITIONS`.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
from dataclasses import dataclass

from edgevoice.audio.base import CAPTURE_FRAME_BYTES, FRAME_MS
from edgevoice.audio.level import SILENCE_DBFS as SILENCE_DBFS  # re-exported (doctor)
from edgevoice.audio.level import pcm_dbfs
from edgevoice.config.base import require
from edgevoice.errors import IllegalTransitionError

logger = logging.getLogger(__name__)

_FULL_SCALE_SQUARED = 32768.0 * 32768.0


@dataclass(frozen=True)
class SilenceSettings:
    """Thresholds and timings of the energy-based silence detector."""

    onset_db: float = 10.0
    """How far (dB) above the noise floor a frame must be to count towards a start."""

    release_db: float = 5.0
    """How far (dB) above the noise floor a frame must be to keep an utterance going.
    Lower than ``onset_db``: the gap is the hysteresis that stops flapping."""

    min_speech_dbfs: float = -55.0
    """Absolute level (dBFS) below which nothing is speech, however quiet the room."""

    onset_ms: int = 60
    """How long the level must stay above the onset threshold before speech is
    confirmed (rounded up to whole 20 ms frames)."""

    hangover_ms: int = 600
    """How long the level must stay below the release threshold before speech is
    declared ended. These frames are still sent, so word endings are not cut."""

    preroll_ms: int = 400
    """Audio kept from before the onset and sent when speech is confirmed, so the
    first syllable is never clipped."""

    noise_floor_init_dbfs: float = -60.0
    """Noise floor assumed before the first frame (and after ``reset``)."""

    floor_fall_tau_ms: float = 100.0
    """Time constant with which the floor follows a quieter level (fast)."""

    floor_rise_tau_ms: float = 4000.0
    """Time constant with which the floor follows a louder level while nobody speaks
    (slow, so the start of a word does not raise it)."""

    warmup_ms: int = 200
    """After start or ``reset``: the floor is the average level and no utterance can
    start, so a noise present from the beginning is learnt, not taken for speech."""

    echo_margin_db: float = 10.0
    """When the level of a known interference (our own playback leaking into the mic)
    is given, speech must be this much (dB) louder than it to start."""

    max_speech_ms: int | None = 60_000
    """End an utterance that lasts longer than this and take its level as the new noise
    floor: a loud steady noise that appeared mid-session must not hold the turn open
    forever. ``None`` disables the limit."""

    def __post_init__(self) -> None:
        require(0.0 < self.onset_db <= 60.0, "onset_db", "must be in (0, 60] dB")
        require(
            0.0 <= self.release_db < self.onset_db,
            "release_db",
            "must be >= 0 and lower than onset_db (that gap is the hysteresis)",
        )
        require(
            SILENCE_DBFS <= self.min_speech_dbfs <= 0.0,
            "min_speech_dbfs",
            f"must be in [{SILENCE_DBFS:g}, 0] dBFS",
        )
        require(self.onset_ms >= 0, "onset_ms", "must be >= 0")
        require(self.hangover_ms >= 0, "hangover_ms", "must be >= 0")
        require(
            300 <= self.preroll_ms <= 5000,
            "preroll_ms",
            "must be in [300, 5000] ms (less would clip the first syllable)",
        )
        require(
            SILENCE_DBFS <= self.noise_floor_init_dbfs <= 0.0,
            "noise_floor_init_dbfs",
            f"must be in [{SILENCE_DBFS:g}, 0] dBFS",
        )
        require(self.floor_fall_tau_ms > 0.0, "floor_fall_tau_ms", "must be > 0")
        require(
            self.floor_rise_tau_ms >= self.floor_fall_tau_ms,
            "floor_rise_tau_ms",
            "must be >= floor_fall_tau_ms (the floor rises slowly and falls fast)",
        )
        require(self.warmup_ms >= 0, "warmup_ms", "must be >= 0")
        require(self.echo_margin_db >= 0.0, "echo_margin_db", "must be >= 0 dB")
        require(
            self.max_speech_ms is None or self.max_speech_ms >= 1000,
            "max_speech_ms",
            "must be >= 1000 ms, or null for no limit",
        )


class SpeechState(enum.Enum):
    """Where the detector is in an utterance."""

    QUIET = "quiet"
    """Nobody speaks; frames go to the pre-roll ring, the floor adapts."""
    STARTING = "starting"
    """Loud enough for an onset, not yet for long enough."""
    SPEAKING = "speaking"
    """Speech confirmed; frames are sent."""
    STOPPING = "stopping"
    """Quiet since less than the hangover; frames are still sent."""


S = SpeechState

#: Every legal transition. Anything else is a bug in this module and raises.
TRANSITIONS: dict[SpeechState, frozenset[SpeechState]] = {
    S.QUIET: frozenset({S.STARTING}),
    # back to QUIET: a short burst (a click, a cough) that did not last onset_ms
    S.STARTING: frozenset({S.QUIET, S.SPEAKING}),
    # to QUIET directly only when max_speech_ms forces an end
    S.SPEAKING: frozenset({S.STOPPING, S.QUIET}),
    S.STOPPING: frozenset({S.SPEAKING, S.QUIET}),
}


@dataclass(frozen=True)
class SpeechStarted:
    """Speech was confirmed on this frame.

    ``preroll`` holds the frames that came before this one, oldest first: about
    ``preroll_ms`` of audio from before the onset followed by the frames that
    confirmed it. Send them, then this frame.
    """

    preroll: tuple[bytes, ...]
    onset_frames: int = 1
    """How many of the last ``preroll`` frames, plus this frame, were above the onset
    threshold: the onset was ``onset_frames`` frames ago, counting this one."""


@dataclass(frozen=True)
class SpeechEnded:
    """The hangover expired (or ``max_speech_ms`` was reached) on this frame."""

    forced: bool = False
    """True when the utterance was cut by ``max_speech_ms`` rather than silence."""


SilenceEvent = SpeechStarted | SpeechEnded


@dataclass(frozen=True)
class FrameDecision:
    """What to do with one frame."""

    send: bool
    """Whether this frame belongs to the utterance (speech or hangover)."""
    event: SilenceEvent | None = None


_DROP = FrameDecision(send=False)
_SEND = FrameDecision(send=True)


def _frames(ms: float) -> int:
    return math.ceil(ms / FRAME_MS)


class IdleGate:
    """Whether a captured block may start an utterance, asked from the capture thread.

    While the detector is QUIET and past its warm-up, a frame can only move it (to
    STARTING) if its level reaches the onset threshold, and that threshold can only
    fall as low as ``onset_db`` above the lowest of the floor and the levels the
    detector will see before it (the floor follows quieter frames down), and never
    below ``min_speech_dbfs``. :meth:`may_start` answers with that bound, less
    ``margin_db`` (the cleaned frame an echo canceller passes by is the raw one shifted
    by a few ms, whose level may differ by up to 3 dB; a device's block at another
    rate differs a little from the 16 kHz frames made of it). A wrong "no" cannot lose
    or cut anything: the frame still reaches the detector, only later (at the next
    batch); a wrong "yes" only costs a wake-up.

    An audio trigger may listen closer to the floor than the detector's onset: the wake
    word's quiet gate (triggers/quietgate.py) runs its models on frames ``margin_db``
    above the same floor. :meth:`arm` then takes that margin as ``listen_margin_db``, and
    a block with a frame that reaches it (less this gate's ``margin_db``, over the same
    lowest floor) is let through at once too: a trigger's models never start late.

    The event loop arms it (:meth:`arm`, with the current floor) after each frame while
    batching is safe and disarms it otherwise; the capture thread reads it. Plain
    float and bool attributes: a read racing a write sees the old or the new value,
    and either is a fine answer for one block.
    """

    __slots__ = (
        "_batch_min",
        "_floor",
        "_listen_factor",
        "_min_speech",
        "_onset_factor",
        "armed",
        "floor_dbfs",
        "listen_margin_db",
        "margin_db",
        "min_speech_dbfs",
        "onset_db",
    )

    def __init__(self, settings: SilenceSettings, margin_db: float = 3.5) -> None:
        self.onset_db = settings.onset_db
        self.min_speech_dbfs = settings.min_speech_dbfs
        self.margin_db = margin_db
        self.armed = False
        self.floor_dbfs = settings.noise_floor_init_dbfs
        # The capture thread compares mean squares (relative to full scale), not dB:
        # no logarithm per frame on the audio thread.
        self._onset_factor = _power(settings.onset_db - margin_db)
        self._min_speech = _power(settings.min_speech_dbfs - margin_db)
        self._floor = _power(self.floor_dbfs)
        # a trigger listens this far above the floor (None: none closer than the onset)
        self.listen_margin_db: float | None = None
        self._listen_factor: float | None = None
        # lowest frame mean square since the batch began (capture thread only)
        self._batch_min = math.inf

    def arm(self, floor_dbfs: float, listen_margin_db: float | None = None) -> None:
        """Batching is safe now (the detector is QUIET); ``floor_dbfs`` is its floor.
        ``listen_margin_db``: an audio trigger needs at once any frame this far above
        that floor (None: no trigger listens below the detector's onset)."""
        if floor_dbfs != self.floor_dbfs:
            self.floor_dbfs = floor_dbfs
            self._floor = _power(floor_dbfs)
        if listen_margin_db != self.listen_margin_db:
            # (set before ``armed``: a block never sees the gate armed without it)
            self._listen_factor = (None if listen_margin_db is None
                                   else _power(listen_margin_db - self.margin_db))
            self.listen_margin_db = listen_margin_db
        self.armed = True

    def disarm(self) -> None:
        self.armed = False

    def batch_began(self) -> None:
        """The frames held so far were handed to the detector (capture thread)."""
        self._batch_min = math.inf

    def may_start(self, block: bytes, frames: int) -> bool:
        """Whether any of the ``frames`` frames of ``block`` (s16le, any channel count)
        could start an utterance or reach a listening trigger (``listen_margin_db``);
        True whenever the gate is not armed.

        Runs on PortAudio's thread once per block, where every cache is cold: numpy
        costs ~150 us a block there (measured on the virtual card, thread CPU time),
        ``math.hypot`` over each frame's samples about half that."""
        if not self.armed:
            return True
        samples = memoryview(block).cast("h")
        step = len(samples) // frames
        if step == 0:
            return True
        per_frame = step * _FULL_SCALE_SQUARED
        lowest, floor = self._batch_min, self._floor
        onset_factor, min_speech = self._onset_factor, self._min_speech
        listen_factor = self._listen_factor
        for start in range(0, step * frames, step):
            root = math.hypot(*samples[start:start + step])  # sqrt of the sum of squares
            mean_square = root * root / per_frame
            if mean_square < lowest:
                lowest = mean_square
            base = floor if floor < lowest else lowest
            if base < _SILENCE_POWER:  # levels are floored there (to_dbfs)
                base = _SILENCE_POWER
            threshold = base * onset_factor
            if threshold < min_speech:
                threshold = min_speech
            if listen_factor is not None and base * listen_factor < threshold:
                threshold = base * listen_factor
            if mean_square >= threshold:
                self._batch_min = lowest
                return True
        self._batch_min = lowest
        return False


def _power(dbfs: float) -> float:
    """A level in dB as a power ratio (a mean square relative to full scale)."""
    return math.pow(10.0, dbfs / 10.0)


_SILENCE_POWER = _power(SILENCE_DBFS)


class SilenceDetector:
    """The hysteresis state machine over frame levels. Not thread-safe."""

    def __init__(self, settings: SilenceSettings | None = None) -> None:
        self.settings = s = settings if settings is not None else SilenceSettings()
        self._onset_frames = max(1, _frames(s.onset_ms))
        self._hangover_frames = _frames(s.hangover_ms)
        self._warmup_frames = _frames(s.warmup_ms)
        self._max_speech_frames = None if s.max_speech_ms is None else _frames(s.max_speech_ms)
        self._fall = 1.0 - math.exp(-FRAME_MS / s.floor_fall_tau_ms)
        self._rise = 1.0 - math.exp(-FRAME_MS / s.floor_rise_tau_ms)
        # The ring holds the pre-roll plus the frames of an onset still being confirmed.
        self._ring: collections.deque[bytes] = collections.deque(
            maxlen=_frames(s.preroll_ms) + self._onset_frames
        )
        self._state = S.QUIET
        self.level_dbfs = SILENCE_DBFS
        """Level of the last frame, RMS dBFS."""
        self.noise_floor_dbfs = s.noise_floor_init_dbfs
        """Current estimate of the background level, dBFS."""
        self._seen = 0  # frames since start/reset, for the warm-up
        self._run = 0  # frames in the current STARTING / STOPPING stretch
        self._speech_frames = 0  # frames since SPEAKING began, for max_speech_ms

    @property
    def state(self) -> SpeechState:
        return self._state

    @property
    def settled_quiet(self) -> bool:
        """QUIET and past the warm-up: only a frame at the onset threshold changes more
        than the floor and the pre-roll ring (what :class:`IdleGate` relies on)."""
        return self._state is S.QUIET and self._seen > self._warmup_frames

    @property
    def hangover_frames(self) -> int:
        """Quiet frames that end an utterance (``hangover_ms``)."""
        return self._hangover_frames

    @property
    def quiet_run_frames(self) -> int:
        """Quiet frames so far in an utterance's hangover (0 unless STOPPING): the
        utterance ends when this reaches :attr:`hangover_frames`, unless speech
        resumes first."""
        return self._run if self._state is S.STOPPING else 0

    def reset(self) -> None:
        """Forget everything: back to QUIET, initial floor, warm-up, empty pre-roll."""
        if self._state is not S.QUIET:
            logger.debug("silence: reset from %s", self._state.name)
        self._state = S.QUIET
        self._ring.clear()
        self.level_dbfs = SILENCE_DBFS
        self.noise_floor_dbfs = self.settings.noise_floor_init_dbfs
        self._seen = 0
        self._run = 0
        self._speech_frames = 0

    def onset_threshold_dbfs(self, reference_dbfs: float | None = None) -> float:
        """The level a frame must reach to count towards a start, right now."""
        s = self.settings
        threshold = max(self.noise_floor_dbfs + s.onset_db, s.min_speech_dbfs)
        if reference_dbfs is not None:
            threshold = max(threshold, reference_dbfs + s.echo_margin_db)
        return threshold

    def release_threshold_dbfs(self) -> float:
        """The level below which a frame counts towards the end of an utterance."""
        s = self.settings
        return max(self.noise_floor_dbfs + s.release_db, s.min_speech_dbfs)

    def process(self, frame: bytes, reference_dbfs: float | None = None) -> FrameDecision:
        """Classify one 640-byte frame.

        ``reference_dbfs`` is the level of a known interference present in this frame
        (our own playback as heard by the mic); an onset must beat it by
        ``echo_margin_db``. It does not affect the end of an utterance.
        """
        if len(frame) != CAPTURE_FRAME_BYTES:
            raise ValueError(
                f"silence detector needs {CAPTURE_FRAME_BYTES}-byte frames, got {len(frame)}"
            )
        level = self.level_dbfs = pcm_dbfs(frame)
        self._seen += 1
        state = self._state

        if state is S.QUIET:
            if self._seen <= self._warmup_frames:
                # Running mean: after the warm-up the floor is the average level.
                self.noise_floor_dbfs += (level - self.noise_floor_dbfs) / self._seen
            elif level >= self.onset_threshold_dbfs(reference_dbfs):
                self._goto(S.STARTING)
                self._run = 1
                if self._run >= self._onset_frames:
                    return self._start(frame)
            else:
                rate = self._fall if level < self.noise_floor_dbfs else self._rise
                self.noise_floor_dbfs += (level - self.noise_floor_dbfs) * rate
            self._ring.append(frame)
            return _DROP

        if state is S.STARTING:
            if level < self.onset_threshold_dbfs(reference_dbfs):
                self._goto(S.QUIET)
                self._ring.append(frame)
                return _DROP
            self._run += 1
            if self._run >= self._onset_frames:
                return self._start(frame)
            self._ring.append(frame)
            return _DROP

        self._speech_frames += 1
        if self._max_speech_frames is not None and self._speech_frames >= self._max_speech_frames:
            logger.info(
                "silence: utterance reached max_speech_ms=%s; taking %.1f dBFS as the floor",
                self.settings.max_speech_ms,
                level,
            )
            self.noise_floor_dbfs = level
            self._goto(S.QUIET)
            return FrameDecision(send=True, event=SpeechEnded(forced=True))

        loud = level >= self.release_threshold_dbfs()
        if state is S.SPEAKING:
            if not loud:
                self._goto(S.STOPPING)
                self._run = 1
                if self._run >= self._hangover_frames:
                    return self._end()
            return _SEND

        # STOPPING
        if loud:
            self._goto(S.SPEAKING)
            return _SEND
        self._run += 1
        if self._run >= self._hangover_frames:
            return self._end()
        return _SEND

    def _start(self, frame: bytes) -> FrameDecision:
        self._goto(S.SPEAKING)
        preroll = tuple(self._ring)
        self._ring.clear()
        self._speech_frames = 0
        return FrameDecision(
            send=True, event=SpeechStarted(preroll=preroll, onset_frames=self._run)
        )

    def _end(self) -> FrameDecision:
        self._goto(S.QUIET)
        return FrameDecision(send=True, event=SpeechEnded())

    def _goto(self, new: SpeechState) -> None:
        if new not in TRANSITIONS[self._state]:
            raise IllegalTransitionError(
                f"silence detector: illegal transition {self._state.name} -> {new.name}"
            )
        logger.debug(
            "silence: %s -> %s (level %.1f dBFS, floor %.1f dBFS)",
            self._state.name,
            new.name,
            self.level_dbfs,
            self.noise_floor_dbfs,
        )
        self._state = new
