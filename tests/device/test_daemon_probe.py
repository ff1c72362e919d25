"""The composition root through its public seams: the link's events in, the probe out.

The daemon is built for real (Opus, resampler, playback buffer, DeviceLink) but not
run: its LinkListener methods are called as the link would call them, and what it
shows is read through stats(), turn_history() and observers only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from device_support import RecordingObserver
from edgevoice_dev.bench.instrument import BenchObserver, DeviceLog

from edgevoice.audio.wavio import WavSink, WavSource
from edgevoice.config.model import DeviceConfig
from edgevoice.device.daemon import DeviceDaemon
from edgevoice.device.observer import DaemonStats, DeviceProbe
from edgevoice.device.records import TurnOutcome, TurnTimeline
from edgevoice.feedback.states import DeviceState
from edgevoice.protocol.messages import ResponseEnd, ResponseStart, Welcome


def daemon(tmp_path: Path, **kwargs: object) -> DeviceDaemon:
    config = DeviceConfig()
    return DeviceDaemon(config, "kitchen.secret", WavSource(tmp_path / "in.wav"),
                        WavSink(tmp_path / "out.wav"), **kwargs)  # type: ignore[arg-type]


def test_probe_reports_typed_stats_before_anything_happened(tmp_path: Path) -> None:
    d = daemon(tmp_path)
    probe: DeviceProbe = d
    s = probe.stats()
    assert isinstance(s, DaemonStats)
    assert (s.device_id, s.turn_state, s.device_state, s.ready) == (
        "kitchen", "idle", "offline", False)
    assert s.audio_problem == "audio not opened yet" and s.session_id is None
    assert probe.turn_history() == ()
    assert d.compact_stats()["state"] == "idle"


def test_observers_and_on_turn_done_see_a_turn_through_the_link_events(tmp_path: Path) -> None:
    done: list[TurnTimeline] = []
    seen = RecordingObserver()
    log = DeviceLog()
    d = daemon(tmp_path, on_turn_done=done.append, observers=[seen])
    d.add_observer(BenchObserver(log))
    d.link_up(Welcome(session_id="s1"))
    assert d.stats().session_id == "s1" and d.stats().status == "listening for speech"
    assert d.request_turn("api")
    d.on_message(ResponseStart(1))
    d.on_message(ResponseEnd(1, "done"))
    assert [t.outcome for t in done] == [TurnOutcome.NO_REPLY]
    assert seen.closed == done and d.turn_history() == tuple(done)
    assert seen.names() == ["link_up", "turn_begun", "response_started"]
    assert len(log.link_ups) == 1 and log.uplink == [[]] and log.pushes == [[]]


def test_link_down_shows_offline_and_a_suspension_is_counted(tmp_path: Path) -> None:
    d = daemon(tmp_path)
    d.link_up(Welcome(session_id="s1"))
    d.link_suspended("connection reset", 1.5, 30.0)
    assert d.stats().suspensions == 1
    assert d.stats().status.startswith("link interrupted, reconnecting in 1.5 s")
    d.link_down("relay unreachable", 4.2)
    assert d.stats().status == "reconnecting in 4.2 s: relay unreachable"
    assert d.stats().device_state == DeviceState.OFFLINE



def test_captured_frames_carry_the_tick_and_the_ticker_only_backs_them_up(
        tmp_path: Path) -> None:
    """While frames arrive they tick every 100 ms (no wake-up of the ticker's own); when
    capture stalls, the ticker ticks every 100 ms again."""
    import asyncio
    import itertools

    from edgevoice.clock import FakeClock
    from edgevoice.device.daemon import TICK_BACKSTOP_S, TICK_S

    clock = FakeClock(start=100.0)
    d = daemon(tmp_path, clock=clock)
    ticks: list[float] = []
    real_tick = d.turn_taking.tick

    def counted(now: float) -> None:
        ticks.append(now)
        real_tick(now)

    d.turn_taking.tick = counted  # type: ignore[method-assign]
    for _ in range(50):  # one second of 60 ms capture blocks, 3 frames each
        if _ % 3 == 0:
            clock.advance(0.06)
        d._on_frame(bytes(640))
    # on the 100 ms grid, a block late at most
    assert 9 <= len(ticks) <= 10
    assert all(0.06 - 1e-9 <= b - a <= 0.12 + 1e-9 for a, b in itertools.pairwise(ticks))

    async def ticker_alone(seconds: float) -> None:
        task = asyncio.create_task(d._ticker())
        end = clock.now() + seconds
        for _ in range(10_000):  # FakeClock.sleep moves time on; let the task run
            if clock.now() >= end:
                break
            await asyncio.sleep(0)
        task.cancel()

    ticks.clear()
    stalled_at = clock.now()
    asyncio.run(ticker_alone(3.0))  # capture stalled: the ticker takes over
    # it slept TICK_BACKSTOP_S while frames flowed, then ticks every 100 ms
    assert ticks[0] - stalled_at == pytest.approx(TICK_BACKSTOP_S, abs=TICK_S)
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert gaps and all(g == pytest.approx(TICK_S) for g in gaps)


class HeldFrames:
    """A batching source as the daemon sees it: frames it holds back while idle."""

    name = "held"

    def __init__(self) -> None:
        from edgevoice.audio.base import SourceStats

        self.stats = SourceStats()
        self.held: list[bytes] = []
        self.gate: object = None

    async def open(self) -> None: ...

    async def read(self) -> bytes:
        raise EOFError

    async def close(self) -> None: ...

    def set_idle_gate(self, gate: object) -> None:
        self.gate = gate

    def read_nowait(self) -> bytes | None:
        return self.held.pop(0) if self.held else None


def test_quiet_frames_are_batched_only_while_idle_and_a_request_comes_after_them(
        tmp_path: Path) -> None:
    """The idle gate is armed while the device waits for nothing but speech; a request
    (button, API) first hands the detector every frame captured before it, so a turn
    begins after them, as it did in time, and the frames after it are the turn's."""
    from device_support import silence, tone

    from edgevoice.audio.silence import IdleGate

    source = HeldFrames()
    d = DeviceDaemon(DeviceConfig(), "kitchen.secret", source,  # type: ignore[arg-type]
                     WavSink(tmp_path / "out.wav"))
    d.link_up(Welcome(session_id="s1"))
    gate = d.idle_gate
    assert isinstance(gate, IdleGate) and source.gate is gate
    quiet = tone(-60.0)
    for _ in range(20):  # past the detector's warm-up
        d._on_frame(quiet)
    assert gate.armed and d.machine.state.value == "idle"
    d._on_frame(tone(-20.0))  # loud: the detector leaves QUIET, every block matters
    assert not gate.armed
    for _ in range(40):
        d._on_frame(silence() if _ % 2 else quiet)
    assert gate.armed
    captured = d.counters.frames_captured
    source.held = [quiet] * 7  # captured, not yet handed over
    assert d.request_turn("api")
    assert source.held == [] and d.counters.frames_captured == captured + 7
    d._on_frame(quiet)
    assert not gate.armed  # a turn is open: no batching


def test_with_the_wake_word_quiet_frames_are_batched_only_while_its_gate_is_closed(
        tmp_path: Path) -> None:
    """The wake word's models (real ones) run only on frames 6 dB over the room's floor
    and for a hold after: while its quiet gate is closed the idle gate is armed with that
    margin (a frame the models need comes at once), and a frame too quiet to start
    speech but loud enough for the models disarms it until the gate closes again."""
    pytest.importorskip("pymicro_wakeword")
    from device_support import tone

    from edgevoice.audio.silence import IdleGate
    from edgevoice.device.turn import TurnSettings
    from edgevoice.triggers.settings import TriggerSettings
    from edgevoice.triggers.wake import WakeSettings, WakeWordTrigger

    wake = WakeSettings(gate_hold_ms=300)
    source = HeldFrames()
    trigger = WakeWordTrigger(wake)
    d = DeviceDaemon(DeviceConfig(turn=TurnSettings(start="wake"),
                                  triggers=TriggerSettings(wake=wake)),
                     "kitchen.secret", source,  # type: ignore[arg-type]
                     WavSink(tmp_path / "out.wav"), triggers=[trigger])
    try:
        d.link_up(Welcome(session_id="s1"))
        assert d.audio_triggers == [trigger]
        gate = d.idle_gate
        assert isinstance(gate, IdleGate) and source.gate is gate
        quiet = tone(-60.0)
        for _ in range(60):  # past the detector's warm-up and the wake gate's hold
            d._on_frame(quiet)
        assert gate.armed and gate.listen_margin_db == wake.gate_margin_db
        frames_before = trigger.counters()["frames_gated"]
        d._on_frame(tone(-52.0))  # 8 dB up: not speech to the detector, but the models'
        assert d.detector.settled_quiet and not gate.armed
        assert trigger.counters()["gate_openings"] == 1
        for _ in range(wake.gate_hold_ms // 20):  # the models finish deciding
            d._on_frame(quiet)
            assert not gate.armed
        d._on_frame(quiet)
        assert gate.armed and trigger.counters()["frames_gated"] == frames_before + 1
        assert trigger.detections == 0 and d.machine.state.value == "idle"
    finally:
        trigger.close()


def test_with_an_ungated_wake_word_quiet_frames_are_never_batched(tmp_path: Path) -> None:
    """Without the quiet gate the models run on every frame: none may come late."""
    pytest.importorskip("pymicro_wakeword")
    from device_support import tone

    from edgevoice.device.turn import TurnSettings
    from edgevoice.triggers.settings import TriggerSettings
    from edgevoice.triggers.wake import WakeSettings, WakeWordTrigger

    wake = WakeSettings(gate_margin_db=None)
    trigger = WakeWordTrigger(wake)
    d = DeviceDaemon(DeviceConfig(turn=TurnSettings(start="wake"), triggers=TriggerSettings(
        wake=wake)), "kitchen.secret", HeldFrames(),  # type: ignore[arg-type]
        WavSink(tmp_path / "out.wav"), triggers=[trigger])
    try:
        d.link_up(Welcome(session_id="s1"))
        assert d.idle_gate is not None and d.audio_triggers == [trigger]
        for _ in range(80):
            d._on_frame(tone(-60.0))
            assert not d.idle_gate.armed
    finally:
        trigger.close()
