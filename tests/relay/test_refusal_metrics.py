"""What the relay refuses shows in /metrics, by kind; its log stays one line per kind."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from edgevoice_dev.testing.harness import run, running_relay

from edgevoice.health.relay import relay_metrics
from edgevoice.health.system import SystemSampler
from edgevoice.relay.health_source import RelayHealth
from edgevoice.relay.refusals import QuietFilter, RefusalLog


def test_refusal_log_counts_everything_and_logs_once_per_kind_per_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    log = RefusalLog(lambda: now[0], interval_s=60)
    with caplog.at_level(logging.WARNING, logger="edgevoice.relay.refusals"):
        for _ in range(1000):
            log.refused("bad_token", "10.0.0.1: unknown token")
        log.refused("slow_reader", "d: not reading")
        now[0] = 61.0
        log.refused("bad_token", "10.0.0.2: unknown token")
    assert log.counts == {"bad_token": 1001, "slow_reader": 1}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and "999 more" in lines[2]


def test_quiet_filter_drops_tracebacks_and_repeats() -> None:
    now = [0.0]
    quiet = QuietFilter(lambda: now[0], interval_s=60)
    try:
        raise OSError(24, "Too many open files")
    except OSError:
        import sys
        record = logging.LogRecord("asyncio", logging.ERROR, "x", 1, "socket.accept() out of "
                                   "system resource", None, sys.exc_info())
    assert quiet.filter(record) and record.exc_info is None
    assert not quiet.filter(record) and quiet.suppressed == 1
    now[0] = 61.0
    assert quiet.filter(record)


def test_refusals_and_connections_are_in_metrics(tmp_path: Path) -> None:
    async def scenario() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with running_relay(tmp_path) as relay:
            token = relay.tokens.add("d")
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write((
                "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                f"Authorization: Bearer {token}\r\nAuthorization: Bearer {token}\r\n\r\n"
            ).encode())
            status = (await reader.readline()).split()[1]
            assert status == b"400"
            writer.close()
            health = RelayHealth(relay, SystemSampler.for_this_machine())
            samples = {}
            for family in relay_metrics(health.snapshot(), health.devices(), []):
                for sample in family.samples:
                    samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
            return samples
    samples = run(scenario())
    assert samples[("edgevoice_relay_refusals_total", (("kind", "bad_handshake"),))] == 1
    assert samples[("edgevoice_relay_auth_failures_total", ())] == 1
    assert ("edgevoice_relay_connections_pending", ()) in samples
    assert samples[("edgevoice_relay_sessions_active", ())] == 0
