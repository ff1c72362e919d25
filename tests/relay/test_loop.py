"""The relay's event loop (relay/loop.py): uvloop when installed, a frozen heap."""

from __future__ import annotations

import asyncio
import gc

import pytest

from edgevoice.relay.loop import loop_factory, run


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
