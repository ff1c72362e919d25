"""The relay's event loop (relay/loop.py): uvloop when installed, a frozen heap."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from edgevoice.relay.loop import HeapKeeper, HeapPass, heap_due, loop_factory, run


def test_the_relay_runs_on_uvloop_when_it_is_installed_with_its_startup_objects_frozen(
        ) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def which_loop() -> type:
        return type(asyncio.get_running_loop())

    try:
        assert run(which_loop()) is uvloop.Loop
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    assert loop_factory() is uvloop.new_event_loop


# ------------------------------------------------------------------ the heap keeper

DUE = dict(now=100.0, last_all=0.0, max_age_s=1800.0)


def test_the_heap_is_collected_only_when_quiet_and_the_collector_made_a_full_pass() -> None:
    assert heap_due(**DUE, full_passes=3, full_passes_seen=2, quiet=True) is HeapPass.YOUNG
    # a turn in progress: its reply must not wait for a collection
    assert heap_due(**DUE, full_passes=3, full_passes_seen=2, quiet=False) is None
    # nothing new since last time: nothing to gain
    assert heap_due(**DUE, full_passes=2, full_passes_seen=2, quiet=True) is None


def test_frozen_objects_are_collected_at_a_quiet_moment_after_max_age_or_after_twice() -> None:
    old = dict(last_all=0.0, max_age_s=1800.0, full_passes=2, full_passes_seen=2)
    assert heap_due(now=1801.0, quiet=True, **old) is HeapPass.ALL
    assert heap_due(now=1801.0, quiet=False, **old) is None  # wait for a quiet moment
    # a relay that is never quiet: all the same, once twice the age passed
    assert heap_due(now=3601.0, quiet=False, **old) is HeapPass.ALL


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_cycles_among_frozen_objects_are_freed_by_a_pass_over_all() -> None:
    keeper = HeapKeeper()
    try:
        cycle = Cycle()
        gc.freeze()  # as the start of the relay (or an earlier pass) did
        gone = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert gone() is not None  # frozen: the collector's own passes never free it
        keeper.collect(HeapPass.YOUNG)
        assert gone() is not None  # nor does a pass over the young
        keeper.collect(HeapPass.ALL)
        assert gone() is None
        assert keeper.runs == 2 and keeper.freed >= 1
    finally:
        gc.unfreeze()


def test_a_young_pass_frees_young_cycles_and_freezes_the_survivors() -> None:
    keeper = HeapKeeper()
    try:
        gc.freeze()
        alive, dead = Cycle(), Cycle()
        gone = weakref.ref(dead)
        del dead
        keeper.collect(HeapPass.YOUNG)
        assert gone() is None
        assert all(o is not alive for o in gc.get_objects())  # frozen: out of every pass
    finally:
        gc.unfreeze()


def test_the_keeper_collects_when_quiet_after_a_full_pass() -> None:
    clock = [0.0]
    keeper = HeapKeeper(max_age_s=1800.0, now=lambda: clock[0])
    try:
        assert keeper.check(quiet=True) is None  # no full pass since it started
        gc.collect()  # the collector's own full pass (as its thresholds would trigger)
        clock[0] = 10.0
        assert keeper.check(quiet=False) is None
        assert keeper.check(quiet=True) is HeapPass.YOUNG
        assert keeper.runs == 1
        assert keeper.check(quiet=True) is None  # its own collection does not count
    finally:
        gc.unfreeze()
