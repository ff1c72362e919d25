"""The relay's event loop (relay/loop.py): uvloop when installed, a frozen heap."""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path

import pytest

from edgevoice.relay.auth import TokenStore
from edgevoice.relay.loop import HeapKeeper, HeapPass, heap_due, loop_factory, run
from edgevoice.relay.server import RelayServer
from edgevoice.relay.settings import LimitsSettings, ListenSettings
from edgevoice.upstream.echo import EchoUpstream


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


def test_what_survives_the_collectors_own_full_pass_is_frozen() -> None:
    # A relay at capacity is never quiet: its keeper freezes right after each full
    # pass the collector makes on its own, so the next one walks only what came since.
    keeper = HeapKeeper()
    gc.callbacks.append(keeper.after_full_pass)
    try:
        alive, dead = Cycle(), Cycle()
        gone = weakref.ref(dead)
        del dead
        gc.collect(1)  # not a full pass: nothing frozen
        assert keeper.frozen_after_passes == 0
        assert any(o is alive for o in gc.get_objects())
        gc.collect()  # a full pass, as the collector's thresholds would make
        assert gone() is None  # what was garbage was freed first
        assert keeper.frozen_after_passes == 1
        assert all(o is not alive for o in gc.get_objects())  # frozen: out of every pass
    finally:
        gc.callbacks.remove(keeper.after_full_pass)
        gc.unfreeze()


def test_a_running_relay_freezes_after_full_passes_and_stops_when_closed(
        tmp_path: Path) -> None:
    async def scenario() -> int:
        relay = RelayServer(ListenSettings(host="127.0.0.1", port=0), LimitsSettings(),
                            TokenStore(tmp_path / "tokens.json"), EchoUpstream())
        await relay.start()
        try:
            gc.collect()
            assert relay.heap.frozen_after_passes == 1
        finally:
            await relay.close()
        gc.collect()
        return relay.heap.frozen_after_passes

    try:
        assert asyncio.run(scenario()) == 1  # closed: no longer called
    finally:
        gc.unfreeze()
