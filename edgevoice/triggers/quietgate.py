"""The wake word's quiet gate: the models run only while the room is not quiet.

A device waiting for its wake word spends most of its life in a quiet room, and the
wake-word models (a feature frontend and a TensorFlow Lite invocation every 30 ms) were
most of what it did there (docs/benchmarks.md, row 12). A wake phrase is louder than
the room it is said in, so frames at the room's noise floor need not reach the models.
Two pure pieces decide that, counting in frames and never reading a clock:

* :class:`QuietGate`, a two-state machine over the level of each frame and the room's
  noise floor (both measured once per frame by the silence detector): it opens on a
  frame ``margin_db`` above the floor and closes after ``hold_frames`` frames that were
  not. The hold lets the models finish deciding after a phrase's last loud frame: their
  detection comes 0.05-0.45 s after the phrase ended (docs/wake-words.md).
* :class:`FrameRing`, the last few captured frames by index in preallocated slots.
  When the gate opens, the frames before the onset are fed to the models first, with
  their own indices, so the models and the frontend's noise estimate see continuous
  audio up to the onset: what they decide and when (the detection's frame, the
  phrase-end estimate the uplink starts from) is what they would have decided had
  they heard every frame. :class:`~edgevoice.triggers.wake.WakeWordTrigger` does the
  feeding.

States and their legal transitions are listed once, in :data:`TRANSITIONS`.
"""

from __future__ import annotations

import enum
import logging

from edgevoice.errors import IllegalTransitionError

logger = logging.getLogger(__name__)


class GateState(enum.Enum):
    """Whether the wake-word models run on the frames arriving now."""

    CLOSED = "closed"
    """The room is at its noise floor: frames only go to the ring."""
    OPEN = "open"
    """A frame rose above the floor by the margin less than the hold time ago."""


#: Every legal transition (a self-transition is not one: it is no change).
TRANSITIONS: dict[GateState, frozenset[GateState]] = {
    GateState.CLOSED: frozenset({GateState.OPEN}),
    GateState.OPEN: frozenset({GateState.CLOSED}),
}


class QuietGate:
    """Opens on a frame ``margin_db`` above the noise floor; closes ``hold_frames``
    frames after the last such frame. Not thread-safe.

    It starts open (and :meth:`reset` opens it): the models' frontend learns the room's
    noise from what it hears, so it must hear the room once; when the gate reopens
    later its estimate is then the room's, as if it had never stopped listening.
    """

    def __init__(self, margin_db: float, hold_frames: int) -> None:
        if margin_db < 0.0:
            raise ValueError("margin_db must be >= 0")
        if hold_frames < 1:
            raise ValueError("hold_frames must be >= 1")
        self.margin_db = margin_db
        self.hold_frames = hold_frames
        self._state = GateState.OPEN
        self._quiet_run = 0  # frames since the last loud one, while open
        #: times the gate opened (not counting the start)
        self.openings = 0

    @property
    def state(self) -> GateState:
        return self._state

    def reset(self) -> None:
        """Open, as at start (the models are reset with it)."""
        if self._state is not GateState.OPEN:
            self._goto(GateState.OPEN, None, None)
        self._quiet_run = 0

    def update(self, level_dbfs: float, noise_floor_dbfs: float) -> bool:
        """One frame's level and the floor it is judged against; True: run the models."""
        loud = level_dbfs >= noise_floor_dbfs + self.margin_db
        if self._state is GateState.CLOSED:
            if not loud:
                return False
            self._goto(GateState.OPEN, level_dbfs, noise_floor_dbfs)
            self.openings += 1
            self._quiet_run = 0
            return True
        if loud:
            self._quiet_run = 0
            return True
        self._quiet_run += 1
        if self._quiet_run > self.hold_frames:
            self._goto(GateState.CLOSED, level_dbfs, noise_floor_dbfs)
            return False
        return True

    def _goto(self, new: GateState, level: float | None, floor: float | None) -> None:
        if new not in TRANSITIONS[self._state]:
            raise IllegalTransitionError(
                f"wake-word gate: illegal transition {self._state.name} -> {new.name}")
        if level is not None and floor is not None:
            logger.debug("wake gate: %s -> %s (level %.1f dBFS, floor %.1f dBFS)",
                         self._state.name, new.name, level, floor)
        self._state = new


class FrameRing:
    """The last ``capacity`` frames, by their consecutive indices (pure, bounded).

    The slots are allocated once; pushing a frame stores a reference to it, so the
    per-frame cost is one list assignment and nothing is allocated.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._slots: list[bytes] = [b""] * capacity
        self._newest = -1  # index of the last frame pushed (-1: none yet)
        self._oldest = 0  # index of the oldest frame still held

    def push(self, index: int, frame: bytes) -> None:
        """Frame number ``index``; it must follow the last one pushed (after
        :meth:`clear`, any index starts a new run)."""
        if self._newest >= 0 and index != self._newest + 1:
            raise ValueError(f"frame {index} does not follow frame {self._newest}")
        if self._newest < 0:
            self._oldest = index
        self._slots[index % self.capacity] = frame
        self._newest = index
        if index - self._oldest >= self.capacity:
            self._oldest = index - self.capacity + 1

    @property
    def oldest_index(self) -> int:
        """Index of the oldest frame held (the ring is empty when it exceeds newest)."""
        return self._oldest

    @property
    def newest_index(self) -> int:
        """Index of the newest frame held (-1: empty)."""
        return self._newest

    def get(self, index: int) -> bytes:
        if not self._oldest <= index <= self._newest:
            raise IndexError(f"frame {index} is not held (held: {self._oldest}..{self._newest})")
        return self._slots[index % self.capacity]

    def clear(self) -> None:
        """Forget every frame (the slots keep their old references until overwritten)."""
        self._newest = -1
        self._oldest = 0
