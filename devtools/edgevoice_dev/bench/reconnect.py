"""Row 6: reconnect, from a restarted relay listening again to the device streaming again.

``edgevoice device`` (the real command) stays up while the relay process is
stopped with SIGTERM (it drains: a reply in flight finishes, then close code 4004
sends the device to reconnect at once, docs/scale-out.md) and started again on the
same port, over and over. Measured per restart: the new
relay listening -> the device's session open again (the relay has answered the
device's hello; from then on its frames are accepted). The device backs off
between attempts while the relay is down (capped exponential, full jitter), so
the figure is mostly the backoff delay it happened to draw.
"""

from __future__ import annotations

import logging
import time

from edgevoice.device.link import RELAY_BACK_WITHIN_S, RelaySettings
from edgevoice_dev.bench.analysis import Spread
from edgevoice_dev.bench.plan import Workspace, free_port
from edgevoice_dev.bench.proc import Child, python_module
from edgevoice_dev.bench.results import INFO, Line, RowResult, fmt_ms, verdict

logger = logging.getLogger(__name__)

DEVICE = "bench-reconnect"
TARGET_P99_S = 1.0


async def run_row(ws: Workspace) -> RowResult:
    started = time.monotonic()
    row = RowResult(6, "Reconnect: relay restarted -> device streaming again")
    port = free_port()
    relay = await ws.relay("reconnect-relay-0", "reply", port=port)
    device: Child | None = None
    after_listen: list[float] = []
    downtime: list[float] = []
    startup: list[float] = []
    try:
        config = ws.device_config(DEVICE, f"ws://127.0.0.1:{port}/", f"wav:{ws.fixture.path}",
                                  f"wav:{ws.root / 'reconnect-heard.wav'}")
        device = await ws.spawn("reconnect-device",
                                python_module("edgevoice", "device", "--config", str(config)))
        await relay.event("session", 30)
        for i in range(ws.plan.reconnects):
            stopping = time.monotonic()
            await relay.stop()
            relay = await ws.relay(f"reconnect-relay-{i + 1}", "reply", port=port)
            listening = relay.events[0]
            session = await relay.event("session", 60)
            after_listen.append(session["t"] - listening["t"])
            downtime.append(session["t"] - stopping)
            startup.append(listening["t"] - relay.started_at)
    finally:
        if device is not None:
            await device.stop()
        await relay.stop()
    spread, down, boot = Spread.of(after_listen), Spread.of(downtime), Spread.of(startup)
    backoff = RelaySettings().backoff
    row.lines.append(Line("relay listening -> device session open, p50 / p99",
                          f"{fmt_ms(spread.p50_ms)} / {fmt_ms(spread.p99_ms)}",
                          f"{spread.n} restarts", f"p99 <= {TARGET_P99_S:g} s",
                          verdict(spread.n > 0 and spread.p99_ms <= 1000 * TARGET_P99_S)))
    row.lines.append(Line("  relay stopped -> device session open, p50 / p99",
                          f"{fmt_ms(down.p50_ms)} / {fmt_ms(down.p99_ms)}",
                          f"relay start-up p50 {fmt_ms(boot.p50_ms)}", "", INFO))
    row.data = {"after_listen": spread.as_dict(), "after_stop": down.as_dict(),
                "relay_startup": boot.as_dict(), "restarts": len(after_listen),
                "after_listen_s": [round(x, 4) for x in after_listen],
                "backoff": {"initial_ms": backoff.initial_ms, "max_ms": backoff.max_ms,
                            "min_ms": backoff.min_ms, "multiplier": backoff.multiplier}}
    retry_max_ms = RelaySettings().resume.retry_max_ms
    row.notes.append(
        "Each restart: SIGTERM to the relay process (it drains; devices get 4004), a new "
        "relay process on the same port; the device process is never touched. The device "
        "retries with capped exponential backoff and full jitter "
        f"(initial {backoff.initial_ms} ms, x{backoff.multiplier:g}, cap {backoff.max_ms} ms), "
        f"its ceiling held to resume.retry_max_ms ({retry_max_ms} ms) for "
        f"{RELAY_BACK_WITHIN_S:g} s after a 4004, so the wait after the relay is back is the "
        "rest of whichever delay it drew.")
    if row.missed:
        worst = max(after_listen, default=0.0)
        row.findings.append(
            f"The relay process takes about {fmt_ms(boot.p50_ms)} to start; the slowest of "
            f"{len(after_listen)} reconnects came {worst * 1000:.0f} ms after it listened. "
            f"A device draws each delay below {retry_max_ms} ms while the relay it lost "
            "to a 4004 comes back, plus the connection's own set-up: a p99 near the target "
            "is that draw's tail, and a lower resume.retry_max_ms trades fleet-wide "
            "reconnect attempts for it.")
    row.seconds = time.monotonic() - started
    return row
