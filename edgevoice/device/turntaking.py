"""Turn taking: captured frames and requests in, the turn machine's commands carried out.

Each captured frame goes through the silence detector, the audio triggers (wake
word) and the barge-in detector, then into the :class:`~edgevoice.device.turn.TurnMachine`;
button, API and wake events become requests to it; the relay's messages about the
reply (start, end, interrupt, error) do too. The machine decides; this class only
hands its commands to the piece that owns each job: the uplink (turn start, frames),
the downlink (stop playback), the turn records, the earcons and the shown state, and
the link (turn end, interrupt).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from edgevoice.audio.aec import EchoCanceller, ReferenceFifo
from edgevoice.audio.base import FRAME_MS
from edgevoice.audio.playback import PlaybackEnded, PlaybackEvent, PlaybackStarted
from edgevoice.audio.silence import SilenceDetector, SpeechEnded, SpeechStarted
from edgevoice.clock import Clock
from edgevoice.device.downlink import Downlink, ResponseEnd
from edgevoice.device.observer import DeviceObserver
from edgevoice.device.records import DeviceCounters, TurnOutcome, TurnRecorder
from edgevoice.device.status import EarconPlayer, StatePresenter, StatusBoard
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
from edgevoice.device.uplink import LinkPort, Uplink
from edgevoice.protocol.messages import (
    TURN_REFUSED_CODE,
    Error,
    Interrupt,
    Message,
    ResponseStart,
    Transcript,
    TurnEnd,
)
from edgevoice.protocol.messages import (
    ResponseEnd as ResponseEndMessage,
)
from edgevoice.triggers.bargein import VoiceBargeInTrigger, pcm_dbfs
from edgevoice.triggers.base import (
    AudioTrigger,
    InterruptRequested,
    MuteToggled,
    QuietListener,
    TriggerEvent,
    TurnEndRequested,
    TurnStartRequested,
)
from edgevoice.triggers.wake import WakeUplinkBuffer

logger = logging.getLogger(__name__)

#: Seconds between two plays of the (optional) thinking sound while waiting.
THINKING_EVERY_S = 1.5
#: ... and how long after the user's turn ended it first plays.
THINKING_AFTER_S = 0.6
#: A turn started by voice reopens a parked speaker this long before its hangover can
#: run out, not as it begins: an open output stream wakes its audio threads every block
#: (0.9 % of a core on the virtual card, bench row 2) and nothing plays while the user
#: talks. The lead covers a reopened stream's start: the sink's 160 ms lead-in, over
#: PulseAudio's first ~140 ms, then room for the reply's first packets.
SPEAKER_LEAD_MS = 400


class TurnTaking:
    """Owns the turn machine; routes frames, requests and reply events through it."""

    def __init__(self, machine: TurnMachine, detector: SilenceDetector, clock: Clock, *,
                 link: LinkPort, uplink: Uplink, downlink: Downlink, records: TurnRecorder,
                 earcons: EarconPlayer, presenter: StatePresenter, status: StatusBoard,
                 counters: DeviceCounters, observer: DeviceObserver,
                 audio_triggers: Sequence[AudioTrigger] = (),
                 barge_in: VoiceBargeInTrigger | None = None,
                 echo_canceller: EchoCanceller | None = None,
                 reference: ReferenceFifo | None = None,
                 recent_frames: int = 75, thinking_sound: bool = False) -> None:
        """``echo_canceller`` with its ``reference`` (what the speaker played, in the
        capture's clock) cleans every frame before anything hears it; ``recent_frames``
        of captured audio are kept for a wake word's ``rewind_frames``;
        ``thinking_sound`` repeats the thinking earcon while a reply is awaited."""
        self.machine = machine
        self.detector = detector
        self.clock = clock
        self.link = link
        self.uplink = uplink
        self.downlink = downlink
        self.records = records
        self.earcons = earcons
        self.presenter = presenter
        self.status = status
        self.counters = counters
        self.observer = observer
        self.audio_triggers = list(audio_triggers)
        # the audio triggers that may take a quiet room's frames late (all, or batching
        # stops at the first one that cannot)
        self._quiet_listeners: list[QuietListener] | None = [
            t for t in self.audio_triggers if isinstance(t, QuietListener)]
        if len(self._quiet_listeners) != len(self.audio_triggers):
            self._quiet_listeners = None
        self.barge_in = barge_in
        self._frame_index = 0
        self._wake_frame_index: int | None = None
        self.echo_canceller = echo_canceller
        self.reference = reference if echo_canceller is not None else None
        self._recent = WakeUplinkBuffer(max(1, recent_frames))
        self.thinking_sound = thinking_sound
        self._thinking_at = float("-inf")
        # a voice turn's speaker opens once its hangover is this many frames old
        # (None: no turn waits for that)
        self._speaker_after_quiet: int | None = None

    # ------------------------------------------------------------- capture

    def on_frame(self, frame: bytes) -> None:
        """One captured 20 ms frame."""
        now = self.clock.now()
        self._frame_index += 1
        self.counters.frames_captured += 1
        raw_dbfs: float | None = None
        if self.echo_canceller is not None and self.reference is not None:
            # everything below hears the microphone without the device's own voice
            raw_dbfs = pcm_dbfs(frame)
            frame = self.echo_canceller.process(frame, self.reference.read())
        self._recent.push(self._frame_index, frame)
        detector = self.detector
        decision = detector.process(frame, self._echo_reference_dbfs(now))
        if (self._speaker_after_quiet is not None
                and detector.quiet_run_frames >= self._speaker_after_quiet):
            self._prepare_speaker()
        trigger_events: list[TriggerEvent] = []
        for trigger in self.audio_triggers:
            # the level just measured: a wake word's gate skips its models in a quiet room
            trigger_events.extend(trigger.process(frame, detector.level_dbfs,
                                                  detector.noise_floor_dbfs))
        if self.barge_in is not None:
            # the detector has just measured this frame's level: do not measure it twice
            trigger_events.extend(self.barge_in.detector.on_capture_frame(
                detector.level_dbfs, now, raw_dbfs=raw_dbfs))
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
        self.records.speech(started=started is not None, ended=ended, now=now)
        self.execute(commands, now)
        for trigger_event in trigger_events:
            self.on_trigger_event(trigger_event)

    def quiet_margin_db(self) -> float | None:
        """None unless the last frame left the device waiting for nothing but a speech
        onset or a louder frame for an audio trigger: idle, the detector settled in
        QUIET, nothing playing, every audio trigger only storing frames (the wake
        word's quiet gate closed). Then quiet frames may reach :meth:`on_frame` in
        batches (they change only the detector's floor and pre-roll and the triggers'
        rings), which the idle gate allows, and this says how far above the noise floor
        an audio trigger needs a frame at once: the smallest margin of them,
        ``math.inf`` when none listens below the detector's onset.

        Called after every frame: one pass over the triggers, nothing allocated."""
        if not (self.machine.state is TurnState.IDLE and self.detector.settled_quiet
                and not self.downlink.playback.busy):
            return None
        listeners = self._quiet_listeners
        if listeners is None:
            return None
        smallest = math.inf
        for trigger in listeners:
            margin = trigger.listen_margin_db()
            if margin is None:
                return None
            if margin < smallest:
                smallest = margin
        return smallest

    def _echo_reference_dbfs(self, now: float) -> float | None:
        """The level our own playback is expected to reach in the microphone now."""
        if self.barge_in is None:
            return None
        playback = self.downlink.playback
        if playback.playing:
            self.barge_in.detector.on_playback_block(playback.last_block_dbfs, now)
        return self.barge_in.reference_dbfs(now)

    # ------------------------------------------------------------ requests

    def on_trigger_event(self, event: TriggerEvent) -> None:
        """A button, wake word or barge-in detector asked for something."""
        now = self.clock.now()
        logger.debug("trigger: %s", event)
        if isinstance(event, TurnStartRequested):
            if event.source == "wake":
                self._wake_frame_index = self._frame_index
            # what followed the wake phrase before it was recognised belongs to the turn
            preroll = (self._recent.since(self._frame_index - event.rewind_frames + 1)
                       if event.rewind_frames > 0 else ())
            commands = self.machine.request_turn(event.source, now, held=event.held,
                                                 preroll=preroll)
        elif isinstance(event, TurnEndRequested):
            commands = self.machine.request_end(event.source, event.reason, now)
        elif isinstance(event, InterruptRequested):
            commands = self.machine.request_interrupt(event.source, now)
        elif isinstance(event, MuteToggled):
            commands = self.machine.set_muted(event.muted, now)
        else:  # pragma: no cover - the union is exhaustive
            return
        self.execute(commands, now)

    def request_turn(self, source: str) -> bool:
        """Start a turn as if a button was pressed; False if one cannot start now."""
        now = self.clock.now()
        commands = self.machine.request_turn(source, now)
        self.execute(commands, now)
        return any(isinstance(c, BeginTurn) for c in commands)

    def request_interrupt(self, source: str) -> bool:
        """Stop the reply now; False if nothing was playing or pending."""
        now = self.clock.now()
        commands = self.machine.request_interrupt(source, now)
        self.execute(commands, now)
        return any(isinstance(c, StopPlayback) for c in commands)

    # ---------------------------------------------------------------- link

    def link_changed(self, up: bool, now: float) -> None:
        self.execute(self.machine.on_link(up, now), now)
        if up:
            self.status.set(self.state_text(self.machine.state))
        else:
            turn = self.records.open_turn
            if turn is not None and turn.first_downlink is None:
                self.records.close(TurnOutcome.LINK_LOST)

    def on_message(self, message: Message) -> None:
        """A control message about the reply."""
        now = self.clock.now()
        if isinstance(message, ResponseStart):
            self.observer.response_started(now)
            self.downlink.response_start()
            self.execute(self.machine.on_response_start(now), now)
        elif isinstance(message, ResponseEndMessage):
            if self.downlink.response_end(message.reason) is ResponseEnd.EMPTY:
                if self.records.current is not None:
                    self.records.close(TurnOutcome.NO_REPLY)
                self.execute(self.machine.on_reply_finished(now), now)
        elif isinstance(message, Interrupt):
            self.observer.remote_interrupt(now)
            self.execute(self.machine.on_remote_interrupt(now), now)
        elif isinstance(message, Transcript):
            # what people say is not for the journal by default (privacy, volume)
            logger.debug("%s said: %s", message.role, message.text)
            if message.final:
                self.records.transcript(message.role, message.text)
        elif isinstance(message, Error):
            self.counters.errors[message.code] = self.counters.errors.get(message.code, 0) + 1
            logger.warning("relay error %s: %s", message.code, message.message)
            self.execute(self.machine.on_error(
                now, turn_refused=message.code == TURN_REFUSED_CODE), now)

    def on_reply_playback(self, event: PlaybackEvent, now: float) -> None:
        """The reply started reaching the speaker, or ended (drained or flushed)."""
        if isinstance(event, PlaybackStarted):
            self.records.playback_started(now)
        elif isinstance(event, PlaybackEnded):
            if not event.flushed:
                self.earcons.reply_ended()
            self.records.playback_ended(flushed=event.flushed, now=now)
            self.execute(self.machine.on_reply_finished(now), now)

    def tick(self, now: float) -> None:
        waiting = self.machine.state is TurnState.THINKING
        self.execute(self.machine.tick(now), now)
        if waiting and self.machine.state is not TurnState.THINKING:
            # only the reply timeout leaves THINKING on a tick: no reply will come
            self.records.close(TurnOutcome.REPLY_TIMEOUT)
        if self.thinking_sound and self.machine.state is TurnState.THINKING and \
                now - self._thinking_at >= THINKING_EVERY_S:
            # a cue: the reply cuts it the moment it starts
            self._thinking_at = now
            self.earcons.play("thinking")
        self.presenter.show(self.machine.state)  # the ERROR state times out

    def stopping(self) -> None:
        """The daemon stops: a turn being streamed is cancelled on the relay's side."""
        current = self.records.current
        if self.machine.state is TurnState.LISTENING and current is not None:
            self.link.send(TurnEnd(current.turn_id, "cancelled"))

    # ------------------------------------------------------------ commands

    def execute(self, commands: list[Command], now: float) -> None:
        for command in commands:
            if isinstance(command, StreamFrame):
                self.uplink.send(command.pcm, now)
            elif isinstance(command, BeginTurn):
                self.records.begin(command.turn_id, command.trigger, now)
                if command.trigger == "vad":  # no cue plays: open it as speech may end
                    lead = SPEAKER_LEAD_MS // FRAME_MS
                    self._speaker_after_quiet = max(1, self.detector.hangover_frames - lead)
                else:  # its cue opens the speaker now anyway; the reply may come soon
                    self._prepare_speaker()
                self.uplink.begin(command.turn_id, command.trigger, command.preroll, now)
            elif isinstance(command, FinishTurn):
                if self._speaker_after_quiet is not None and command.reason != "no_speech":
                    self._prepare_speaker()  # ended before its hangover was old enough
                self._speaker_after_quiet = None
                self.link.send(TurnEnd(command.turn_id, command.reason))
                self.records.finished(command.reason, now)
            elif isinstance(command, StopPlayback):
                self.downlink.stop(command.reason)
                self.earcons.cancel_pending()
                if command.notify_relay:
                    self.link.send(Interrupt(reason=command.reason))
            elif isinstance(command, PlayEarcon):
                self.earcons.play(command.kind)
            elif isinstance(command, StateChanged):
                self._on_state_changed(command)
                self.presenter.show(self.machine.state)

    def _prepare_speaker(self) -> None:
        """A reply may come soon: a parked speaker reopens now, to have settled by then."""
        self._speaker_after_quiet = None
        self.downlink.prepare()

    def state_text(self, state: TurnState) -> str:
        """What the daemon is doing, in the words STATUS= and the log use."""
        turn_id = self.machine.turn_id
        return {
            TurnState.IDLE: "listening for speech" if self.machine.settings.always_on
            else "idle",
            TurnState.LISTENING: f"streaming turn {turn_id}",
            TurnState.THINKING: f"waiting for the reply to turn {turn_id}",
            TurnState.SPEAKING: f"playing the reply to turn {turn_id}",
            TurnState.MUTED: "microphone muted",
            TurnState.FOLLOW_UP: f"listening for a follow-up to turn {turn_id}",
        }[state]

    def _on_state_changed(self, change: StateChanged) -> None:
        state = change.state
        logger.info("state=%s previous=%s turn=%d", state.value, change.previous.value,
                    self.machine.turn_id)
        if change.previous is TurnState.LISTENING:  # ended or cancelled: nothing to open
            self._speaker_after_quiet = None
        if state is TurnState.THINKING:  # first thinking sound after the "done" earcon
            self._thinking_at = self.clock.now() - THINKING_EVERY_S + THINKING_AFTER_S
        if self.link.connected:
            self.status.set(self.state_text(state))
        # the user talked over the reply: that reply's turn ends here
        if change.previous is TurnState.SPEAKING and state is TurnState.LISTENING and \
                self.records.open_turn is not None:
            self.records.close(TurnOutcome.INTERRUPTED)
