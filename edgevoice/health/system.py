"""Process and board metrics, read from the kernel with no extra dependencies.

Every reader takes the filesystem root as a parameter so tests can point it at a
fake ``/proc`` and ``/sys`` tree, and returns None when the number is unavailable
(another OS, a container, a board without the sensor) instead of raising: a missing
thermometer must never break ``/stats``.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgevoice.clock import Clock, MonotonicClock

logger = logging.getLogger(__name__)

_THROTTLED = re.compile(r"throttled=(0x[0-9a-fA-F]+|\d+)")


@dataclass(frozen=True)
class ThrottleFlags:
    """The Raspberry Pi firmware's ``get_throttled`` bits, decoded.

    The first four are "now"; the ``_occurred`` ones latch until the next boot, so a
    brown-out that ended an hour ago still shows.
    """

    raw: int
    under_voltage: bool
    freq_capped: bool
    throttled: bool
    soft_temp_limit: bool
    under_voltage_occurred: bool
    freq_capped_occurred: bool
    throttled_occurred: bool
    soft_temp_limit_occurred: bool

    @classmethod
    def from_bits(cls, raw: int) -> ThrottleFlags:
        """Decode the bit field (bits 0-3 now, 16-19 since boot)."""

        def bit(n: int) -> bool:
            return bool(raw >> n & 1)

        return cls(raw, bit(0), bit(1), bit(2), bit(3), bit(16), bit(17), bit(18), bit(19))

    def active(self) -> dict[str, bool]:
        """The four "now" flags by name."""
        return {
            "under_voltage": self.under_voltage,
            "freq_capped": self.freq_capped,
            "throttled": self.throttled,
            "soft_temp_limit": self.soft_temp_limit,
        }

    def occurred(self) -> dict[str, bool]:
        """The four "since boot" flags, by the same names as :meth:`active`."""
        return {
            "under_voltage": self.under_voltage_occurred,
            "freq_capped": self.freq_capped_occurred,
            "throttled": self.throttled_occurred,
            "soft_temp_limit": self.soft_temp_limit_occurred,
        }


@dataclass(frozen=True)
class SystemStats:
    """One sample of this process and its board; None where unavailable."""

    #: CPU used by this process since the previous sample, in % of one core
    cpu_percent: float | None = None
    #: CPU seconds (user + system) used by this process since it started
    cpu_seconds: float | None = None
    rss_bytes: int | None = None
    open_fds: int | None = None
    soc_temp_c: float | None = None
    throttling: ThrottleFlags | None = None
    #: CPU seconds since start by the role of the thread that used them (see
    #: :class:`ThreadCpuAccount`); empty where the kernel does not say
    thread_cpu_seconds: Mapping[str, float] = field(default_factory=dict)


def parse_throttled(text: str) -> ThrottleFlags | None:
    """Decode ``vcgencmd get_throttled`` output (``throttled=0x50005``)."""
    match = _THROTTLED.search(text)
    if match is None:
        return None
    return ThrottleFlags.from_bits(int(match.group(1), 0))


def read_soc_temp_c(root: Path = Path("/")) -> float | None:
    """SoC temperature from thermal zone 0 (millidegrees Celsius in sysfs)."""
    try:
        text = (root / "sys/class/thermal/thermal_zone0/temp").read_text()
        return int(text.strip()) / 1000.0
    except (OSError, ValueError):
        return None


def read_rss_bytes(root: Path = Path("/")) -> int | None:
    """Resident set size of this process, from ``/proc/self/statm`` (in pages).

    ``resource.getrusage`` only knows the peak, which would hide a leak that
    recovered, so without procfs the answer is None.
    """
    try:
        fields = (root / "proc/self/statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def count_open_fds(root: Path = Path("/")) -> int | None:
    """Number of open file descriptors of this process (entries of /proc/self/fd)."""
    try:
        # The listing itself briefly opens a descriptor; that one is counted too,
        # which is a constant offset of one and not worth a second syscall.
        return sum(1 for _ in (root / "proc/self/fd").iterdir())
    except OSError:
        return None


#: The role of a thread, by the name the kernel has for it: PortAudio's callback
#: threads are named by edgevoice (audio/sounddevice_io.py), the sound server client's
#: by libpulse. The event loop is the main thread (whatever its name); anything else
#: (worker threads, a library's) is "other".
THREAD_ROLES: Mapping[str, str] = {
    "edgevoice-mic": "mic",
    "edgevoice-play": "speaker",
    "threaded-ml": "sound_server",
}
ROLE_EVENT_LOOP = "event_loop"
ROLE_OTHER = "other"
#: CPU of threads that ended before they were looked at, or since the last look
ROLE_ENDED = "ended"
_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def read_threads(root: Path = Path("/")) -> dict[int, tuple[str, float]] | None:
    """Every live thread of this process: tid -> (the kernel's name, CPU seconds).

    From ``/proc/self/task/*/stat`` (user + system ticks); None without procfs."""
    threads: dict[int, tuple[str, float]] = {}
    try:
        tasks = list((root / "proc/self/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            text = (task / "stat").read_text()
            fields = text[text.rindex(")") + 2:].split()
            threads[int(task.name)] = (text[text.index("(") + 1:text.rindex(")")],
                                       (int(fields[11]) + int(fields[12])) / _TICKS_PER_S)
        except (OSError, ValueError, IndexError):  # ended meanwhile, or not a number
            continue
    return threads


class ThreadCpuAccount:
    """CPU seconds by thread role, as counters that never go down.

    Threads come and go (a speaker stream parks after each reply and opens a new
    thread for the next): a thread's CPU stays with its role after it ended, as much
    as was seen at the last look. What a thread used after that look, or a thread that
    lived and ended between two looks, shows as ``ended``: the process's total less
    everything attributed (so the roles always add up to the process's CPU).
    """

    def __init__(self, roles: Mapping[str, str] = THREAD_ROLES) -> None:
        self._roles = roles
        # tid -> (role, CPU at the last look, CPU it had when it took that role)
        self._live: dict[int, tuple[str, float, float]] = {}
        self._retired: dict[str, float] = {}
        self._ended = 0.0

    def role(self, tid: int, name: str, main_tid: int) -> str:
        if tid == main_tid:
            return ROLE_EVENT_LOOP
        return self._roles.get(name, ROLE_OTHER)

    def update(self, threads: Mapping[int, tuple[str, float]], process_total: float,
               main_tid: int) -> dict[str, float]:
        """Account for one look at the live ``threads`` (tid -> (name, CPU s)) and the
        process's total CPU; the CPU seconds by role since start."""
        live: dict[int, tuple[str, float, float]] = {}
        for tid, (name, cpu) in threads.items():
            role = self.role(tid, name, main_tid)
            base = 0.0
            before = self._live.get(tid)
            if before is not None:
                old_role, old_cpu, old_base = before
                if cpu < old_cpu:  # the kernel gave a new thread an ended one's tid
                    self._retire(old_role, old_cpu - old_base)
                elif old_role != role:
                    # renamed (PortAudio's threads take their names at their first
                    # callback): what it used so far stays where it was counted
                    self._retire(old_role, old_cpu - old_base)
                    base = old_cpu
                else:
                    base = old_base
            live[tid] = (role, cpu, base)
        for tid, (role, cpu, base) in self._live.items():
            if tid not in threads:
                self._retire(role, cpu - base)
        self._live = live
        totals = dict(self._retired)
        for role, cpu, base in live.values():
            totals[role] = totals.get(role, 0.0) + cpu - base
        # what no live or retired thread accounts for; never less than before (the
        # process's total and the threads' are read a moment apart)
        self._ended = max(self._ended, process_total - sum(totals.values()))
        totals[ROLE_ENDED] = self._ended
        return totals

    def _retire(self, role: str, cpu: float) -> None:
        self._retired[role] = self._retired.get(role, 0.0) + cpu


def process_cpu_seconds() -> float:
    """User plus system CPU seconds this process has used."""
    times = os.times()
    return times.user + times.system


Runner = Callable[[Sequence[str]], str]


def _run(argv: Sequence[str]) -> str:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=2.0, check=True
    ).stdout


def read_throttled(vcgencmd: str | None, run: Runner = _run) -> ThrottleFlags | None:
    """Ask the firmware through ``vcgencmd get_throttled``; None without it or on error."""
    if vcgencmd is None:
        return None
    try:
        return parse_throttled(run([vcgencmd, "get_throttled"]))
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("vcgencmd get_throttled failed: %s", exc)
        return None


class SystemSampler:
    """Produces :class:`SystemStats`, cheap enough to call on every request.

    CPU % is the process's CPU time over the wall time between samples; samples
    closer together than ``min_interval_s`` reuse the previous figure, because two
    scrapes a millisecond apart would otherwise report noise. ``vcgencmd`` forks a
    process and talks to the firmware (tens of ms on a Pi Zero), which would stall
    the event loop that also moves audio, so its answer is kept for
    ``throttle_refresh_s``.
    """

    def __init__(
        self,
        root: Path = Path("/"),
        *,
        clock: Clock | None = None,
        cpu_seconds: Callable[[], float] = process_cpu_seconds,
        vcgencmd: str | None = None,
        run: Runner = _run,
        min_interval_s: float = 1.0,
        throttle_refresh_s: float = 30.0,
    ) -> None:
        self._root = root
        self._clock = clock or MonotonicClock()
        self._cpu_seconds = cpu_seconds
        self._vcgencmd = vcgencmd
        self._run = run
        self._min_interval_s = min_interval_s
        self._throttle_refresh_s = throttle_refresh_s
        self._last_at: float | None = None
        self._last_cpu = 0.0
        self._cpu_percent: float | None = None
        self._throttle_at: float | None = None
        self._throttling: ThrottleFlags | None = None
        self._threads = ThreadCpuAccount()
        self._main_tid = os.getpid()

    @classmethod
    def for_this_machine(cls) -> SystemSampler:
        """A sampler of the real ``/`` that uses ``vcgencmd`` when it is installed."""
        # Imported here: shutil brings bz2 and lzma with it, ~0.3 MB resident in a
        # device that needs it for this one look-up at start-up (bench rows 11, 12).
        import shutil

        return cls(vcgencmd=shutil.which("vcgencmd"))

    def sample(self) -> SystemStats:
        """Read everything once (throttling and CPU % possibly from the cache)."""
        now = self._clock.now()
        cpu = self._cpu_seconds()
        if self._last_at is None:
            self._last_at, self._last_cpu = now, cpu
        elif now - self._last_at >= self._min_interval_s:
            self._cpu_percent = max(0.0, (cpu - self._last_cpu) / (now - self._last_at) * 100.0)
            self._last_at, self._last_cpu = now, cpu
        if self._throttle_at is None or now - self._throttle_at >= self._throttle_refresh_s:
            self._throttling = read_throttled(self._vcgencmd, self._run)
            self._throttle_at = now
        threads = read_threads(self._root)
        return SystemStats(
            cpu_percent=self._cpu_percent,
            cpu_seconds=cpu,
            rss_bytes=read_rss_bytes(self._root),
            open_fds=count_open_fds(self._root),
            soc_temp_c=read_soc_temp_c(self._root),
            throttling=self._throttling,
            thread_cpu_seconds={} if threads is None else
            self._threads.update(threads, cpu, self._main_tid),
        )
