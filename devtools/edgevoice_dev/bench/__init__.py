"""Benchmarks: edgevoice measured against its peers and its floor, in one run.

``edgevoice bench`` (or ``python -m edgevoice_dev.bench``) runs seven rows, each with
real processes on 127.0.0.1 and WAV audio at real time: uplink bandwidth against
Wyoming and Nova-style JSON (row 1), device CPU against libopus + soxr alone (2),
per-hop latency (3), relay capacity on one core (4), barge-in (5), reconnect (6)
and the device's footprint (7). It prints a table and writes ``bench/results-full.json``
and ``bench/benchmarks-full.md`` (``--publish``: the tracked ``bench/results.json`` and
``docs/benchmarks.md``); ``--quick`` is the short run CI uses.

Module map: :mod:`~edgevoice_dev.bench.runner` (command line, order of the rows),
one module per row or pair of rows (:mod:`~edgevoice_dev.bench.conversation` for 1, 2
and 7, :mod:`~edgevoice_dev.bench.latency`, :mod:`~edgevoice_dev.bench.capacity`,
:mod:`~edgevoice_dev.bench.bargein`, :mod:`~edgevoice_dev.bench.reconnect`), the child
processes they start (:mod:`~edgevoice_dev.bench.relay_runner`,
:mod:`~edgevoice_dev.bench.device_runner`, :mod:`~edgevoice_dev.bench.loadgen`), and their
tools (:mod:`~edgevoice_dev.bench.wire`, :mod:`~edgevoice_dev.bench.peers`,
:mod:`~edgevoice_dev.bench.floor`, :mod:`~edgevoice_dev.bench.analysis`, ...).
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """``edgevoice bench [--quick] ...``; ``argv`` is what follows ``bench``."""
    from edgevoice_dev.bench.runner import main as run

    return run(argv)


__all__ = ["main"]
