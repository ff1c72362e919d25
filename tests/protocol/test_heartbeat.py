"""The heartbeat schedule, driven synchronously: a silent relay is given up on after the
answer timeout and not before; any message counts as an answer; the stats ride every
Nth heartbeat (docs/protocol.md §6)."""

from __future__ import annotations

import itertools

import pytest

from edgevoice.device.link import RelaySettings
from edgevoice.protocol.heartbeat import Beat, Heartbeat, RelaySilent, stats_every
from edgevoice.relay.settings import LimitsSettings


def run_until(heartbeat: Heartbeat, until: float, heard: int = 0,
              ) -> list[tuple[float, Beat | RelaySilent]]:
    """Poll at every wake-up until ``until`` (or a RelaySilent), as the link does."""
    out: list[tuple[float, Beat | RelaySilent]] = []
    now = heartbeat.wake_at
    while now <= until:
        action = heartbeat.poll(now, heard)
        if action is not None:
            out.append((now, action))
            if isinstance(action, RelaySilent):
                return out
            continue
        now = heartbeat.wake_at
    return out


# ------------------------------------------------------------------ unhappy path

def test_a_relay_that_never_answers_is_given_up_after_the_timeout_not_before() -> None:
    hb = Heartbeat(30.0, 20.0, 0, now=100.0)
    assert hb.poll(100.0, heard=0) == Beat(0, False)
    assert hb.poll(119.99, heard=0) is None
    assert hb.poll(120.0, heard=0) == RelaySilent(20.0)


def test_a_relay_that_dies_after_an_answer_is_found_within_interval_plus_timeout() -> None:
    hb = Heartbeat(30.0, 20.0, 0, now=0.0)
    assert isinstance(hb.poll(0.0, heard=0), Beat)
    # the pong comes (one message heard), then nothing ever again
    events = run_until(hb, 1000.0, heard=1)
    assert [type(a) for _, a in events] == [Beat, RelaySilent]
    (beat_at, _), (silent_at, silent) = events
    assert beat_at == 30.0 and silent_at == 50.0  # interval + timeout after the last answer
    assert isinstance(silent, RelaySilent) and silent.waited_s == 20.0


def test_a_timeout_longer_than_the_interval_keeps_pinging_and_waits_for_the_oldest() -> None:
    hb = Heartbeat(10.0, 25.0, 0, now=0.0)
    events = run_until(hb, 1000.0, heard=0)
    assert [(t, type(a)) for t, a in events] == [
        (0.0, Beat), (10.0, Beat), (20.0, Beat), (25.0, RelaySilent)]


def test_any_message_counts_as_an_answer_not_only_the_pong() -> None:
    hb = Heartbeat(30.0, 20.0, 0, now=0.0)
    heard = 0
    for k in range(100):  # a relay streaming audio: something arrives between beats
        now = hb.wake_at
        action = hb.poll(now, heard)
        assert not isinstance(action, RelaySilent), (k, now)
        heard += 7
    assert hb.beats >= 50


def test_a_message_heard_before_the_heartbeat_does_not_answer_it() -> None:
    hb = Heartbeat(30.0, 20.0, 0, now=0.0)
    assert isinstance(hb.poll(0.0, heard=5), Beat)  # 5 messages came before this beat
    assert hb.poll(20.0, heard=5) == RelaySilent(20.0)


def test_a_runner_that_fell_behind_restarts_the_grid_instead_of_bursting() -> None:
    hb = Heartbeat(30.0, 20.0, 0, now=0.0)
    hb.poll(0.0, heard=0)
    assert isinstance(hb.poll(95.0, heard=1), Beat)  # e.g. the process was suspended
    assert hb.poll(95.0, heard=1) is None  # one beat, not three to catch up
    assert hb.next_at == 125.0


def test_bad_schedules_are_refused() -> None:
    with pytest.raises(ValueError):
        Heartbeat(0.0, 20.0, 0, now=0.0)
    with pytest.raises(ValueError):
        Heartbeat(30.0, 0.0, 0, now=0.0)
    with pytest.raises(ValueError):
        Heartbeat(30.0, 20.0, -1, now=0.0)
    with pytest.raises(ValueError):
        stats_every(0, 30)


# ------------------------------------------------------------------ stats

@pytest.mark.parametrize(("heartbeat_ms", "stats_s", "every"), [
    (30_000, 30, 1),    # the defaults: every heartbeat
    (30_000, 60, 2),    # stats less often than heartbeats: every 2nd
    (30_000, 45, 2),    # the first heartbeat at or after 45 s: the 2nd (60 s)
    (10_000, 30, 3),
    (30_000, 10, 1),    # stats asked more often than heartbeats: every heartbeat
    (30_000, 0, 0),     # no stats
    (200, 1, 5),
])
def test_the_stats_ride_the_first_heartbeat_at_or_after_their_interval(
        heartbeat_ms: int, stats_s: int, every: int) -> None:
    assert stats_every(heartbeat_ms, stats_s) == every
    hb = Heartbeat(heartbeat_ms / 1000, 1e9, every, now=0.0)
    beats = [a for _, a in run_until(hb, 20 * heartbeat_ms / 1000, heard=0)]
    carrying = [b.number for b in beats if isinstance(b, Beat) and b.with_stats]
    if every == 0:
        assert carrying == []
    else:
        assert carrying[0] == 0  # at connect: the fleet view is current at once
        gaps = {b - a for a, b in itertools.pairwise(carrying)}
        assert gaps == {every}
        # never sooner than asked, unless asked more often than heartbeats go
        assert every * heartbeat_ms >= min(stats_s * 1000, heartbeat_ms)


def test_the_shipped_defaults_send_stats_with_every_heartbeat() -> None:
    """The idle relay cost of bench row 13 assumes one write per heartbeat."""
    assert stats_every(LimitsSettings().heartbeat_interval_ms,
                       RelaySettings().stats_interval_s) == 1
    assert RelaySettings().ping_interval_ms == 0  # no WebSocket keepalive by default
