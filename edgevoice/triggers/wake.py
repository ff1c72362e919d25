"""The wake-word trigger: microWakeWord models (pymicro-wakeword) on the capture stream.

The daemon feeds every captured 20 ms frame to :meth:`WakeWordTrigger.process`; the
model works on 10 ms feature windows, so each frame yields two windows and the
TensorFlow Lite model runs once per three windows (its stride). When the smoothed
probability crosses the cutoff, ``process`` returns the events for that frame:

* IDLE, ERROR, OFFLINE: ``TurnStartRequested("wake")``;
* THINKING, SPEAKING: ``InterruptRequested("wake")`` then ``TurnStartRequested("wake")``
  (saying the wake word over a reply means "stop, I have something to say");
* LISTENING: nothing (a turn is already open; the user may just be repeating it);
* MUTED: the model is not even run.

A detection opens a refractory period (``refractory_ms``) in which further detections
are ignored: the model stays above the cutoff for several windows after one utterance.

Pre-roll: the wake word itself must not be sent upstream. The detection fires on the
frame that completes the wake word (typically 0.1-0.3 s after its last syllable), so
the daemon clears its pre-roll buffer when it receives the ``TurnStartRequested("wake")``
returned by ``process`` and streams from the *next* frame on. If the daemon handles the
event later than that frame, :func:`frames_after_detection` picks the frames to keep
using :attr:`WakeWordTrigger.last_detection_frame_index`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
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

logger = logging.getLogger(__name__)

SOURCE = "wake"

#: Models shipped inside the pymicro-wakeword wheel.
BUILTIN_MODELS = ("hey_jarvis", "okay_nabu", "alexa", "hey_mycroft")


@dataclass(frozen=True)
class WakeSettings:
    """Wake-word detection on the microphone stream."""

    enabled: bool = False
    """Listen for a wake word (needs the ``wake`` extra: pymicro-wakeword)."""

    model: str = "hey_jarvis"
    """A built-in model (``hey_jarvis``, ``okay_nabu``, ``alexa``, ``hey_mycroft``) or
    the path of a custom microWakeWord model: its ``.json`` description, or its
    ``.tflite`` file with the ``.json`` of the same name beside it."""

    probability_cutoff: float | None = None
    """Detection threshold in (0, 1); higher means fewer false wakes and more misses.
    ``null`` uses the model's own (0.97 for hey_jarvis)."""

    refractory_ms: int = 2000
    """After a detection, ignore further detections for this long."""

    def __post_init__(self) -> None:
        require(
            self.model in BUILTIN_MODELS or self.model.endswith((".json", ".tflite")),
            "model",
            f"must be one of {', '.join(BUILTIN_MODELS)} or a path ending in .json or .tflite",
        )
        require(
            self.probability_cutoff is None or 0.0 < self.probability_cutoff < 1.0,
            "probability_cutoff",
            "must be in (0, 1), or null for the model's default",
        )
        require(0 <= self.refractory_ms <= 60_000, "refractory_ms", "must be in [0, 60000] ms")


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


def _resolve_model(model: str) -> Path:
    """The ``.json`` description file of a custom model; raise if it is missing."""
    path = Path(model).expanduser()
    config = path.with_suffix(".json")
    if not config.is_file():
        raise TriggerUnavailableError(
            f"wake-word model {model!r}: {config} does not exist. A custom microWakeWord "
            "model needs its .json description (with the .tflite it names) on the device."
        )
    return config


class WakeWordTrigger:
    """Runs a microWakeWord model over the capture stream (an :class:`AudioTrigger`).

    Loads the model in the constructor, so a missing extra or model file fails at
    start-up with a message naming the fix, not at the first frame.
    """

    name = "wake"

    def __init__(self, settings: WakeSettings) -> None:
        self.settings = settings
        mww: Any = import_extra("pymicro_wakeword", "wake", "the wake word")
        try:
            if settings.model in BUILTIN_MODELS:
                self._model: Any = mww.MicroWakeWord.from_builtin(mww.Model(settings.model))
            else:
                self._model = mww.MicroWakeWord.from_config(_resolve_model(settings.model))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise TriggerUnavailableError(
                f"cannot load wake-word model {settings.model!r}: {exc}"
            ) from exc
        if settings.probability_cutoff is not None:
            self._model.probability_cutoff = settings.probability_cutoff
        self._features: Any = mww.MicroWakeWordFeatures()
        self._refractory_frames = -(-settings.refractory_ms // FRAME_MS)
        self._state = DeviceState.IDLE
        #: frames fed to :meth:`process` since :meth:`start` (the next frame's index)
        self.frames_processed = 0
        #: index of the frame on which the last wake word was detected (None: none yet)
        self.last_detection_frame_index: int | None = None
        #: detections since start(), including those the device state suppressed
        self.detections = 0
        logger.info(
            "wake word %r loaded (cutoff %.3f)",
            getattr(self._model, "wake_word", settings.model),
            self._model.probability_cutoff,
        )

    @property
    def wake_word(self) -> str:
        """The phrase the model listens for, e.g. "Hey Jarvis"."""
        return str(getattr(self._model, "wake_word", self.settings.model))

    @property
    def probability_cutoff(self) -> float:
        return float(self._model.probability_cutoff)

    async def start(self, emit: Emit) -> None:
        # Events are returned by process(); emit is not needed.
        self._reset_model()
        self.frames_processed = 0
        self.last_detection_frame_index = None
        self.detections = 0

    async def stop(self) -> None:
        """Nothing to release until :meth:`close`: the model is kept for a restart."""

    def close(self) -> None:
        """Free the TensorFlow Lite interpreter."""
        self._model.close()

    def set_state(self, state: DeviceState) -> None:
        if self._state is DeviceState.MUTED and state is not DeviceState.MUTED:
            # Audio from before the mute is stale: start the model from scratch.
            self._reset_model()
        self._state = state

    def process(self, frame: bytes) -> list[TriggerEvent]:
        if len(frame) != CAPTURE_FRAME_BYTES:
            raise ValueError(f"expected a {CAPTURE_FRAME_BYTES}-byte frame, got {len(frame)}")
        index = self.frames_processed
        self.frames_processed += 1
        if self._state is DeviceState.MUTED:
            return []
        detected = False
        for features in self._features.process_streaming(frame):
            probability = self._model.process_streaming_prob(features)
            if probability is not None and probability > self._model.probability_cutoff:
                detected = True
        if not detected:
            return []
        last = self.last_detection_frame_index
        if last is not None and index - last <= self._refractory_frames:
            return []
        self.last_detection_frame_index = index
        self.detections += 1
        logger.info("wake word detected at frame %d while %s", index, self._state.value)
        if self._state is DeviceState.LISTENING:
            return []
        if self._state in (DeviceState.SPEAKING, DeviceState.THINKING):
            return [InterruptRequested(SOURCE), TurnStartRequested(SOURCE)]
        return [TurnStartRequested(SOURCE)]

    def _reset_model(self) -> None:
        self._features.reset()
        self._model.reset()
