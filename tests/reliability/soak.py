"""Soak: a device daemon process whose link flaps every 10 s, watched for leaks.

Three processes: ``edgevoice relay`` (echo upstream), a device daemon (this file
with ``--device``: the real DeviceDaemon, a looping speech source so there is
always a turn or a reply in flight, a real-time sink into /dev/null), and this
driver, which puts a :class:`~edgevoice_dev.testing.netfault.FaultProxy` between them
and cuts every connection (after stalling them for 0.3 s, so what is in flight is
lost; then refusing new ones for ``--down`` seconds) every ``--every`` seconds. It
samples the daemon's RSS and open file descriptors from /proc after a warm-up and
after every flap, and the daemon's own counters from a status file it writes
every second. ``scripts/soak`` runs it for 10 minutes;
``test_soak.py`` runs it for about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Sample:
    at_s: float
    rss_kib: int
    fds: int
    relay_rss_kib: int
    relay_fds: int


@dataclass
class SoakReport:
    duration_s: float
    every_s: float
    down_s: float
    flaps: int = 0
    samples: list[Sample] = field(default_factory=list)
    device: dict[str, object] = field(default_factory=dict)

    @property
    def first(self) -> Sample:
        return self.samples[0]

    @property
    def last(self) -> Sample:
        return self.samples[-1]

    def summary(self) -> dict[str, object]:
        return {
            "duration_s": self.duration_s, "flap_every_s": self.every_s,
            "down_s": self.down_s, "flaps": self.flaps,
            "device_rss_kib_before": self.first.rss_kib, "device_rss_kib_after": self.last.rss_kib,
            "device_rss_kib_max": max(s.rss_kib for s in self.samples),
            "device_fds_before": self.first.fds, "device_fds_after": self.last.fds,
            "device_fds_max": max(s.fds for s in self.samples),
            "relay_rss_kib_before": self.first.relay_rss_kib,
            "relay_rss_kib_after": self.last.relay_rss_kib,
            "relay_fds_before": self.first.relay_fds, "relay_fds_after": self.last.relay_fds,
            **{f"device_{k}": v for k, v in self.device.items()},
        }


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- the device side


def _write_status(path: Path, status: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status))
    tmp.replace(path)


def device_main(url: str, token_file: str, status_file: str) -> None:
    """The soaked process: a DeviceDaemon with a looping source, writing its counters."""
    import logging

    from edgevoice.audio.wavio import WavSink, WavSource
    from edgevoice.backoff import BackoffSettings
    from edgevoice.config.model import DeviceConfig
    from edgevoice.demo import bundled_speech
    from edgevoice.device.daemon import DeviceDaemon, TurnTimeline
    from edgevoice.protocol.connection import AudioReceived  # noqa: F401 (warm import)

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    outcomes: dict[str, int] = {}

    def turn_done(turn: TurnTimeline) -> None:
        outcomes[turn.outcome] = outcomes.get(turn.outcome, 0) + 1

    base = DeviceConfig()
    config = replace(base, device_id="soak", relay=replace(
        base.relay, url=url, backoff=BackoffSettings()))
    token = Path(token_file).read_text().strip()
    daemon = DeviceDaemon(config, token,
                        WavSource(bundled_speech(), loop=True, tail_silence_ms=6000),
                        WavSink("/dev/null", realtime=True), on_turn_done=turn_done)

    async def report() -> None:
        while True:
            await asyncio.sleep(1.0)
            link = daemon.link.stats
            status = {
                "connected": daemon.link.connected, "connects": link.connects,
                "resumes": link.resumes, "resumes_refused": link.resumes_refused,
                "resumes_expired": link.resumes_expired,
                "frames_sent": daemon.counters.frames_sent,
                "frames_received": daemon.counters.frames_received,
                "frames_replayed": link.frames_replayed,
                "frames_lost": daemon.link.dropped,
                "frames_concealed": daemon.counters.frames_concealed,
                "turns": daemon.counters.turns, "outcomes": outcomes,
            }
            _write_status(Path(status_file), status)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, daemon.stop)
        reporter = asyncio.create_task(report())
        await daemon.run()
        reporter.cancel()

    asyncio.run(main())


# ---------------------------------------------------------------------- the driver


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _start_relay(workdir: Path, port: int) -> tuple[Path, Path, subprocess.Popen[bytes]]:
    """Write the relay's config and a device token; start ``edgevoice relay``."""
    from edgevoice.relay.auth import TokenStore
    workdir.mkdir(parents=True, exist_ok=True)
    tokens = workdir / "tokens.json"
    config = workdir / "relay.yaml"
    config.write_text(f"listen: {{host: 127.0.0.1, port: {port}}}\n"
                      f"auth: {{tokens_file: {tokens}}}\nadmin: {{port: 0}}\n"
                      "log_level: warning\n")
    token_file = workdir / "device.token"
    token_file.write_text(TokenStore(tokens).add("soak"))
    with (workdir / "relay.log").open("wb") as log:
        relay = subprocess.Popen([sys.executable, "-m", "edgevoice", "relay", "--config",
                                  str(config)], stderr=log, env=_env())
    return token_file, workdir / "device-status.json", relay


def _start_device(workdir: Path, url: str, token_file: Path,
                  status_file: Path) -> subprocess.Popen[bytes]:
    with (workdir / "device.log").open("wb") as log:
        return subprocess.Popen([sys.executable, __file__, "--device", url, str(token_file),
                                 str(status_file)], stderr=log, env=_env())


def _read_status(status_file: Path) -> dict[str, object]:
    if not status_file.exists():
        return {}
    result: dict[str, object] = json.loads(status_file.read_text())
    return result


async def soak(duration_s: float, every_s: float, down_s: float, workdir: Path,
               warmup_s: float = 20.0, log: bool = True) -> SoakReport:
    from edgevoice_dev.testing.netfault import FaultProxy

    port = free_port()
    token_file, status_file, relay = _start_relay(workdir, port)
    report = SoakReport(duration_s, every_s, down_s)
    device: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(300):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        async with FaultProxy("127.0.0.1", port) as proxy:
            device = _start_device(workdir, proxy.url, token_file, status_file)
            start = time.monotonic()

            def sample() -> Sample:
                assert device is not None
                return Sample(round(time.monotonic() - start, 1), rss_kib(device.pid),
                              fd_count(device.pid), rss_kib(relay.pid), fd_count(relay.pid))

            await asyncio.sleep(warmup_s)
            report.samples.append(sample())
            end = start + warmup_s + duration_s
            while time.monotonic() + every_s <= end:
                await asyncio.sleep(every_s - down_s)
                report.samples.append(sample())  # between flaps: connected, settled
                await proxy.outage(down_s, stall_s=0.3)  # what is in flight is lost
                report.flaps += 1
                if log:
                    s = report.samples[-1]
                    print(f"{s.at_s:7.1f} s  flap {report.flaps:3d}  device rss "
                          f"{s.rss_kib} KiB fds {s.fds}  relay rss {s.relay_rss_kib} KiB "
                          f"fds {s.relay_fds}", flush=True)
            await asyncio.sleep(every_s - down_s)  # let the last resume finish
            report.samples.append(sample())
            report.device = _read_status(status_file)
    finally:
        for proc in (device, relay):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (device, relay):
            if proc is not None:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return report


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--device":
        device_main(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="soak length")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between flaps")
    parser.add_argument("--down", type=float, default=2.0, help="seconds each flap lasts")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/edgevoice-soak"))
    parser.add_argument("--json", type=Path, help="write the report here too")
    args = parser.parse_args()
    report = asyncio.run(soak(args.minutes * 60, args.every, args.down, args.workdir))
    summary = report.summary()
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary,
                                         "samples": [asdict(s) for s in report.samples]},
                                        indent=2))


if __name__ == "__main__":
    main()
