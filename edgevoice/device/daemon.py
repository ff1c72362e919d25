"""The device daemon: wires capture, silence detection, turns, the link and playback.

Decisions are made by the pure cores (silence detector, turn machine, protocol);
this module only moves data between them and the outside world, and records what
happened when (the turn timeline the health endpoint and the demo report).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgevoice import __version__
from edgevoice.audio.base import AudioSink, AudioSource
from edgevoice.audio.opus import OpusDecodeError, OpusDecoder, OpusEncoder
from edgevoice.audio.playback import PlaybackBuffer, PlaybackEnded, PlaybackStarted
from edgevoice.audio.resample import StreamResampler
from edgevoice.audio.silence import SilenceDetector, SpeechEnded, SpeechStarted
from edgevoice.backoff import Backoff, BackoffSettings
from edgevoice.clock import Clock, MonotonicClock
from edgevoice.config.model import DeviceConfig
from edgevoice.device.link import DeviceLink, LinkListener
from edgevoice.device.turn import (
    BeginTurn,
    Command,
    FinishTurn,
    PlayEarcon,
    StateChanged,
    StopPlayback,
    StreamFrame,
    TurnMachine,
    TurnState,
)
from edgevoice.errors import AudioDeviceError, ConfigError
from edgevoice.feedback.earcons import Earcon, Earcons
from edgevoice.feedback.states import DeviceState
from edgevoice.protocol.connection import AudioReceived
from edgevoice.protocol.messages import (
    DOWNLINK_FORMAT,
    AudioFlags,
    Error,
    Interrupt,
    Message,
    ResponseEnd,
    ResponseStart,
    Stats,
    Transcript,
    TurnEnd,
    TurnStart,
    Welcome,
)
from edgevoice.triggers.bargein import VoiceBargeInTrigger
from edgevoice.triggers.base import (
    AudioTrigger,
    InterruptRequested,
    MuteToggled,
    Trigger,
    TriggerEvent,
    TurnEndRequested,
    TurnStartRequested,
)

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_FILE = "/etc/edgevoice/device.token"
#: A gap longer than this is not concealed: invented audio would only confuse.
MAX_CONCEALED_FRAMES = 5
EARCONS = {"listening": Earcon.LISTEN_START, "done": Earcon.LISTEN_END,
           "error": Earcon.ERROR, "offline": Earcon.OFFLINE}
#: How long the ERROR state (LED, /stats) lasts after a failed turn, in seconds.
ERROR_STATE_S = 3.0


class StateDisplay(Protocol):
    """Something that shows the device state (the LED)."""

    def set_state(self, state: DeviceState) -> None: ...


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


@dataclass
class TurnTimeline:
    """When each step of one turn happened (monotonic seconds; None: did not happen)."""

    turn_id: int
    trigger: str
    started_at: float
    wall_start: float = field(default_factory=time.time)
    speech_start: float | None = None
    speech_end: float | None = None
    first_uplink: float | None = None
    turn_end: float | None = None
    first_downlink: float | None = None
    playback_start: float | None = None
    playback_end: float | None = None
    uplink_frames: int = 0
    downlink_frames: int = 0
    transcripts: list[tuple[str, str]] = field(default_factory=list)
    outcome: str = "open"

    def milestones_ms(self) -> dict[str, float | None]:
        """Each milestone in ms after the turn started."""
        def rel(t: float | None) -> float | None:
            return None if t is None else round((t - self.started_at) * 1000.0, 1)
        return {
            "speech_start": rel(self.speech_start), "first_uplink": rel(self.first_uplink),
            "speech_end": rel(self.speech_end), "turn_end": rel(self.turn_end),
            "first_downlink": rel(self.first_downlink),
            "playback_start": rel(self.playback_start), "playback_end": rel(self.playback_end),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "turn_id": self.turn_id, "trigger": self.trigger, "outcome": self.outcome,
            "started": datetime.datetime.fromtimestamp(self.wall_start, datetime.UTC)
            .isoformat(timespec="milliseconds"),
            "milestones_ms": self.milestones_ms(),
            "uplink_frames": self.uplink_frames, "downlink_frames": self.downlink_frames,
            "transcripts": [{"role": r, "text": t} for r, t in self.transcripts],
        }


@dataclass
class DeviceCounters:
    frames_captured: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    frames_concealed: int = 0
    audio_reopens: int = 0
    turns: int = 0
    interrupts: int = 0
    #: link drops survived by resuming the session
    suspensions: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class DeviceDaemon(LinkListener):
    """One device: capture → detector → turns → Opus → relay, and back to the speaker."""

    def __init__(self, config: DeviceConfig, token: str, source: AudioSource, sink: AudioSink,
                 *, clock: Clock | None = None, exit_on_eof: bool = False,
                 on_turn_done: Callable[[TurnTimeline], None] | None = None,
                 on_state: Callable[[str], None] | None = None,
                 on_ready: Callable[[str], None] | None = None,
                 triggers: Sequence[Trigger] = (),
                 display: StateDisplay | None = None,
                 capture_after_link: bool = False) -> None:
        """``capture_after_link``: open the source only once the relay answered (for
        recordings: a WAV read as fast as possible would otherwise be spoken while
        the device is still offline)."""
        self.config = config
        self.clock = clock or MonotonicClock()
        self.source = source
        self.sink = sink
        self.exit_on_eof = exit_on_eof
        self.on_turn_done = on_turn_done
        self.on_state = on_state
        self.on_ready = on_ready
        self.ready = False
        self.session_id: str | None = None
        self._link_tried = False
        self.detector = SilenceDetector(config.silence)
        self.machine = TurnMachine(config.turn)
        self.encoder = OpusEncoder.from_settings(config.opus)
        self.decoder = OpusDecoder(DOWNLINK_FORMAT.sample_rate_hz)
        # LQ, not HQ: soxr's HQ filter hands out its output in bursts (a whole block,
        # then nothing), which kept every other reply frame waiting 20 ms for the next
        # (measured by `edgevoice bench`, row 3); LQ is steady and ample for speech.
        self.resampler = StreamResampler(DOWNLINK_FORMAT.sample_rate_hz, sink.sample_rate_hz,
                                         quality="LQ")
        self.playback = PlaybackBuffer(sink.sample_rate_hz,
                                       prefill_ms=config.audio.playback_prefill_ms,
                                       max_ms=config.audio.playback_max_ms,
                                       on_event=self._playback_event_threadsafe)
        self.device_id = device_identity(config, token, "config")
        self.link = DeviceLink(config.relay, self.device_id, token, self, clock=self.clock)
        self.barge_in = (VoiceBargeInTrigger(config.triggers.barge_in, self.clock)
                         if config.triggers.barge_in.enabled else None)
        self.triggers: list[Trigger] = list(triggers)
        self.audio_triggers: list[AudioTrigger] = [
            t for t in self.triggers if isinstance(t, AudioTrigger)]
        self.display = display
        self.earcons = (Earcons(sink.sample_rate_hz, config.feedback.earcon_volume)
                        if config.feedback.earcons_enabled else None)
        #: the responses the playback buffer holds, in order (earcons are mixed-in cues)
        self._playing: collections.deque[str] = collections.deque()
        #: an earcon due once the reply now playing has been heard
        self._earcon_after_reply: str | None = None
        self._frame_index = 0
        self._wake_frame_index: int | None = None
        self._error_until = 0.0
        self.device_state = DeviceState.OFFLINE
        self._shown: DeviceState | None = None  # what the triggers and LED were last told
        self.counters = DeviceCounters()
        self.turns: collections.deque[TurnTimeline] = collections.deque(maxlen=20)
        self.current: TurnTimeline | None = None
        self.started_at = self.clock.now()
        self.audio_problem: str | None = "audio not opened yet"
        self.status = "starting"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._connected = asyncio.Event()
        self.capture_after_link = capture_after_link
        self._uplink_index = 0
        self._discard_downlink = False
        self._response_frames = 0
        self._last_link_status = ""

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Run until :meth:`stop` (or the end of a WAV source with ``exit_on_eof``)."""
        self._loop = asyncio.get_running_loop()
        await self.sink.open(self.playback)
        for trigger in self.triggers:
            await trigger.start(self._on_trigger_event)
        self._show_state()
        tasks = [asyncio.create_task(self._capture(), name="capture"),
                 asyncio.create_task(self.link.run(), name="link"),
                 asyncio.create_task(self._ticker(), name="ticker")]
        try:
            await self._stop.wait()
        finally:
            self._set_status("stopping")
            if self.machine.state is TurnState.LISTENING and self.current is not None:
                self.link.send(TurnEnd(self.current.turn_id, "cancelled"))
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

    def _maybe_ready(self) -> None:
        """Ready once audio is open and the link loop has made its first attempt.

        Not "once the relay answered": a device booting while the relay is down must
        still come up (and say so in its status) rather than be killed by systemd's
        start timeout and restarted in a loop.
        """
        if self.ready or self.audio_problem is not None or not self._link_tried:
            return
        self.ready = True
        logger.info("ready: %s", self.status)
        if self.on_ready is not None:
            self.on_ready(self.status)

    # ------------------------------------------------------------ API actions

    def request_turn(self, source: str = "api") -> bool:
        """Start a turn as if a button was pressed; False if one cannot start now."""
        now = self.clock.now()
        commands = self.machine.request_turn(source, now)
        self._execute(commands, now)
        return any(isinstance(c, BeginTurn) for c in commands)

    def request_interrupt(self, source: str = "api") -> bool:
        """Stop the reply now; False if nothing was playing or pending."""
        now = self.clock.now()
        commands = self.machine.request_interrupt(source, now)
        self._execute(commands, now)
        return any(isinstance(c, StopPlayback) for c in commands)

    def _set_status(self, text: str) -> None:
        if text != self.status:
            self.status = text
            if self.on_state is not None:
                self.on_state(text)

    # -------------------------------------------------------------- capture

    async def _capture(self) -> None:
        backoff = Backoff(BackoffSettings(initial_ms=500, max_ms=self.config.audio.reopen_max_ms,
                                          min_ms=200))
        if self.capture_after_link:
            await self._connected.wait()
        while True:
            try:
                await self.source.open()
                self.audio_problem = None
                backoff.reset()
                self._maybe_ready()
                while True:
                    frame = await self.source.read()
                    self._on_frame(frame)
            except EOFError:
                logger.info("audio source %s ended", self.source.name)
                if self.exit_on_eof:
                    self.stop()
                return
            except AudioDeviceError as exc:
                delay = backoff.next_delay()
                self.audio_problem = f"microphone unavailable: {exc}"
                self.counters.audio_reopens += 1
                logger.warning("%s; reopening in %.1f s", self.audio_problem, delay)
                self._set_status(f"{self.audio_problem}; retrying in {delay:.1f} s")
                with contextlib.suppress(Exception):
                    await self.source.close()
                await self.clock.sleep(delay)

    def _echo_reference_dbfs(self, now: float) -> float | None:
        """The level our own playback is expected to reach in the microphone now."""
        if self.barge_in is None:
            return None
        if self.playback.playing:
            self.barge_in.guard.on_playback_block(self.playback.last_block_dbfs, now)
        return self.barge_in.reference_dbfs(now)

    def _on_frame(self, frame: bytes) -> None:
        now = self.clock.now()
        self._frame_index += 1
        self.counters.frames_captured += 1
        detector = self.detector
        decision = detector.process(frame, self._echo_reference_dbfs(now))
        trigger_events: list[TriggerEvent] = []
        for trigger in self.audio_triggers:
            trigger_events.extend(trigger.process(frame))
        if self.barge_in is not None:
            # the detector has just measured this frame's level: do not measure it twice
            trigger_events.extend(self.barge_in.detector.on_capture_frame(detector.level_dbfs, now))
        event = decision.event
        started = event.preroll if isinstance(event, SpeechStarted) else None
        if started is not None and self._wake_frame_index is not None:
            # the wake word itself is not sent upstream: cut the pre-roll after it
            after = self._frame_index - self._wake_frame_index - 1
            started = started[len(started) - min(len(started), max(0, after)):]
        ended = isinstance(event, SpeechEnded)
        voiced = detector.level_dbfs >= detector.release_threshold_dbfs()
        commands = self.machine.on_frame(frame, speech_started=started, speech_ended=ended,
                                         in_speech=decision.send, now=now, voiced=voiced)
        if self.current is not None:
            if started is not None and self.current.speech_start is None:
                self.current.speech_start = now
            if ended and self.current.speech_end is None:
                self.current.speech_end = now
        self._execute(commands, now)
        for trigger_event in trigger_events:
            self._on_trigger_event(trigger_event)

    def _on_trigger_event(self, event: TriggerEvent) -> None:
        """A button, wake word or barge-in detector asked for something."""
        now = self.clock.now()
        logger.debug("trigger: %s", event)
        if isinstance(event, TurnStartRequested):
            if event.source == "wake":
                self._wake_frame_index = self._frame_index
            commands = self.machine.request_turn(event.source, now)
        elif isinstance(event, TurnEndRequested):
            commands = self.machine.request_end(event.source, event.reason, now)
        elif isinstance(event, InterruptRequested):
            commands = self.machine.request_interrupt(event.source, now)
        elif isinstance(event, MuteToggled):
            commands = self.machine.set_muted(event.muted, now)
        else:  # pragma: no cover - the union is exhaustive
            return
        self._execute(commands, now)

    # ------------------------------------------------------------ feedback

    def _show_state(self) -> None:
        state = {
            TurnState.LISTENING: DeviceState.LISTENING,
            TurnState.THINKING: DeviceState.THINKING,
            TurnState.SPEAKING: DeviceState.SPEAKING,
            TurnState.MUTED: DeviceState.MUTED,
            TurnState.IDLE: DeviceState.IDLE,
        }[self.machine.state]
        if state is DeviceState.IDLE:
            if not (self.link.connected or self.link.suspended):
                state = DeviceState.OFFLINE
            elif self.clock.now() < self._error_until:
                state = DeviceState.ERROR
        self.device_state = state
        if state is self._shown:
            return
        self._shown = state
        for trigger in self.triggers:
            trigger.set_state(state)
        if self.barge_in is not None:
            self.barge_in.set_state(state)
        if self.display is not None:
            self.display.set_state(state)

    def _play_earcon(self, kind: str) -> None:
        if kind == "error":
            self._error_until = self.clock.now() + ERROR_STATE_S
        if self.earcons is None:
            return
        if "reply" in self._playing:
            # never talk over the assistant; an error (a reply cut by a fault) is
            # played once what did arrive of the reply has been heard
            if kind == "error":
                self._earcon_after_reply = kind
            return
        # Mixed in, not queued: a reply that arrives meanwhile cuts it instead of
        # waiting behind it (the "done" cue used to delay every answer by 225 ms).
        self.playback.play_cue(self.earcons.pcm(EARCONS[kind]))

    # ------------------------------------------------------------- commands

    def _execute(self, commands: list[Command], now: float) -> None:
        for command in commands:
            if isinstance(command, StreamFrame):
                self._send_frame(command.pcm, now)
            elif isinstance(command, BeginTurn):
                self._begin_turn(command, now)
            elif isinstance(command, FinishTurn):
                self.link.send(TurnEnd(command.turn_id, command.reason))
                if self.current is not None:
                    self.current.turn_end = now
                    if command.reason in ("no_speech", "cancelled"):
                        self._close_turn(command.reason)
            elif isinstance(command, StopPlayback):
                self.playback.flush()
                self._playing.clear()
                self._earcon_after_reply = None
                self.resampler.reset()
                self._discard_downlink = True
                self.counters.interrupts += 1
                if command.notify_relay:
                    self.link.send(Interrupt(reason=command.reason))
                logger.info("playback stopped (%s)", command.reason)
            elif isinstance(command, PlayEarcon):
                self._play_earcon(command.kind)
            elif isinstance(command, StateChanged):
                self._on_state_changed(command)
                self._show_state()

    def _begin_turn(self, command: BeginTurn, now: float) -> None:
        if self.current is not None and self.current.outcome == "open":
            self._close_turn("superseded")
        self.current = TurnTimeline(command.turn_id, command.trigger, now)
        if command.trigger == "vad":
            self.current.speech_start = now
        self.counters.turns += 1
        self._uplink_index = 0
        self.sink.prepare()  # a parked speaker reopens now, long before the reply
        self.link.send(TurnStart(command.turn_id, command.trigger))
        for pcm in command.preroll:
            self._send_frame(pcm, now)

    def _send_frame(self, pcm: bytes, now: float) -> None:
        flags = AudioFlags.START if self._uplink_index == 0 else AudioFlags.NONE
        packet = self.encoder.encode(pcm)
        if self.link.send_audio(packet, self._uplink_index * 20, flags):
            self.counters.frames_sent += 1
        self._uplink_index += 1
        if self.current is not None:
            self.current.uplink_frames += 1
            if self.current.first_uplink is None:
                self.current.first_uplink = now

    def _state_text(self, state: TurnState) -> str:
        """What the daemon is doing, in the words STATUS= and the log use."""
        return {
            TurnState.IDLE: "listening for speech" if self.config.turn.always_on else "idle",
            TurnState.LISTENING: f"streaming turn {self.machine.turn_id}",
            TurnState.THINKING: f"waiting for the reply to turn {self.machine.turn_id}",
            TurnState.SPEAKING: f"playing the reply to turn {self.machine.turn_id}",
            TurnState.MUTED: "microphone muted",
        }[state]

    def _on_state_changed(self, change: StateChanged) -> None:
        state = change.state
        if self.link.connected:
            self._set_status(self._state_text(state))
        if change.previous is TurnState.SPEAKING and state is not TurnState.SPEAKING and \
                self.current is not None and self.current.outcome == "open" and \
                state is TurnState.LISTENING:
            self._close_turn("interrupted")

    def _close_turn(self, outcome: str) -> None:
        turn = self.current
        if turn is None or turn.outcome != "open":
            return
        turn.outcome = outcome
        self.turns.append(turn)
        logger.info("turn %d %s: %s", turn.turn_id, outcome, turn.milestones_ms())
        if self.on_turn_done is not None:
            self.on_turn_done(turn)

    # ------------------------------------------------------------- playback

    def _playback_event_threadsafe(self, event: object) -> None:
        # PlaybackBuffer may call this from the audio thread: hop onto the loop.
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_playback_event, event)

    def _on_playback_event(self, event: object) -> None:
        now = self.clock.now()
        what = self._playing[0] if self._playing else "reply"
        if isinstance(event, PlaybackEnded) and self._playing:
            self._playing.popleft()
            if what == "reply" and self._earcon_after_reply is not None:
                kind, self._earcon_after_reply = self._earcon_after_reply, None
                self._play_earcon(kind)
        if what != "reply":
            return  # an earcon: not part of any turn
        turn = self.current
        if isinstance(event, PlaybackStarted):
            if turn is not None and turn.playback_start is None:
                turn.playback_start = now
        elif isinstance(event, PlaybackEnded):
            if turn is not None and not event.flushed:
                turn.playback_end = now
                self._close_turn("completed")
            elif turn is not None:
                self._close_turn("interrupted")
            self._execute(self.machine.on_reply_finished(now), now)

    # ---------------------------------------------------------- link events

    def link_up(self, welcome: Welcome) -> None:
        now = self.clock.now()
        self.session_id = welcome.session_id
        self._connected.set()
        self._execute(self.machine.on_link(True, now), now)
        self._set_status(self._state_text(self.machine.state))
        self._link_tried = True
        self._maybe_ready()
        self._show_state()
        if self.config.relay.stats_interval_s:
            self.link.send(Stats(self.compact_stats()))  # the fleet view is current at once

    def link_down(self, reason: str, retry_in_s: float | None) -> None:
        now = self.clock.now()
        self._execute(self.machine.on_link(False, now), now)
        if self.current is not None and self.current.outcome == "open" and \
                self.current.first_downlink is None:
            self._close_turn("link_lost")
        when = f"reconnecting in {retry_in_s:.1f} s: " if retry_in_s is not None else ""
        self._set_status(f"{when}{reason}")
        self._link_tried = True
        self._maybe_ready()
        self._show_state()

    def link_suspended(self, reason: str, retry_in_s: float | None,
                       resume_within_s: float) -> None:
        """The connection dropped but the relay keeps the session: the turn goes on,
        what is said meanwhile is queued by the link and replayed on resume."""
        self.counters.suspensions += 1
        when = f"reconnecting in {retry_in_s:.1f} s" if retry_in_s is not None \
            else "reconnecting"
        self._set_status(f"link interrupted, {when}; session kept {resume_within_s:.0f} s "
                         f"more: {reason}")
        self._link_tried = True
        self._maybe_ready()

    def on_message(self, message: Message) -> None:
        now = self.clock.now()
        if isinstance(message, ResponseStart):
            self._playing.append("reply")
            self._discard_downlink = False
            self._response_frames = 0
            self.decoder.reset()
            self.resampler.reset()
            self._execute(self.machine.on_response_start(now), now)
        elif isinstance(message, ResponseEnd):
            if self._discard_downlink or message.reason == "interrupted":
                return
            self.playback.end_of_response()
            if self._response_frames == 0:
                if "reply" in self._playing:
                    self._playing.remove("reply")
                if self.current is not None:
                    self._close_turn("no_reply")
                self._execute(self.machine.on_reply_finished(now), now)
        elif isinstance(message, Interrupt):
            self._execute(self.machine.on_remote_interrupt(now), now)
        elif isinstance(message, Transcript):
            logger.info("%s said: %s", message.role, message.text)
            if self.current is not None and message.final:
                self.current.transcripts.append((message.role, message.text))
        elif isinstance(message, Error):
            self.counters.errors[message.code] = self.counters.errors.get(message.code, 0) + 1
            logger.warning("relay error %s: %s", message.code, message.message)
            self._execute(self.machine.on_error(now), now)

    def on_audio(self, received: AudioReceived) -> None:
        if self._discard_downlink:
            return
        now = self.clock.now()
        self.counters.frames_received += 1
        self._response_frames += 1
        try:
            pieces = self.decoder.decode_after_gap(received.frame.payload, received.missing,
                                                   MAX_CONCEALED_FRAMES)
            self.counters.frames_concealed += len(pieces) - 1
            for pcm in pieces:
                self._play(pcm)
        except OpusDecodeError as exc:
            logger.warning("undecodable downlink frame %d: %s", received.frame.seq, exc)
            self._play(self.decoder.conceal())
        turn = self.current
        if turn is not None:
            turn.downlink_frames += 1
            if turn.first_downlink is None:
                turn.first_downlink = now

    def _play(self, pcm24k: bytes) -> None:
        out = self.resampler.process_bytes(pcm24k)
        if out:
            self.playback.push(out)

    # ----------------------------------------------------------------- time

    async def _ticker(self) -> None:
        last_stats = self.clock.now()
        interval = self.config.relay.stats_interval_s
        while True:
            await self.clock.sleep(0.1)
            now = self.clock.now()
            self._execute(self.machine.tick(now), now)
            self._show_state()  # the ERROR state times out
            if interval and now - last_stats >= interval and self.link.connected:
                last_stats = now
                self.link.send(Stats(self.compact_stats()))

    # ----------------------------------------------------------------- stats

    def compact_stats(self) -> dict[str, Any]:
        """A small stats dict pushed to the relay's fleet view."""
        link = self.link.stats
        source = self.source.stats
        return {
            "version": __version__,
            "timezone": self.config.timezone,
            "uptime_s": round(self.clock.now() - self.started_at, 1),
            "state": self.machine.state.value,
            "rtt_ms": None if link.rtt_ms is None else round(link.rtt_ms, 1),
            "reconnects": link.reconnects,
            "frames_captured": source.frames_captured,
            "frames_dropped": source.frames_dropped,
            "frames_sent": self.counters.frames_sent,
            "underruns": self.playback.stats.underruns,
            "turns": self.counters.turns,
            "noise_floor_dbfs": round(self.detector.noise_floor_dbfs, 1),
            "audio_problem": self.audio_problem,
        }

    def counters_dict(self) -> dict[str, Any]:
        return asdict(self.counters)
