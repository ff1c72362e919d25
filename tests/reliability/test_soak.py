"""The soak in short: a minute of link flapping every 10 s leaves no trace in the daemon.

``scripts/soak`` runs the same thing for 10 minutes (figures in docs/reliability.md).
The bounds here are leak detectors, not performance figures: file descriptors
must come back to where they were, and memory may move only by allocator noise.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from reliability_support import scaled
from soak import soak


@pytest.mark.slow
def test_a_minute_of_flapping_leaks_nothing_and_loses_nothing(tmp_path: Path) -> None:
    seconds = float(os.environ.get("SOAK_SECONDS", "60"))
    report = asyncio.run(asyncio.wait_for(
        soak(seconds, every_s=10.0, down_s=2.0, workdir=tmp_path, warmup_s=15.0, log=False),
        scaled(seconds + 120)))
    summary = report.summary()
    assert report.flaps >= int(seconds // 10) - 1, summary
    device = report.device
    assert device.get("connected") is True, summary
    # every flap was resumed: nothing queued was dropped, nothing had to be concealed
    assert device["resumes"] == report.flaps and device["resumes_refused"] == 0, summary
    assert device["frames_lost"] == 0 and device["frames_concealed"] == 0, summary
    assert device["turns"] >= 3, summary
    # no growth beyond noise
    assert report.last.fds <= report.first.fds + 1, summary
    assert report.last.relay_fds <= report.first.relay_fds + 1, summary
    assert report.last.rss_kib - report.first.rss_kib < 8 * 1024, summary
