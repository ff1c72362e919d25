"""Process and board metrics, read from fake /proc and /sys trees."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from edgevoice.audio.sounddevice_io import PLAYBACK_THREAD_NAME, name_this_thread
from edgevoice.clock import FakeClock
from edgevoice.health.system import (
    SystemSampler,
    ThreadCpuAccount,
    ThrottleFlags,
    count_open_fds,
    parse_throttled,
    read_rss_bytes,
    read_soc_temp_c,
    read_threads,
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


# ------------------------------------------------------------------ CPU by thread

MAIN = 100


def test_threads_are_accounted_by_role_and_the_rest_of_the_process_as_ended() -> None:
    account = ThreadCpuAccount()
    totals = account.update({MAIN: ("edgevoice", 5.0), 101: ("edgevoice-mic", 1.0),
                             102: ("edgevoice-play", 2.0), 103: ("threaded-ml", 0.5),
                             104: ("edgevoice", 0.25)}, process_total=9.0, main_tid=MAIN)
    assert totals == {"event_loop": 5.0, "mic": 1.0, "speaker": 2.0, "sound_server": 0.5,
                      "other": 0.25, "ended": 0.25}
    assert sum(totals.values()) == 9.0


def test_a_thread_that_ended_keeps_its_cpu_and_no_counter_goes_down() -> None:
    """A speaker stream parks after a reply and the next reply opens a new one: the
    first thread's CPU stays with "speaker", what it used after the last look and
    threads never seen go to "ended"."""
    account = ThreadCpuAccount()
    account.update({MAIN: ("py", 1.0), 102: ("edgevoice-play", 2.0)}, 3.0, MAIN)
    # 102 used 0.25 s more, then ended; 105 played the next reply; one more thread
    # lived and ended between the looks (0.5 s)
    totals = account.update({MAIN: ("py", 1.5), 105: ("edgevoice-play", 1.0)}, 6.25, MAIN)
    assert totals == {"event_loop": 1.5, "speaker": 3.0, "ended": 1.75}
    # the process's total read a tick before the threads': nothing goes down
    again = account.update({MAIN: ("py", 1.5), 105: ("edgevoice-play", 1.01)}, 6.25, MAIN)
    assert all(again[role] >= totals[role] for role in totals)


def test_a_reused_thread_id_is_a_new_thread() -> None:
    account = ThreadCpuAccount()
    account.update({MAIN: ("py", 1.0), 101: ("edgevoice-mic", 3.0)}, 4.0, MAIN)
    # the microphone's thread ended; the kernel gave its id to a speaker stream
    totals = account.update({MAIN: ("py", 1.0), 101: ("edgevoice-play", 0.5)}, 4.5, MAIN)
    assert totals["mic"] == 3.0 and totals["speaker"] == 0.5
    # ... or to another microphone thread: it starts from less CPU than the old one had
    totals = account.update({MAIN: ("py", 1.0), 101: ("edgevoice-play", 0.25)}, 4.75, MAIN)
    assert totals["speaker"] == 0.75


def test_a_thread_that_takes_its_name_late_is_counted_once() -> None:
    """PortAudio's input thread may poll for a second under the interpreter's name
    before its first callback names it: that second stays "other", the rest is "mic",
    and nothing is counted twice or taken back."""
    account = ThreadCpuAccount()
    first = account.update({MAIN: ("py", 1.0), 101: ("py", 1.4)}, 2.4, MAIN)
    assert first == {"event_loop": 1.0, "other": 1.4, "ended": 0.0}
    totals = account.update({MAIN: ("py", 1.0), 101: ("edgevoice-mic", 1.5)}, 2.5, MAIN)
    assert totals == {"event_loop": 1.0, "other": 1.4, "mic": pytest.approx(0.1),
                      "ended": 0.0}
    # and when it ends, only its share as "mic" is kept under that role
    totals = account.update({MAIN: ("py", 1.25)}, 2.85, MAIN)
    assert totals["mic"] == pytest.approx(0.1) and totals["other"] == 1.4
    assert sum(totals.values()) == pytest.approx(2.85)


def test_thread_stat_lines_are_read_whatever_the_name_holds(tmp_path: Path) -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    for tid, name in ((7, "python3"), (8, "a (b) c")):
        task = tmp_path / f"proc/self/task/{tid}"
        task.mkdir(parents=True)
        rest = " ".join(["S", *["0"] * 10, str(2 * ticks), str(ticks), *["0"] * 30])
        (task / "stat").write_text(f"{tid} ({name}) {rest}\n")
    (tmp_path / "proc/self/task/9").mkdir()  # ended while listed: no stat
    assert read_threads(tmp_path) == {7: ("python3", 3.0), 8: ("a (b) c", 3.0)}
    assert read_threads(tmp_path / "nowhere") is None


def test_the_sampler_shows_a_named_audio_thread_under_its_role() -> None:
    """The real /proc: a thread named as PortAudio's speaker thread is, burning CPU."""
    done = threading.Event()
    named = threading.Event()

    def speaker() -> None:
        assert name_this_thread(PLAYBACK_THREAD_NAME)
        named.set()
        deadline = time.thread_time() + 0.1
        while time.thread_time() < deadline:
            pass
        done.wait(10)

    thread = threading.Thread(target=speaker)
    thread.start()
    try:
        assert named.wait(10)
        deadline = time.monotonic() + 10
        while True:  # the kernel counts CPU in ticks
            totals = SystemSampler().sample().thread_cpu_seconds
            if totals.get("speaker", 0.0) >= 0.05 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        done.set()
        thread.join()
    assert totals["speaker"] >= 0.05, totals
    assert totals["event_loop"] > 0
    after = SystemSampler().sample().thread_cpu_seconds  # a new account: ended unseen
    assert "speaker" not in after and after["ended"] >= 0.05, after
