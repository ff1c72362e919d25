"""One device's conversation with Nova Sonic, as a state machine without I/O.

:class:`SessionCore` decides; the runner (:mod:`edgevoice.nova.upstream`) does.
Every input is a method call that takes ``now`` (monotonic seconds) and returns a
list of :data:`Action` for the runner to carry out: open a stream with these first
events, send these events, close or abort a stream, run a tool, or emit an
:mod:`upstream <edgevoice.upstream.base>` event to the device. Tests drive it
directly, with made-up time.

States (:class:`SessionState`; every legal move is in ``_TRANSITIONS``)::

    CLOSED ──start_turn──► OPENING ──opened──► OPEN ──age, at a pause──► ROTATING
      ▲                      │  ▲                │  ◄──next stream opened──┘
      │                      │  └──BACKOFF◄──────┤ (throttled, lost, timed out)
      └──────CLOSING◄────────┴─────idle─────────-┘
    any ──close()──► STOPPED

* A stream is opened lazily, when the device starts a turn. Nova hears what a turn
  needs and no more (audio is billed): the device's frames, gaps between them filled
  with silence at real time, and after the last frame the silence Nova's turn
  detection waits for (its end-of-turn pause plus a margin), until its reply starts.
  While nobody speaks nothing is sent, and the stream is closed soon after a reply.
* Rotation: AWS ends a stream after 8 minutes, so after ``rotate_after_s``, at a
  pause, a new stream is opened with the conversation so far. The old one hears
  silence meanwhile; the user's audio is held and replayed into the new stream,
  which takes over once open. Nothing said during the switch is lost.
* Idle close: after ``idle_close_s`` without speech or reply the stream is closed,
  because an open stream is billed; the next turn opens a new one with history.
* Recovery: a failure is classified by :mod:`edgevoice.nova.faults`. When the user
  is waiting for an answer (speaking, or the question is unanswered, or the reply
  was cut), the question is replayed once into a fresh stream that carries the
  history; the device's reply goes on (it hears the answer start over). If that
  does not bring an answer within ``open_timeout_s`` plus the first-output deadline,
  or fails too, the device gets ``ResponseEnded("error")`` (if a reply had started)
  and ``UpstreamFailed``. Anything an operator must fix is told at once
  (``retryable=False``). A stream that ends without ``completionEnd`` was lost.
* Stalls: no event within the first-output deadline after the turn ended (Nova's
  end-of-turn pause plus ``reply_margin_s``), no event for ``stall_timeout_s`` in
  the middle of a reply, or none within ``tool_ack_timeout_s`` of a tool result:
  the stream is torn down and replaced as above, never kept.
"""

from __future__ import annotations

import collections
import enum
import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from edgevoice.backoff import Backoff, BackoffSettings
from edgevoice.errors import IllegalTransitionError
from edgevoice.nova import events as nova
from edgevoice.nova.faults import (
    STREAM_ENDED,
    STREAM_LOST,
    STREAM_STALLED,
    Diagnosis,
    Fault,
    Recovery,
    classify,
)
from edgevoice.nova.history import ConversationHistory, HistoryLimits
from edgevoice.nova.settings import NovaSettings
from edgevoice.upstream.base import (
    AudioOutput,
    ResponseEnded,
    ResponseInterrupted,
    ResponseStarted,
    ToolCalled,
    TranscriptReceived,
    UpstreamEvent,
    UpstreamFailed,
    UsageReported,
)

logger = logging.getLogger(__name__)

FRAME_S = 0.02
FRAME_BYTES = 640  # 20 ms of 16 kHz mono s16le
SILENCE_FRAME = bytes(FRAME_BYTES)
#: How far the audio sent may lag real time before silence is filled in: covers
#: the jitter of device frames, so a late frame is not raced by a silent one.
SILENCE_SLACK_S = 0.06
#: After a stall of the event loop longer than this, skip ahead instead of
#: bursting seconds of silence.
MAX_SILENCE_CATCH_UP_S = 1.0
#: Content blocks remembered per stream (their role and type matter at contentEnd).
MAX_OPEN_CONTENTS = 64
#: Silence sent after the user's last frame beyond Nova's end-of-turn pause.
TAIL_MARGIN_S = 0.5
#: Rotate this long before the stream's credentials expire (soft, at a pause) ...
CREDENTIALS_MARGIN_S = 120.0
#: ... and at the latest this long before, whatever is going on.
CREDENTIALS_HARD_MARGIN_S = 30.0
#: ``response_end`` reasons the device may see (docs/protocol.md).
END_TURN = "end_turn"
INTERRUPTED = "interrupted"
ENDED_BY_ERROR = "error"
RESPONSE_END_REASONS: frozenset[str] = frozenset({END_TURN, INTERRUPTED, ENDED_BY_ERROR})


class SessionState(enum.Enum):
    """Where the conversation with Nova stands."""

    CLOSED = "closed"  # no stream; the next turn opens one
    OPENING = "opening"  # a stream is being opened; the user's audio is held
    OPEN = "open"  # a stream is open and hears continuous audio
    ROTATING = "rotating"  # the open stream is being replaced by a fresh one
    BACKOFF = "backoff"  # waiting to reopen after a failure; audio is held
    CLOSING = "closing"  # the stream was closed for idleness; waiting for its end
    STOPPED = "stopped"  # the device session is over (terminal)


_S = SessionState
_TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    _S.CLOSED: frozenset({_S.OPENING, _S.STOPPED}),
    _S.OPENING: frozenset({_S.OPEN, _S.OPENING, _S.BACKOFF, _S.CLOSED, _S.STOPPED}),
    _S.OPEN: frozenset({_S.ROTATING, _S.OPENING, _S.BACKOFF, _S.CLOSING, _S.CLOSED, _S.STOPPED}),
    _S.ROTATING: frozenset({_S.OPEN, _S.OPENING, _S.BACKOFF, _S.CLOSED, _S.STOPPED}),
    _S.BACKOFF: frozenset({_S.OPENING, _S.CLOSED, _S.STOPPED}),
    _S.CLOSING: frozenset({_S.CLOSED, _S.OPENING, _S.STOPPED}),
    _S.STOPPED: frozenset(),
}


#: kept under its old name for callers of this module
IllegalTransition = IllegalTransitionError

# --- actions for the runner -------------------------------------------------------


@dataclass(frozen=True)
class OpenStream:
    """Open stream ``stream_id`` and send ``events`` first (session, prompt, history)."""

    stream_id: int
    events: tuple[nova.Event, ...]


@dataclass(frozen=True)
class SendEvents:
    """Send ``events`` on ``stream_id``, in order, after everything queued before."""

    stream_id: int
    events: tuple[nova.Event, ...]


@dataclass(frozen=True)
class SendAudio:
    """Send ``frames`` (16 kHz s16le PCM) as ``audioInput`` of the stream's audio content,
    in order, after everything queued before. Raw PCM: the shell encodes it once, and
    may join frames that wait together into one event."""

    stream_id: int
    prompt_name: str
    content_name: str
    frames: tuple[bytes, ...]


@dataclass(frozen=True)
class CloseStream:
    """Send ``events`` (contentEnd, promptEnd, sessionEnd), close the input, drain output."""

    stream_id: int
    events: tuple[nova.Event, ...]


@dataclass(frozen=True)
class AbortStream:
    """Tear ``stream_id`` down without a goodbye (it failed or stalled)."""

    stream_id: int


@dataclass(frozen=True)
class RunTool:
    """Run a tool and report back with :meth:`SessionCore.tool_finished`."""

    stream_id: int
    tool_use_id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Emit:
    """Deliver ``event`` to the device's session."""

    event: UpstreamEvent


Action = OpenStream | SendEvents | SendAudio | CloseStream | AbortStream | RunTool | Emit


# --- internal bookkeeping ------------------------------------------------------------


@dataclass
class _Stream:
    """What the core knows about one stream."""

    id: int
    prompt_name: str
    audio_content: str
    requested_at: float
    opened_at: float | None = None
    #: Real time up to which audio has been sent (device frames or silence).
    audio_clock: float = 0.0
    contents: collections.OrderedDict[str, nova.ContentStarted] = field(
        default_factory=collections.OrderedDict
    )
    completion_open: bool = False
    completion_ended: bool = False
    got_output: bool = False
    last_output_at: float = 0.0
    #: Silence is filled, at real time, up to this audio clock reading.
    fill_until: float = 0.0
    #: When the credentials this stream was signed with expire (monotonic), if known.
    expires_at: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0


def _closes_tool_use(stream: _Stream, event: nova.OutputEvent) -> bool:
    """Whether ``event`` is the ``contentEnd`` of a toolUse block (part of the request)."""
    if not isinstance(event, nova.ContentEnded):
        return False
    if event.type == nova.TYPE_TOOL or event.stop_reason == nova.STOP_TOOL_USE:
        return True
    started = stream.contents.get(event.content_id)
    return started is not None and started.type == nova.TYPE_TOOL


@dataclass
class _Response:
    """The reply being spoken."""

    started_at: float
    #: The device interrupted it locally: drop the rest of its audio.
    suppressed: bool = False
    #: Its stream failed; a fresh stream answers the replayed question into it.
    restarting: bool = False


@dataclass
class SessionStats:
    """Counters for logs and metrics."""

    streams_opened: int = 0
    rotations: int = 0
    resumes: int = 0
    idle_closes: int = 0
    failures: int = 0
    pending_frames_dropped: int = 0
    frames_without_stream: int = 0
    audio_chunks_dropped: int = 0
    malformed_events: int = 0
    unknown_events: int = 0
    silence_frames: int = 0
    #: every 20 ms audio frame sent to Nova: the user's, replayed and silence
    audio_frames_sent: int = 0
    #: ``audioInput`` events that carried them: frames queued together for a stream
    #: leave as one event (the I/O shell's writer joins them)
    audio_events_sent: int = 0
    #: questions replayed into a fresh stream after a fault or stall
    replays: int = 0
    stalls: int = 0

    @property
    def upstream_audio_s(self) -> float:
        """Seconds of audio sent to Nova (what input audio is billed on)."""
        return self.audio_frames_sent * FRAME_S


class SessionCore:
    """The decisions of one device's Nova session (see the module docstring)."""

    def __init__(
        self,
        settings: NovaSettings,
        *,
        tool_specs: tuple[dict[str, object], ...] = (),
        new_id: Callable[[], str] | None = None,
        rng: random.Random | None = None,
        backoff: BackoffSettings | None = None,
        debug_name: str = "",
    ) -> None:
        self.settings = settings
        self.tool_specs = tool_specs
        self._new_id = new_id or (lambda: str(uuid.uuid4()))
        self._backoff = Backoff(backoff or BackoffSettings(initial_ms=500, max_ms=8_000), rng)
        self._name = debug_name
        self.state = SessionState.CLOSED
        self.stats = SessionStats()
        self.history = ConversationHistory(
            HistoryLimits(
                max_messages=settings.history_max_messages,
                max_total_bytes=settings.history_max_bytes,
            )
        )
        self._current: _Stream | None = None
        self._next: _Stream | None = None
        self._draining: dict[int, _Stream] = {}
        self._stream_ids = 0
        frames = max(1, round(settings.replay_buffer_s / FRAME_S))
        #: The user's latest speech, kept until it is answered in full, and replayed
        #: into a stream that replaces a failed or stalled one.
        self._turn_audio: collections.deque[bytes] = collections.deque(maxlen=frames)
        #: the question in ``_turn_audio`` was already replayed once
        self._replayed = False
        #: Nova's first event since the turn ended is due by then (None: not waiting)
        self._first_output_due: float | None = None
        #: Nova's next event after a tool result is due by then
        self._tool_ack_due: float | None = None
        #: a fault left the user waiting: unless a stream opens (``_tell_unless_answered``
        #: False) or an answer comes (True), tell them by then
        self._tell_by: float | None = None
        self._tell_unless_answered = False
        self._last_diagnosis: Diagnosis | None = None
        self._tail_s = settings.end_of_turn_pause_s + TAIL_MARGIN_S
        #: Speech not yet delivered to any stream (one is opening or rotating in).
        self._pending: collections.deque[bytes] = collections.deque()
        self._pending_max = max(1, round(settings.pending_audio_max_s / FRAME_S))
        self._turn_active = False
        self._awaiting_since: float | None = None
        #: a reply started since the device's current turn began
        self._turn_answered = False
        self._response: _Response | None = None
        self._tools_running: dict[str, int] = {}
        self._last_activity = 0.0
        self._retry_at: float | None = None
        self._rotate_retry_at: float | None = None
        self._failures = 0
        self._usage_done = (0, 0)
        self._usage_reported: tuple[int, int, float] = (0, 0, 0.0)

    # --- queries -----------------------------------------------------------------

    @property
    def current_stream(self) -> int | None:
        return self._current.id if self._current else None

    @property
    def responding(self) -> bool:
        return self._response is not None

    def paused(self) -> bool:
        """Nobody is talking, nothing is running: a good moment to switch streams."""
        return (
            not self._turn_active
            and self._response is None
            and not self._tools_running
            and self._awaiting_since is None
        )

    def next_deadline(self, now: float) -> float | None:
        """When :meth:`tick` must run next at the latest (None: only on input)."""
        if self.state in (_S.CLOSED, _S.STOPPED, _S.CLOSING):
            return None
        if self.state is _S.BACKOFF:
            times = [t for t in (self._retry_at, self._tell_by) if t is not None]
            return min(times) if times else None
        # While a stream opens or is open, silence or a deadline may be due any frame.
        return now + FRAME_S

    # --- device side ---------------------------------------------------------------

    def start_turn(self, now: float) -> list[Action]:
        if self.state is _S.STOPPED:
            return []
        self._turn_active = True
        self._turn_answered = False
        self._turn_audio.clear()
        self._replayed = False
        self._awaiting_since = None
        self._first_output_due = None
        self._last_activity = now
        if self.state in (_S.CLOSED, _S.CLOSING):
            return self._open(now)
        return []

    def audio_in(self, pcm: bytes, now: float) -> list[Action]:
        """A frame of the user's voice (16 kHz mono s16le)."""
        if self.state is _S.STOPPED or not pcm:
            return []
        actions: list[Action] = []
        if self.state in (_S.CLOSED, _S.CLOSING):
            # No turn started, or it failed: only start_turn opens a stream, so a
            # fatal error cannot turn every later frame into another attempt.
            self.stats.frames_without_stream += 1
            return actions
        self._last_activity = now
        self._turn_audio.append(pcm)
        if self.state is _S.OPEN and self._current is not None:
            stream = self._current
            stream.audio_clock = max(stream.audio_clock, now - SILENCE_SLACK_S) + FRAME_S
            stream.fill_until = stream.audio_clock + self._tail_s
            self.stats.audio_frames_sent += 1
            actions.append(self._send_audio(stream, (pcm,)))
        else:
            self._hold(pcm)
        return actions

    def end_turn(self, now: float) -> list[Action]:
        if self.state is _S.STOPPED:
            return []
        self._turn_active = False
        self._last_activity = now
        # Nova detects the end of speech itself and often answers before the
        # device's longer hangover ends the turn: then nothing is awaited.
        if self._turn_audio and self._response is None and not self._turn_answered:
            self._awaiting_since = now
            if self.state is _S.OPEN:
                self._first_output_due = now + self.settings.first_output_timeout_s
        return []

    def interrupt(self, now: float) -> list[Action]:
        """The device stopped the reply itself: drop the rest of its audio."""
        response = self._response
        if response is None or response.suppressed:
            return []
        response.suppressed = True
        self._turn_audio.clear()
        self._log("reply interrupted by the device")
        return [Emit(ResponseInterrupted())]

    def close(self, now: float) -> list[Action]:
        """The device session ends: close every stream politely."""
        if self.state is _S.STOPPED:
            return []
        actions: list[Action] = []
        for stream in (self._next, self._current):
            if stream is not None:
                actions.append(self._close_stream(stream))
        self._current = self._next = None
        self._pending.clear()
        self._turn_audio.clear()
        self._tell_by = None
        self._transition(_S.STOPPED)
        return actions

    # --- stream side ---------------------------------------------------------------

    def stream_opened(
        self, stream_id: int, now: float, *, credentials_expire_in_s: float | None = None
    ) -> list[Action]:
        """The stream's HTTP response arrived: it is ready.

        ``credentials_expire_in_s``: how long the credentials it was signed with stay
        valid (temporary credentials); the stream is replaced before then.
        """
        expires_at = None if credentials_expire_in_s is None else now + credentials_expire_in_s
        if self._current is not None and stream_id == self._current.id and self.state is _S.OPENING:
            stream = self._current
            stream.opened_at = stream.audio_clock = stream.last_output_at = now
            stream.expires_at = expires_at
            self._transition(_S.OPEN)
            self._log("stream %d open", stream_id)
            if not self._tell_unless_answered:
                self._tell_by = None  # open in time; the first-output deadline takes over
            if self._awaiting_since is not None and self._response is None:
                # The turn ended while the stream was opening: Nova hears it all now.
                self._first_output_due = now + self.settings.first_output_timeout_s
            elif self._replaying_question():
                # A reply cut mid-way: Nova hears the question again and takes its
                # end-of-turn pause before it answers, as it did the first time.
                self._first_output_due = now + self.settings.first_output_timeout_s
            return self._flush_pending(stream, now)
        if self._next is not None and stream_id == self._next.id and self.state is _S.ROTATING:
            old, new = self._current, self._next
            new.opened_at = new.audio_clock = new.last_output_at = now
            new.expires_at = expires_at
            self._current, self._next = new, None
            self._rotate_retry_at = None
            self.stats.rotations += 1
            self._transition(_S.OPEN)
            self._log("rotated from stream %s to %d", old.id if old else None, new.id)
            actions: list[Action] = []
            if old is not None:
                actions.append(self._close_stream(old))
            actions += self._end_response(END_TURN)
            return actions + self._flush_pending(new, now)
        return []

    def stream_failed(self, stream_id: int, fault: Fault, now: float) -> list[Action]:
        """The stream broke (an AWS exception, a network error, a timeout, a stall)."""
        if stream_id in self._draining:
            self._retire(stream_id)
            return self._settle_closing()
        diagnosis = classify(fault, region=self.settings.region, model_id=self.settings.model_id)
        self.stats.failures += 1
        if self._next is not None and stream_id == self._next.id:
            return self._rotation_failed(now, fault, diagnosis.recovery)
        if self._current is None or stream_id != self._current.id:
            return []
        logger.warning(
            "nova stream %d failed: %s: %s (%s)%s",
            stream_id,
            fault.code,
            fault.message,
            diagnosis.recovery.value,
            self._suffix(),
        )
        self._last_diagnosis = diagnosis
        # Did Nova hear the question? Then it may be replayed once; else it is just sent.
        delivered = self._current.opened_at is not None
        actions: list[Action] = [AbortStream(stream_id)]
        self._retire(stream_id, current=True)
        self._tools_running.clear()
        self._first_output_due = self._tool_ack_due = None
        if self.state is _S.ROTATING and self._next is not None:
            # The old stream died first: the one rotating in becomes the current one.
            self._current, self._next = self._next, None
            self._transition(_S.OPENING)
            return actions
        if diagnosis.recovery is Recovery.FATAL:
            return actions + self._tell(diagnosis, retryable=False, now=now)
        self._failures += 1
        if self._failures > self.settings.max_attempts:
            return actions + self._tell(diagnosis, retryable=True, now=now)
        question = (
            self._awaiting_since is not None or self._response is not None or bool(self._turn_audio)
        )
        if not (self._turn_active or question or self._pending):
            # Nobody is waiting on Nova: reopen lazily, on the next turn.
            self._transition(_S.CLOSED)
            return actions
        # A question Nova heard: the turn is over, or Nova already answers it.
        heard = not self._turn_active or self._response is not None
        if question and heard and delivered:
            if self._replayed:
                # The question was replayed once already: stop and say so.
                return actions + self._tell(diagnosis, retryable=True, now=now)
            self._replayed = True
            self.stats.replays += 1
            self._drop_unanswered_question_from_history()
            if self._tell_by is None or not self._tell_unless_answered:
                self._tell_by = (
                    now + self.settings.open_timeout_s + self.settings.first_output_timeout_s
                )
                self._tell_unless_answered = True
            if self._awaiting_since is not None:
                self._awaiting_since = now  # the replay is a fresh wait
        elif self._tell_by is None:
            # Nova has not heard the question yet: it goes to the next stream, which
            # must open in time.
            self._tell_by = now + self.settings.open_timeout_s
            self._tell_unless_answered = False
        if self._response is not None:
            self._response.restarting = True
        if delivered:
            # What the broken stream heard goes again; a stream that never opened
            # still holds it all in ``_pending``.
            self._pending.extendleft(reversed(self._turn_audio))
            self._trim_pending()
        self.stats.resumes += 1
        if diagnosis.recovery is Recovery.RESUME and self._failures == 1:
            return actions + self._open(now)
        self._retry_at = now + self._backoff.next_delay()
        self._transition(_S.BACKOFF)
        return actions

    def stream_ended(self, stream_id: int, now: float) -> list[Action]:
        """The stream's output ended (the SDK's ``receive()`` returned None)."""
        if stream_id in self._draining:
            self._retire(stream_id)
            return self._settle_closing()
        stream = self._stream(stream_id)
        if stream is None:
            return []
        if stream.completion_ended and not stream.completion_open:
            # Nova finished the stream itself: carry on with a fresh one when needed.
            self._log("stream %d ended by Nova", stream_id)
            fault = Fault(STREAM_ENDED, "Nova ended the stream")
        else:
            fault = Fault(STREAM_LOST, "the stream ended without completionEnd")
        return self.stream_failed(stream_id, fault, now)

    def output_event(self, stream_id: int, event: nova.OutputEvent, now: float) -> list[Action]:
        """One event Nova sent on ``stream_id``."""
        stream = self._stream(stream_id) or self._draining.get(stream_id)
        if stream is None:
            return []
        if isinstance(event, nova.UsageUpdated):
            stream.input_tokens, stream.output_tokens = event.input_tokens, event.output_tokens
            return self._report_usage()
        if isinstance(event, nova.CompletionEnded):
            stream.completion_open, stream.completion_ended = False, True
        if stream is not self._current:
            return []  # a stream on its way out: only its usage still counts
        stream.last_output_at = now
        self._first_output_due = None
        if not _closes_tool_use(stream, event):
            # Nova moved on after a tool result: it was heard. The toolUse block's
            # own contentEnd may arrive after a fast tool's result; it is no answer.
            self._tool_ack_due = None
        if not stream.got_output:
            stream.got_output = True
            # The stream works: earlier failures no longer count against it.
            self._failures = 0
            self._backoff.reset()
            self._tell_by = None
        match event:
            case nova.CompletionStarted():
                stream.completion_open = True
                return []
            case nova.CompletionEnded():
                interrupted = event.stop_reason == nova.STOP_INTERRUPTED
                return self._interrupted() if interrupted else self._end_response(END_TURN)
            case nova.ContentStarted():
                return self._content_started(stream, event, now)
            case nova.TextReceived():
                return self._text(stream, event)
            case nova.AudioReceived():
                return self._audio(stream, event, now)
            case nova.ToolUseRequested():
                self._tools_running[event.tool_use_id] = stream.id
                self._awaiting_since = None
                self._last_activity = now
                self._log("model calls tool %s", event.tool_name)
                return [RunTool(stream.id, event.tool_use_id, event.tool_name, event.arguments)]
            case nova.ContentEnded():
                return self._content_ended(stream, event)
            case nova.UnknownEventReceived():
                self.stats.unknown_events += 1
                logger.debug("ignoring unknown Nova event %r", event.name)
                return []
            case nova.MalformedEventReceived():
                self.stats.malformed_events += 1
                logger.warning("ignoring malformed Nova event: %s", event.reason)
                return []
        return []

    def tool_finished(
        self,
        stream_id: int,
        tool_use_id: str,
        name: str,
        ok: bool,
        result_json: str,
        duration_ms: float,
        now: float,
    ) -> list[Action]:
        """A tool the core asked for (:class:`RunTool`) finished."""
        actions: list[Action] = [Emit(ToolCalled(name=name, ok=ok, duration_ms=duration_ms))]
        if self._tools_running.pop(tool_use_id, None) is None:
            return actions  # its stream is gone; the model will not wait for it
        stream = self._current
        if stream is None or stream.id != stream_id or self.state not in (_S.OPEN, _S.ROTATING):
            return actions
        self._last_activity = now
        if not self._tools_running:
            self._tool_ack_due = now + self.settings.tool_ack_timeout_s
        block = nova.tool_result_block(stream.prompt_name, self._new_id(), tool_use_id, result_json)
        return [*actions, SendEvents(stream.id, tuple(block))]

    def tick(self, now: float) -> list[Action]:
        """Real time passed: fill silence, retry, rotate, close when idle, spot stalls."""
        state = self.state
        if self._tell_by is not None and now >= self._tell_by and self._last_diagnosis is not None:
            # A fault left the user waiting and no answer came in time: say so.
            # Retrying goes on in the background (the stream may still open).
            return self._tell(self._last_diagnosis, retryable=True, now=now, keep_trying=True)
        if state is _S.BACKOFF:
            if self._retry_at is not None and now >= self._retry_at:
                self._retry_at = None
                return self._open(now)
            return []
        if state not in (_S.OPEN, _S.ROTATING) or self._current is None:
            return []
        stream = self._current
        actions = self._fill_silence(stream, now)
        stall = self._stall(stream, now)
        if stall is not None:
            self.stats.stalls += 1
            return actions + self.stream_failed(stream.id, Fault(STREAM_STALLED, stall), now)
        if (
            self._awaiting_since is not None
            and now - self._awaiting_since > self.settings.response_wait_s
        ):
            # Nova heard the turn and chose not to answer (a cough, a door): stop waiting.
            self._awaiting_since = None
            self._turn_audio.clear()
        if state is not _S.OPEN or stream.opened_at is None:
            return actions
        if self.paused() and now - self._last_activity >= self.settings.idle_close_s:
            self.stats.idle_closes += 1
            self._log("closing idle stream %d", stream.id)
            actions += self._report_usage()
            actions.append(self._close_stream(stream))
            self._current = None
            self._transition(_S.CLOSING)
            return actions
        age = now - stream.opened_at
        if self._rotate_retry_at is not None and now < self._rotate_retry_at:
            return actions
        expires = stream.expires_at
        soft = (
            age >= self.settings.rotate_after_s
            or (expires is not None and now >= expires - CREDENTIALS_MARGIN_S)
        ) and self.paused()
        # Past the hard age only a reply or a tool holds the switch back: the
        # user's words are buffered and replayed, the model's would be cut off.
        hard = (
            (
                age >= self.settings.rotate_hard_s
                or (expires is not None and now >= expires - CREDENTIALS_HARD_MARGIN_S)
            )
            and self._response is None
            and not self._tools_running
        )
        if soft or hard:
            self._log("rotating stream %d after %.0f s", stream.id, age)
            if self._turn_active:
                # Mid-turn: the new stream must hear the whole utterance so far.
                self._pending.extend(self._turn_audio)
                self._trim_pending()
            return actions + self._open(now, rotate=True)
        return actions

    def _stall(self, stream: _Stream, now: float) -> str | None:
        """Why ``stream`` counts as stalled now, or None."""
        due = self._first_output_due
        if due is not None and now >= due:
            return (
                f"no answer within {self.settings.first_output_timeout_s:g} s "
                "after the user's turn ended"
            )
        if self._tool_ack_due is not None and now >= self._tool_ack_due:
            return f"tool result not acknowledged within {self.settings.tool_ack_timeout_s:g} s"
        if (
            self._response is not None
            and not self._tools_running
            and not (self._response.restarting and not stream.got_output)
            and now - stream.last_output_at > self.settings.stall_timeout_s
        ):
            return f"no event for {self.settings.stall_timeout_s:g} s in the middle of a reply"
        return None

    # --- internals -------------------------------------------------------------------

    def _replaying_question(self) -> bool:
        """Whether the current reply restarts in a fresh stream that replays its question."""
        return self._response is not None and self._response.restarting and self._replayed

    def _transition(self, new: SessionState) -> None:
        old = self.state
        if new not in _TRANSITIONS[old]:
            raise IllegalTransition(f"nova session: {old.name} -> {new.name}")
        self.state = new
        if old is not new:
            logger.debug("nova session%s: %s -> %s", self._suffix(), old.name, new.name)

    def _suffix(self) -> str:
        return f" [{self._name}]" if self._name else ""

    def _log(self, message: str, *args: object) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("nova session%s: %s", self._suffix(), message % args)

    def _stream(self, stream_id: int) -> _Stream | None:
        for stream in (self._current, self._next):
            if stream is not None and stream.id == stream_id:
                return stream
        return None

    def _send_audio(self, stream: _Stream, frames: tuple[bytes, ...]) -> SendAudio:
        return SendAudio(stream.id, stream.prompt_name, stream.audio_content, frames)

    def _hold(self, pcm: bytes) -> None:
        self._pending.append(pcm)
        self._trim_pending()

    def _trim_pending(self) -> None:
        while len(self._pending) > self._pending_max:
            self._pending.popleft()
            self.stats.pending_frames_dropped += 1

    def _flush_pending(self, stream: _Stream, now: float) -> list[Action]:
        if not self._pending:
            return []
        frames = list(self._pending)
        self._pending.clear()
        stream.audio_clock = max(stream.audio_clock, now - SILENCE_SLACK_S) + FRAME_S * len(frames)
        stream.fill_until = stream.audio_clock + self._tail_s
        self.stats.audio_frames_sent += len(frames)
        self._log("replaying %d held frames into stream %d", len(frames), stream.id)
        return [self._send_audio(stream, tuple(frames))]

    def _prelude(self, stream: _Stream) -> tuple[nova.Event, ...]:
        s = self.settings
        sensitivity = s.endpointing_sensitivity
        if s.model_id == nova.MODEL_NOVA_SONIC:
            sensitivity = None  # Nova Sonic 1 has no turn-detection setting
        prompt = stream.prompt_name
        events: list[nova.Event] = [
            nova.session_start(
                max_tokens=s.max_tokens,
                top_p=s.top_p,
                temperature=s.temperature,
                endpointing_sensitivity=sensitivity,
            ),
            nova.prompt_start(prompt, voice_id=s.voice_id, tools=self.tool_specs),
        ]
        if s.system_prompt.strip():
            events += nova.text_block(prompt, self._new_id(), "SYSTEM", s.system_prompt)
        events += self.history.events(prompt, self._new_id)
        events.append(nova.content_start_audio(prompt, stream.audio_content))
        return tuple(events)

    def _open(self, now: float, *, rotate: bool = False) -> list[Action]:
        self._stream_ids += 1
        stream = _Stream(
            id=self._stream_ids,
            prompt_name=self._new_id(),
            audio_content=self._new_id(),
            requested_at=now,
        )
        self.stats.streams_opened += 1
        if rotate:
            self._next = stream
            self._transition(_S.ROTATING)
        else:
            self._current = stream
            self._transition(_S.OPENING)
        self._log("opening stream %d", stream.id)
        return [OpenStream(stream.id, self._prelude(stream))]

    def _close_stream(self, stream: _Stream) -> CloseStream:
        self._draining[stream.id] = stream
        prompt = stream.prompt_name
        return CloseStream(
            stream.id,
            (
                nova.content_end(prompt, stream.audio_content),
                nova.prompt_end(prompt),
                nova.session_end(),
            ),
        )

    def _retire(self, stream_id: int, *, current: bool = False) -> None:
        """Forget a stream; keep its token usage in the session totals."""
        stream = self._draining.pop(stream_id, None)
        if current and self._current is not None and self._current.id == stream_id:
            stream, self._current = self._current, None
        if stream is not None:
            done_in, done_out = self._usage_done
            self._usage_done = (done_in + stream.input_tokens, done_out + stream.output_tokens)

    def _settle_closing(self) -> list[Action]:
        if self.state is _S.CLOSING and not self._draining and self._current is None:
            self._transition(_S.CLOSED)
        return []

    def _rotation_failed(self, now: float, fault: Fault, recovery: Recovery) -> list[Action]:
        failed = self._next
        self._next = None
        if failed is not None:
            self._retire(failed.id)
        logger.warning(
            "nova: could not open the next stream (%s: %s); staying", fault.code, fault.message
        )
        self._transition(_S.OPEN)
        # Keep the old stream until its hard limit; try again a little later.
        self._rotate_retry_at = now + (
            30.0 if recovery is Recovery.FATAL else self._backoff.next_delay()
        )
        actions: list[Action] = []
        if failed is not None:
            actions.append(AbortStream(failed.id))
        if self._current is not None:
            actions += self._flush_pending(self._current, now)
        return actions

    def _tell(
        self, diagnosis: Diagnosis, *, retryable: bool, now: float, keep_trying: bool = False
    ) -> list[Action]:
        """The user will not get their answer: end the reply, tell the device.

        With ``keep_trying`` a stream that is still being (re)opened goes on in the
        background; otherwise the session waits for the next turn.
        """
        actions: list[Action] = self._end_response(ENDED_BY_ERROR)
        self._turn_active = False
        self._pending.clear()
        self._turn_audio.clear()
        self._awaiting_since = None
        self._first_output_due = self._tool_ack_due = None
        self._tell_by = None
        if not keep_trying:
            self._retry_at = None
            self._failures = 0
            self._backoff.reset()
            if self.state is not _S.CLOSED:
                self._transition(_S.CLOSED)
        level = logging.WARNING if retryable else logging.ERROR
        logger.log(
            level,
            "nova session%s failed: %s: %s",
            self._suffix(),
            diagnosis.code,
            diagnosis.message,
        )
        failed = UpstreamFailed(code=diagnosis.code, message=diagnosis.message, retryable=retryable)
        return [*actions, Emit(failed)]

    def _drop_unanswered_question_from_history(self) -> None:
        """The question's audio is replayed: its transcript must not be in the history too."""
        self.history.drop_trailing_user()

    def _fill_silence(self, stream: _Stream, now: float) -> list[Action]:
        if stream.opened_at is None:
            return []
        if stream.audio_clock < now - MAX_SILENCE_CATCH_UP_S:
            stream.audio_clock = now - SILENCE_SLACK_S
        count = 0
        limit = min(now - SILENCE_SLACK_S, stream.fill_until - FRAME_S / 2)
        while stream.audio_clock <= limit:
            count += 1
            stream.audio_clock += FRAME_S
        if not count:
            return []
        self.stats.silence_frames += count
        self.stats.audio_frames_sent += count
        return [self._send_audio(stream, (SILENCE_FRAME,) * count)]

    def _report_usage(self) -> list[Action]:
        total_in, total_out = self._usage_done
        for stream in (self._current, self._next, *self._draining.values()):
            if stream is not None:
                total_in += stream.input_tokens
                total_out += stream.output_tokens
        audio_s = round(self.stats.upstream_audio_s, 2)
        if (total_in, total_out, audio_s) == self._usage_reported:
            return []
        self._usage_reported = (total_in, total_out, audio_s)
        return [Emit(UsageReported(total_in, total_out, audio_input_s=audio_s))]

    def _start_response(self, now: float) -> list[Action]:
        stream = self._current
        if stream is not None:
            stream.fill_until = 0.0  # Nova took its turn: no more silence needed
        if self._response is not None:
            self._response.restarting = False
            return []  # a replayed question's answer goes on in the same reply
        self._response = _Response(started_at=now)
        self._awaiting_since = None
        self._last_activity = now
        self._log("reply started")
        self._turn_answered = True
        return [Emit(ResponseStarted())]

    def _end_response(self, reason: str) -> list[Action]:
        assert reason in RESPONSE_END_REASONS, reason
        response, self._response = self._response, None
        if response is None:
            return []
        if reason == END_TURN:
            self._turn_audio.clear()  # answered in full: nothing left to replay
            self._replayed = False
        if response.suppressed:
            return self._report_usage()
        self._log("reply ended: %s", reason)
        return [Emit(ResponseEnded(reason=reason)), *self._report_usage()]

    def _interrupted(self) -> list[Action]:
        # Nova signals a barge-in twice (a text marker and a stop reason): one event.
        self._turn_audio.clear()  # the user moved on: nothing to replay
        response, self._response = self._response, None
        if response is None or response.suppressed:
            return []
        self._log("reply interrupted by the user (barge-in)")
        return [Emit(ResponseInterrupted())]

    def _content_started(
        self, stream: _Stream, event: nova.ContentStarted, now: float
    ) -> list[Action]:
        stream.contents[event.content_id] = event
        while len(stream.contents) > MAX_OPEN_CONTENTS:
            stream.contents.popitem(last=False)
        if event.role != nova.ROLE_ASSISTANT:
            return []
        speaking = event.type == nova.TYPE_AUDIO or (
            event.type == nova.TYPE_TEXT and event.generation_stage == nova.STAGE_SPECULATIVE
        )
        return self._start_response(now) if speaking else []

    def _text(self, stream: _Stream, event: nova.TextReceived) -> list[Action]:
        if event.interrupted:
            return self._interrupted()
        content = stream.contents.get(event.content_id)
        role = event.role or (content.role if content else "")
        stage = content.generation_stage if content else None
        if stage == nova.STAGE_SPECULATIVE or role not in (nova.ROLE_USER, nova.ROLE_ASSISTANT):
            return []
        text = event.text.strip()
        if not text:
            return []
        self.history.add(role, text)  # type: ignore[arg-type]  # narrowed above
        logger.debug("transcript %s: %s", role.lower(), text)
        side: Literal["user", "assistant"] = "user" if role == nova.ROLE_USER else "assistant"
        return [Emit(TranscriptReceived(role=side, text=text, final=True))]

    def _audio(self, stream: _Stream, event: nova.AudioReceived, now: float) -> list[Action]:
        content = stream.contents.get(event.content_id)
        if content is not None and content.role != nova.ROLE_ASSISTANT:
            return []
        response = self._response
        if response is None or response.suppressed:
            self.stats.audio_chunks_dropped += 1  # the tail of an interrupted reply
            return []
        self._last_activity = now
        return [Emit(AudioOutput(pcm=event.pcm))]

    def _content_ended(self, stream: _Stream, event: nova.ContentEnded) -> list[Action]:
        content = stream.contents.pop(event.content_id, None)
        if event.stop_reason == nova.STOP_INTERRUPTED:
            return self._interrupted()
        if event.stop_reason != nova.STOP_END_TURN or content is None:
            return []
        if content.role == nova.ROLE_ASSISTANT and content.type == nova.TYPE_AUDIO:
            return self._end_response(END_TURN)
        return []
