"""Load-based admission (relay/admission.py, issue 15 row 15).

Unhappy paths first: a relay whose event loop is held up by other work refuses new
turns even under its ``max_active_turns``; it admits again once the load is gone; an
idle relay runs no probe; a bad setting is refused before start.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from edgevoice_dev.testing.harness import hello_device, run, running_relay

from edgevoice.config.relay import load_relay_config
from edgevoice.errors import ConfigError
from edgevoice.health.exposition import render
from edgevoice.health.relay import relay_metrics
from edgevoice.protocol.messages import TURN_REFUSED_CODE, Error, TurnEnd, TurnStart
from edgevoice.relay.admission import LoadGauge, LoadLimits, LoadProbe, Refusal, TurnAdmission
from edgevoice.relay.health_source import RelayHealth

LIMITS = LoadLimits(lag_ms=10, cpu_share=0.85, late_share=0.2, window_s=1.0)
COUNT_ONLY = LoadLimits(lag_ms=0, cpu_share=0.85)  # no probe


def feed(gauge: LoadGauge, start: float, seconds: float, *, late_every: int = 0,
         lag_s: float = 0.0, cpu_share: float = 0.1, period: float = 0.05) -> float:
    """Probes every ``period`` for ``seconds``; every ``late_every``-th runs ``lag_s``
    late; the loop's thread uses ``cpu_share`` of a core. Returns the end time."""
    t, k = start, 0
    cpu = 0.0
    while t < start + seconds:
        k += 1
        due = t + period
        ran = due + (lag_s if late_every and k % late_every == 0 else 0.0)
        cpu += (ran - t) * cpu_share
        gauge.sample(due, ran, cpu)
        t = ran
    return t


# ------------------------------------------------------------------ the gauge (no I/O)

def test_a_loop_whose_probes_run_late_is_overloaded_after_its_window() -> None:
    gauge = LoadGauge(LIMITS)
    gauge.begin(0.0, 0.0)
    t = feed(gauge, 0.0, 0.5, late_every=2, lag_s=0.03)
    assert not gauge.overloaded  # the window has not ended: no decision yet
    feed(gauge, t, 0.6, late_every=2, lag_s=0.03)
    assert gauge.overloaded and gauge.late_share >= 0.2
    assert gauge.worst_lag_s == pytest.approx(0.03)
    assert gauge.windows_overloaded == 1


def test_a_loop_whose_thread_fills_its_core_is_overloaded_though_no_probe_is_late() -> None:
    gauge = LoadGauge(LIMITS)
    gauge.begin(0.0, 0.0)
    feed(gauge, 0.0, 1.1, cpu_share=0.95)
    assert gauge.overloaded and gauge.late_share == 0.0
    assert gauge.cpu_share == pytest.approx(0.95, abs=0.02)


def test_a_few_late_probes_and_a_busy_but_not_full_core_are_not_overload() -> None:
    gauge = LoadGauge(LIMITS)
    gauge.begin(0.0, 0.0)
    # one probe in ten late (under a fifth), 80 % of a core (under 85 %)
    feed(gauge, 0.0, 3.1, late_every=10, lag_s=0.05, cpu_share=0.8)
    assert not gauge.overloaded and gauge.windows_overloaded == 0


def test_the_decision_holds_for_a_window_and_clears_when_the_load_is_gone() -> None:
    gauge = LoadGauge(LIMITS)
    gauge.begin(0.0, 0.0)
    t = feed(gauge, 0.0, 1.05, late_every=1, lag_s=0.02)
    assert gauge.overloaded
    t = feed(gauge, t, 0.5)  # calm, but the window is not over: still refusing
    assert gauge.overloaded
    feed(gauge, t, 0.6)
    assert not gauge.overloaded


def test_a_pause_forgets_the_load_and_the_next_sample_starts_a_new_window() -> None:
    gauge = LoadGauge(LIMITS)
    gauge.begin(0.0, 0.0)
    feed(gauge, 0.0, 1.1, cpu_share=1.0)
    assert gauge.overloaded
    gauge.pause()
    assert not gauge.overloaded and gauge.cpu_share == 0.0
    # after a long pause the first probe's lateness is the pause, not a loop stall
    gauge.sample(100.0, 150.0, 5.0)
    assert not gauge.overloaded
    feed(gauge, 150.0, 1.1)
    assert not gauge.overloaded


def test_the_count_limit_comes_first_and_every_refusal_is_counted_by_reason() -> None:
    admission = TurnAdmission(2, LoadLimits(lag_ms=0, cpu_share=0.85), lambda: False)
    assert admission.probe is None  # lag 0: count limit only, no timer at all
    assert admission.decide(1, 0.0) is None
    assert admission.decide(2, 0.0) is Refusal.CAPACITY
    admission.gauge.overloaded = True  # as a window would have decided
    assert admission.decide(0, 0.0) is Refusal.LOAD
    assert admission.decide(5, 0.0) is Refusal.CAPACITY
    assert admission.refused == {"capacity": 2, "ramp": 0, "load": 1}


def test_an_overloaded_window_holds_new_turns_below_those_in_flight_until_the_load_allows(
) -> None:
    # A relay that gets only part of its core (a busy neighbour, a slower board than the
    # count was set for): refusing only while a window reads overloaded let the turns
    # in flight drain and the slots refill to the count the core could not serve.
    # (the gauge's windows are decided by hand here: no probe timer, no event loop)
    admission = TurnAdmission(100, COUNT_ONLY, lambda: 0)
    gauge = admission.gauge
    admission.window_ended(70)  # a calm window: no limit but the count
    assert admission.load_limit is None and admission.decide(90, 0.0) is None
    gauge.overloaded = True  # as a window would have decided, with 60 turns in flight
    admission.window_ended(60)
    assert admission.load_limit == 48
    assert admission.decide(10, 0.0) is Refusal.LOAD  # while overloaded: none at all
    gauge.overloaded = False  # the next window is calm: the turns in flight drained
    admission.window_ended(45)
    assert admission.load_limit == 50  # up by 1/32 of itself
    assert admission.decide(50, 1.0) is Refusal.LOAD
    assert admission.decide(49, 1.0) is None
    gauge.overloaded = True  # overloaded again with fewer in flight: lower still
    admission.window_ended(40)
    assert admission.load_limit == 32
    admission.window_ended(90)  # an overload never raises it
    assert admission.load_limit == 32
    gauge.overloaded = False
    windows = 0
    while admission.load_limit is not None:  # calm windows raise it back to the count
        admission.window_ended(admission.load_limit)
        windows += 1
    assert 20 <= windows <= 40  # about half a minute from a third of the count
    assert admission.decide(99, 100.0) is None
    assert admission.refused == {"capacity": 0, "ramp": 0, "load": 2}


def test_without_a_count_the_load_limit_lifts_once_far_past_what_is_asked() -> None:
    # the load limit needs the count of turns in flight; with no probe, nothing does
    assert TurnAdmission(0, LIMITS, lambda: 0).counts_active
    assert not TurnAdmission(0, COUNT_ONLY, lambda: 0).counts_active
    admission = TurnAdmission(0, COUNT_ONLY, lambda: 0)
    admission.gauge.overloaded = True
    admission.window_ended(10)
    assert admission.load_limit == 8 and admission.decide(8, 0.0) is Refusal.LOAD
    admission.gauge.overloaded = False
    admission.window_ended(8)
    assert admission.load_limit == 9
    admission.window_ended(4)  # 10 > 2 x 4: nothing asks for it, it goes
    assert admission.load_limit is None


def test_the_probe_hands_each_window_its_turns_in_flight_and_stops_when_none_are() -> None:
    gauge = LoadGauge(LIMITS)
    seen: list[int] = []
    active = [3]
    probe = LoadProbe(gauge, lambda: active[0], seen.append)
    gauge.begin(0.0, 0.0)
    t, k = 0.0, 0
    for _ in range(2):  # two windows of probes every 50 ms
        for _ in range(21):
            k += 1
            assert probe._ran(t, t)
            t += 0.05
    assert seen == [3, 3]
    active[0] = 0
    while len(seen) < 3:
        assert probe._ran(t, t) == (len(seen) < 3)
        t += 0.05
    assert seen == [3, 3, 0] and gauge.windows == 3


def test_a_wave_of_turns_is_admitted_at_the_ramp_not_all_at_once() -> None:
    # 60 turns per 6 s: 10 a second, bursts of 10
    admission = TurnAdmission(60, LoadLimits(lag_ms=0, cpu_share=0.85), lambda: False,
                              ramp_s=6.0, now=0.0)
    # from a standing start too (a relay just started, devices back after an outage):
    # half the count admitted within a second would have its replies encoded together
    decided = [admission.decide(active, 0.5) for active in range(30)]
    # the first on an idle relay costs the ramp nothing; then a second's worth
    assert decided.count(None) == 11 and set(decided[11:]) == {Refusal.RAMP}
    decided = [admission.decide(10 + k, 1.5) for k in range(20)]  # 20 more at once
    assert decided.count(None) == 10
    assert set(decided[10:]) == {Refusal.RAMP}
    assert admission.refused["ramp"] == 29
    # the ramp is empty, but a relay with nothing else active always takes a turn
    assert admission.decide(0, 1.5) is None
    # a second later another second's worth is admitted, no more
    decided = [admission.decide(40, 2.5) for _ in range(20)]
    assert decided.count(None) == 10
    # the ramp never admits beyond the count
    assert admission.decide(60, 100.0) is Refusal.CAPACITY


def test_no_count_limit_means_no_ramp() -> None:
    admission = TurnAdmission(0, LoadLimits(lag_ms=0, cpu_share=0.85), lambda: False,
                              ramp_s=6.0, now=0.0)
    assert all(admission.decide(1000, 0.0) is None for _ in range(500))


def test_settings_out_of_range_are_refused_with_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("limits:\n  overload_cpu_pct: 5\n")
    with pytest.raises(ConfigError, match=r"relay\.yaml.*limits\.overload_cpu_pct.*10\.\.100"):
        load_relay_config(path)
    path.write_text("limits:\n  turn_ramp_ms: -5\n")
    with pytest.raises(ConfigError, match=r"limits\.turn_ramp_ms"):
        load_relay_config(path)
    path.write_text("limits:\n  overload_lag_ms: -1\n")
    with pytest.raises(ConfigError, match=r"limits\.overload_lag_ms"):
        load_relay_config(path)


# ------------------------------------------------------------------ a real relay

class Hog:
    """Other work on the relay's event loop: ``busy_s`` of CPU every ``every_s``."""

    def __init__(self, busy_s: float = 0.04, every_s: float = 0.05) -> None:
        self.busy_s, self.every_s = busy_s, every_s
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(self.every_s, self._run)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _run(self) -> None:
        end = time.perf_counter() + self.busy_s
        while time.perf_counter() < end:
            pass
        self.start()


def test_an_overloaded_loop_refuses_new_turns_below_the_count_limit_then_admits_again(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path, max_active_turns=100) as relay:
            ws_a, conn_a = await hello_device(relay.port, relay.tokens.add("a"), "a")
            ws_b, conn_b = await hello_device(relay.port, relay.tokens.add("b"), "b")
            await ws_a.send(conn_a.send(TurnStart(1)))  # admitted: the probe runs
            await asyncio.sleep(0.2)
            probe = relay.admission.probe
            assert probe is not None and probe.running
            assert relay.sessions["a"].turn_id == 1
            hog = Hog()
            hog.start()
            try:
                await asyncio.sleep(2.5)  # at least one whole window under the hog
                assert relay.admission.gauge.overloaded
                await ws_b.send(conn_b.send(TurnStart(1)))
                error = conn_b.receive_text(await asyncio.wait_for(ws_b.recv(), 10))
            finally:
                hog.stop()
            assert isinstance(error, Error) and error.code == TURN_REFUSED_CODE
            assert error.retryable and "overloaded" in error.message
            assert relay.admission.refused == {"capacity": 0, "ramp": 0, "load": 1}
            assert relay.sessions["b"].turn_id is None
            # the operator sees it on /metrics
            health = RelayHealth(relay)
            text = render(relay_metrics(health.snapshot(), health.devices(), [])).decode()
            assert 'edgevoice_relay_turns_refused_total{reason="load"} 1.0' in text
            assert "edgevoice_relay_turns_active 1.0" in text
            # the one turn in flight then is all that is admitted until the load allows
            assert "edgevoice_relay_turn_load_limit 1.0" in text
            await ws_b.send(conn_b.send(TurnEnd(1, "refused")))
            # the load is gone: after a calm window b's next turn is admitted
            await asyncio.sleep(2.5)
            assert not relay.admission.gauge.overloaded
            await ws_b.send(conn_b.send(TurnStart(2)))
            await asyncio.sleep(0.3)
            assert relay.sessions["b"].turn_id == 2
            assert relay.admission.refused["load"] == 1
            # nobody was disconnected for it
            assert set(relay.sessions) == {"a", "b"}
            await ws_a.close()
            await ws_b.close()

    run(scenario())


def test_with_load_admission_off_only_the_count_refuses(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path, max_active_turns=100, overload_lag_ms=0) as relay:
            assert relay.admission.probe is None
            ws_a, conn_a = await hello_device(relay.port, relay.tokens.add("a"), "a")
            ws_b, conn_b = await hello_device(relay.port, relay.tokens.add("b"), "b")
            await ws_a.send(conn_a.send(TurnStart(1)))
            hog = Hog()
            hog.start()
            try:
                await asyncio.sleep(1.5)
                await ws_b.send(conn_b.send(TurnStart(1)))
                await asyncio.sleep(0.3)
            finally:
                hog.stop()
            assert relay.sessions["b"].turn_id == 1
            assert relay.admission.refused == {"capacity": 0, "ramp": 0, "load": 0}
            await ws_a.close()
            await ws_b.close()

    run(scenario())


def test_an_idle_relay_runs_no_probe(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_relay(tmp_path) as relay:
            probe = relay.admission.probe
            assert probe is not None and not probe.running  # nobody has talked yet
            ws, conn = await hello_device(relay.port, relay.tokens.add("a"), "a")
            await ws.send(conn.send(TurnStart(1)))
            await asyncio.sleep(0.2)
            assert probe.running
            await ws.send(conn.send(TurnEnd(1, "silence")))  # nothing said: nothing to answer
            for _ in range(20):
                await asyncio.sleep(0.1)
                if not relay.sessions["a"].busy:
                    break
            assert not relay.sessions["a"].busy
            await asyncio.sleep(1.5)  # the next window finds nobody busy: it stops
            assert not probe.running
            assert not relay.admission.gauge.overloaded
            await ws.close()

    run(scenario())


def test_the_heap_is_kept_only_when_no_session_is_in_a_turn(tmp_path: Path) -> None:
    """The relay's 5 s tick asks ``keep_heap``: a collection that is due waits while
    any session is in a turn (its stall would land on a reply), and runs once the
    relay is quiet. ``busy_count`` is what admission, /metrics and the drain count."""
    import gc

    from edgevoice.relay.loop import HeapKeeper, HeapPass

    async def scenario() -> None:
        async with running_relay(tmp_path) as relay:
            clock = [0.0]
            relay.heap = HeapKeeper(max_age_s=60.0, now=lambda: clock[0])
            ws_a, conn_a = await hello_device(relay.port, relay.tokens.add("a"), "a")
            ws_b, conn_b = await hello_device(relay.port, relay.tokens.add("b"), "b")
            await ws_a.send(conn_a.send(TurnStart(1)))
            await ws_b.send(conn_b.send(TurnStart(1)))
            await asyncio.sleep(0.3)
            assert relay.busy_count() == 2 and relay.busy_count(1) == 1
            assert relay.busy_count(excluding=relay.sessions["a"]) == 1
            clock[0] = 61.0  # a whole pass is due by age
            assert relay.keep_heap() is None and relay.heap.runs == 0
            for ws, conn in ((ws_a, conn_a), (ws_b, conn_b)):
                await ws.send(conn.send(TurnEnd(1, "silence")))
            for _ in range(20):
                await asyncio.sleep(0.1)
                if relay.busy_count() == 0:
                    break
            assert relay.busy_count() == 0
            assert relay.keep_heap() is HeapPass.ALL and relay.heap.runs == 1
            await ws_a.close()
            await ws_b.close()

    try:
        run(scenario())
    finally:
        gc.unfreeze()
