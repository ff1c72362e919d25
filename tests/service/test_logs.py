"""Log lines an operator can filter: journald priorities, native noise captured, one format."""

from __future__ import annotations

import ctypes.util
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgevoice.logs import (
    JournalFormatter,
    NativeStderr,
    classify_native_line,
    stream_is_journal,
    syslog_priority,
)

REPO = Path(__file__).resolve().parents[2]


def record(level: int, msg: str, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            info = sys.exc_info()
    return logging.LogRecord("edgevoice.x", level, __file__, 1, msg, (), info)


def test_levels_map_to_syslog_priorities() -> None:
    assert [syslog_priority(x) for x in (logging.DEBUG, logging.INFO, logging.WARNING,
                                         logging.ERROR, logging.CRITICAL)] == [7, 6, 4, 3, 2]
    assert syslog_priority(logging.INFO + 5) == 6


def test_every_line_of_a_record_carries_its_priority() -> None:
    text = JournalFormatter().format(record(logging.ERROR, "it failed", exc=True))
    lines = text.splitlines()
    assert len(lines) > 3 and lines[0] == "<3>ERROR edgevoice.x: it failed"
    assert all(line.startswith("<3>") for line in lines)  # the traceback too


def test_journal_stream_must_name_this_very_stderr(tmp_path: Path) -> None:
    f = (tmp_path / "log").open("w")
    st = os.fstat(f.fileno())
    assert stream_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, f.fileno())
    # a child of a service inherits the variable while its stderr is something else
    assert not stream_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, f.fileno())
    assert not stream_is_journal({"JOURNAL_STREAM": "garbage"}, f.fileno())
    assert not stream_is_journal({}, f.fileno())
    f.close()


def log_four_levels(tmp_path: Path, journal: bool) -> str:
    """What a process logging at each level writes to its stderr (a file), with
    ``$JOURNAL_STREAM`` naming that file or not."""
    script = textwrap.dedent(f"""
        import logging, os, sys
        st = os.fstat(2)
        if {journal!r}:
            os.environ["JOURNAL_STREAM"] = f"{{st.st_dev}}:{{st.st_ino}}"
        from edgevoice.logs import setup_logging
        setup_logging("debug")
        log = logging.getLogger("edgevoice.test")
        log.debug("a detail")
        log.info("a fact")
        log.warning("a warning")
        log.error("an error")
        setup_logging("debug")  # configuring again replaces, never duplicates
        log.warning("once")
    """)
    err = tmp_path / "stderr"
    with err.open("w") as f:
        subprocess.run([sys.executable, "-c", script], stderr=f, check=True, cwd=REPO)
    return err.read_text()


def test_under_journald_lines_start_with_their_priority(tmp_path: Path) -> None:
    lines = log_four_levels(tmp_path, journal=True).splitlines()
    assert lines == ["<7>DEBUG edgevoice.test: a detail", "<6>INFO edgevoice.test: a fact",
                     "<4>WARNING edgevoice.test: a warning", "<3>ERROR edgevoice.test: an error",
                     "<4>WARNING edgevoice.test: once"]


def test_elsewhere_lines_carry_a_time_stamp_and_no_prefix(tmp_path: Path) -> None:
    lines = log_four_levels(tmp_path, journal=False).splitlines()
    assert len(lines) == 5 and not any(line.startswith("<") for line in lines)
    assert lines[2].endswith("WARNING edgevoice.test: a warning") and lines[2][:4].isdigit()


def test_sound_library_lines_are_classified() -> None:
    assert classify_native_line(
        "ALSA lib pcm.c:8570:(snd_pcm_recover) underrun occurred") == "alsa_underrun"
    assert classify_native_line("ALSA lib pcm.c:2666:(snd_pcm_open_noupdate) Unknown PCM x"
                                ) == "alsa_other"
    assert classify_native_line("Expression 'ret' failed in 'src/hostapi/alsa/pa_linux_alsa.c',"
                                " line: 1736") == "portaudio"
    assert classify_native_line("Fatal Python error: Segmentation fault") is None


@pytest.mark.skipif(ctypes.util.find_library("asound") is None, reason="needs libasound")
def test_alsa_noise_is_counted_not_printed(tmp_path: Path) -> None:
    """Real ALSA, printing through its own default error handler from C."""
    script = textwrap.dedent("""
        import ctypes, ctypes.util, logging, os, sys, time
        from edgevoice.logs import setup_logging
        native = setup_logging("info", capture_native=True)
        asound = ctypes.CDLL(ctypes.util.find_library("asound"))
        pcm = ctypes.c_void_p()
        for _ in range(3):
            assert asound.snd_pcm_open(ctypes.byref(pcm), b"edgevoice_no_such_pcm", 0, 0) < 0
        os.write(2, b"something else entirely\\n")
        deadline = time.monotonic() + 10
        while sum(native.counts().values()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        logging.getLogger("edgevoice.test").info("counts %s", native.counts())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=REPO, timeout=60, check=True)
    assert "ALSA lib" not in result.stderr, result.stderr
    assert "counts {'alsa_other': 3}" in result.stderr, result.stderr
    # what is not a sound library's is not swallowed
    assert "WARNING edgevoice.native: native stderr: something else entirely" in result.stderr


def test_native_capture_keeps_python_stderr_working() -> None:
    native = NativeStderr()
    assert native.record("ALSA lib x: underrun occurred") == "alsa_underrun"
    assert native.counts() == {"alsa_underrun": 1}


def test_counted_sound_library_lines_are_in_the_device_stats() -> None:
    from edgevoice.clock import MonotonicClock
    from edgevoice.device.app import CurrentHealth, WaitingForSoundCard
    from edgevoice.health.device import stats_document

    native = NativeStderr()
    health = CurrentHealth(WaitingForSoundCard("kitchen", MonotonicClock()), native.counts)
    native.record("ALSA lib pcm.c:8570:(snd_pcm_recover) underrun occurred")
    native.record("ALSA lib pcm.c:8570:(snd_pcm_recover) underrun occurred")
    document = stats_document(health.snapshot(), health.health_problems(0.0))
    assert document["audio_library_messages"] == {"alsa_underrun": 2}
    assert document["problems"] == ["waiting for sound card"]
