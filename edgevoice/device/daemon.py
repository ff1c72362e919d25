"""The device daemon: the composition root that wires the device's pieces together.

Each piece owns one job and is tested through its seams (tests/device):

- :class:`~edgevoice.device.capture.CaptureLoop` reads the microphone (reopening it);
- :class:`~edgevoice.device.turntaking.TurnTaking` owns the turn machine: frames,
  triggers and the relay's reply messages in, commands handed to the pieces below;
- :class:`~edgevoice.device.uplink.Uplink` encodes and sends a turn's frames;
- :class:`~edgevoice.device.downlink.Downlink` decodes and plays the reply;
- :class:`~edgevoice.device.records.TurnRecorder` keeps the turn timelines;
- :mod:`edgevoice.device.status`: STATUS text and readiness, the shown state, earcons;
- :class:`~edgevoice.device.link.DeviceLink` talks to the relay.

This module builds them, runs the capture, link and ticker tasks, routes the link's
events, and is the public face instruments and the health endpoint use: observers
(:class:`~edgevoice.device.observer.DeviceObserver`) and :meth:`DeviceDaemon.stats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgevoice import __version__
from edgevoice.audio.aec import PlaybackReference, ReferenceFifo, load_echo_canceller
from edgevoice.audio.base import AudioSink, AudioSource, BatchingSource
from edgevoice.audio.opus import OpusEncoder
from edgevoice.audio.playback import PlaybackBuffer, PlaybackEvent
from edgevoice.audio.silence import IdleGate, SilenceDetector
from edgevoice.clock import Clock, MonotonicClock
from edgevoice.config.model import DeviceConfig
from edgevoice.device.capture import CaptureLoop
from edgevoice.device.downlink import MAX_CONCEALED_FRAMES, Downlink
from edgevoice.device.hooks import EventHub, HookRunner
from edgevoice.device.link import DeviceLink, LinkListener
from edgevoice.device.observer import DaemonStats, DeviceObserver, Observers
from edgevoice.device.records import DeviceCounters, TurnOutcome, TurnRecorder, TurnTimeline
from edgevoice.device.status import (
    ERROR_STATE_S,
    EarconPlayer,
    StateDisplay,
    StatePresenter,
    StatusBoard,
)
from edgevoice.device.timers import DeviceTimers, Timer, answer_device_call, chime
from edgevoice.device.turn import TurnMachine
from edgevoice.device.turntaking import TurnTaking
from edgevoice.device.uplink import Uplink
from edgevoice.errors import ConfigError
from edgevoice.feedback.earcons import Earcons
from edgevoice.feedback.states import DeviceState
from edgevoice.protocol.connection import AudioReceived
from edgevoice.protocol.messages import DeviceCall, DeviceResult, Message, Welcome
from edgevoice.triggers.bargein import VoiceBargeInTrigger
from edgevoice.triggers.base import AudioTrigger, Trigger, TriggerEvent
from edgevoice.triggers.wake import WakeWordTrigger

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_FILE = "/etc/edgevoice/device.token"
#: How often the turn machine's timeouts and the shown state are looked at.
TICK_S = 0.1
#: While frames arrive, they carry the tick; the ticker task then only looks this often
#: whether capture stalled (each wake-up of an idle device costs: issue 15).
TICK_BACKSTOP_S = 1.0
#: Frames count as flowing (the ticker need not tick) when the last one came this
#: recently: a batching source hands quiet frames over every few hundred ms.
FLOWING_WITHIN_S = 0.6

__all__ = [
    "DEFAULT_TOKEN_FILE", "ERROR_STATE_S", "MAX_CONCEALED_FRAMES", "DeviceCounters",
    "DeviceDaemon", "StateDisplay", "TurnOutcome", "TurnTimeline", "device_identity",
    "read_token",
]


def read_token(config: DeviceConfig, config_file: str) -> str:
    """The device token, from the configured file, systemd's credential or /etc."""
    candidates: list[tuple[str, str]] = []
    credential = ""
    if config.relay.token_file:
        candidates.append((config.relay.token_file, "relay.token_file"))
    else:
        credentials = os.environ.get("CREDENTIALS_DIRECTORY")
        if credentials:
            credential = str(Path(credentials) / "device-token")
            candidates.append((credential, "relay.token_file"))
        candidates.append((DEFAULT_TOKEN_FILE, "relay.token_file"))
    for path, key in candidates:
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(config_file, key, f"cannot read {path}: {exc.strerror}") from None
        if not token:
            # systemd's credential is a read-only copy of /etc/edgevoice/device.token:
            # name the file the operator can write, not the copy
            where = path if path != credential else f"{DEFAULT_TOKEN_FILE} (handed to the " \
                f"service as {path})"
            raise ConfigError(config_file, key, f"{where} is empty: put the device token in "
                              f"{path if path != credential else DEFAULT_TOKEN_FILE} "
                              "(`edgevoice token add NAME` on the relay prints one)")
        return token
    raise ConfigError(config_file, "relay.token_file",
                      f"no token found (looked in {', '.join(p for p, _ in candidates)})")


def device_identity(config: DeviceConfig, token: str, config_file: str) -> str:
    """This device's name: the one in its token (NAME.SECRET), checked against the config."""
    name, dot, _secret = token.partition(".")
    if not dot or not name:
        raise ConfigError(config_file, "relay.token_file",
                          "the token is not NAME.SECRET: copy it whole from `edgevoice token add`")
    if config.device_id is not None and config.device_id != name:
        raise ConfigError(config_file, "device_id",
                          f"is {config.device_id!r} but the token was issued for {name!r}")
    return name



class _TurnDoneCallback(DeviceObserver):
    """``on_turn_done=`` as an observer."""

    def __init__(self, callback: Callable[[TurnTimeline], None]) -> None:
        self.callback = callback

    def turn_closed(self, turn: TurnTimeline) -> None:
        self.callback(turn)


class DeviceDaemon(LinkListener):
    """One device: capture → detector → turns → Opus → relay, and back to the speaker."""

    def __init__(self, config: DeviceConfig, token: str, source: AudioSource, sink: AudioSink,
                 *, clock: Clock | None = None, exit_on_eof: bool = False,
                 on_turn_done: Callable[[TurnTimeline], None] | None = None,
                 on_state: Callable[[str], None] | None = None,
                 on_ready: Callable[[str], None] | None = None,
                 triggers: Sequence[Trigger] = (),
                 display: StateDisplay | None = None,
                 capture_after_link: bool = False,
                 observers: Sequence[DeviceObserver] = (),
                 events: EventHub | None = None) -> None:
        """``capture_after_link``: open the source only once the relay answered (for
        recordings: a WAV read as fast as possible would otherwise be spoken while
        the device is still offline). ``observers`` see every event (the bench's
        timestamps); ``on_turn_done`` is a shorthand for one that sees closed turns."""
        self.config = config
        self.clock = clock or MonotonicClock()
        self.source = source
        self.sink = sink
        self.exit_on_eof = exit_on_eof
        self.capture_after_link = capture_after_link
        self.started_at = self.clock.now()
        self.session_id: str | None = None
        self.device_id = device_identity(config, token, "config")
        self.observers = Observers(observers)
        if on_turn_done is not None:
            self.observers.add(_TurnDoneCallback(on_turn_done))
        self.counters = DeviceCounters()
        self._connected = asyncio.Event()
        self._stop = asyncio.Event()
        # when the next tick is due (kept on a 100 ms grid: 60 ms capture blocks would
        # otherwise tick every 120 ms)
        self._tick_due = self.clock.now() + TICK_S
        self._frame_at = float("-inf")  # when the last captured frame was handled

        # the fleet stats ride the link's heartbeat (at connect, then every
        # relay.stats_interval_s): one relay wake-up for both (docs/protocol.md §6)
        self.link = DeviceLink(config.relay, self.device_id, token, self, clock=self.clock,
                               stats=self.compact_stats)
        self.status_board = StatusBoard(on_state, on_ready)
        self.records = TurnRecorder(self.counters, on_closed=self.observers.turn_closed)
        self.detector = SilenceDetector(config.silence)
        self.machine = TurnMachine(config.turn)
        self.encoder = OpusEncoder.from_settings(config.opus)
        self.uplink = Uplink(self.encoder, self.link, self.clock, self.counters, self.records,
                             self.observers)
        self.downlink = Downlink(sink,
                                 prefill_ms=config.audio.playback_prefill_ms,
                                 prefill_min_ms=config.audio.playback_prefill_min_ms,
                                 max_ms=config.audio.playback_max_ms, clock=self.clock,
                                 counters=self.counters, observer=self.observers,
                                 on_reply_event=self._on_reply_playback)
        self.barge_in = (VoiceBargeInTrigger(config.triggers.barge_in, self.clock)
                         if config.triggers.barge_in.enabled else None)
        self.triggers: list[Trigger] = list(triggers)
        self.audio_triggers: list[AudioTrigger] = [
            t for t in self.triggers if isinstance(t, AudioTrigger)]
        self.display = display
        displays: list[StateDisplay] = [*self.triggers]
        if self.barge_in is not None:
            displays.append(self.barge_in)
        if display is not None:
            displays.append(display)
        # device events: the hook command and the health port's /events (device/hooks.py)
        self.events = events or EventHub(self.device_id)
        displays.append(self.events)
        self.hooks = HookRunner(config.hooks, self.events) if config.hooks.command else None
        # timers the model sets through the relay; they ring here (device/timers.py)
        self.timers = (DeviceTimers(config.timers, self._ring_timer)
                       if config.timers.enabled else None)
        self.presenter = StatePresenter(self.clock, self.link, displays)
        feedback = config.feedback
        earcons = (Earcons(sink.sample_rate_hz, feedback.earcon_volume,
                           feedback.earcon_files)
                   if feedback.earcons_enabled else None)
        self.downlink.playback.gain = feedback.output_volume
        # echo cancellation (the aec extra): the speaker's blocks are its reference
        self.echo_canceller = load_echo_canceller(config.aec)
        self.reference: ReferenceFifo | None = None
        if self.echo_canceller is not None:
            self.reference = ReferenceFifo(config.aec.reference_max_ms)
            self.downlink.playback.on_pulled = PlaybackReference(self.reference,
                                                                 sink.sample_rate_hz)
        self.earcons = EarconPlayer(earcons, self.downlink, self.presenter, self.clock,
                                    self.observers)
        self.turn_taking = TurnTaking(
            self.machine, self.detector, self.clock, link=self.link, uplink=self.uplink,
            downlink=self.downlink, records=self.records, earcons=self.earcons,
            presenter=self.presenter, status=self.status_board, counters=self.counters,
            observer=self.observers, audio_triggers=self.audio_triggers,
            barge_in=self.barge_in, echo_canceller=self.echo_canceller,
            reference=self.reference,
            recent_frames=config.triggers.wake.buffer_ms // 20,
            thinking_sound=feedback.thinking_sound)
        self.capture = CaptureLoop(
            source, self.clock, self.status_board, self.counters, self._on_frame,
            reopen_max_ms=config.audio.reopen_max_ms, on_eof=self._source_ended,
            start_after=self._connected if capture_after_link else None)
        # While the device only waits for speech (or a wake word) to start, a batching
        # source (the sound card's) may hold quiet frames back: fewer event-loop
        # wake-ups (issue 15).
        self.idle_gate: IdleGate | None = None
        if isinstance(source, BatchingSource):
            self.idle_gate = IdleGate(config.silence)
            source.set_idle_gate(self.idle_gate)

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Run until :meth:`stop` (or the end of a WAV source with ``exit_on_eof``)."""
        self.downlink.bind_loop(asyncio.get_running_loop())
        await self.sink.open(self.downlink.playback)
        for trigger in self.triggers:
            await trigger.start(self._on_trigger_event)
        self.presenter.show(self.machine.state)
        tasks = [asyncio.create_task(self.capture.run(), name="capture"),
                 asyncio.create_task(self.link.run(), name="link"),
                 asyncio.create_task(self._ticker(), name="ticker")]
        if self.hooks is not None:
            tasks.append(asyncio.create_task(self.hooks.run(), name="hooks"))
        if self.timers is not None:
            tasks.append(asyncio.create_task(self.timers.run(), name="timers"))
        try:
            await self._stop.wait()
        finally:
            self.status_board.set("stopping")
            self.turn_taking.stopping()
            await self.link.stop()
            for trigger in self.triggers:
                with contextlib.suppress(Exception):
                    await trigger.stop()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self.source.close()
            await self.sink.close()

    def stop(self) -> None:
        self._stop.set()

    def _source_ended(self) -> None:
        if self.exit_on_eof:
            self.stop()

    def _on_frame(self, frame: bytes) -> None:
        """A captured frame; it also ticks when a tick is due (no wake-up of its own)."""
        turn_taking = self.turn_taking
        turn_taking.on_frame(frame)
        gate = self.idle_gate
        if gate is not None:
            margin = turn_taking.quiet_margin_db()
            if margin is None:
                gate.disarm()
            else:
                gate.arm(self.detector.noise_floor_dbfs,
                         None if margin == math.inf else margin)
        now = self._frame_at = self.clock.now()
        if now >= self._tick_due:
            self._tick(now)

    def _on_trigger_event(self, event: TriggerEvent) -> None:
        """A button's (or another trigger's) request, after the frames captured before it."""
        self.capture.catch_up()
        self.turn_taking.on_trigger_event(event)

    def _tick(self, now: float) -> None:
        due = self._tick_due + TICK_S
        self._tick_due = due if due > now else now + TICK_S  # fell behind: restart grid
        self.turn_taking.tick(now)

    async def _ticker(self) -> None:
        """Ticks when no frame did (capture stalled, closed or not yet open)."""
        while True:
            now = self.clock.now()
            if now >= self._tick_due:
                self._tick(now)
            flowing = now - self._frame_at < FLOWING_WITHIN_S
            await self.clock.sleep(TICK_BACKSTOP_S if flowing else TICK_S)

    # ------------------------------------------------------------ probe (public)

    def add_observer(self, observer: DeviceObserver) -> None:
        self.observers.add(observer)

    def request_turn(self, source: str = "api") -> bool:
        """Start a turn as if a button was pressed; False if one cannot start now."""
        self.capture.catch_up()
        return self.turn_taking.request_turn(source)

    def request_interrupt(self, source: str = "api") -> bool:
        """Stop the reply now; False if nothing was playing or pending."""
        self.capture.catch_up()
        return self.turn_taking.request_interrupt(source)

    @property
    def volume(self) -> float:
        """The output volume (0..1), applied to everything played, at once."""
        return self.downlink.playback.gain

    def set_volume(self, volume: float) -> None:
        """Change the output volume (0..1); raises ValueError outside that range."""
        if not 0.0 <= volume <= 1.0:
            raise ValueError(f"volume must be in [0, 1], got {volume}")
        self.downlink.playback.gain = volume
        logger.info("output volume %.2f", volume)

    def turn_history(self) -> tuple[TurnTimeline, ...]:
        """The last closed turns, oldest first."""
        return tuple(self.records.turns)

    def stats(self) -> DaemonStats:
        link = self.link.stats
        source = self.source.stats
        return DaemonStats(
            device_id=self.device_id,
            uptime_s=round(self.clock.now() - self.started_at, 1),
            turn_state=self.machine.state.value,
            device_state=str(self.presenter.state),
            status=self.status_board.text,
            ready=self.status_board.ready,
            audio_problem=self.status_board.audio_problem,
            session_id=self.session_id,
            link_connected=self.link.connected,
            link_suspended=self.link.suspended,
            link_state=self.link.state.value,
            rtt_ms=link.rtt_ms,
            reconnects=link.reconnects,
            resumes=link.resumes,
            frames_replayed=link.frames_replayed,
            relay_down_since=link.down_since,
            frames_captured=source.frames_captured,
            last_frame_at=source.last_frame_at,
            source_frames_dropped=source.frames_dropped,
            link_frames_dropped=self.link.dropped,
            frames_sent=self.counters.frames_sent,
            frames_received=self.counters.frames_received,
            frames_concealed=self.counters.frames_concealed,
            playback_underruns=self.downlink.playback.stats.underruns,
            input_level_dbfs=self.detector.level_dbfs,
            noise_floor_dbfs=self.detector.noise_floor_dbfs,
            turns_total=self.counters.turns,
            interrupts=self.counters.interrupts,
            audio_reopens=self.counters.audio_reopens,
            suspensions=self.counters.suspensions,
            started_at=self.started_at,
        )

    def compact_stats(self) -> dict[str, Any]:
        """A small stats dict pushed to the relay's fleet view."""
        s = self.stats()
        return {
            "version": __version__,
            "timezone": self.config.timezone,
            "uptime_s": s.uptime_s,
            "state": s.turn_state,
            "rtt_ms": None if s.rtt_ms is None else round(s.rtt_ms, 1),
            "reconnects": s.reconnects,
            "frames_captured": s.frames_captured,
            "frames_dropped": s.source_frames_dropped,
            "frames_sent": s.frames_sent,
            "underruns": s.playback_underruns,
            "turns": s.turns_total,
            "noise_floor_dbfs": round(s.noise_floor_dbfs, 1),
            "audio_problem": s.audio_problem,
        }

    def counters_dict(self) -> dict[str, Any]:
        return asdict(self.counters)

    def hook_counters(self) -> dict[str, int]:
        """The event hook's counters (empty: no hook configured)."""
        if self.hooks is None:
            return {}
        self.hooks.counters.dropped = self.hooks.sub.dropped
        return asdict(self.hooks.counters)

    def timer_counters(self) -> dict[str, int]:
        """Timers pending, rung and missed (empty: timers are off)."""
        if self.timers is None:
            return {}
        return {"pending": len(self.timers.book.timers), "rung": self.timers.rung,
                "missed": self.timers.missed}

    def wake_counters(self) -> dict[str, int]:
        """The wake word's counters (empty: no wake word configured)."""
        for trigger in self.audio_triggers:
            if isinstance(trigger, WakeWordTrigger):
                return trigger.counters()
        return {}

    # Read-only views kept for callers written against the one-piece daemon.

    @property
    def playback(self) -> PlaybackBuffer:
        return self.downlink.playback

    @property
    def current(self) -> TurnTimeline | None:
        return self.records.current

    @property
    def turns(self) -> tuple[TurnTimeline, ...]:
        return self.turn_history()

    @property
    def audio_problem(self) -> str | None:
        return self.status_board.audio_problem

    @property
    def status(self) -> str:
        return self.status_board.text

    @property
    def ready(self) -> bool:
        return self.status_board.ready

    @property
    def device_state(self) -> DeviceState:
        return self.presenter.state

    # ---------------------------------------------------------- link events

    def link_up(self, welcome: Welcome) -> None:
        now = self.clock.now()
        self.observers.link_up(welcome, now)
        self.session_id = welcome.session_id
        self._connected.set()
        self.turn_taking.link_changed(True, now)
        self.status_board.link_tried()
        self.presenter.show(self.machine.state)
        # the fleet view is current at once: the link's first heartbeat, sent as the
        # connection starts, carries the stats

    def link_down(self, reason: str, retry_in_s: float | None) -> None:
        now = self.clock.now()
        self.turn_taking.link_changed(False, now)
        when = f"reconnecting in {retry_in_s:.1f} s: " if retry_in_s is not None else ""
        self.status_board.set(f"{when}{reason}")
        self.status_board.link_tried()
        self.presenter.show(self.machine.state)

    def link_suspended(self, reason: str, retry_in_s: float | None,
                       resume_within_s: float) -> None:
        """The connection dropped but the relay keeps the session: the turn goes on,
        what is said meanwhile is queued by the link and replayed on resume."""
        self.counters.suspensions += 1
        when = f"reconnecting in {retry_in_s:.1f} s" if retry_in_s is not None \
            else "reconnecting"
        self.status_board.set(f"link interrupted, {when}; session kept "
                              f"{resume_within_s:.0f} s more: {reason}")
        self.status_board.link_tried()

    def on_message(self, message: Message) -> None:
        if isinstance(message, DeviceCall):
            if message.name == "turn.start":  # the relay's /converse: listen now
                started = self.request_turn("relay")
                self.link.send(DeviceResult(message.id, started, {} if started else
                                            {"error": "a turn cannot start now"}))
            else:
                self.link.send(answer_device_call(self.timers, message))
            return
        self.turn_taking.on_message(message)

    def _ring_timer(self, timer: Timer, attempt: int = 0) -> None:
        """Ring ``timer``: its chime (after a reply that is playing) and an event."""
        if attempt == 0:
            self.events.moment("timer_ringing")
        pcm = chime(self.sink.sample_rate_hz, self.config.timers.ring_repeats)
        if self.downlink.play_earcon(pcm):
            self.observers.earcon_played("timer", self.clock.now())
        elif attempt < 120:  # a reply is playing: ring when it is over (within a minute)
            asyncio.get_running_loop().call_later(0.5, self._ring_timer, timer, attempt + 1)

    def on_audio(self, received: AudioReceived) -> None:
        now = self.clock.now()
        if self.downlink.audio(received):
            self.records.downlink_frame(now)

    def _on_reply_playback(self, event: PlaybackEvent, now: float) -> None:
        # late-bound: the downlink exists before the turn taking that handles its events
        self.turn_taking.on_reply_playback(event, now)
