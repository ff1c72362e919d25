"""Kitchen timers that live on the device: set, list and cancel; they ring locally.

A timer is kept on the device, not on the relay, so it rings with its earcon even
when the relay is unreachable when it is due, and it is written to the state
directory so it survives a daemon restart (a timer that fell due while the daemon
was down rings as soon as it is back, unless it is older than
``timers.late_ring_max_s``).

:class:`TimerBook` is the core: it takes wall-clock ``now`` (timers are about the
wall clock: a restart must not move them) and returns what to do; it does no I/O.
:class:`TimerStore` reads and writes its JSON file atomically; :class:`DeviceTimers`
is the thin runner in the daemon: it answers the relay's ``device_call`` messages
(``timer.set``, ``timer.list``, ``timer.cancel``; docs/protocol.md §12), sleeps until
the next timer is due, and rings it (an earcon and a ``timer_ringing`` device event).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgevoice.config.base import require
from edgevoice.protocol.messages import DeviceCall, DeviceResult

logger = logging.getLogger(__name__)

#: Most timers at once (a voice user sets a few; a bound keeps the file small).
MAX_TIMERS = 20
#: Longest timer, in seconds (a day).
MAX_TIMER_S = 86_400


@dataclass(frozen=True)
class TimerSettings:
    """Timers the model can set on this device (they ring even when the relay is away)."""

    enabled: bool = True
    """Answer the relay's timer calls (set, list, cancel)."""
    state_file: str = ""
    """Where timers are kept across restarts. Empty: timers.json in $STATE_DIRECTORY
    (systemd's StateDirectory, /var/lib/edgevoice), else in ~/.local/state/edgevoice."""
    ring_repeats: int = 3
    """How many times the timer's chime sounds when it rings."""
    late_ring_max_s: int = 3_600
    """A timer that fell due while the daemon was down still rings when it is back,
    if it is late by less than this many seconds."""

    def __post_init__(self) -> None:
        require(1 <= self.ring_repeats <= 20, "ring_repeats", "must be 1..20")
        require(self.late_ring_max_s >= 0, "late_ring_max_s", "must be >= 0")

    def path(self) -> Path:
        if self.state_file:
            return Path(self.state_file)
        base = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        root = Path(base) if base else Path.home() / ".local" / "state" / "edgevoice"
        return root / "timers.json"


@dataclass(frozen=True)
class Timer:
    id: str
    label: str
    #: wall-clock seconds (epoch) when it rings
    due_at: float
    seconds: int

    def view(self, now: float) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, "seconds": self.seconds,
                "seconds_left": max(0, math.ceil(self.due_at - now))}


class TimerError(ValueError):
    """A timer call the device refuses; ``str()`` is for the model."""


class TimerBook:
    """The timers, by id. Pure: every method takes ``now`` (wall-clock seconds)."""

    def __init__(self, timers: Mapping[str, Timer] | None = None, next_id: int = 1) -> None:
        self.timers: dict[str, Timer] = dict(timers or {})
        self.next_id = next_id

    def set(self, seconds: int, label: str, now: float) -> Timer:
        if not 1 <= seconds <= MAX_TIMER_S:
            raise TimerError(f"a timer lasts 1 to {MAX_TIMER_S} seconds")
        if len(self.timers) >= MAX_TIMERS:
            raise TimerError(f"there are already {MAX_TIMERS} timers; cancel one first")
        timer = Timer(f"t{self.next_id}", label.strip()[:60], now + seconds, seconds)
        self.next_id += 1
        self.timers[timer.id] = timer
        return timer

    def listing(self, now: float) -> list[dict[str, Any]]:
        return [t.view(now) for t in sorted(self.timers.values(), key=lambda t: t.due_at)]

    def cancel(self, timer_id: str = "", label: str = "") -> list[Timer]:
        """Cancel by id, else by label (case-insensitive), else all; the cancelled."""
        if timer_id:
            found = [self.timers[timer_id]] if timer_id in self.timers else []
        elif label:
            found = [t for t in self.timers.values() if t.label.casefold() == label.casefold()]
        else:
            found = list(self.timers.values())
        if (timer_id or label) and not found:
            raise TimerError(f"there is no timer {timer_id or label!r}")
        for t in found:
            del self.timers[t.id]
        return found

    def next_due(self) -> float | None:
        return min((t.due_at for t in self.timers.values()), default=None)

    def pop_due(self, now: float, late_max_s: float) -> tuple[list[Timer], list[Timer]]:
        """Remove the timers due at ``now``: (to ring, too late to ring)."""
        due = sorted((t for t in self.timers.values() if t.due_at <= now),
                     key=lambda t: t.due_at)
        for t in due:
            del self.timers[t.id]
        return ([t for t in due if now - t.due_at <= late_max_s],
                [t for t in due if now - t.due_at > late_max_s])

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, "next_id": self.next_id,
                "timers": [asdict(t) for t in self.timers.values()]}

    @classmethod
    def from_json(cls, data: Any) -> TimerBook:
        if not isinstance(data, dict) or data.get("version") != 1:
            raise ValueError("not a version 1 timers file")
        timers = {}
        for raw in data.get("timers", []):
            t = Timer(str(raw["id"]), str(raw["label"]), float(raw["due_at"]),
                      int(raw["seconds"]))
            timers[t.id] = t
        return cls(timers, int(data.get("next_id", len(timers) + 1)))


class TimerStore:
    """The timers file: read once at start, replaced atomically on each change."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> TimerBook:
        try:
            return TimerBook.from_json(json.loads(self.path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return TimerBook()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("timers file %s is unusable, starting without timers: %s",
                           self.path, exc)
            return TimerBook()

    def save(self, book: TimerBook) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(book.to_json()), encoding="utf-8")
            os.replace(tmp, self.path)
            return True
        except OSError as exc:
            logger.warning("cannot save timers to %s (they will not survive a restart): %s",
                           self.path, exc)
            return False


def chime(rate_hz: int, repeats: int = 1, volume: float = 0.3) -> bytes:
    """The timer's ring: two short rising tones, ``repeats`` times (s16le mono)."""
    pieces = []
    for freq in (880.0, 1320.0):
        n = int(rate_hz * 0.15)
        t = np.arange(n) / rate_hz
        envelope = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)
        pieces.append(np.sin(2 * np.pi * freq * t) * envelope)
        pieces.append(np.zeros(int(rate_hz * 0.05)))
    pieces.append(np.zeros(int(rate_hz * 0.3)))
    once = (np.concatenate(pieces) * volume * 32767).astype("<i2")
    return np.tile(once, repeats).tobytes()


class DeviceTimers:
    """The daemon's timers: answers device calls, rings what is due."""

    def __init__(self, settings: TimerSettings, ring: Callable[[Timer], None],
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.ring = ring
        self.wall_clock = wall_clock
        self.store = TimerStore(settings.path())
        self.book = self.store.load()
        self.rung = 0
        self.missed = 0
        self._changed = asyncio.Event()

    def call(self, name: str, args: Mapping[str, Any]) -> dict[str, Any]:
        """Answer ``timer.*``; raises :class:`TimerError` for the model to hear."""
        now = self.wall_clock()
        if name == "timer.set":
            seconds = args.get("seconds")
            if isinstance(seconds, bool) or not isinstance(seconds, int | float):
                raise TimerError("seconds must be a number")
            timer = self.book.set(round(seconds), str(args.get("label") or ""), now)
            result: dict[str, Any] = {"timer": timer.view(now)}
        elif name == "timer.list":
            return {"timers": self.book.listing(now)}
        elif name == "timer.cancel":
            gone = self.book.cancel(str(args.get("id") or ""), str(args.get("label") or ""))
            result = {"cancelled": [t.view(now) for t in gone]}
        else:
            raise TimerError(f"this device has no function {name!r}")
        if not self.store.save(self.book):
            result["note"] = "the timer is set but will not survive a restart"
        self._changed.set()
        return result

    async def run(self) -> None:
        """Ring each timer when due; wake early when the timers change."""
        while True:
            now = self.wall_clock()
            ringing, missed = self.book.pop_due(now, self.settings.late_ring_max_s)
            if ringing or missed:
                self.store.save(self.book)
            for t in missed:
                self.missed += 1
                logger.warning("timer %s (%s) fell due %.0f s ago while the daemon was "
                               "down: not ringing", t.id, t.label, now - t.due_at)
            for t in ringing:
                self.rung += 1
                logger.info("timer %s (%s) rings", t.id, t.label or "no label")
                self.ring(t)
            due = self.book.next_due()
            self._changed.clear()
            # Sleep in short steps at most: the wall clock may jump (NTP at boot).
            wait_s = 30.0 if due is None else min(30.0, max(0.0, due - self.wall_clock()))
            try:
                async with asyncio.timeout(wait_s):
                    await self._changed.wait()
            except TimeoutError:
                pass


def answer_device_call(timers: DeviceTimers | None, call: DeviceCall) -> DeviceResult:
    """The ``device_result`` for a relay's ``device_call`` (docs/protocol.md §12)."""
    if timers is None:
        return DeviceResult(call.id, False, {"error": "timers are turned off on this device"})
    try:
        return DeviceResult(call.id, True, timers.call(call.name, call.args))
    except TimerError as exc:
        return DeviceResult(call.id, False, {"error": str(exc)})
