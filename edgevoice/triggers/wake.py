"""The wake-word trigger: microWakeWord models (microwake.py) on the capture stream.

The daemon feeds every captured 20 ms frame to :meth:`WakeWordTrigger.process`; the
features (10 ms windows) are computed once and every configured model runs on them
(a TensorFlow Lite invocation per three windows, its stride). Each model has its own
cutoff. When one model's smoothed probability crosses its cutoff, ``process`` returns
the events for that frame:

* IDLE, FOLLOW_UP, ERROR, OFFLINE: ``TurnStartRequested("wake")``;
* THINKING, SPEAKING: ``InterruptRequested("wake")`` then ``TurnStartRequested("wake")``
  (saying the wake word over a reply means "stop, I have something to say");
* LISTENING: nothing (a turn is already open; the user may just be repeating it);
* MUTED: the models are not even run.

A detection opens a refractory period (``refractory_ms``) in which further detections
(by any model) are ignored: a model stays above its cutoff for several windows after
one utterance.

**Where the question starts.** The detection comes 0.05-0.3 s after the wake phrase
ended (the smoothing window, and the model needs the end of the phrase to be sure).
A user who does not pause ("okay nabu what's the time") is already saying the question
then, and starting the uplink at the detection lost its first word. So each model's
*raw* (unsmoothed) output is watched too: the frame where it last rose above one half
is where the model started recognising the phrase's end. The phrase is taken to end
a measured lead per model before that (measured on synthetic voices, see
docs/wake-words.md), exposed as :attr:`WakeWordTrigger.last_phrase_end_frame_index`,
and the daemon sends the frames from there out of a short :class:`WakeUplinkBuffer`.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevoice.audio.base import CAPTURE_FRAME_BYTES, FRAME_MS
from edgevoice.config.base import require
from edgevoice.feedback.states import DeviceState
from edgevoice.triggers.base import (
    Emit,
    InterruptRequested,
    TriggerEvent,
    TriggerUnavailableError,
    TurnStartRequested,
    import_extra,
)
from edgevoice.triggers.microwake import (
    MicroFeatures,
    MicroWakeWordModel,
    library_path,
    wheel_dir,
)
from edgevoice.triggers.quietgate import FrameRing, GateState, QuietGate

logger = logging.getLogger(__name__)

SOURCE = "wake"

#: Models shipped inside the pymicro-wakeword wheel.
BUILTIN_MODELS = ("hey_jarvis", "okay_nabu", "alexa", "hey_mycroft")


#: Cutoff for a custom ``.tflite`` given without its ``.json`` (microWakeWord's usual).
DEFAULT_CUSTOM_CUTOFF = 0.9
#: Smoothing window (model outputs) for a custom ``.tflite`` without its ``.json``.
DEFAULT_CUSTOM_WINDOW = 5
#: A model's raw output above this counts as "recognising the phrase" (phrase end).
_RISE_PROBABILITY = 0.5
#: At most this many frames reach the models per captured frame while the gate's
#: pre-roll is caught up (the captured frame and 7 of the pre-roll's).
_MAX_FRAMES_PER_CALL = 8


@dataclass(frozen=True)
class WakeSettings:
    """Wake-word detection on the microphone stream (used when ``turn.start`` has wake)."""

    models: tuple[str, ...] = ("hey_jarvis",)
    """The wake words listened for, all at once: built-in models (hey_jarvis, alexa,
    okay_nabu, hey_mycroft) and/or paths of custom microWakeWord models: a ``.json``
    description, or a ``.tflite`` file (its ``.json`` of the same name is used when it
    exists). Measured on 45 generated voices (detected after a pause, clean room) and an
    hour of other speech with near-rhymes (false wakes), at the cutoffs used: hey_jarvis
    0.8: 78 %, 0 per hour (the default); alexa 0.6: 78 %, 0; okay_nabu 0.85: 84 %, 6;
    hey_mycroft 0.95: 40 %, 5. Every model added adds its false wakes. Full table:
    docs/wake-words.md."""

    probability_cutoffs: dict[str, float] = field(default_factory=dict)
    """Per model (the name or path as written in ``models``), the detection threshold
    in (0, 1): higher means fewer false wakes and more misses. Models not listed use
    the cutoff measured for them in docs/wake-words.md (custom models: their .json's,
    or 0.9)."""

    refractory_ms: int = 2000
    """After a detection, ignore further detections for this long."""

    phrase_end_lead_ms: int | None = None
    """The wake phrase is taken to end this long (ms) before its model's raw output
    rose above one half; the uplink starts there. Larger keeps more of a question said
    without a pause (and risks the phrase's last sound), smaller the reverse. Empty:
    the lead measured for each built-in model (100 ms for custom ones)."""

    buffer_ms: int = 1500
    """Audio kept to recover the start of the question after the wake phrase (ms)."""

    gate_margin_db: float | None = 6.0
    """Run the models only on frames this much (dB) above the room's noise floor (the
    silence detector's), and for ``gate_hold_ms`` after: a quiet room then costs almost
    nothing, and a wake phrase, louder than its room, opens the gate and is heard from
    ``gate_preroll_ms`` before it. Lower opens on quieter sounds (and more often on the
    room's own fluctuations). Empty (null): the models run on every frame."""

    gate_hold_ms: int = 1000
    """How long (ms) the gate stays open after the last frame above the margin: the
    models decide 0.05-0.45 s after a phrase ends (docs/wake-words.md) and a phrase's
    last sound may be under the margin, so 1 s lets them finish."""

    gate_preroll_ms: int = 1500
    """Audio (ms) from before the gate opened that the models hear first, so they and
    the frontend's noise estimate have heard the room up to the onset as if never gated
    (measured: what they decide then matches the ungated run, docs/wake-words.md)."""

    def __post_init__(self) -> None:
        require(bool(self.models), "models", "must name at least one wake-word model")
        for model in self.models:
            require(
                model in BUILTIN_MODELS or model.endswith((".json", ".tflite")),
                "models",
                f"{model!r} must be one of {', '.join(BUILTIN_MODELS)} or a path ending "
                "in .json or .tflite",
            )
        require(len(set(self.models)) == len(self.models), "models", "names a model twice")
        for model, cutoff in self.probability_cutoffs.items():
            require(model in self.models, f"probability_cutoffs.{model}",
                    "is not one of the models (list it in triggers.wake.models)")
            require(0.0 < cutoff < 1.0, f"probability_cutoffs.{model}", "must be in (0, 1)")
        require(0 <= self.refractory_ms <= 60_000, "refractory_ms", "must be in [0, 60000] ms")
        require(self.phrase_end_lead_ms is None or 0 <= self.phrase_end_lead_ms <= 500,
                "phrase_end_lead_ms", "must be in [0, 500] ms")
        require(500 <= self.buffer_ms <= 5000, "buffer_ms", "must be in [500, 5000] ms")
        require(self.gate_margin_db is None or 0.0 <= self.gate_margin_db <= 40.0,
                "gate_margin_db", "must be in [0, 40] dB, or null for no gate")
        require(300 <= self.gate_hold_ms <= 10_000, "gate_hold_ms",
                "must be in [300, 10000] ms (less cuts the models off before they decide)")
        require(300 <= self.gate_preroll_ms <= 3000, "gate_preroll_ms",
                "must be in [300, 3000] ms")


#: Cutoffs chosen by measurement (docs/wake-words.md, tests/triggers/measure_wake.py):
#: a step above the lowest with no false wake in an hour of speech dense with
#: near-rhymes. okay_nabu
#: and hey_mycroft never got there and keep their own (and false-wake several times an
#: hour on near-rhymes: the table says how often).
MEASURED_CUTOFFS: dict[str, float] = {
    "hey_jarvis": 0.8,
    "alexa": 0.6,
    "okay_nabu": 0.85,
    "hey_mycroft": 0.95,
}
#: How long before the raw output's rise each phrase ends (ms), measured the same way;
#: set so the estimate lands about 50 ms before the true end (keeping the question).
MEASURED_LEAD_MS: dict[str, int] = {
    "hey_jarvis": 100,
    "alexa": 200,
    "okay_nabu": 50,
    "hey_mycroft": 0,
}
#: The lead for custom models.
DEFAULT_LEAD_MS = 100


class WakeUplinkBuffer:
    """The last few seconds of captured frames, by frame index (pure, bounded).

    The daemon pushes every frame; when the wake word is detected it takes the frames
    from the estimated end of the phrase on with :meth:`since`.
    """

    def __init__(self, max_frames: int) -> None:
        if max_frames < 1:
            raise ValueError("max_frames must be >= 1")
        self._frames: collections.deque[tuple[int, bytes]] = collections.deque(
            maxlen=max_frames)

    def push(self, index: int, frame: bytes) -> None:
        self._frames.append((index, frame))

    def since(self, index: int) -> tuple[bytes, ...]:
        """The buffered frames numbered ``index`` or later, oldest first."""
        return tuple(frame for i, frame in self._frames if i >= index)

    def clear(self) -> None:
        self._frames.clear()


def frames_after_detection(
    frames: Sequence[bytes], last_frame_index: int, detection_frame_index: int
) -> list[bytes]:
    """The frames of ``frames`` that came after the wake word.

    ``frames`` is a buffer of consecutive captured frames, oldest first, whose newest
    element is frame number ``last_frame_index`` (numbered like
    :attr:`WakeWordTrigger.frames_processed` counts: the first frame processed is 0).
    The frame that completed the wake word and everything before it are dropped.
    """
    keep = last_frame_index - detection_frame_index
    if keep <= 0:
        return []
    return list(frames[-keep:]) if keep < len(frames) else list(frames)


def _frames_per_stride(model: MicroWakeWordModel) -> int:
    """Frames to skip together so a model invokes on the same frames (a frame is two
    10 ms feature windows; a model invokes every ``stride`` windows)."""
    stride = model.stride
    return stride // math.gcd(stride, 2)


def _load_model(wheel: Path, model: str) -> MicroWakeWordModel:
    """Load a built-in model, a custom ``.json`` or a bare custom ``.tflite``."""
    library = library_path(wheel)
    if library is None:
        raise TriggerUnavailableError("pymicro-wakeword has no TensorFlow Lite library here")
    if model in BUILTIN_MODELS:
        return MicroWakeWordModel.from_config(wheel / "models" / f"{model}.json", library)
    path = Path(model).expanduser()
    config = path.with_suffix(".json")
    if config.is_file():
        return MicroWakeWordModel.from_config(config, library)
    if path.suffix == ".json" or not path.is_file():
        raise TriggerUnavailableError(
            f"wake-word model {model!r}: {path} does not exist. Copy the model file to "
            "the device (a .tflite, with its .json beside it if it has one)."
        )
    # A bare .tflite: microWakeWord's defaults.
    return MicroWakeWordModel(
        path.stem, wake_word=path.stem.replace("_", " ").title(), tflite_model=path,
        probability_cutoff=DEFAULT_CUSTOM_CUTOFF, sliding_window_size=DEFAULT_CUSTOM_WINDOW,
        library=library)


@dataclass
class _Loaded:
    """One model running in the trigger, and what it saw lately."""

    name: str
    model: MicroWakeWordModel
    cutoff: float
    lead_frames: int
    #: the frame where its raw output last rose above one half
    rise_frame_index: int | None = None
    above: bool = False


class WakeWordTrigger:
    """Runs microWakeWord models over the capture stream (an :class:`AudioTrigger`).

    Loads the models in the constructor, so a missing extra or model file fails at
    start-up with a message naming the fix, not at the first frame.
    """

    name = "wake"

    def __init__(self, settings: WakeSettings) -> None:
        self.settings = settings
        # The features come from pymicro-features; pymicro-wakeword's wheel brings the
        # TensorFlow Lite library and the models, but its Python wrapper is not imported.
        frontend: Any = import_extra("pymicro_features", "wake", "the wake word")
        wheel = wheel_dir()
        if wheel is None:
            raise TriggerUnavailableError(
                "the wake word needs the Python package 'pymicro_wakeword', which is not "
                "installed. Install it with: pip install 'edgevoice[wake]', or disable "
                "the wake word in the configuration.")
        self._loaded: list[_Loaded] = []
        for name in settings.models:
            try:
                model = _load_model(wheel, name)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                self.close()
                raise TriggerUnavailableError(
                    f"cannot load wake-word model {name!r}: {exc}") from exc
            cutoff = settings.probability_cutoffs.get(
                name, MEASURED_CUTOFFS.get(name, float(model.probability_cutoff)))
            model.probability_cutoff = cutoff
            lead_ms = settings.phrase_end_lead_ms
            if lead_ms is None:
                lead_ms = MEASURED_LEAD_MS.get(name, DEFAULT_LEAD_MS)
            self._loaded.append(_Loaded(name, model, cutoff, round(lead_ms / FRAME_MS)))
            logger.info("wake word %r loaded (cutoff %.3f)", model.wake_word, cutoff)
        self._features = MicroFeatures(frontend.MicroFrontend)
        self._refractory_frames = -(-settings.refractory_ms // FRAME_MS)
        # The quiet gate (quietgate.py) and the frames it held back, fed first when it
        # opens. Frames skipped are a whole number of every model's strides (3 feature
        # windows = 1.5 frames: 3 frames), so the models invoke on the same frames as
        # ungated and detections land on the same frame.
        self._gate = (None if settings.gate_margin_db is None else
                      QuietGate(settings.gate_margin_db, -(-settings.gate_hold_ms // FRAME_MS)))
        self._preroll_frames = -(-settings.gate_preroll_ms // FRAME_MS)
        self._skip_unit = math.lcm(*(_frames_per_stride(m.model) for m in self._loaded))
        self._ring = FrameRing(self._preroll_frames + self._skip_unit
                               if self._gate is not None else 1)
        #: index of the first frame the models have not heard yet
        self._next_fed = 0
        #: frames were held back since the models last ran (the gate was closed)
        self._held_back = False
        self._state = DeviceState.IDLE
        #: frames fed to :meth:`process` since :meth:`start` (the next frame's index)
        self.frames_processed = 0
        #: index of the frame on which the last wake word was detected (None: none yet)
        self.last_detection_frame_index: int | None = None
        #: estimated index of the first frame after the last detected wake phrase
        self.last_phrase_end_frame_index: int | None = None
        #: which model fired last (its entry in ``models``)
        self.last_model: str | None = None
        #: detections since start(), including those the device state suppressed
        self.detections = 0
        #: frames that arrived while the gate was closed (the models did not run on
        #: them then; the last ``gate_preroll_ms`` of them run when it opens)
        self.frames_gated = 0
        #: of those, the frames run late, as the pre-roll of an opening gate
        self.frames_replayed = 0

    @property
    def wake_word(self) -> str:
        """The phrase of the first model, e.g. "Okay Nabu"."""
        return self._loaded[0].model.wake_word

    @property
    def wake_words(self) -> dict[str, str]:
        """Each model's phrase, by its entry in ``models``."""
        return {m.name: m.model.wake_word for m in self._loaded}

    @property
    def probability_cutoff(self) -> float:
        """The first model's cutoff."""
        return self._loaded[0].cutoff

    @property
    def probability_cutoffs(self) -> dict[str, float]:
        return {m.name: m.cutoff for m in self._loaded}

    async def start(self, emit: Emit) -> None:
        # Events are returned by process(); emit is not needed.
        self.frames_processed = 0
        self._reset_model()
        if self._gate is not None:
            self._gate.openings = 0
        self.last_detection_frame_index = None
        self.last_phrase_end_frame_index = None
        self.last_model = None
        self.detections = 0
        self.frames_gated = 0
        self.frames_replayed = 0

    @property
    def gate_openings(self) -> int:
        """Times the quiet gate opened since :meth:`start` (0 without a gate)."""
        return 0 if self._gate is None else self._gate.openings

    def counters(self) -> dict[str, int]:
        """Since :meth:`start`: frames heard, detections, and what the quiet gate did
        (the device's /metrics shows them)."""
        return {"frames": self.frames_processed, "detections": self.detections,
                "frames_gated": self.frames_gated, "frames_replayed": self.frames_replayed,
                "gate_openings": self.gate_openings}

    def listen_margin_db(self) -> float | None:
        """While the quiet gate is closed, frames only go to its ring: those below its
        margin may come late, in order (a :class:`~edgevoice.triggers.base.QuietListener`);
        None while it is open (the models run) or without a gate."""
        gate = self._gate
        if gate is None or gate.state is not GateState.CLOSED:
            return None
        return gate.margin_db

    async def stop(self) -> None:
        """Nothing to release until :meth:`close`: the models are kept for a restart."""

    def close(self) -> None:
        """Free the TensorFlow Lite interpreters."""
        for loaded in self._loaded:
            loaded.model.close()

    def set_state(self, state: DeviceState) -> None:
        if self._state is DeviceState.MUTED and state is not DeviceState.MUTED:
            # Audio from before the mute is stale: start the models from scratch.
            self._reset_model()
        self._state = state

    def process(self, frame: bytes, level_dbfs: float | None = None,
                noise_floor_dbfs: float | None = None) -> list[TriggerEvent]:
        if len(frame) != CAPTURE_FRAME_BYTES:
            raise ValueError(f"expected a {CAPTURE_FRAME_BYTES}-byte frame, got {len(frame)}")
        index = self.frames_processed
        self.frames_processed += 1
        if self._state is DeviceState.MUTED:
            return []
        gate = self._gate
        if gate is None:
            self._next_fed = index + 1
            fired = self._feed(frame, index)
            return [] if fired is None else self._detected(fired, index, index)
        self._ring.push(index, frame)
        if level_dbfs is not None and noise_floor_dbfs is not None and \
                not gate.update(level_dbfs, noise_floor_dbfs):
            self.frames_gated += 1
            self._held_back = True
            return []
        first = self._next_fed
        if self._held_back:
            # the gate has just opened: the models go on from the pre-roll, a whole
            # number of strides after the last frame they heard
            self._held_back = False
            oldest = max(self._ring.oldest_index, index + 1 - self._preroll_frames)
            if first < oldest:
                unit = self._skip_unit
                first += -(-(oldest - first) // unit) * unit
            self.frames_replayed += index - first
        # A pre-roll is caught up a few frames per call, not all at once: each call
        # stays well under a millisecond on a Pi Zero 2 W, and the lag is gone within
        # a few frames of the onset, long before a wake phrase ends.
        last = min(index, first + _MAX_FRAMES_PER_CALL - 1)
        events: list[TriggerEvent] = []
        for fed in range(first, last + 1):
            fired = self._feed(self._ring.get(fed), fed)
            if fired is not None and not events:
                events = self._detected(fired, fed, index)
        self._next_fed = last + 1
        return events

    def _feed(self, frame: bytes, index: int) -> _Loaded | None:
        """Run the frontend and every model on frame number ``index``; the model that
        crossed its cutoff (the first one listed), if any."""
        fired: _Loaded | None = None
        for features in self._features.windows(frame):
            for loaded in self._loaded:
                probability = loaded.model.probability(features)
                self._watch_rise(loaded, index)
                if probability > loaded.cutoff and fired is None:
                    fired = loaded
        return fired

    def _detected(self, fired: _Loaded, index: int, now_index: int) -> list[TriggerEvent]:
        """``fired`` crossed its cutoff on frame ``index``; the frame being captured is
        ``now_index`` (later when the detection came from the gate's pre-roll)."""
        last = self.last_detection_frame_index
        if last is not None and index - last <= self._refractory_frames:
            return []
        self.last_detection_frame_index = index
        rise = fired.rise_frame_index if fired.rise_frame_index is not None else index
        self.last_phrase_end_frame_index = min(index + 1, max(0, rise - fired.lead_frames))
        self.last_model = fired.name
        self.detections += 1
        logger.info("wake word %s detected at frame %d (phrase ended ~frame %d) while %s",
                    fired.name, index, self.last_phrase_end_frame_index, self._state.value)
        if self._state is DeviceState.LISTENING:
            return []
        rewind = now_index + 1 - self.last_phrase_end_frame_index
        start = TurnStartRequested(SOURCE, rewind_frames=rewind)
        if self._state in (DeviceState.SPEAKING, DeviceState.THINKING):
            return [InterruptRequested(SOURCE), start]
        return [start]

    @staticmethod
    def _watch_rise(loaded: _Loaded, index: int) -> None:
        """Track where the model's raw (unsmoothed) output last rose above one half."""
        raw_history = loaded.model.raw_probabilities
        if not raw_history:
            return
        above = float(raw_history[-1]) > _RISE_PROBABILITY
        if above and not loaded.above:
            loaded.rise_frame_index = index
        loaded.above = above

    def _reset_model(self) -> None:
        """The models start from scratch with the next frame (nothing before it is fed)."""
        self._next_fed = self.frames_processed
        self._held_back = False
        self._ring.clear()
        if self._gate is not None:
            self._gate.reset()
        self._features.reset()
        for loaded in self._loaded:
            loaded.model.reset()
            loaded.rise_frame_index = None
            loaded.above = False
