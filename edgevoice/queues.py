"""Bounded queues that never block the producer and count what they drop.

Every queue in edgevoice is one of these: a producer (an audio callback, a
receiving socket) must never wait on a slow consumer, and an operator must be
able to see what was lost.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Generic, TypeVar

T = TypeVar("T")

#: What a queue, journal or buffer that has never held anything points at: a deque costs
#: 760 bytes even empty, and a relay keeps several per session for thousands of idle
#: devices. It can hold nothing (maxlen 0: an append would be lost), so every writer
#: swaps in its own deque first, with :func:`owned`.
NOTHING_YET: collections.deque[Any] = collections.deque(maxlen=0)


def owned(items: collections.deque[T]) -> collections.deque[T]:
    """``items``, or a new deque of its own when it is still :data:`NOTHING_YET`."""
    return collections.deque() if items is NOTHING_YET else items


class DropOldestQueue(Generic[T]):
    """An asyncio queue of at most ``maxsize`` items; ``put`` drops the oldest when full.

    ``put_nowait`` is the only way in and never blocks; it must be called from the
    event loop's thread (use ``loop.call_soon_threadsafe`` from other threads).
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = maxsize
        self._items: collections.deque[T] = NOTHING_YET  # allocated on the first put
        self._waiter: asyncio.Future[None] | None = None
        #: items thrown away because the queue was full
        self.dropped = 0
        #: items ever accepted
        self.put_count = 0

    def __len__(self) -> int:
        return len(self._items)

    def put_nowait(self, item: T) -> T | None:
        """Append ``item``; return the item dropped to make room, if any."""
        dropped: T | None = None
        if len(self._items) >= self.maxsize:
            dropped = self._items.popleft()
            self.dropped += 1
        self._items = owned(self._items)
        self._items.append(item)
        self.put_count += 1
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return dropped

    def get_nowait(self) -> T:
        """Pop the oldest item; raise ``asyncio.QueueEmpty`` when there is none."""
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    def peek(self) -> T:
        """The oldest item, left in the queue; ``asyncio.QueueEmpty`` when there is none."""
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items[0]

    async def get(self) -> T:
        """Wait for and pop the oldest item.

        Always a real suspension point: when items are already waiting it still lets
        the event loop run once before returning, so a consumer draining a long queue
        (a whole reply handed over at once) cannot hold the loop for the whole of it.
        """
        if self._items:
            await asyncio.sleep(0)
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def clear(self) -> int:
        """Drop everything queued (not counted as drops); return how many."""
        n = len(self._items)
        self._items.clear()
        return n


class Flag:
    """An :class:`asyncio.Event` for one waiter at a time, without the Event's 760-byte
    deque of waiters (a relay holds one per session, for thousands of idle devices).

    ``wait`` returns once the flag is set, as Event's does: a ``set`` followed by a
    ``clear`` before the waiter runs still wakes it.
    """

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        if self._waiter is not None:
            raise RuntimeError("a Flag has one waiter at a time")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
