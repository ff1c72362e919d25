"""A device process for the latency and barge-in benchmarks: the daemon, instrumented.

``python -m edgevoice_dev.bench.device_runner --config device.yaml --source wav:PATH``
runs the real daemon with a :class:`~edgevoice_dev.bench.instrument.BenchObserver`
taking timestamps with a WAV or silent microphone and a sink pulling
20 ms blocks at real time, until SIGTERM; then it writes its timestamps to
``--record``. It prints a ``link_up`` JSON event each time the relay answers.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from edgevoice.audio.base import AudioSource
from edgevoice.audio.wavio import WavSource
from edgevoice.config.model import load_device_config
from edgevoice.device.daemon import DeviceDaemon, read_token
from edgevoice.protocol.messages import Welcome
from edgevoice_dev.bench.instrument import BenchObserver, DeviceLog, PacedSink, SilentSource
from edgevoice_dev.bench.proc import emit

logger = logging.getLogger(__name__)


class _LinkUpEvents(BenchObserver):
    """Also tells the parent process each time the relay answers."""

    def link_up(self, welcome: Welcome, at: float) -> None:
        super().link_up(welcome, at)
        emit({"event": "link_up", "t": at})


async def run(args: argparse.Namespace) -> DeviceLog:
    config = load_device_config(args.config)
    token = read_token(config, args.config)
    source: AudioSource
    if args.source == "silence":
        source = SilentSource()
    else:
        source = WavSource(Path(args.source.removeprefix("wav:")), realtime=True)
    log = DeviceLog()
    sink = PacedSink(args.output_rate, log)
    log.output_rate_hz = sink.sample_rate_hz
    daemon = DeviceDaemon(config, token, source, sink, observers=[_LinkUpEvents(log)])
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    await daemon.run()
    log.playback = dataclasses.asdict(daemon.downlink.playback.stats)
    return log


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgevoice_dev.bench.device_runner")
    p.add_argument("--config", required=True)
    p.add_argument("--source", default="silence", help="wav:PATH or silence")
    p.add_argument("--output-rate", type=int, default=48_000)
    p.add_argument("--record", help="write the device's timestamps here (JSON)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log = asyncio.run(run(args))
    if args.record:
        Path(args.record).write_text(json.dumps(log.as_dict()))
    emit({"event": "stopped", "t": time.monotonic()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
