"""What each end keeps so a resumed session loses nothing (``docs/protocol.md`` §7).

Two bounded, pure containers, shared by the device and the relay:

* :class:`ReplayJournal` — what this side has *sent* in the session: audio frames
  with their sequence numbers, reliable control messages with their ordinals. After
  a resume the peer says what it received last; :meth:`ReplayJournal.after` answers
  with everything it missed, in the order first sent.
* :class:`OutboundQueue` — what this side has *not sent yet* (the link is down, or
  the pacer has not got to it). Audio and control messages keep their order;
  audio is bounded by dropping the oldest frame, control messages by their own
  limit, so a burst of audio can never push out the ``turn_start`` it belongs to.

Neither touches a socket or a clock: times are passed in.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass
from typing import Generic, TypeVar

from edgevoice.errors import RemoteProtocolError
from edgevoice.protocol.messages import AudioFlags, AudioFrame, AudioKind, Message
from edgevoice.queues import NOTHING_YET, owned

logger = logging.getLogger(__name__)

A = TypeVar("A")


@dataclass(frozen=True)
class SentMessage:
    """A reliable control message as first sent; ``ordinal`` counts from 1."""

    ordinal: int
    message: Message
    sent_at: float


@dataclass(frozen=True)
class SentFrame:
    """An audio frame as first sent."""

    frame: AudioFrame
    sent_at: float


Sent = SentMessage | SentFrame

#: How the journal holds a frame: (kind, seq, timestamp_ms, flags, payload, sent_at), an
#: exact tuple of ints, bytes and a float. The cyclic garbage collector stops tracking
#: such a tuple after its first young collection, so the frames a relay holds for every
#: session (~100 each at capacity) are not walked by each full collection: as two
#: objects per frame they were two thirds of what it walked, a 15-55 ms loop stall at
#: 150 conversing sessions (bench row 14).
_HeldFrame = tuple[int, int, int, int, bytes, float]


def _held(frame: AudioFrame, now: float) -> _HeldFrame:
    return (int(frame.kind), frame.seq, frame.timestamp_ms, int(frame.flags), frame.payload,
            now)


def _sent_frame(held: _HeldFrame) -> SentFrame:
    kind, seq, timestamp_ms, flags, payload, sent_at = held
    return SentFrame(AudioFrame(AudioKind(kind), seq, timestamp_ms, payload,
                                AudioFlags(flags)), sent_at)


@dataclass(frozen=True)
class Replay:
    """What the peer missed, in send order, and what is no longer held."""

    items: tuple[Sent, ...]
    #: frames the peer missed that the journal had already forgotten
    frames_lost: int = 0
    #: reliable messages the peer missed that the journal had already forgotten
    messages_lost: int = 0

    @property
    def frames(self) -> int:
        return sum(1 for item in self.items if isinstance(item, SentFrame))


class ReplayJournal:
    """The last ``max_frames`` audio frames and ``max_messages`` reliable messages sent.

    Entries are kept in send order; beyond either limit the oldest entry of that kind
    is forgotten, and :meth:`after` reports what the peer needed but is gone.
    """

    def __init__(self, max_frames: int, max_messages: int = 256) -> None:
        if max_frames < 1 or max_messages < 1:
            raise ValueError("a journal holds at least one frame and one message")
        self.max_frames = max_frames
        self.max_messages = max_messages
        self._entries: collections.deque[_HeldFrame | SentMessage] = NOTHING_YET  # until used
        self._frames = 0
        self._messages = 0
        #: highest sequence number and message ordinal ever recorded
        self.last_seq: int | None = None
        self.last_ordinal = 0
        #: the oldest sequence number / ordinal still held (None: none recorded yet)
        self._first_seq: int | None = None
        self._first_ordinal: int | None = None

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def frames_held(self) -> int:
        return self._frames

    def record_frame(self, frame: AudioFrame, now: float) -> None:
        """``frame`` was handed to the socket (it may still be lost with the link)."""
        if self.last_seq is not None and frame.seq <= self.last_seq:
            raise ValueError(f"frame {frame.seq} recorded after {self.last_seq}")
        self._entries = owned(self._entries)
        self._entries.append(_held(frame, now))
        self._frames += 1
        self.last_seq = frame.seq
        if self._first_seq is None:
            self._first_seq = frame.seq
        self._trim()

    def record_message(self, ordinal: int, message: Message, now: float) -> None:
        """Reliable ``message`` number ``ordinal`` (1, 2, ...) was handed to the socket."""
        if ordinal != self.last_ordinal + 1:
            raise ValueError(f"message {ordinal} recorded after {self.last_ordinal}")
        self._entries = owned(self._entries)
        self._entries.append(SentMessage(ordinal, message, now))
        self._messages += 1
        self.last_ordinal = ordinal
        if self._first_ordinal is None:
            self._first_ordinal = ordinal
        self._trim()

    def _trim(self) -> None:
        # Sequence numbers and ordinals are consecutive, so what is forgotten is
        # exactly everything below the one after the entry dropped.
        while self._frames > self.max_frames:
            frame = self._pop_oldest(tuple)
            assert isinstance(frame, tuple)
            self._frames -= 1
            self._first_seq = frame[1] + 1
        while self._messages > self.max_messages:
            message = self._pop_oldest(SentMessage)
            assert isinstance(message, SentMessage)
            self._messages -= 1
            self._first_ordinal = message.ordinal + 1

    def _pop_oldest(self, kind: type[tuple[object, ...]] | type[SentMessage]
                    ) -> _HeldFrame | SentMessage:
        for i, entry in enumerate(self._entries):
            if isinstance(entry, kind):
                del self._entries[i]
                return entry
        raise AssertionError("counted an entry the journal does not hold")

    def after(self, last_seq: int | None, messages_received: int) -> Replay:
        """Everything sent after the peer's last frame ``last_seq`` and message count.

        Raises :class:`RemoteProtocolError` when the peer claims more than was sent.
        """
        if (last_seq is not None and (self.last_seq is None or last_seq > self.last_seq)) \
                or messages_received > self.last_ordinal or messages_received < 0:
            raise RemoteProtocolError("peer claims to have received more than was sent")
        next_seq = 0 if last_seq is None else last_seq + 1
        items = tuple(
            entry if isinstance(entry, SentMessage) else _sent_frame(entry)
            for entry in self._entries
            if (isinstance(entry, tuple) and entry[1] >= next_seq)
            or (isinstance(entry, SentMessage) and entry.ordinal > messages_received))
        frames_lost = messages_lost = 0
        if self.last_seq is not None and self._first_seq is not None:
            frames_lost = max(0, self._first_seq - next_seq)
        if self._first_ordinal is not None:
            messages_lost = max(0, self._first_ordinal - (messages_received + 1))
        return Replay(items, frames_lost, messages_lost)

    def clear(self) -> None:
        """Forget the session (it ended or was not resumed)."""
        self._entries.clear()
        self._frames = self._messages = 0
        self.last_seq = None
        self.last_ordinal = 0
        self._first_seq = self._first_ordinal = None


class OutboundQueue(Generic[A]):
    """Items waiting to be sent: control :class:`Message` s and audio items ``A``, in order.

    ``put_nowait`` never blocks. Beyond ``max_audio`` audio items the oldest audio
    item is dropped; beyond ``max_control`` messages the oldest message is dropped.
    Both are counted. Single consumer (``get``), any number of producers, all on
    the event loop's thread.
    """

    def __init__(self, max_audio: int, max_control: int = 256) -> None:
        if max_audio < 1 or max_control < 1:
            raise ValueError("an outbound queue holds at least one item of each kind")
        self.max_audio = max_audio
        self.max_control = max_control
        self._items: collections.deque[Message | A] = NOTHING_YET  # until the first put
        self._audio = 0
        self._waiter: asyncio.Future[None] | None = None
        #: audio items and control messages thrown away because the queue was full
        self.audio_dropped = 0
        self.control_dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def audio_queued(self) -> int:
        return self._audio

    @property
    def dropped(self) -> int:
        return self.audio_dropped + self.control_dropped

    def put_nowait(self, item: Message | A) -> bool:
        """Append ``item``; False when something had to be dropped to make room."""
        is_message = isinstance(item, Message)
        self._items = owned(self._items)
        self._items.append(item)
        full = False
        if is_message:
            if len(self._items) - self._audio > self.max_control:
                self._drop_oldest(audio=False)
                self.control_dropped += 1
                full = True
        else:
            self._audio += 1
            if self._audio > self.max_audio:
                self._drop_oldest(audio=True)
                self.audio_dropped += 1
                full = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return not full

    def _drop_oldest(self, *, audio: bool) -> None:
        for i, item in enumerate(self._items):
            if isinstance(item, Message) != audio:
                del self._items[i]
                if audio:
                    self._audio -= 1
                return

    def peek(self) -> Message | A:
        """The oldest item, left in the queue; raise ``asyncio.QueueEmpty`` when there
        is none (a sender looks before it knows it can send)."""
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items[0]

    def get_nowait(self) -> Message | A:
        """Pop the oldest item; raise ``asyncio.QueueEmpty`` when there is none."""
        if not self._items:
            raise asyncio.QueueEmpty
        item = self._items.popleft()
        if not isinstance(item, Message):
            self._audio -= 1
        return item

    async def get(self) -> Message | A:
        """Wait for and pop the oldest item."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.get_nowait()

    def clear(self, *, audio_only: bool = False) -> int:
        """Drop everything queued (or just the audio); not counted. Returns audio dropped."""
        audio = self._audio
        if audio_only:
            self._items = collections.deque(i for i in self._items if isinstance(i, Message))
        else:
            self._items.clear()
        self._audio = 0
        return audio


__all__ = ["OutboundQueue", "Replay", "ReplayJournal", "SentFrame", "SentMessage"]
