"""DropOldestQueue: bounded, counts drops, and its get() always lets the loop run."""

from __future__ import annotations

import asyncio

import pytest

from edgevoice.queues import DropOldestQueue


def test_a_full_queue_drops_the_oldest_and_counts_it() -> None:
    q: DropOldestQueue[int] = DropOldestQueue(2)
    assert q.put_nowait(1) is None and q.put_nowait(2) is None
    assert q.put_nowait(3) == 1
    assert q.dropped == 1 and q.put_count == 3 and len(q) == 2
    assert q.get_nowait() == 2


def test_get_yields_to_the_loop_even_when_items_wait() -> None:
    """A consumer draining a long backlog must not hold the loop for all of it."""

    async def main() -> list[str]:
        q: DropOldestQueue[int] = DropOldestQueue(100)
        for i in range(50):
            q.put_nowait(i)
        order: list[str] = []

        async def other() -> None:
            for _ in range(5):
                order.append("other")
                await asyncio.sleep(0)

        task = asyncio.create_task(other())
        for _ in range(5):
            await q.get()
            order.append("get")
        await task
        return order

    order = asyncio.run(main())
    # interleaved: the other task ran between the gets, not after all of them
    assert order[:4] in (["other", "get", "other", "get"], ["get", "other", "get", "other"])


def test_get_waits_for_an_item_and_a_cleared_item_is_not_returned() -> None:
    async def main() -> int:
        q: DropOldestQueue[int] = DropOldestQueue(4)
        q.put_nowait(1)
        getter = asyncio.create_task(q.get())
        q.clear()  # gone while the getter yielded
        await asyncio.sleep(0)
        assert not getter.done()
        q.put_nowait(2)
        return await asyncio.wait_for(getter, 1)

    assert asyncio.run(main()) == 2


def test_maxsize_must_be_positive() -> None:
    with pytest.raises(ValueError):
        DropOldestQueue(0)


def test_idle_queues_and_journals_hold_no_deque_of_their_own_until_used() -> None:
    """A relay holds thousands of idle sessions: an empty deque is 760 bytes each."""
    import tracemalloc

    from edgevoice.protocol.messages import AudioFrame, AudioKind
    from edgevoice.protocol.replay import OutboundQueue, ReplayJournal
    from edgevoice.queues import NOTHING_YET

    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        idle = [(DropOldestQueue[int](8), OutboundQueue[bytes](8), ReplayJournal(8))
                for _ in range(100)]
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert grown < 100 * 760  # three deques each would be 228 kB
    first, second = idle[0], idle[1]
    first[0].put_nowait(1)
    first[1].put_nowait(b"x")
    first[2].record_frame(AudioFrame(AudioKind.UPLINK, 0, 0, b"x"), 0.0)
    assert len(first[0]) == 1 and len(first[1]) == 1 and len(first[2]) == 1
    assert len(second[0]) == 0 and len(second[1]) == 0 and len(second[2]) == 0
    assert len(NOTHING_YET) == 0  # nobody wrote into the shared one
    assert first[0].get_nowait() == 1 and first[1].get_nowait() == b"x"


def test_a_flag_wakes_its_waiter_even_if_cleared_before_it_runs_and_has_one_waiter() -> None:
    from edgevoice.queues import Flag

    async def main() -> None:
        flag = Flag()
        assert not flag.is_set()
        waiter = asyncio.create_task(flag.wait())
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="one waiter"):
            await flag.wait()
        flag.set()
        flag.clear()
        await asyncio.wait_for(waiter, 1)
        flag.set()
        await asyncio.wait_for(flag.wait(), 1)  # set: returns at once

    asyncio.run(main())


def test_peek_shows_the_oldest_without_taking_it_and_an_empty_queue_says_so() -> None:
    q: DropOldestQueue[int] = DropOldestQueue(2)
    with pytest.raises(asyncio.QueueEmpty):
        q.peek()
    for item in (1, 2, 3):  # 1 is dropped
        q.put_nowait(item)
    assert q.peek() == 2 and len(q) == 2
    assert q.get_nowait() == 2 and q.peek() == 3
