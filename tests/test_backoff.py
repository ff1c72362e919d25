"""The backoff policy: bounds, cap, jitter spread."""

from __future__ import annotations

import random
import statistics

import pytest

from edgevoice.backoff import Backoff, BackoffSettings
from edgevoice.config.base import SettingError


def test_delays_stay_within_bounds_and_the_cap() -> None:
    settings = BackoffSettings(initial_ms=100, max_ms=2000, multiplier=2.0, min_ms=10)
    backoff = Backoff(settings, random.Random(1))
    for attempt in range(40):
        ceiling = min(2.0, 0.1 * 2**attempt)
        delay = backoff.next_delay()
        assert 0.01 <= delay <= ceiling
    assert backoff.ceiling_s() == 2.0


def test_ceiling_grows_exponentially_until_capped() -> None:
    backoff = Backoff(BackoffSettings(initial_ms=100, max_ms=1000))
    ceilings = []
    for _ in range(6):
        ceilings.append(backoff.ceiling_s())
        backoff.next_delay()
    assert ceilings == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_full_jitter_spreads_delays_across_the_range() -> None:
    rng = random.Random(42)
    delays = []
    for _ in range(2000):
        b = Backoff(BackoffSettings(initial_ms=1000, max_ms=1000, min_ms=0), rng)
        delays.append(b.next_delay())
    assert min(delays) < 0.05 and max(delays) > 0.95
    assert 0.45 < statistics.mean(delays) < 0.55
    # every tenth of the range gets its share: no clustering
    buckets = [sum(1 for d in delays if i / 10 <= d < (i + 1) / 10) for i in range(10)]
    assert min(buckets) > 150


def test_reset_starts_over() -> None:
    backoff = Backoff(BackoffSettings(initial_ms=100, max_ms=10_000))
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.attempt == 0 and backoff.ceiling_s() == 0.1


@pytest.mark.parametrize("kwargs", [{"initial_ms": 0}, {"max_ms": 10, "initial_ms": 100},
                                    {"multiplier": 0.5}, {"min_ms": 1000, "initial_ms": 100}])
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(SettingError):
        BackoffSettings(**kwargs)  # type: ignore[arg-type]


def test_a_capped_draw_spreads_across_the_lower_range_and_the_count_goes_on() -> None:
    # a peer expected back soon: delays drawn under the cap, not clipped onto it (a
    # fleet clipped to the cap would retry together)
    rng = random.Random(3)
    backoff = Backoff(BackoffSettings(initial_ms=250, max_ms=15_000, min_ms=50), rng)
    delays = [backoff.next_delay(1.0) for _ in range(400)]
    assert all(0.05 <= d <= 1.0 for d in delays)
    assert sum(1 for d in delays if d > 0.99) < 10 and 0.45 < statistics.mean(delays) < 0.6
    assert backoff.ceiling_s() == 15.0  # uncapped, the next draw may reach the ceiling
    assert backoff.next_delay(0.1) <= 0.1
