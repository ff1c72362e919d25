"""Each trigger starts a real turn through a real relay's echo upstream.

Button on gpiozero mock pins, wake word from flite speech, the HTTP API, and the
state sequence the LED shows; the turn's audio goes device → relay → echo → device.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgevoice_dev.testing.harness import device_config, run, running_relay

from edgevoice.audio.wavio import WavSink, WavSource, load_wav, write_wav
from edgevoice.config.model import DeviceConfig
from edgevoice.demo import bundled_speech
from edgevoice.device.daemon import DeviceDaemon, TurnTimeline
from edgevoice.device.health_source import DaemonHealth
from edgevoice.feedback.states import DeviceState
from edgevoice.health.device import device_health_api
from edgevoice.health.http import HealthSettings
from edgevoice.triggers.base import Trigger

S = DeviceState


def mic(tmp_path: Path, *parts: tuple[str, float | Path]) -> Path:
    """A microphone WAV from ("quiet", seconds) and ("speech", wav path) parts."""
    pcm: list[np.ndarray[Any, Any]] = []
    for kind, value in parts:
        if kind == "quiet":
            pcm.append(np.zeros(int(16000 * float(value)), dtype=np.int16))  # type: ignore[arg-type]
        else:
            pcm.append(np.frombuffer(load_wav(value), dtype=np.int16))  # type: ignore[arg-type]
    path = tmp_path / "mic.wav"
    write_wav(path, np.concatenate(pcm).tobytes(), 16000)
    return path


class RecordingDisplay:
    """Stands in for the LED: records every state it is asked to show."""

    def __init__(self) -> None:
        self.states: list[DeviceState] = []

    def set_state(self, state: DeviceState) -> None:
        self.states.append(state)


async def converse(tmp_path: Path, microphone: Path, config: DeviceConfig,
                   triggers: list[Trigger], during: Callable[[DeviceDaemon], Any] | None = None,
                   display: RecordingDisplay | None = None,
                   wait_s: float = 30) -> tuple[TurnTimeline | None, DeviceDaemon, Any]:
    async with running_relay(tmp_path) as server:
        token = server.tokens.add("kitchen")
        cfg = device_config(f"ws://127.0.0.1:{server.port}/", "kitchen", base=config)
        done: asyncio.Future[TurnTimeline] = asyncio.get_running_loop().create_future()
        daemon = DeviceDaemon(cfg, token, WavSource(microphone, tail_silence_ms=3000),
                              WavSink(tmp_path / "speaker.wav", realtime=False),
                              on_turn_done=lambda t: done.done() or done.set_result(t),
                              capture_after_link=True, triggers=triggers, display=display)
        task = asyncio.create_task(daemon.run())
        extra = None
        try:
            if during is not None:
                extra = await during(daemon)
            turn = await asyncio.wait_for(done, wait_s)
        except TimeoutError:
            turn = None
        daemon.stop()
        await task
        return turn, daemon, extra


@pytest.fixture
def mock_pins() -> Iterator[Any]:
    gpiozero = pytest.importorskip("gpiozero")
    from gpiozero.pins.mock import MockFactory
    factory = MockFactory()
    previous = gpiozero.Device.pin_factory
    gpiozero.Device.pin_factory = factory
    try:
        yield factory
    finally:
        factory.reset()
        gpiozero.Device.pin_factory = previous


def test_push_to_talk_button_starts_a_real_turn(tmp_path: Path, mock_pins: Any) -> None:
    from edgevoice.triggers.button import ButtonSettings, ButtonTrigger
    settings = ButtonSettings(pin=17, mode="push_to_talk", bounce_ms=5)
    button = ButtonTrigger(settings, pin_factory=mock_pins)
    base = DeviceConfig()
    base = replace(base, turn=replace(base.turn, start="button"))
    microphone = mic(tmp_path, ("quiet", 1.0), ("speech", bundled_speech()), ("quiet", 0.3))
    display = RecordingDisplay()

    async def hold_the_button(daemon: DeviceDaemon) -> None:
        pin = mock_pins.pin(17)
        await asyncio.sleep(0.5)
        pin.drive_low()  # pressed (pull-up: low is pressed)
        await asyncio.sleep(4.2)  # hold while the user speaks
        pin.drive_high()

    turn, _daemon, _ = run(converse(tmp_path, microphone, base, [button], hold_the_button,
                                   display), 60)
    assert turn is not None and turn.trigger == "button", turn
    assert turn.outcome == "completed" and turn.uplink_frames > 100
    # the LED followed the turn: listening, waiting, speaking, back to idle
    seen = [s for i, s in enumerate(display.states) if i == 0 or display.states[i - 1] != s]
    assert seen[seen.index(S.LISTENING):][:4] == [S.LISTENING, S.THINKING, S.SPEAKING, S.IDLE]


def test_push_to_talk_long_pause_while_held_is_one_turn_ending_at_release(
        tmp_path: Path, mock_pins: Any) -> None:
    """The issue's user: a 1.2 s pause while holding the button split one request in two."""
    from edgevoice.triggers.button import ButtonSettings, ButtonTrigger
    button = ButtonTrigger(ButtonSettings(pin=17, mode="push_to_talk"), pin_factory=mock_pins)
    base = DeviceConfig()
    base = replace(base, turn=replace(base.turn, start="button"))
    speech = bundled_speech()
    speech_s = len(load_wav(speech)) / 2 / 16000
    microphone = mic(tmp_path, ("quiet", 1.0), ("speech", speech), ("quiet", 1.2),
                     ("speech", speech), ("quiet", 1.0))

    async def hold(daemon: DeviceDaemon) -> None:
        pin = mock_pins.pin(17)
        await asyncio.sleep(0.6)
        pin.drive_low()  # pressed before the first word ...
        await asyncio.sleep(0.4 + speech_s + 1.2 + speech_s + 0.3)
        pin.drive_high()  # ... released after the last

    turn, daemon, _ = run(converse(tmp_path, microphone, base, [button], hold), 60)
    assert turn is not None and turn.trigger == "button", turn
    assert turn.outcome == "completed", turn.as_dict()
    assert daemon.counters.turns == 1  # one request, one turn
    speech_frames = len(load_wav(speech)) // 640
    assert turn.uplink_frames >= 2 * speech_frames * 0.9  # both halves went up
    # it ended at the release, not at the pause: the turn lasted past the second half
    milestones = turn.milestones_ms()
    assert milestones["turn_end"] is not None
    assert milestones["turn_end"] >= (0.4 + 2 * speech_s + 1.2) * 1000


def test_toggle_button_press_during_reply_interrupts(tmp_path: Path, mock_pins: Any) -> None:
    from edgevoice.triggers.button import ButtonSettings, ButtonTrigger
    settings = ButtonSettings(pin=17, mode="toggle", bounce_ms=5)
    button = ButtonTrigger(settings, pin_factory=mock_pins)
    base = DeviceConfig()
    base = replace(base, turn=replace(base.turn, start="button"))
    microphone = mic(tmp_path, ("quiet", 0.8), ("speech", bundled_speech()), ("quiet", 1.0))

    speech_s = len(load_wav(bundled_speech())) / 2 / 16000

    async def press(daemon: DeviceDaemon) -> None:
        pin = mock_pins.pin(17)
        await asyncio.sleep(0.4)
        pin.drive_low()
        await asyncio.sleep(0.1)
        pin.drive_high()  # toggle: turn on; it stays open until the next press
        await asyncio.sleep(0.3 + speech_s + 0.3)
        pin.drive_low()
        await asyncio.sleep(0.1)
        pin.drive_high()  # the second press ends the turn
        for _ in range(400):  # the reply arrives within seconds; poll the daemon's state
            if daemon.device_state is S.SPEAKING:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        pin.drive_low()  # a press while the assistant speaks interrupts it
        await asyncio.sleep(0.1)
        pin.drive_high()

    turn, daemon, _ = run(converse(tmp_path, microphone, base, [button], press), 60)
    assert turn is not None and turn.trigger == "button"
    assert turn.outcome == "interrupted", turn.as_dict()
    assert daemon.counters.interrupts >= 1


def test_wake_word_starts_a_turn_without_sending_the_wake_word(tmp_path: Path) -> None:
    pytest.importorskip("pymicro_wakeword")
    from edgevoice_dev.testing.speech import synthesize

    from edgevoice.triggers.wake import WakeSettings, WakeWordTrigger
    wake = WakeWordTrigger(WakeSettings(models=("hey_jarvis",)))
    phrase = synthesize("hey jarvis", voice="slt", path=tmp_path / "wake.wav")
    question = synthesize("what time is it in Tokyo", voice="slt", path=tmp_path / "q.wav")
    microphone = mic(tmp_path, ("quiet", 1.0), ("speech", phrase), ("quiet", 0.4),
                     ("speech", question), ("quiet", 0.3))
    base = DeviceConfig()
    base = replace(base, turn=replace(base.turn, start="button"))
    turn, _daemon, _ = run(converse(tmp_path, microphone, base, [wake]), 60)
    assert turn is not None and turn.trigger == "wake", turn
    assert turn.outcome == "completed"
    question_frames = len(load_wav(question)) // 640
    wake_frames = len(load_wav(phrase)) // 640
    pause_frames = 20  # the 0.4 s after the wake word: the uplink starts where it ended
    # the question (plus pre-roll and hangover) went up; the wake phrase did not (where
    # exactly the uplink starts is checked by tests/triggers/test_wake_uplink.py)
    assert turn.uplink_frames >= question_frames * 0.8
    assert turn.uplink_frames < question_frames + pause_frames + wake_frames


def test_http_trigger_starts_a_real_turn_and_needs_the_token_when_set(tmp_path: Path) -> None:
    base = DeviceConfig()
    base = replace(base, turn=replace(base.turn, start="button"))
    microphone = mic(tmp_path, ("quiet", 1.5), ("speech", bundled_speech()), ("quiet", 0.3))

    async def post_trigger(daemon: DeviceDaemon) -> list[int]:
        settings = HealthSettings(port=0)
        api = device_health_api(DaemonHealth(daemon, settings), settings, "s3cret-token")
        await api.start()
        statuses = []
        await asyncio.sleep(0.3)
        for token in (None, "wrong", "s3cret-token"):
            request = urllib.request.Request(f"http://127.0.0.1:{api.port}/trigger",
                                             method="POST", data=b"")
            if token:
                request.add_header("Authorization", f"Bearer {token}")
            try:
                status = await asyncio.to_thread(
                    lambda r=request: urllib.request.urlopen(r, timeout=5).status)
            except urllib.error.HTTPError as exc:
                status = exc.code
            statuses.append(status)
        await asyncio.sleep(5)
        await api.stop()
        return statuses

    turn, _daemon, statuses = run(converse(tmp_path, microphone, base, [], post_trigger), 60)
    assert statuses == [401, 401, 202]
    assert turn is not None and turn.trigger == "api" and turn.outcome == "completed"


def test_turn_requested_while_offline_plays_the_offline_earcon(tmp_path: Path) -> None:
    async def scenario() -> tuple[bytes, list[DeviceState]]:
        display = RecordingDisplay()
        cfg = replace(DeviceConfig(), turn=replace(DeviceConfig().turn, start="button"),
                      relay=replace(DeviceConfig().relay, url="ws://127.0.0.1:9/"))
        out = tmp_path / "speaker.wav"
        daemon = DeviceDaemon(cfg, "kitchen.x", WavSource(mic(tmp_path, ("quiet", 3.0))),
                              WavSink(out, realtime=False), display=display)
        task = asyncio.create_task(daemon.run())
        await asyncio.sleep(0.5)
        assert not daemon.request_turn("button")
        await asyncio.sleep(1.0)
        daemon.stop()
        await task
        return out.read_bytes(), display.states

    data, states = run(scenario(), 30)
    assert states[0] is S.OFFLINE
    from edgevoice.feedback.earcons import Earcon, Earcons
    offline = Earcons(24000, DeviceConfig().feedback.earcon_volume).pcm(Earcon.OFFLINE)
    assert data[44:44 + len(offline)] == offline  # the speaker played exactly that earcon
