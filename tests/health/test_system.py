"""Process and board metrics, read from fake /proc and /sys trees."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from edgevoice.clock import FakeClock
from edgevoice.health.system import (
    SystemSampler,
    ThrottleFlags,
    count_open_fds,
    parse_throttled,
    read_rss_bytes,
    read_soc_temp_c,
    read_throttled,
)

PAGE = os.sysconf("SC_PAGE_SIZE")


def fake_board(
    root: Path, *, temp: str = "48312\n", statm: str = "5000 1200 300 10 0 900 0\n", fds: int = 7
) -> Path:
    (root / "sys/class/thermal/thermal_zone0").mkdir(parents=True)
    (root / "sys/class/thermal/thermal_zone0/temp").write_text(temp)
    (root / "proc/self/fd").mkdir(parents=True)
    (root / "proc/self/statm").write_text(statm)
    for n in range(fds):
        (root / f"proc/self/fd/{n}").touch()
    return root


class ScriptedRunner:
    """Answers ``vcgencmd get_throttled`` with a fixed text and counts the calls."""

    def __init__(self, answer: str | Exception) -> None:
        self.answer = answer
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> str:
        self.calls.append(list(argv))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class FakeCpu:
    def __init__(self) -> None:
        self.seconds = 10.0

    def __call__(self) -> float:
        return self.seconds


def test_readers_on_a_fake_board(tmp_path: Path) -> None:
    root = fake_board(tmp_path)
    assert read_soc_temp_c(root) == pytest.approx(48.312)
    assert read_rss_bytes(root) == 1200 * PAGE
    assert count_open_fds(root) == 7


def test_readers_give_none_when_the_files_are_missing_or_garbled(tmp_path: Path) -> None:
    assert read_soc_temp_c(tmp_path) is None
    assert read_rss_bytes(tmp_path) is None
    assert count_open_fds(tmp_path) is None
    garbled = fake_board(tmp_path / "g", temp="hot\n", statm="5000\n")
    assert read_soc_temp_c(garbled) is None
    assert read_rss_bytes(garbled) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs procfs")
def test_readers_on_this_machine_see_this_process() -> None:
    rss = read_rss_bytes()
    fds = count_open_fds()
    assert rss is not None and rss > 1_000_000
    assert fds is not None and fds >= 3


@pytest.mark.parametrize(
    ("text", "active", "occurred"),
    [
        ("throttled=0x0\n", set(), set()),
        ("throttled=0x50005\n", {"under_voltage", "throttled"}, {"under_voltage", "throttled"}),
        ("throttled=0x50000\n", set(), {"under_voltage", "throttled"}),
        ("throttled=0x80008", {"soft_temp_limit"}, {"soft_temp_limit"}),
        ("throttled=0x20002", {"freq_capped"}, {"freq_capped"}),
    ],
)
def test_parse_throttled(text: str, active: set[str], occurred: set[str]) -> None:
    flags = parse_throttled(text)
    assert flags is not None
    assert {k for k, on in flags.active().items() if on} == active
    assert {k for k, on in flags.occurred().items() if on} == occurred


def test_throttle_bits_map_to_named_fields() -> None:
    flags = ThrottleFlags.from_bits(0xF000F)
    assert flags.raw == 0xF000F
    assert all(flags.active().values()) and all(flags.occurred().values())
    assert flags.under_voltage_occurred and flags.soft_temp_limit
    assert parse_throttled('error=1 error_msg="Command not registered"') is None


def test_read_throttled_without_vcgencmd_or_when_it_fails() -> None:
    assert read_throttled(None) is None
    failing = ScriptedRunner(subprocess.CalledProcessError(1, ["vcgencmd"]))
    assert read_throttled("/usr/bin/vcgencmd", failing) is None
    assert failing.calls == [["/usr/bin/vcgencmd", "get_throttled"]]
    assert read_throttled("/usr/bin/vcgencmd", ScriptedRunner(OSError("gone"))) is None


def test_sampler_cpu_percent_is_a_delta_over_at_least_the_minimum_interval(tmp_path: Path) -> None:
    clock, cpu = FakeClock(100.0), FakeCpu()
    sampler = SystemSampler(fake_board(tmp_path), clock=clock, cpu_seconds=cpu, min_interval_s=1.0)
    first = sampler.sample()
    assert first.cpu_percent is None  # nothing to compare with yet
    assert first.cpu_seconds == 10.0
    clock.advance(2.0)
    cpu.seconds += 0.5
    assert sampler.sample().cpu_percent == pytest.approx(25.0)
    # Too soon after the last sample: the figure is kept, not recomputed from noise.
    clock.advance(0.01)
    cpu.seconds += 0.01
    assert sampler.sample().cpu_percent == pytest.approx(25.0)
    clock.advance(1.0)
    assert sampler.sample().cpu_percent == pytest.approx(1.0 / 1.01)


def test_sampler_reads_the_board_and_caches_vcgencmd(tmp_path: Path) -> None:
    clock = FakeClock()
    runner = ScriptedRunner("throttled=0x50000\n")
    sampler = SystemSampler(
        fake_board(tmp_path), clock=clock, vcgencmd="vcgencmd", run=runner, throttle_refresh_s=30
    )
    stats = sampler.sample()
    assert stats.soc_temp_c == pytest.approx(48.312)
    assert stats.rss_bytes == 1200 * PAGE
    assert stats.open_fds == 7
    assert stats.throttling is not None and stats.throttling.throttled_occurred
    clock.advance(10)
    sampler.sample()
    assert len(runner.calls) == 1
    runner.answer = "throttled=0x0\n"
    clock.advance(25)
    stats = sampler.sample()
    assert len(runner.calls) == 2
    assert stats.throttling == ThrottleFlags.from_bits(0)


def test_sampler_without_a_board(tmp_path: Path) -> None:
    stats = SystemSampler(tmp_path).sample()
    assert (stats.rss_bytes, stats.open_fds, stats.soc_temp_c, stats.throttling) == (
        None,
        None,
        None,
        None,
    )
    assert stats.cpu_seconds is not None and stats.cpu_seconds > 0
