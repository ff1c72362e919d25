"""The daemon's feedback, driven through its pieces with a fake clock (no sockets).

The thinking sound repeats while a reply is awaited and stops when it starts; the
follow-up window is shown as its own state and announced by its earcon.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgevoice.audio.wavio import WavSink, WavSource, write_wav
from edgevoice.clock import FakeClock
from edgevoice.config.model import DeviceConfig
from edgevoice.device.daemon import DeviceDaemon
from edgevoice.device.observer import DeviceObserver
from edgevoice.device.turn import TurnState
from edgevoice.feedback.states import DeviceState
from edgevoice.protocol.messages import ResponseEnd, ResponseStart

TONE = (np.sin(2 * np.pi * 200 * np.arange(320) / 16000) * 6000).astype("<i2").tobytes()


class Earcons(DeviceObserver):
    def __init__(self) -> None:
        self.played: list[tuple[str, float]] = []

    def earcon_played(self, kind: str, at: float) -> None:
        self.played.append((kind, at))


def daemon_in(tmp_path: Path, clock: FakeClock, **turn: object) -> tuple[DeviceDaemon, Earcons]:
    mic = tmp_path / "mic.wav"
    write_wav(mic, bytes(3200), 16000)
    base = DeviceConfig()
    config = replace(base, turn=replace(base.turn, start="button", **turn),  # type: ignore[arg-type]
                     feedback=replace(base.feedback, thinking_sound=True))
    earcons = Earcons()
    daemon = DeviceDaemon(config, "kitchen.x", WavSource(mic),
                          WavSink(tmp_path / "out.wav", realtime=False), clock=clock,
                          observers=[earcons])
    daemon.turn_taking.link_changed(True, clock.now())
    return daemon, earcons


def talk_then_end(daemon: DeviceDaemon, clock: FakeClock) -> None:
    quiet = (np.random.default_rng(1).standard_normal(320) * 30).astype("<i2").tobytes()
    for _ in range(50):  # a quiet room: the silence detector learns its floor
        clock.advance(0.02)
        daemon.turn_taking.on_frame(quiet)
    assert daemon.request_turn("api")
    for _ in range(30):  # 0.6 s of voice, then the end of the turn
        clock.advance(0.02)
        daemon.turn_taking.on_frame(TONE)
    now = clock.now()
    daemon.turn_taking.execute(daemon.machine.request_end("api", "released", now), now)
    assert daemon.machine.state is TurnState.THINKING


def test_thinking_sound_repeats_while_waiting_and_stops_with_the_reply(tmp_path: Path) -> None:
    clock = FakeClock(100.0)
    daemon, earcons = daemon_in(tmp_path, clock)
    talk_then_end(daemon, clock)
    ended_at = clock.now()
    for _ in range(40):  # 4 s of waiting
        clock.advance(0.1)
        daemon.turn_taking.tick(clock.now())
    thinking = [at - ended_at for kind, at in earcons.played if kind == "thinking"]
    assert len(thinking) == 3 and 0.55 <= thinking[0] <= 0.75  # after the "done" earcon
    assert all(1.4 <= b - a <= 1.6 for a, b in itertools.pairwise(thinking))
    daemon.turn_taking.on_message(ResponseStart(turn_id=1))
    before = len(earcons.played)
    for _ in range(30):
        clock.advance(0.1)
        daemon.turn_taking.tick(clock.now())
    assert [k for k, _ in earcons.played[before:]] == []  # the reply is playing: silence


def test_follow_up_window_shows_and_sounds_then_closes(tmp_path: Path) -> None:
    clock = FakeClock(100.0)
    daemon, earcons = daemon_in(tmp_path, clock, follow_up_s=4.0)
    talk_then_end(daemon, clock)
    daemon.turn_taking.on_message(ResponseStart(turn_id=1))
    daemon.turn_taking.on_message(ResponseEnd(turn_id=1))  # a reply with no audio
    assert daemon.machine.state is TurnState.FOLLOW_UP
    assert daemon.presenter.state is DeviceState.FOLLOW_UP
    assert earcons.played[-1][0] == "follow_up"
    clock.advance(4.1)
    daemon.turn_taking.tick(clock.now())
    assert daemon.machine.state is TurnState.IDLE
