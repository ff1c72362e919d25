"""Process-wide logging, configured once by the entry point (:mod:`edgevoice.cli`).

Two duties:

* **Format.** Under systemd stderr is a journal stream, named by ``$JOURNAL_STREAM``
  (``device:inode`` of that stream). Then every line starts with a ``<N>`` syslog
  priority, which journald strips and stores as the entry's priority, so
  ``journalctl -p warning`` finds warnings and errors; journald adds the time
  stamp. Elsewhere a line carries its own time stamp and no prefix.
* **Native noise.** ALSA and PortAudio print to file descriptor 2 from C
  (``ALSA lib pcm.c:...: underrun occurred``), bypassing logging: unfiltered, without
  a priority, and uncounted. :class:`NativeStderr` points fd 2 at a pipe, counts
  what the sound libraries say by kind (shown in the device's ``/stats``) and logs
  it at debug; anything else arriving there (a native crash message) is passed on
  as a warning. Python's own ``sys.stderr`` keeps writing to the real stderr.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Mapping
from typing import IO, TextIO

#: syslog priorities journald understands in a ``<N>`` line prefix
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4,
             logging.INFO: 6, logging.DEBUG: 7}

native_logger = logging.getLogger("edgevoice.native")


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (levels between map downwards)."""
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


def stream_is_journal(environ: Mapping[str, str], fd: int) -> bool:
    """Whether ``fd`` is the journal stream systemd announced in ``$JOURNAL_STREAM``.

    Comparing device and inode (not just the variable's presence) matters: a child
    of a service inherits the variable while its stderr may be a pipe or a file.
    """
    dev, sep, ino = environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


class JournalFormatter(logging.Formatter):
    """``<N>LEVEL logger: message``, the prefix repeated on every line of a record
    (journald splits lines into entries: a traceback keeps its priority)."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def make_formatter(journal: bool) -> logging.Formatter:
    if journal:
        return JournalFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


# What the sound libraries print, by kind. The first pattern that matches wins.
_NATIVE_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("alsa_underrun", re.compile(r"^ALSA lib .*underrun occurred")),
    ("alsa_overrun", re.compile(r"^ALSA lib .*overrun occurred")),
    ("alsa_other", re.compile(r"^ALSA lib ")),
    ("portaudio", re.compile(r"^(Expression '.*' failed in '.*pa_|PaAlsa|"
                             r"ALSA (?:restore|xrun)|PortAudio)")),
    ("jack", re.compile(r"^(jack server|Cannot connect to server|JackShmReadWritePtr)")),
)


def classify_native_line(line: str) -> str | None:
    """The kind of a line a sound library printed on stderr, or None if it is not one."""
    for kind, pattern in _NATIVE_KINDS:
        if pattern.search(line):
            return kind
    return None


class NativeStderr:
    """Captures file descriptor 2 (C libraries' stderr) and counts sound-library noise.

    ``start()`` returns the stream Python should log to: a duplicate of the original
    stderr. Counting is thread-safe; ``counts()`` is cheap.
    """

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._saved_fd: int | None = None
        self._reader: IO[bytes] | None = None
        self.original: TextIO | None = None

    def counts(self) -> dict[str, int]:
        """Lines counted so far, by kind (``alsa_underrun``, ``portaudio``, ...)."""
        with self._lock:
            return dict(self._counts)

    def record(self, line: str) -> str | None:
        """Count one line; return its kind (None: not a sound library's)."""
        kind = classify_native_line(line)
        if kind is not None:
            with self._lock:
                self._counts[kind] = self._counts.get(kind, 0) + 1
        return kind

    def start(self) -> TextIO:
        """Redirect fd 2 into a pipe read by a thread; return the real stderr."""
        sys.stderr.flush()
        saved = os.dup(2)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._saved_fd = saved
        self.original = open(saved, "w", buffering=1, encoding="utf-8",  # noqa: SIM115
                             errors="backslashreplace", closefd=False)
        sys.stderr = self.original
        self._reader = open(read_fd, "rb", buffering=0)  # noqa: SIM115
        self._thread = threading.Thread(target=self._pump, name="native-stderr", daemon=True)
        self._thread.start()
        return self.original

    def _pump(self) -> None:
        assert self._reader is not None
        pending = b""
        while True:
            try:
                chunk = self._reader.read(65536)
            except OSError:
                return
            if not chunk:
                if pending:
                    self._line(pending)
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                self._line(raw)

    def _line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "backslashreplace").rstrip()
        if not line:
            return
        kind = self.record(line)
        if kind is not None:
            native_logger.debug("%s: %s", kind, line)
        else:
            native_logger.warning("native stderr: %s", line)


def setup_logging(level: str, *, capture_native: bool = False,
                  environ: Mapping[str, str] | None = None) -> NativeStderr | None:
    """Configure the root logger once for this process; return the native capture.

    ``capture_native``: take over fd 2 (the device, whose sound libraries print).
    """
    env = os.environ if environ is None else environ
    journal = stream_is_journal(env, 2)
    native = NativeStderr() if capture_native else None
    stream: TextIO = native.start() if native is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(make_formatter(journal))
    root = logging.getLogger()
    # once: a second call (tests, or a command calling another) replaces, never adds
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # websockets logs every handshake failure at INFO with a traceback; keep it quiet.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, root.level))
    return native
