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
