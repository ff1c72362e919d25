"""Counting what the relay refuses, and saying so once per kind per interval.

An attacker can make the relay refuse thousands of connections a second; one log
line (let alone a traceback) per refusal would turn that into a disk and CPU
attack. :class:`RefusalLog` counts every refusal by kind (``/metrics`` shows the
counts) and logs the first of each kind, then at most one summary line per kind
per interval. :class:`QuietFilter` does the same for log records of libraries the
relay cannot change (websockets' handshake errors, asyncio's accept errors): it
strips tracebacks and passes one record per message per interval.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

#: Seconds between two log lines about the same kind of refusal.
LOG_INTERVAL_S = 60.0


class RefusalLog:
    """Refusals counted by kind; logged at most once per kind per ``interval_s``."""

    def __init__(self, now: Callable[[], float], interval_s: float = LOG_INTERVAL_S) -> None:
        self._now = now
        self.interval_s = interval_s
        self.counts: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def refused(self, kind: str, detail: str) -> None:
        """Count one refusal of ``kind``; ``detail`` goes in the log line when one is due."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        now = self._now()
        last = self._logged_at.get(kind)
        if last is not None and now - last < self.interval_s:
            self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
            return
        self._logged_at[kind] = now
        more = self._unlogged.pop(kind, 0)
        if more:
            logger.warning("refused (%s): %s; and %d more since the last such line",
                           kind, detail, more)
        else:
            logger.warning("refused (%s): %s", kind, detail)


class QuietFilter(logging.Filter):
    """Drops tracebacks and repeats: one record per message per ``interval_s``."""

    def __init__(self, now: Callable[[], float], interval_s: float = LOG_INTERVAL_S) -> None:
        super().__init__()
        self._now = now
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        key = str(record.msg)
        now = self._now()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self.suppressed += 1
            return False
        if len(self._last) > 1000:  # messages are templates; bounded all the same
            self._last.clear()
        self._last[key] = now
        return True


__all__ = ["QuietFilter", "RefusalLog"]
