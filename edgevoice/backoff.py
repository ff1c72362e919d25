"""Capped exponential backoff with full jitter: the one retry-delay policy.

Full jitter (a delay drawn uniformly between 0 and the exponential ceiling) spreads
a fleet of devices that lost the same relay at the same moment, so they do not all
come back in the same millisecond. Pure: it draws from an injected ``random.Random``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from edgevoice.config.base import require


@dataclass(frozen=True)
class BackoffSettings:
    """How long to wait between reconnect attempts."""

    initial_ms: int = 250
    """Ceiling of the first delay, in milliseconds."""
    max_ms: int = 15_000
    """The ceiling never grows past this, in milliseconds."""
    multiplier: float = 2.0
    """The ceiling is multiplied by this after every failed attempt."""
    min_ms: int = 50
    """Every delay is at least this, so a broken peer is never hammered in a loop."""

    def __post_init__(self) -> None:
        require(self.initial_ms > 0, "initial_ms", "must be > 0")
        require(self.max_ms >= self.initial_ms, "max_ms", "must be >= initial_ms")
        require(self.multiplier >= 1.0, "multiplier", "must be >= 1")
        require(0 <= self.min_ms <= self.initial_ms, "min_ms", "must be between 0 and initial_ms")


class Backoff:
    """Successive delays for one retry loop; ``reset()`` after a success."""

    def __init__(self, settings: BackoffSettings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self._rng = rng or random.Random()
        self.attempt = 0

    def ceiling_s(self) -> float:
        """The upper bound of the next delay, in seconds."""
        s = self.settings
        ceiling = s.initial_ms * s.multiplier ** min(self.attempt, 64)
        return min(float(s.max_ms), ceiling) / 1000.0

    def next_delay(self, cap_s: float | None = None) -> float:
        """The delay before the next attempt, in seconds; advances the attempt count.

        ``cap_s`` lowers the ceiling for this draw (a peer expected back soon): the
        delay is still drawn across the whole lower range, not clipped to it (clipped,
        half the draws of a fleet would land on the cap together)."""
        ceiling = self.ceiling_s() if cap_s is None else min(self.ceiling_s(), cap_s)
        self.attempt += 1
        low = self.settings.min_ms / 1000.0
        return low + self._rng.random() * max(0.0, ceiling - low)

    def reset(self) -> None:
        self.attempt = 0
