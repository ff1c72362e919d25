"""A relay process for the benchmarks: the real RelayServer with a bench upstream.

``python -m edgevoice_dev.bench.relay_runner --tokens FILE --upstream KIND ...`` listens
on 127.0.0.1, prints JSON event lines on stdout (``listening``, ``session``, ...)
and, on SIGTERM, closes the relay the way ``edgevoice relay`` does, writes what its
upstream recorded to ``--record`` and prints a ``stopped`` event with the relay's
counters. ``--cpu`` pins it to one core; ``--profile`` writes a cProfile of the
whole run (CPU time, not wall time).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import logging
import signal
import time
from array import array
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from edgevoice.relay.auth import TokenStore
from edgevoice.relay.loop import run as run_on_relay_loop
from edgevoice.relay.server import RelayServer
from edgevoice.relay.settings import LimitsSettings, ListenSettings
from edgevoice_dev.bench.proc import emit, pin_to_cpu
from edgevoice_dev.bench.upstreams import BargeInUpstream, LoopbackUpstream, ReplyUpstream

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edgevoice_dev.bench.relay_runner")
    p.add_argument("--tokens", required=True, help="token store (JSON) of the devices")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--upstream", choices=["reply", "loopback", "bargein"], required=True)
    p.add_argument("--reply", help="raw 24 kHz s16le PCM file the upstream speaks")
    p.add_argument("--reply-ms", type=int, default=600)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--record", help="write the upstream's timestamps here (JSON)")
    p.add_argument("--cpu", type=int, help="pin the relay to this CPU")
    p.add_argument("--profile", help="write a cProfile (CPU time) of the run here")
    p.add_argument("--max-active-turns", type=int, default=0,
                   help="the relay's admission limit (0: none, to measure the engine alone)")
    p.add_argument("--admission", choices=("off", "shipped"), default="off",
                   help="the ramp and load-based admission (relay/admission.py): off (the "
                   "engine alone) or as shipped (limits.turn_ramp_ms, overload_*)")
    p.add_argument("--tls-dir", help="serve wss:// with a throwaway CA written here")
    p.add_argument("--loop-lag", help="write the event loop's lateness samples here (JSON "
                   "list of [monotonic s, late ms], one per 10 ms)")
    p.add_argument("--step-times", help="time every step the event loop runs and write them "
                   "here (StepTimes.write); runs on asyncio's loop, not uvloop")
    return p


def _step_name(handle: asyncio.events.Handle) -> str:
    """What a step ran: a task's coroutine, or the callback's qualified name."""
    callback = getattr(handle, "_callback", None)
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        return f"task {getattr(coro, '__qualname__', repr(coro))}"
    return str(getattr(callback, "__qualname__", repr(callback)))[:120]


class StepTimes:
    """How long each step the event loop runs holds it: every callback, task step and
    I/O callback, timed where asyncio runs it (``Handle._run``), and every collector
    pass (``gc.callbacks``).

    uvloop runs its steps in C where Python cannot time them, so a run with this on uses
    asyncio's loop: the steps are the relay's same code, with asyncio's slightly slower
    loop around them (an upper bound for uvloop's). Costs two clock reads per step.
    """

    #: steps longer than this are kept with the callback's name (at most ``KEEP``)
    SLOW_S = 0.002
    KEEP = 200

    def __init__(self) -> None:
        self.ended = array("d")  # monotonic time each step ended
        self.held = array("d")  # how long it held the loop, seconds
        self.slow: list[tuple[float, float, str]] = []
        self.collections: list[tuple[float, float, int]] = []  # (start, seconds, generation)
        self._gc_started = 0.0

    def install(self) -> None:
        timed = asyncio.events.Handle._run
        clock, ended, held, slow = time.monotonic, self.ended, self.held, self.slow

        def run(handle: asyncio.events.Handle) -> None:
            start = clock()
            timed(handle)
            end = clock()
            ended.append(end)
            held.append(end - start)
            if end - start > StepTimes.SLOW_S and len(slow) < StepTimes.KEEP:
                slow.append((end, end - start, _step_name(handle)))

        asyncio.events.Handle._run = run  # type: ignore[method-assign,assignment]
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.monotonic()
        else:
            self.collections.append((self._gc_started, time.monotonic() - self._gc_started,
                                     info["generation"]))

    def write(self, path: Path) -> None:
        """``path`` (JSON: the slow steps and the collections) and ``path``.bin (the
        end times, then the durations, as doubles)."""
        with open(f"{path}.bin", "wb") as out:
            self.ended.tofile(out)
            self.held.tofile(out)
        path.write_text(json.dumps({"steps": len(self.held), "slow": self.slow,
                                    "collections": self.collections}))


class LoopLag:
    """How late the event loop runs a callback scheduled every ``period_s``: the time
    some other step held the loop (a stall), sampled. Costs one wake-up per period.
    Timed with time.monotonic, not loop.time (uvloop's is in whole milliseconds and
    cached per loop iteration)."""

    def __init__(self, period_s: float = 0.01) -> None:
        self.period_s = period_s
        self.samples: list[tuple[float, float]] = []  # (monotonic time, lateness s)
        self._loop = asyncio.get_running_loop()
        self._due = time.monotonic() + period_s
        self._handle = self._loop.call_later(period_s, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        self.samples.append((now, max(0.0, now - self._due)))
        self._due = now + self.period_s
        self._handle = self._loop.call_later(self.period_s, self._tick)

    def stop(self) -> list[list[float]]:
        self._handle.cancel()
        return [[round(t, 4), round(lag * 1000, 3)] for t, lag in self.samples]


async def serve(args: argparse.Namespace, reply: bytes) -> dict[str, Any]:
    """Run the relay until SIGTERM; what the upstream recorded."""
    upstream: ReplyUpstream | LoopbackUpstream | BargeInUpstream
    if args.upstream == "reply":
        upstream = ReplyUpstream(reply, args.reply_ms, notify=emit)
    elif args.upstream == "loopback":
        upstream = LoopbackUpstream(reply, notify=None)  # hundreds of sessions: stay quiet
    else:
        upstream = BargeInUpstream(reply, args.trials, notify=emit)
    limits = LimitsSettings(max_active_turns=args.max_active_turns, max_devices=100_000)
    if args.admission == "off":
        limits = replace(limits, turn_ramp_ms=0, overload_lag_ms=0)
    listen = ListenSettings(host="127.0.0.1", port=args.port)
    if args.tls_dir:
        from edgevoice_dev.testing.tls import make_test_ca

        certs = make_test_ca(args.tls_dir)
        listen = ListenSettings(host="127.0.0.1", port=args.port,
                                tls_cert_file=str(certs.cert_file),
                                tls_key_file=str(certs.key_file))
    server = RelayServer(listen, limits,
                         TokenStore(args.tokens), upstream)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    # sampled only when asked for: its 100 wake-ups a second would be counted as the
    # relay's own in the idle-fleet row
    lag = LoopLag() if args.loop_lag else None
    emit({"event": "listening", "port": server.port, "t": time.monotonic()})
    # as `edgevoice relay` does every 5 s (relay/app.py): collect and freeze when quiet
    heap = server.heap
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 5.0)
        done = server.keep_heap()
        if done is not None:
            emit({"event": "heap", "pass": done.value, "t": time.monotonic(),
                  "pause_ms": round(1000 * heap.last_pause_s, 1), "freed": heap.freed})
    loop_lag = lag.stop() if lag is not None else []
    await server.close()
    counters = asdict(server.counters)
    counters["turns_refused_by_reason"] = dict(server.admission.refused)
    counters["heap_collections"] = heap.runs
    counters["heap_last_pause_ms"] = round(1000 * heap.last_pause_s, 1)
    counters.pop("upstream_latency_s", None)
    return {"record": upstream.dump(), "counters": counters, "loop_lag_ms": loop_lag}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    pin_to_cpu(args.cpu)
    reply = Path(args.reply).read_bytes() if args.reply else b""
    profile = cProfile.Profile(time.process_time) if args.profile else None
    steps = StepTimes() if args.step_times else None
    if profile is not None:
        profile.enable()
    try:
        if steps is not None:
            steps.install()
            gc.freeze()  # as relay/loop.py run() does before its loop starts
            outcome = asyncio.run(serve(args, reply))
        else:
            outcome = run_on_relay_loop(serve(args, reply))  # the loop `edgevoice relay` runs on
    finally:
        if profile is not None:
            profile.disable()
            profile.dump_stats(args.profile)
    if steps is not None:
        steps.write(Path(args.step_times))
    if args.record:
        Path(args.record).write_text(json.dumps(outcome["record"]))
    if args.loop_lag:
        Path(args.loop_lag).write_text(json.dumps(outcome["loop_lag_ms"]))
    emit({"event": "stopped", "t": time.monotonic(), "counters": outcome["counters"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
