"""Benchmarks: edgevoice measured against its peers and its floor, in one run.

``edgevoice bench`` (or ``python -m edgevoice.bench``) runs seven rows, each with
real processes on 127.0.0.1 and WAV audio at real time: uplink bandwidth against
Wyoming and Nova-style JSON (row 1), device CPU against libopus + soxr alone (2),
per-hop latency (3), relay capacity on one core (4), barge-in (5), reconnect (6)
and the device's footprint (7). It prints a table and writes ``bench/results.json``
and ``docs/benchmarks.md``; ``--quick`` is the short run CI uses.

Module map: :mod:`~edgevoice.bench.runner` (command line, order of the rows),
one module per row or pair of rows (:mod:`~edgevoice.bench.conversation` for 1, 2
and 7, :mod:`~edgevoice.bench.latency`, :mod:`~edgevoice.bench.capacity`,
:mod:`~edgevoice.bench.bargein`, :mod:`~edgevoice.bench.reconnect`), the child
processes they start (:mod:`~edgevoice.bench.relay_runner`,
:mod:`~edgevoice.bench.device_runner`, :mod:`~edgevoice.bench.loadgen`), and their
tools (:mod:`~edgevoice.bench.wire`, :mod:`~edgevoice.bench.peers`,
:mod:`~edgevoice.bench.floor`, :mod:`~edgevoice.bench.analysis`, ...).
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """``edgevoice bench [--quick] ...``; ``argv`` is what follows ``bench``."""
    from edgevoice.bench.runner import main as run

    return run(argv)


__all__ = ["main"]
