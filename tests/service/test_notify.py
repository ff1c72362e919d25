"""The sd_notify side: the pure watchdog policy, and the notifier over a real socket.

The socket tests bind a unix datagram socket, point ``$NOTIFY_SOCKET`` at it and
read what the notifier sends from a thread, so arrival times stay true even while
a test deliberately blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from edgevoice_dev.testing.timeouts import TIMEOUT_FACTOR

from edgevoice.audio.base import SourceStats
from edgevoice.config.base import SettingError
from edgevoice.service import (
    LoopLagProbe,
    SystemdNotifier,
    WatchdogPolicy,
    WatchdogSettings,
    capture_probe,
    sanitize_status,
    watchdog_usec_from_env,
)
from edgevoice.service.notify import STATUS_MAX_BYTES

# ----------------------------------------------------------------------------- policy

SETTINGS = WatchdogSettings(stall_after_s=5.0, loop_stall_after_s=3.0)


def test_policy_is_disabled_without_a_watchdog() -> None:
    policy = WatchdogPolicy(None, SETTINGS)
    verdict = policy.decide(100.0, 100.0, 100.0)
    assert not policy.enabled
    assert verdict.healthy and not verdict.ping
    assert verdict.next_check_at == math.inf


def test_keepalives_are_due_every_half_timeout() -> None:
    policy = WatchdogPolicy(30_000_000, SETTINGS)
    assert policy.interval_s == 15.0
    first = policy.decide(100.0, 100.0, 100.0)
    assert first.ping and first.healthy and first.next_check_at == 115.0
    policy.pinged(100.0)
    early = policy.decide(110.0, 110.0, 110.0)
    assert early.healthy and not early.ping
    assert early.next_check_at == 115.0
    due = policy.decide(115.0, 115.0, 115.0)
    assert due.ping


def test_a_stalled_capture_withholds_keepalives_until_frames_return() -> None:
    policy = WatchdogPolicy(30_000_000, SETTINGS)
    policy.pinged(100.0)
    stalled = policy.decide(116.0, 116.0, 110.9)
    assert not stalled.healthy and not stalled.ping
    assert "audio capture stalled" in stalled.reason
    assert stalled.next_check_at - 116.0 <= 1.0  # looks again soon, not after 15 s
    back = policy.decide(117.0, 117.0, 116.99)
    assert back.healthy and back.ping


def test_a_capture_that_never_delivered_is_unhealthy() -> None:
    policy = WatchdogPolicy(30_000_000, SETTINGS)
    verdict = policy.decide(1.0, 1.0, 0.0)
    assert not verdict.ping
    assert "not delivered a frame" in verdict.reason


def test_a_stuck_event_loop_withholds_keepalives() -> None:
    policy = WatchdogPolicy(30_000_000, SETTINGS)
    verdict = policy.decide(100.0, 96.5, 100.0)
    assert not verdict.ping
    assert "event loop" in verdict.reason
    assert "probe has never run" in policy.decide(100.0, 0.0, 100.0).reason


def test_without_an_audio_probe_only_the_loop_counts() -> None:
    # the relay captures nothing
    policy = WatchdogPolicy(2_000_000, SETTINGS)
    assert policy.decide(100.0, 99.0, None).ping


def test_settings_reject_nonsense() -> None:
    with pytest.raises(SettingError, match="stall_after_s"):
        WatchdogSettings(stall_after_s=0)
    with pytest.raises(SettingError, match="loop_stall_after_s"):
        WatchdogSettings(loop_stall_after_s=-1)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30_000_000),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 30_000_000),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"}, None),
    ],
)
def test_watchdog_timeout_comes_from_the_environment(
    environ: dict[str, str], expected: int | None
) -> None:
    assert watchdog_usec_from_env(environ, 4242) == expected


def test_status_text_cannot_forge_notifications() -> None:
    assert sanitize_status("relay said:\nREADY=1\r\x00ok") == "relay said: READY=1  ok"


def test_long_status_text_is_cut_on_a_character_boundary() -> None:
    text = sanitize_status("é" * 1000)
    encoded = text.encode("utf-8")
    assert len(encoded) <= STATUS_MAX_BYTES
    assert text.endswith("...")
    assert set(text[:-3]) == {"é"}


# ----------------------------------------------------------------------------- socket


class NotifyListener:
    """A bound NOTIFY_SOCKET and a thread recording (arrival time, text) pairs."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.messages: list[tuple[float, str]] = []
        self._sock = self._bind()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(self.path)
        sock.settimeout(0.05)
        return sock

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode("utf-8")))

    def rebind(self) -> None:
        """Replace the socket by a new one at the same path (systemd re-executing)."""
        self.close()
        os.unlink(self.path)
        self._sock = self._bind()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()

    def texts(self) -> list[str]:
        return [text for _, text in self.messages]

    def times_of(self, text: str) -> list[float]:
        return [at for at, got in self.messages if got == text]

    def wait_for(self, count: int, timeout_s: float = 2.0) -> list[str]:
        deadline = time.monotonic() + timeout_s * TIMEOUT_FACTOR
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.texts()


@pytest.fixture
def listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    # a short directory: unix socket paths are limited to 107 bytes
    directory = tempfile.mkdtemp(prefix="ev-notify-")
    path = os.path.join(directory, "notify")
    server = NotifyListener(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield server
    finally:
        server.close()
        shutil.rmtree(directory, ignore_errors=True)


def watchdog_env(monkeypatch: pytest.MonkeyPatch, usec: int) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", str(usec))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))


def test_ready_status_and_stopping_reach_systemd(listener: NotifyListener) -> None:
    notifier = SystemdNotifier()
    assert notifier.enabled
    notifier.ready("listening")
    notifier.status("listening")  # unchanged: not resent
    notifier.status("streaming turn 3")
    notifier.status("reconnecting in 4.2 s: relay unreachable: connection refused")
    notifier.stopping("stopping")
    notifier.close()
    assert listener.wait_for(4) == [
        "READY=1\nSTATUS=listening",
        "STATUS=streaming turn 3",
        "STATUS=reconnecting in 4.2 s: relay unreachable: connection refused",
        "STOPPING=1\nSTATUS=stopping",
    ]
    assert notifier.last_status == "stopping"


def test_status_keeps_every_character_as_utf8(listener: NotifyListener) -> None:
    # sdnotify alone would drop this (not latin-1), and latin-1 bytes would make
    # systemd ignore it (not UTF-8): both must be avoided
    notifier = SystemdNotifier()
    notifier.status("relay unreachable: café → ☃\nREADY=1")
    notifier.close()
    assert listener.wait_for(1) == ["STATUS=relay unreachable: café → ☃ READY=1"]


def test_abstract_socket_addresses_work(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"edgevoice-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(2 * TIMEOUT_FACTOR)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notifier = SystemdNotifier()
        notifier.ready()
        notifier.close()
        assert server.recv(4096) == b"READY=1"


def test_without_notify_socket_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    watchdog_env(monkeypatch, 400_000)
    notifier = SystemdNotifier()
    assert not notifier.enabled
    notifier.ready("listening")
    notifier.status("streaming turn 1")
    notifier.stopping()

    async def scenario() -> None:
        # returns at once instead of pinging nobody
        await asyncio.wait_for(notifier.run_watchdog(lambda: time.monotonic()), 1)

    asyncio.run(scenario())
    assert notifier.pings_sent == 0


def test_an_unreachable_socket_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/edgevoice/notify")
    notifier = SystemdNotifier()
    notifier.ready("listening")
    notifier.status("still fine")
    notifier.close()


def test_a_replaced_socket_is_reconnected(listener: NotifyListener) -> None:
    notifier = SystemdNotifier()
    notifier.status("one")
    assert listener.wait_for(1) == ["STATUS=one"]
    listener.rebind()  # the old connection now points at a dead socket
    listener.messages.clear()
    notifier.status("two")
    notifier.close()
    assert listener.wait_for(1) == ["STATUS=two"]


class FakeCapture:
    """A capture source whose frames arrive every 20 ms while ``flowing`` is set."""

    name = "fake"

    def __init__(self) -> None:
        self.stats = SourceStats()
        self.flowing = True

    async def run(self) -> None:
        while True:
            if self.flowing:
                self.stats.last_frame_at = time.monotonic()
                self.stats.frames_captured += 1
            await asyncio.sleep(0.02)


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


async def run_watchdog_for(
    notifier: SystemdNotifier, capture: FakeCapture, probe: LoopLagProbe, seconds: float
) -> None:
    probe.start()
    frames = asyncio.create_task(capture.run())
    task = notifier.watchdog_task(probe, capture_probe(capture))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(seconds)
    finally:
        task.cancel()
        frames.cancel()
        probe.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(asyncio.CancelledError):
            await frames


def test_keepalives_follow_half_the_watchdog_timeout(
    listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    watchdog_env(monkeypatch, 400_000)  # keep-alives every 0.2 s
    notifier = SystemdNotifier()
    notifier.ready("listening")
    asyncio.run(run_watchdog_for(notifier, FakeCapture(), LoopLagProbe(period_s=0.05), 1.5))
    notifier.close()
    pings = listener.times_of("WATCHDOG=1")
    # about 8 in 1.5 s; generous bounds so a slow machine does not fail this
    assert 4 <= len(pings) <= 12, listener.texts()
    assert all(0.1 < gap < 0.6 * TIMEOUT_FACTOR for gap in gaps(pings)), gaps(pings)
    assert notifier.last_ping_at is not None


def test_before_ready_the_start_timeout_is_extended_instead(
    listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    watchdog_env(monkeypatch, 400_000)
    notifier = SystemdNotifier()
    asyncio.run(run_watchdog_for(notifier, FakeCapture(), LoopLagProbe(period_s=0.05), 0.5))
    notifier.close()
    texts = listener.texts()
    assert texts and set(texts) == {"EXTEND_TIMEOUT_USEC=400000"}


def test_keepalives_stop_while_capture_stalls_then_resume(
    listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    watchdog_env(monkeypatch, 400_000)
    notifier = SystemdNotifier(settings=WatchdogSettings(stall_after_s=0.3))
    notifier.ready()
    capture = FakeCapture()
    marks: dict[str, float] = {}

    async def stall_for_a_while() -> None:
        await asyncio.sleep(0.5)
        capture.flowing = False
        marks["stalled"] = time.monotonic()
        await asyncio.sleep(1.2)
        assert notifier.last_verdict is not None
        marks["reason"] = 0.0 if "capture stalled" in notifier.last_verdict.reason else 1.0
        capture.flowing = True
        marks["resumed"] = time.monotonic()

    async def scenario() -> None:
        stall = asyncio.create_task(stall_for_a_while())
        await run_watchdog_for(notifier, capture, LoopLagProbe(period_s=0.05), 2.4)
        await stall

    asyncio.run(scenario())
    notifier.close()
    pings = listener.times_of("WATCHDOG=1")
    before = [t for t in pings if t < marks["stalled"]]
    # stall_after_s (0.3 s) plus one keep-alive period (0.2 s) of grace
    silent = [t for t in pings if marks["stalled"] + 0.55 < t < marks["resumed"]]
    after = [t for t in pings if t > marks["resumed"]]
    assert before, listener.texts()
    assert silent == [], (marks, pings)
    assert after and after[0] - marks["resumed"] < 0.5 * TIMEOUT_FACTOR, (marks, pings)
    assert marks["reason"] == 0.0
    assert notifier.pings_withheld > 0


def test_keepalives_stop_while_the_loop_is_blocked_then_resume(
    listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    watchdog_env(monkeypatch, 400_000)
    notifier = SystemdNotifier()
    notifier.ready()
    probe = LoopLagProbe(period_s=0.05, max_lag_s=0.2)
    marks: dict[str, float] = {}

    async def block_the_loop() -> None:
        await asyncio.sleep(0.5)
        marks["blocked"] = time.monotonic()
        time.sleep(1.0)  # noqa: ASYNC251 - the point of the test
        marks["unblocked"] = time.monotonic()

    async def scenario() -> None:
        blocker = asyncio.create_task(block_the_loop())
        await run_watchdog_for(notifier, FakeCapture(), probe, 2.2)
        await blocker

    asyncio.run(scenario())
    notifier.close()
    pings = listener.times_of("WATCHDOG=1")
    during = [t for t in pings if marks["blocked"] + 0.01 < t < marks["unblocked"] - 0.01]
    after = [t for t in pings if t > marks["unblocked"]]
    assert [t for t in pings if t < marks["blocked"]], listener.texts()
    assert during == []
    assert after, (marks, pings)
    assert probe.worst_lag_s >= 0.9


def test_a_chronically_late_loop_withholds_keepalives(
    listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loop still turns (the watchdog task runs) but every turn is late: only
    # the lag probe can tell, and keep-alives must stop.
    watchdog_env(monkeypatch, 400_000)
    notifier = SystemdNotifier(settings=WatchdogSettings(loop_stall_after_s=0.3))
    notifier.ready()
    probe = LoopLagProbe(period_s=0.05, max_lag_s=0.05)
    marks: dict[str, float] = {}

    async def hog() -> None:
        await asyncio.sleep(0.4)
        marks["hog"] = time.monotonic()
        while time.monotonic() - marks["hog"] < 1.6:
            time.sleep(0.2)  # noqa: ASYNC251 - simulates CPU-bound work between awaits
            await asyncio.sleep(0)
        marks["calm"] = time.monotonic()

    async def scenario() -> None:
        hogging = asyncio.create_task(hog())
        await run_watchdog_for(notifier, FakeCapture(), probe, 2.6)
        await hogging

    asyncio.run(scenario())
    notifier.close()
    pings = listener.times_of("WATCHDOG=1")
    # after loop_stall_after_s (0.3 s) plus one 0.2 s hog step of grace
    late = [t for t in pings if marks["hog"] + 0.75 < t < marks["calm"]]
    assert late == [], (marks, pings)
    assert notifier.pings_withheld > 0
    assert [t for t in pings if t > marks["calm"]], (marks, pings)


def test_an_observer_sees_each_run_late_or_not_and_can_stop_the_probe() -> None:
    """The observer is told when each run was due and when it ran; False stops the
    timer (no more wake-ups) until the probe is started again."""
    seen: list[tuple[float, float]] = []
    keep_going = [True, True, False]

    def observe(due: float, ran: float) -> bool:
        seen.append((due, ran))
        return keep_going[len(seen) - 1] if len(seen) <= len(keep_going) else True

    async def scenario() -> LoopLagProbe:
        probe = LoopLagProbe(period_s=0.02, observer=observe)
        probe.start()
        await asyncio.sleep(0.03)
        time.sleep(0.06)  # noqa: ASYNC251 - the second run is late by this much
        await asyncio.sleep(0.2)
        assert not probe.running and len(seen) == 3  # stopped by the third answer
        probe.start()
        await asyncio.sleep(0.05)
        probe.stop()
        return probe

    probe = asyncio.run(scenario())
    assert len(seen) >= 4 and probe.turns == len(seen)
    assert all(ran >= due for due, ran in seen)
    assert seen[1][1] - seen[1][0] >= 0.03  # the late run was seen late
    assert probe.worst_lag_s >= 0.03


def test_a_full_notify_queue_never_blocks_the_caller(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Nobody reads the socket: sends must drop, not block (the queue holds ~10)."""
    import socket as socket_module
    import threading

    path = tmp_path / "full.sock"
    receiver = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_DGRAM)
    receiver.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    notifier = SystemdNotifier()
    finished = threading.Event()

    def flood() -> None:
        for i in range(500):
            notifier.status(f"status {i}")
        finished.set()

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    assert finished.wait(10), "status() blocked on a full notification queue"
    assert notifier.dropped > 0
    receiver.close()
    notifier.close()
