"""Child processes and what /proc says about them.

The benchmarks run the relay, the device and the load generator as separate
processes, as they run in production. :class:`Child` starts one with its stdout
carrying JSON event lines (each stamped by the child with ``time.monotonic``, one
clock for every process on the machine) and keeps its stderr, time-stamped when
read, for log lines and for diagnosis. CPU time and memory come from ``/proc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def emit(event: dict[str, Any]) -> None:
    """Write one JSON event line on stdout (a child's channel to the bench)."""
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), seconds."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def cpu_busy_ticks() -> dict[str, tuple[int, int]]:
    """Per CPU line of /proc/stat ("cpu" is all of them): (busy ticks, total ticks)."""
    out: dict[str, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if not line.startswith("cpu"):
            continue
        name, *values = line.split()
        ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
        total = sum(ticks)
        out[name] = (total - ticks[3] - ticks[4], total)
    return out


def busy_pct(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]],
             cpu: str = "cpu") -> float:
    """How busy ``cpu`` was between two :func:`cpu_busy_ticks` readings, % of its time."""
    busy = after[cpu][0] - before[cpu][0]
    total = after[cpu][1] - before[cpu][1]
    return 100.0 * busy / total if total > 0 else 0.0


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), RssAnon and RssFile of process ``pid``, KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


def rss_by_mapping(pid: int) -> dict[str, int]:
    """Resident KiB of process ``pid`` per mapped file ("[anon]" for the rest)."""
    out: dict[str, int] = {}
    current = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:
            current = head[5] if len(head) == 6 and head[5].startswith("/") else "[anon]"
        elif head and head[0] == "Rss:":
            out[current] = out.get(current, 0) + int(head[1])
    return out


def pin_to_cpu(cpu: int | None) -> bool:
    """Restrict this process to one CPU; False when that CPU is not available."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return False
    if cpu not in os.sched_getaffinity(0):
        logger.warning("cpu %d is not available here; not pinning", cpu)
        return False
    os.sched_setaffinity(0, {cpu})
    return True


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    for key in ("model name", "Model", "Hardware", "cpu model"):
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key and value.strip():
                return value.strip()
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


#: Passes of the reference work; the fastest counts (a moment of other load is left out).
SPEED_PASSES = 5


def best_stage_times(passes: int,
                     make_pass: Callable[[], Sequence[Callable[[], object]]]) -> list[float]:
    """The least CPU time (``time.process_time``, seconds) each stage of a pass took,
    over ``passes`` passes: a moment of other load on the machine is left out.

    ``make_pass()`` sets a pass up untimed (fresh codec state) and returns its stages,
    run in order and timed one by one; a stage may use what an earlier one made."""
    best: list[float] = []
    for _ in range(passes):
        times = []
        for stage in make_pass():
            t0 = time.process_time()
            stage()
            times.append(time.process_time() - t0)
        best = times if not best else [min(a, b) for a, b in zip(best, times, strict=True)]
    return best


def machine_speed(passes: int = SPEED_PASSES) -> dict[str, float]:
    """CPU time of fixed reference work on this host, best of ``passes``: libopus
    encoding 10 s of seeded 16 kHz noise (the uplink's settings) and a fixed loop of
    interpreter steps (dict, attribute and arithmetic work, as the frame path does).

    Hosts differ (a cloud VM's neighbours, another CPU): two pages' CPU figures compare
    only as far as these do."""
    import numpy as np

    from edgevoice.audio.opus import OpusEncoder

    rng = np.random.default_rng(20261203)
    frames = [(rng.standard_normal(320) * 3000).astype("<i2").tobytes() for _ in range(500)]

    class _State:
        __slots__ = ("count", "level")

        def __init__(self) -> None:
            self.level, self.count = 0.0, 0

    def interpreter_work() -> None:
        state, table = _State(), {i: float(i) for i in range(64)}
        for i in range(300_000):
            state.level = max(state.level * 0.9, table[i & 63])
            state.count += 1

    def one_pass() -> tuple[Callable[[], None], Callable[[], None]]:
        encoder = OpusEncoder()

        def encode() -> None:
            for frame in frames:
                encoder.encode(frame)

        return encode, interpreter_work

    best_opus, best_python = best_stage_times(passes, one_pass)
    return {"opus_10s_ms": round(best_opus * 1000, 1),
            "python_loop_ms": round(best_python * 1000, 1), "passes": passes}


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    try:
        import opuslib_next.api.info as opus_info

        libopus = opus_info.get_version_string().decode()
    except Exception as exc:  # reported, not fatal: the Opus rows will fail on their own
        libopus = f"unavailable ({exc})"
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "libopus": libopus,
        "speed": machine_speed(),
        "packages": {name: _version(name) for name in (
            "edgevoice", "websockets", "opuslib-next", "soxr", "numpy", "wyoming")},
    }


class Child:
    """A child process speaking JSON event lines on stdout."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self.started_at = time.monotonic()
        self.events: list[dict[str, Any]] = []
        #: stderr lines with the monotonic time they were read
        self.lines: list[tuple[float, str]] = []
        self._changed = asyncio.Condition()
        self._readers = [asyncio.create_task(self._read_events()),
                         asyncio.create_task(self._read_stderr())]

    @classmethod
    async def start(cls, name: str, args: Sequence[str], log_dir: Path, *,
                    env: dict[str, str] | None = None) -> Child:
        merged = {**os.environ, **(env or {})}
        merged.setdefault("PYTHONUNBUFFERED", "1")
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=merged)
        child = cls(name, proc, log_dir / f"{name}.log")
        child.started_at = started
        logger.debug("started %s (pid %d): %s", name, proc.pid, " ".join(args))
        return child

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    async def _read_events(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                event = {"event": "stdout", "text": raw.decode(errors="replace").rstrip()}
            async with self._changed:
                self.events.append(event)
                self._changed.notify_all()

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        with self.log_path.open("a", encoding="utf-8") as log:
            async for raw in self.proc.stderr:
                line = raw.decode(errors="replace").rstrip()
                log.write(line + "\n")
                async with self._changed:
                    self.lines.append((time.monotonic(), line))
                    self._changed.notify_all()

    async def _wait(self, ready: Callable[[], Any], what: str, limit_s: float) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        async with self._changed:
            while (found := ready()) is None:
                if self.proc.returncode is not None and all(r.done() for r in self._readers):
                    raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before "
                                       f"{what}; see {self.log_path}")
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise RuntimeError(f"{self.name}: no {what} within {limit_s:.0f} s; "
                                       f"see {self.log_path}")
                with contextlib.suppress(TimeoutError):
                    # wake up now and then: the process may have exited silently
                    await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
            return found

    async def event(self, name: str, limit_s: float, *, after: int = 0) -> dict[str, Any]:
        """The first event called ``name`` at index ``after`` or later."""
        def find() -> dict[str, Any] | None:
            for event in self.events[after:]:
                if event.get("event") == name:
                    return event
            return None
        result: dict[str, Any] = await self._wait(find, f"{name!r} event", limit_s)
        return result

    async def line(self, text: str, limit_s: float) -> float:
        """When a stderr line containing ``text`` was read."""
        def find() -> float | None:
            for at, line in self.lines:
                if text in line:
                    return at
            return None
        at: float = await self._wait(find, f"log line {text!r}", limit_s)
        return at

    async def stop(self, limit_s: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after ``limit_s``; the exit status."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), limit_s)
            except TimeoutError:
                logger.warning("%s did not stop within %.0f s; killing it", self.name, limit_s)
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        for reader in self._readers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader, 5)
        return int(self.proc.returncode or 0)

    async def wait(self, limit_s: float) -> int:
        """Wait for the child to exit on its own (killed after ``limit_s``)."""
        try:
            await asyncio.wait_for(self.proc.wait(), limit_s)
        except TimeoutError:
            return await self.stop(5)
        for reader in self._readers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader, 5)
        return int(self.proc.returncode or 0)


def python_module(module: str, *args: str) -> list[str]:
    """argv to run ``python -m module args...`` with this interpreter."""
    return [sys.executable, "-m", module, *args]
