"""Echo-safe barge-in by voice, without acoustic echo cancellation.

A device without echo cancellation hears its own reply through the air. It must not
take that for the user talking over the reply, yet it should notice a real user
quickly. The approach here is level-based and needs no DSP beyond an RMS per block:

* :class:`EchoGuard` is told the level (RMS dBFS) of every block the device *plays*
  and of every frame it *captures*. It learns the speaker-to-microphone coupling
  (how many dB quieter the echo is than the playback) and predicts, for any instant,
  the echo level the microphone should hear: :meth:`EchoGuard.reference_dbfs`. The
  capture path lags the playback path by tens of milliseconds (buffers, converters,
  the air), so the prediction uses the *loudest* playback block of the last
  ``max_delay_ms`` rather than trying to align blocks. It learns only while the
  playback is loud enough to be heard, has had time to reach the microphone, and the
  microphone is not clearly louder than the prediction (that would be the user
  talking: learning from double talk would teach it to ignore the user). It starts
  from a deliberately pessimistic coupling (``prior_coupling_db``) and then uses a
  high percentile of the last few seconds of observations, the top of the echo's range.
* :class:`BargeInDetector` asks, while the device is SPEAKING, whether the
  microphone has been louder than the predicted echo by ``margin_db`` (and louder than
  ``min_level_dbfs``) for ``min_speech_ms`` worth of frames (short dips allowed), or
  far louder for half that, and if so returns ``InterruptRequested("voice")`` once per
  reply.
* :class:`VoiceBargeInTrigger` packages both as an
  :class:`~edgevoice.triggers.base.AudioTrigger` over raw frames.

The silence detector uses the same prediction: pass ``reference_dbfs(now)`` as its
``reference_dbfs`` so an utterance can only start when speech rises above the echo.

Levels follow the convention of ``edgevoice.audio.level`` (shared with the silence
detector, which measures each captured frame once for both): RMS relative to full
scale (a full-scale sine reads -3 dBFS), digital silence reads -100 dBFS.
"""

from __future__ import annotations

import bisect
import collections
import logging
from dataclasses import dataclass

from edgevoice.audio.base import FRAME_MS
from edgevoice.audio.level import SILENCE_DBFS as SILENCE_DBFS  # the levels' floor
from edgevoice.audio.level import pcm_dbfs as pcm_dbfs  # one level for every consumer
from edgevoice.clock import Clock, MonotonicClock
from edgevoice.config.base import require
from edgevoice.feedback.states import DeviceState
from edgevoice.triggers.base import Emit, InterruptRequested, TriggerEvent

logger = logging.getLogger(__name__)

SOURCE = "voice"

#: Playback quieter than this is treated as "nothing is playing".
_AUDIBLE_PLAYBACK_DBFS = -80.0
#: Coupling estimates are kept inside this range (dB): a small enclosure can make the
#: echo louder than the playback (positive dB), nothing real is below -70 dB.
_COUPLING_RANGE_DB = (-70.0, 12.0)
#: Playback blocks whose echo has decayed by this much (dB) no longer matter.
_FORGET_BELOW_DB = 40.0


@dataclass(frozen=True)
class BargeInSettings:
    """Interrupting the reply by talking over it, made safe against the device's own echo."""

    enabled: bool = True
    """Let the user interrupt a reply by speaking (the button always can)."""

    margin_db: float = 8.0
    """How far (dB) the microphone must rise above the predicted echo to count as the
    user talking. Lower reacts to quieter voices and risks self-interruption."""

    min_speech_ms: int = 100
    """How long (ms, whole 20 ms frames) the user must be above the echo before the
    reply is interrupted. Coughs and clicks are shorter."""

    min_level_dbfs: float = -45.0
    """The microphone must also be at least this loud (dBFS), whatever the echo."""

    prior_coupling_db: float = -6.0
    """Speaker-to-microphone coupling assumed before anything was learnt (dB, echo
    level minus playback level). Pessimistic on purpose: too high only delays
    barge-in until it is learnt; too low would let the device interrupt itself."""

    max_delay_ms: int = 120
    """Longest delay (ms) between playing a block and hearing it in the microphone
    (output buffer + input buffer + the air). The prediction covers this window."""

    reverb_rt60_ms: int = 400
    """The shortest the room is assumed to keep ringing after a sound stops (ms, time
    to fall by 60 dB). A room that rings longer (tiled or empty rooms, up to 1000 ms)
    is measured from the decay heard in the pauses of the reply, so this only needs
    raising to make the first second of the first reply safe in such a room."""

    learn_min_playback_dbfs: float = -40.0
    """The coupling is learnt only while the playback is at least this loud (dBFS);
    quieter playback drowns in the room noise and says nothing about the coupling."""

    def __post_init__(self) -> None:
        require(0.0 < self.margin_db <= 40.0, "margin_db", "must be in (0, 40] dB")
        require(
            FRAME_MS <= self.min_speech_ms <= 2000,
            "min_speech_ms",
            f"must be in [{FRAME_MS}, 2000] ms",
        )
        require(-90.0 <= self.min_level_dbfs <= 0.0, "min_level_dbfs", "must be in [-90, 0] dBFS")
        lo, hi = _COUPLING_RANGE_DB
        require(
            lo <= self.prior_coupling_db <= hi,
            "prior_coupling_db",
            f"must be in [{lo:g}, {hi:g}] dB",
        )
        require(0 <= self.max_delay_ms <= 1000, "max_delay_ms", "must be in [0, 1000] ms")
        require(50 <= self.reverb_rt60_ms <= 3000, "reverb_rt60_ms", "must be in [50, 3000] ms")
        require(
            -80.0 <= self.learn_min_playback_dbfs <= 0.0,
            "learn_min_playback_dbfs",
            "must be in [-80, 0] dBFS",
        )


# The coupling is a high percentile of (microphone - playback) over the last few
# seconds of frames that heard our playback: the top of the echo's range, so echo
# rarely exceeds the prediction, yet robust to outliers in both directions -- a few
# silent frames (a pause the playback history does not show) cannot pull it down, and
# the first syllables of a user too quiet to count as double talk cannot push it up,
# because they are a few percent of the history. Only minutes of quiet double talk
# could, and that errs on the safe side (fewer barge-ins).
_HISTORY_FRAMES = 200  # 4 s of frames that heard loud playback
_MIN_HISTORY_FRAMES = 25  # 0.5 s: until then the prior applies
_PERCENTILE = 0.8
#: Quiet frames tolerated among the ``min_speech_ms`` of loud ones.
_DIP_FRAMES = 3
#: A frame this far (dB) above the barge-in threshold is "strong": half of
#: ``min_speech_ms`` of strong frames is enough.
_STRONG_DB = 6.0
_STRONG = 2
#: Frames of playback an echo canceller needs before its output alone is trusted
#: (WebRTC AEC3 converges within about 2 s of speech; 3 s leaves margin).
_AEC_WARMUP_FRAMES = 150
# The room's decay is measured in the pauses of the playback: each frame heard after
# the last audible block left the direct window tells the slowest decay (dB/s) that
# keeps the prediction at or above it. A low percentile of the recent ones is the
# room's decay as the microphone hears it (the tail of a synthetic or real room
# fluctuates around its exponential envelope: the slow side of it is what matters).
_DECAY_HISTORY_FRAMES = 500
_DECAY_MIN_FRAMES = 3
_DECAY_PERCENTILE = 0.1
#: Longest ring (ms) the measurement may conclude: beyond it the frame is not echo.
_MAX_RT60_MS = 3000


class _SortedWindow:
    """The last ``size`` values, in arrival order and sorted (for a running percentile
    without sorting per frame)."""

    __slots__ = ("_arrived", "_size", "ordered")

    def __init__(self, size: int) -> None:
        self._size = size
        self._arrived: collections.deque[float] = collections.deque()
        #: the values, sorted
        self.ordered: list[float] = []

    def __len__(self) -> int:
        return len(self._arrived)

    def add(self, value: float) -> None:
        self._arrived.append(value)
        bisect.insort(self.ordered, value)
        if len(self._arrived) > self._size:
            del self.ordered[bisect.bisect_left(self.ordered, self._arrived.popleft())]

    def clear(self) -> None:
        self._arrived.clear()
        self.ordered.clear()


def _at_fraction(ordered: list[float], fraction: float) -> float:
    """The value ``fraction`` of the way up a non-empty sorted list."""
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class EchoGuard:
    """Predicts the level of the device's own playback in the microphone.

    Pure: time comes in as ``now`` (monotonic seconds). Call
    :meth:`on_playback_block` for every block handed to the sound card (when it is
    handed over, including earcons) and :meth:`on_capture_frame` for every captured
    frame, both from the event loop's thread.

    The *effective playback level* at ``now`` is the loudest recent block, where a
    block older than ``max_delay_ms`` counts as quieter by the room's decay: the echo of
    a loud syllable rings on after it, and a prediction that dropped at once would take
    that ringing for the user. The decay is 60 dB per ``reverb_rt60_ms`` or slower:
    as slow as measured in the pauses of the playback (:meth:`_learn_decay`), so a room
    that rings longer than configured is followed without anyone setting it.
    """

    def __init__(self, settings: BargeInSettings | None = None) -> None:
        self.settings = settings or BargeInSettings()
        s = self.settings
        # A block reported at t sounds during [t, t + block): the window spans the delay
        # plus one block before the room's decay applies.
        self._direct_s = (s.max_delay_ms + FRAME_MS) / 1000.0
        self._prior_decay_db_per_s = 60.0 / (s.reverb_rt60_ms / 1000.0)
        self._decay_db_per_s = self._prior_decay_db_per_s
        # measured decay rates (dB/s) of the last pauses
        self._decays = _SortedWindow(_DECAY_HISTORY_FRAMES)
        self._pause_decays: list[float] = []  # measured in the pause in progress
        self._playback: collections.deque[tuple[float, float]] = collections.deque()
        # playback_dbfs's last answer, and what it depended on
        self._memo_key: tuple[float, float, int, tuple[float, float], tuple[float, float]] | None \
            = None
        self._memo: float | None = None
        # (microphone - playback) of the frames learnt from
        self._observed = _SortedWindow(_HISTORY_FRAMES)
        self._coupling_db = s.prior_coupling_db
        #: capture frames the coupling was learnt from
        self.learnt_frames = 0

    @property
    def coupling_db(self) -> float:
        """Current estimate of echo level minus playback level (dB)."""
        return self._coupling_db

    @property
    def reverb_rt60_ms(self) -> float:
        """Current estimate of the room's ring (ms to fall by 60 dB): the measured
        decay where it is slower than ``reverb_rt60_ms``, else that setting."""
        return 60_000.0 / self._decay_db_per_s

    def reset(self) -> None:
        """Forget the playback history and return to the prior coupling and decay."""
        self._playback.clear()
        self._observed.clear()
        self._decays.clear()
        self._pause_decays.clear()
        self._coupling_db = self.settings.prior_coupling_db
        self._decay_db_per_s = self._prior_decay_db_per_s
        self.learnt_frames = 0

    def on_playback_block(self, dbfs: float, now: float) -> None:
        """The device started playing a block whose level is ``dbfs``."""
        if dbfs > _AUDIBLE_PLAYBACK_DBFS:
            self._playback.append((now, dbfs))
        self._prune(now)

    def playback_dbfs(self, now: float) -> float | None:
        """Effective playback level now (dBFS), or None when nothing audible played."""
        self._prune(now)
        playback = self._playback
        if not playback:
            return None
        # asked several times per captured frame (silence detector, barge-in threshold,
        # learning): the history is walked once per frame
        key = (now, self._decay_db_per_s, len(playback), playback[0], playback[-1])
        if key == self._memo_key:
            return self._memo
        direct_from = now - self._direct_s
        decay = self._decay_db_per_s
        level = max(
            dbfs if played_at >= direct_from else dbfs - decay * (direct_from - played_at)
            for played_at, dbfs in playback
        )
        self._memo_key = key
        self._memo = level if level > _AUDIBLE_PLAYBACK_DBFS else None
        return self._memo

    def tail_dbfs(self, now: float) -> float | None:
        """The part of :meth:`reference_dbfs` that is room tail: the decayed echo of the
        blocks played before the direct window (None when there is none)."""
        direct_from = now - self._direct_s
        decay = self._decay_db_per_s
        levels = [dbfs - decay * (direct_from - played_at)
                  for played_at, dbfs in self._playback if played_at < direct_from]
        if not levels or max(levels) <= _AUDIBLE_PLAYBACK_DBFS:
            return None
        return max(levels) + self._coupling_db

    def playing_directly(self, now: float) -> bool:
        """Whether an audible block is within ``max_delay_ms`` (not just its ringing)."""
        direct_from = now - self._direct_s
        return any(played_at >= direct_from for played_at, _ in self._playback)

    def reference_dbfs(self, now: float) -> float | None:
        """The echo level the microphone may hear now (dBFS), or None if nothing plays."""
        played = self.playback_dbfs(now)
        if played is None:
            return None
        return played + self._coupling_db

    def on_capture_frame(self, dbfs: float, now: float, *, learn: bool = True) -> None:
        """A frame of level ``dbfs`` was captured; learn the coupling if it is echo.

        ``learn=False`` (used while barge-in suspects the user is talking) skips learning
        the coupling; the room's decay is measured either way (see :meth:`_learn_decay`).
        """
        self._learn_decay(dbfs, now)
        if not learn:
            return
        played = self.playback_dbfs(now)
        if played is None or played < self.settings.learn_min_playback_dbfs:
            return
        if not self._echo_has_arrived(now):
            # Playback (re)started less than max_delay_ms ago: the microphone may not hear
            # it yet, and learning from that silence would teach a far too low coupling.
            return
        observed = dbfs - played
        if observed > self._coupling_db + self.settings.margin_db:
            return  # louder than any echo could be: the user is talking (double talk)
        self._observed.add(observed)
        self.learnt_frames += 1
        if len(self._observed) >= _MIN_HISTORY_FRAMES:
            top = _at_fraction(self._observed.ordered, _PERCENTILE)
            lo, hi = _COUPLING_RANGE_DB
            self._coupling_db = min(hi, max(lo, top))

    def _learn_decay(self, dbfs: float, now: float) -> None:
        """Measure how fast the room's echo dies away, from a frame heard in a pause.

        Only frames with no audible block inside the direct window count (the direct
        echo would hide the tail), and only those loud enough to matter for barge-in
        (``min_level_dbfs``; quieter ones are mostly room noise). For each block
        played before the window, the decay rate that would make its echo predict
        exactly this frame is (its echo level - frame) / its age; the largest of them
        is the slowest decay that still covers the frame. It is measured whether or not
        the frame looked like the user: a decay the current estimate cannot explain is
        precisely what must be learnt, and a user's voice in a pause can only make the
        estimate slower -- fewer barge-ins during pauses, never a self-interruption.
        A frame louder than the undecayed echo of every block is not echo: skipped.
        """
        if not self._playback:
            return
        direct_from = now - self._direct_s
        if self._playback[-1][0] >= direct_from:
            self._commit_decays()  # playing directly again: the pause is over
            return
        if dbfs < self.settings.min_level_dbfs:
            return
        slowest = None
        for played_at, played_dbfs in self._playback:
            age_s = direct_from - played_at
            if age_s < FRAME_MS / 1000.0 or played_dbfs < self.settings.learn_min_playback_dbfs:
                continue
            rate = (played_dbfs + self._coupling_db - dbfs) / age_s
            slowest = rate if slowest is None else max(slowest, rate)
        if slowest is None or slowest < 60_000.0 / _MAX_RT60_MS:
            return  # no room rings that long: this frame is not (only) our echo
        self._pause_decays.append(slowest)
        if len(self._decays) < _DECAY_MIN_FRAMES:
            # Nothing measured yet (the first pause of the first reply): learn at once;
            # the first long pause of a reverberant room would otherwise interrupt.
            self._estimate_decay(sorted([*self._decays.ordered, *self._pause_decays]))

    def _commit_decays(self) -> None:
        """Learn from the pause that just ended (never from the one in progress: a user
        who starts talking in a pause must not raise the bar they are trying to clear)."""
        if not self._pause_decays:
            return
        for rate in self._pause_decays:
            self._decays.add(rate)
        self._pause_decays.clear()
        self._estimate_decay(self._decays.ordered)

    def _estimate_decay(self, rates: list[float]) -> None:
        if len(rates) >= _DECAY_MIN_FRAMES:
            measured = _at_fraction(rates, _DECAY_PERCENTILE)
            self._decay_db_per_s = min(self._prior_decay_db_per_s, measured)

    def _echo_has_arrived(self, now: float) -> bool:
        """Whether a loud block started more than ``max_delay_ms`` before this frame.

        The frame reported at ``now`` covers the last 20 ms; a block played at ``t`` is
        heard from ``t + delay`` on, ``delay <= max_delay_ms``. Only blocks from a short
        span just beyond that bound count, so a restart after a pause is waited out too.
        """
        frame_s = FRAME_MS / 1000.0
        latest = now - self.settings.max_delay_ms / 1000.0 - frame_s
        earliest = latest - 2 * frame_s
        loud = self.settings.learn_min_playback_dbfs
        return any(
            earliest <= played_at <= latest and dbfs >= loud for played_at, dbfs in self._playback
        )

    def _prune(self, now: float) -> None:
        # Blocks whose decayed level fell this far are irrelevant: forget them.
        oldest = now - self._direct_s - _FORGET_BELOW_DB / self._decay_db_per_s
        playback = self._playback
        while playback and playback[0][0] < oldest:
            playback.popleft()


class BargeInDetector:
    """Decides when the user talks over the reply. Pure: levels and ``now`` in, events out.

    Feed every captured frame's level to :meth:`on_capture_frame` (it also feeds the
    guard, so the guard stops learning while a barge-in is suspected). Fires at most
    once per SPEAKING period.
    """

    def __init__(self, settings: BargeInSettings | None = None, guard: EchoGuard | None = None):
        self.settings = settings or BargeInSettings()
        self.guard = guard or EchoGuard(self.settings)
        self._needed_frames = -(-self.settings.min_speech_ms // FRAME_MS)
        # Frames far above the echo are proof enough in half the time: a short, loud
        # "stop!" has only a few voiced frames, while echo never gets that far above its
        # prediction.
        self._needed_strong_frames = -(-self._needed_frames // 2)
        # The loud frames need not be consecutive: speech dips between syllables, and
        # restarting the count at every dip would make short words too slow.
        self._recent: collections.deque[int] = collections.deque(
            maxlen=self._needed_frames + _DIP_FRAMES
        )
        self._state = DeviceState.IDLE
        self._fired = False
        #: barge-ins detected since creation
        self.interrupts = 0
        #: with echo cancellation: a guard over the *uncancelled* microphone (see
        #: :meth:`on_capture_frame`); created at the first frame that brings a raw level
        self.raw_guard: EchoGuard | None = None
        self._cancelled_frames = 0

    def on_playback_block(self, dbfs: float, now: float) -> None:
        """The device started playing a block of level ``dbfs`` (feeds every guard)."""
        self.guard.on_playback_block(dbfs, now)
        if self.raw_guard is not None:
            self.raw_guard.on_playback_block(dbfs, now)

    def set_state(self, state: DeviceState) -> None:
        if state is not self._state:
            self._recent.clear()
            self._fired = False
        self._state = state

    def threshold_dbfs(self, now: float) -> float:
        """Level the microphone must reach now to count as the user talking."""
        threshold = self.settings.min_level_dbfs
        reference = self.guard.reference_dbfs(now)
        if reference is not None:
            threshold = max(threshold, reference + self.settings.margin_db)
        return threshold

    def on_capture_frame(self, dbfs: float, now: float,
                         raw_dbfs: float | None = None) -> list[TriggerEvent]:
        """One captured frame's level; with echo cancellation, ``dbfs`` is the cleaned
        frame's and ``raw_dbfs`` the microphone's before cancellation.

        The canceller removes the echo of what is playing, but a room keeps ringing
        after the playback pauses (between sentences), longer than the canceller's
        filter reaches, and that tail passes almost untouched. So while no block is
        playing directly, the raw level must also clear the raw guard's threshold, as
        without cancellation; while the reply plays, the cleaned level alone decides --
        once the canceller has converged (its first seconds of playback leave bursts of
        residual echo that the cleaned-level guard would take for the user).
        """
        threshold = self.threshold_dbfs(now)
        loud = dbfs >= threshold
        if raw_dbfs is not None:
            raw_guard = self.raw_guard
            if raw_guard is None:
                raw_guard = self.raw_guard = EchoGuard(self.settings)
                raw_guard._playback.extend(self.guard._playback)
            raw_reference = raw_guard.reference_dbfs(now)
            raw_loud = raw_reference is None or \
                raw_dbfs >= raw_reference + self.settings.margin_db
            raw_guard.on_capture_frame(raw_dbfs, now, learn=not raw_loud)
            playing = self.guard.playing_directly(now)
            self._cancelled_frames += playing
            if not playing or self._cancelled_frames < _AEC_WARMUP_FRAMES:
                loud = loud and raw_loud
            else:
                # The canceller's filter is shorter than the room's ring: the tail of
                # what played before the direct window passes it almost untouched.
                tail = raw_guard.tail_dbfs(now)
                loud = loud and (tail is None or dbfs >= tail + self.settings.margin_db)
        # No learning while the user may be talking: it would teach the guard their voice.
        self.guard.on_capture_frame(dbfs, now, learn=not loud and not any(self._recent))
        if not self.settings.enabled or self._state is not DeviceState.SPEAKING or self._fired:
            self._recent.clear()
            return []
        self._recent.append(_STRONG if dbfs >= threshold + _STRONG_DB else int(loud))
        if not loud:
            return []
        loud_frames = sum(1 for level in self._recent if level)
        strong_frames = sum(1 for level in self._recent if level == _STRONG)
        if loud_frames < self._needed_frames and strong_frames < self._needed_strong_frames:
            return []
        self._fired = True
        self._recent.clear()
        self.interrupts += 1
        logger.info(
            "barge-in: mic %.1f dBFS over predicted echo %s (coupling %.1f dB)",
            dbfs,
            _fmt(self.guard.reference_dbfs(now)),
            self.guard.coupling_db,
        )
        return [InterruptRequested(SOURCE)]


def _fmt(dbfs: float | None) -> str:
    return "none" if dbfs is None else f"{dbfs:.1f} dBFS"


class VoiceBargeInTrigger:
    """:class:`BargeInDetector` over raw PCM, as an AudioTrigger for the daemon.

    The daemon also calls :meth:`on_playback` with every block it hands to the sound
    card, and passes :meth:`reference_dbfs` to the silence detector.
    """

    name = "barge_in"

    def __init__(self, settings: BargeInSettings | None = None, clock: Clock | None = None):
        self.detector = BargeInDetector(settings)
        self.guard = self.detector.guard
        self._clock: Clock = clock or MonotonicClock()

    async def start(self, emit: Emit) -> None:
        # Events are returned by process(); emit is not needed.
        pass

    async def stop(self) -> None:
        pass

    def set_state(self, state: DeviceState) -> None:
        self.detector.set_state(state)

    def process(self, frame: bytes, level_dbfs: float | None = None,
                noise_floor_dbfs: float | None = None) -> list[TriggerEvent]:
        level = pcm_dbfs(frame) if level_dbfs is None else level_dbfs
        return self.detector.on_capture_frame(level, self._clock.now())

    def on_playback(self, pcm: bytes, now: float | None = None) -> None:
        """A block of s16le PCM (any rate) started playing at ``now`` (default: now)."""
        self.guard.on_playback_block(pcm_dbfs(pcm), self._clock.now() if now is None else now)

    def reference_dbfs(self, now: float | None = None) -> float | None:
        """Predicted echo level for the silence detector (None: nothing is playing)."""
        return self.guard.reference_dbfs(self._clock.now() if now is None else now)
