"""`edgevoice bench`: run every benchmark row, print the table, write the results.

The rows run one after another (never two at once: each would disturb the other's
CPU figures), in the order that lets one conversation serve rows 1, 2 and 7. A row
that fails is reported as not run, with its error, and the others still run; the
exit status is 1 then. A missed target is a finding, not a failure: exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgevoice_dev import repository_root
from edgevoice_dev.bench.plan import FULL, QUICK, TINY, BenchPlan, Workspace
from edgevoice_dev.bench.proc import machine_info
from edgevoice_dev.bench.report import render_table, write_outputs
from edgevoice_dev.bench.results import ERROR, RowResult

logger = logging.getLogger(__name__)

ROWS = {
    1: "Uplink bandwidth while speaking",
    2: "Device CPU, full-duplex conversation",
    3: "Added latency per hop (loopback, one device)",
    4: "Relay capacity, one core",
    5: "Barge-in: relay interrupt -> device output silent",
    6: "Reconnect: relay restarted -> device streaming again",
    7: "Device footprint",
    8: "Echo cancellation CPU (aec extra), per second of audio",
    9: "Scale-out: two relay processes vs one, behind HAProxy",
    10: "Idle devices spread over two relays",
    11: "Device idle, always-on listening",
    12: "Device idle, wake word on",
    13: "Idle fleet: connected devices nobody talks to",
    14: "Relay conversational capacity, one core",
    15: "Relay beyond capacity: admission control",
    16: "Uplink on the real wire: wss://, TLS and TCP/IP headers",
    17: "Upstream audio / user speech (Nova, scripted conversation)",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgevoice bench",
        description="Measure edgevoice against its peers and its floor, in one run on this "
                    "machine: bandwidth, device CPU, per-hop latency, relay capacity, "
                    "barge-in, reconnect, footprint.")
    p.add_argument("--quick", action="store_true",
                   help="short run (5-8 minutes), for CI: same rows, fewer samples")
    p.add_argument("--rows", default=f"1-{max(ROWS)}",
                   help="rows to run, e.g. 1,3 or 2-4 (rows 1, 2 and 7 share one run)")
    p.add_argument("--json", type=Path, help="results file (default: bench/results-full.json, "
                   "or bench/results-quick.json with --quick; untracked)")
    p.add_argument("--markdown", type=Path, help="report page (default: "
                   "bench/benchmarks-full.md, or bench/benchmarks-quick.md with --quick)")
    p.add_argument("--publish", action="store_true",
                   help="a full run only: write the tracked bench/results.json and "
                        "docs/benchmarks.md (what the documentation shows) instead")
    p.add_argument("--no-write", action="store_true", help="only print the table")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                   help="profile the device / relay when their CPU targets are missed "
                        "(default: on in a full run, off with --quick)")
    p.add_argument("--keep", action="store_true",
                   help="keep the scratch directory (logs, configs, raw timestamps)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # seconds a row
    return p


def output_paths(root: Path, mode: str, *, publish: bool = False,
                 json_path: Path | None = None, md_path: Path | None = None
                 ) -> tuple[Path, Path]:
    """Where a run writes its results and report.

    Only ``publish`` touches the tracked files the documentation shows
    (bench/results.json, docs/benchmarks.md): a run on a loaded laptop must not
    silently rewrite the published figures. Otherwise ``bench/*-MODE.*``, ignored by git.
    """
    if publish:
        default_json, default_md = root / "bench" / "results.json", root / "docs" / "benchmarks.md"
    else:
        default_json = root / "bench" / f"results-{mode}.json"
        default_md = root / "bench" / f"benchmarks-{mode}.md"
    return json_path or default_json, md_path or default_md


def parse_rows(spec: str) -> list[int]:
    rows: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        rows.update(range(first, last + 1))
    bad = sorted(rows - set(ROWS))
    if bad:
        raise ValueError(f"no such row: {', '.join(map(str, bad))} (rows are 1-{max(ROWS)})")
    return sorted(rows)


async def _guard(numbers: Sequence[int], make: Callable[[], Awaitable[Sequence[RowResult]]],
                 ) -> list[RowResult]:
    """Run a row (or the run shared by several rows); a failure becomes an error row."""
    started = time.monotonic()
    logger.info("row %s: %s ...", "/".join(map(str, numbers)), ROWS[numbers[0]])
    try:
        rows = list(await make())
    except Exception as exc:
        logger.exception("row %s failed", "/".join(map(str, numbers)))
        rows = [RowResult.failed(n, ROWS[n], f"{type(exc).__name__}: {exc}") for n in numbers]
    for row in rows:
        row.seconds = row.seconds or time.monotonic() - started
    logger.info("row %s: done in %.0f s", "/".join(map(str, numbers)),
                time.monotonic() - started)
    return rows


async def run_bench(plan: BenchPlan, rows: Sequence[int], workdir: Path) -> list[RowResult]:
    """Run the selected rows with ``plan`` in ``workdir``; the results in row order."""
    ws = Workspace(workdir, plan)
    try:
        return await _run_rows(ws, plan, set(rows))
    finally:
        await ws.close()


async def _run_rows(ws: Workspace, plan: BenchPlan, wanted: set[int]) -> list[RowResult]:
    from edgevoice_dev.bench import (
        aec,
        bargein,
        capacity,
        convcap,
        conversation,
        latency,
        life,
        reconnect,
        scaleout,
        upstreamaudio,
        wirecost,
    )

    results: list[RowResult] = []

    async def single(run: Callable[[Workspace], Awaitable[RowResult]]) -> list[RowResult]:
        return [await run(ws)]

    if wanted & {1, 2, 7}:
        shared = await _guard([n for n in (1, 2, 7) if n in wanted],
                              lambda: conversation.run_rows(ws))
        results += [r for r in shared if r.number in wanted]
        cpu = next((r for r in results if r.number == 2), None)
        if cpu is not None and cpu.missed and plan.profile and not cpu.error:
            logger.info("row 2: profiling the device (its CPU target was missed) ...")
            try:
                cpu.profile = await conversation.profile_device(ws)
            except Exception:
                logger.exception("profiling the device failed")
    if wanted & {11, 12}:
        idle = await _guard([n for n in (11, 12) if n in wanted],
                            lambda: life.run_idle_rows(ws))
        results += [r for r in idle if r.number in wanted]
    if 13 in wanted:
        results += await _guard([13], functools.partial(single, life.run_fleet_row))
    if wanted & {14, 15}:
        conv = await _guard([n for n in (14, 15) if n in wanted], lambda: convcap.run_rows(ws))
        results += [r for r in conv if r.number in wanted]
    if 16 in wanted:
        results += await _guard([16], functools.partial(single, wirecost.run_row))
    if 17 in wanted:
        results += await _guard([17], functools.partial(single, upstreamaudio.run_row))
    # capacity last: it is the longest, and it loads both cores
    runners: dict[int, Callable[[Workspace], Awaitable[RowResult]]] = {
        3: latency.run_row, 5: bargein.run_row, 6: reconnect.run_row, 8: aec.run_row,
        10: scaleout.run_idle_row, 9: scaleout.run_scale_row, 4: capacity.run_row}
    for number, run in runners.items():
        if number in wanted:
            results += await _guard([number], functools.partial(single, run))
    return sorted(results, key=lambda r: r.number)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def results_document(plan: BenchPlan, rows: list[RowResult], command: str, started: float,
                     started_wall: datetime.datetime, load_before: list[float],
                     ) -> dict[str, Any]:
    return {
        "command": command,
        "mode": plan.mode,
        "started": started_wall.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started, 1),
        "machine": machine_info(),
        "load_average": {"before": load_before, "after": _load()},
        "plan": asdict(plan),
        "rows": [row.as_dict() for row in rows],
        "missed": [f"{row.number}: {line.metric.strip()}" for row in rows
                   for line in row.lines if line.verdict == "MISSED"],
    }


def _configure_logging() -> None:
    """Progress lines on stderr, unless the caller configured logging already."""
    if logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("bench: %(message)s"))
    bench = logging.getLogger("edgevoice_dev.bench")
    bench.addHandler(handler)
    bench.setLevel(logging.INFO)
    bench.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``edgevoice bench`` (``argv``: the arguments after ``bench``).

    Returns 0 when every selected row ran (whether or not it met its target), 1 when
    a row could not run, 2 for bad arguments.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(args_list)
    try:
        rows = parse_rows(args.rows)
    except ValueError as exc:
        parser.error(str(exc))
    plan = TINY if args.tiny else QUICK if args.quick else FULL
    if args.profile is not None:
        plan = BenchPlan(**{**asdict(plan), "profile": args.profile})
    _configure_logging()
    root = repository_root()
    if args.publish and plan.mode != "full":
        parser.error("--publish: only a full run is published (drop --quick)")
    json_path, md_path = output_paths(root, plan.mode, publish=args.publish,
                                      json_path=args.json, md_path=args.markdown)
    command = " ".join(["edgevoice bench", *args_list])
    started, started_wall = time.monotonic(), datetime.datetime.now(datetime.UTC)
    load_before = _load()
    workdir = Path(tempfile.mkdtemp(prefix="edgevoice-bench-"))
    logger.info("%s run, scratch directory %s", plan.mode, workdir)
    try:
        results = asyncio.run(run_bench(plan, rows, workdir))
    finally:
        if args.keep:
            logger.info("kept %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    document = results_document(plan, results, command, started, started_wall, load_before)
    print(render_table(document))
    if not args.no_write:
        write_outputs(document, json_path, md_path)
        logger.info("wrote %s and %s", json_path, md_path)
    if document["missed"]:
        logger.info("targets missed: %s", "; ".join(document["missed"]))
    return 1 if any(line.verdict == ERROR for row in results for line in row.lines) else 0
