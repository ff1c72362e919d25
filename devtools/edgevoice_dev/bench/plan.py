"""How long each benchmark runs, and the scratch space they share.

:class:`BenchPlan` holds every duration and count, so the full run, the quick run
(CI) and the test suite's tiny run differ only in numbers. :class:`Workspace` is
the temporary directory with the speech fixture, the reply audio, device tokens
and configs, and starts the relay and device processes the rows need.
"""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

from edgevoice.relay.auth import TokenStore
from edgevoice_dev.bench.fixtures import SpeechFixture, build_speech, reply_pcm
from edgevoice_dev.bench.proc import Child, python_module

logger = logging.getLogger(__name__)

#: What the device plays: most USB and I2S outputs run at 48 kHz, so the 24 kHz
#: reply is resampled, as it would be on a Pi.
OUTPUT_RATE_HZ = 48_000
#: Length of the bench upstream's spoken reply to each turn.
REPLY_MS = 600
#: Echo cancellation (aec.mode) of the device the CPU rows (2, 11, 12) measure: the
#: device a plain install gets. AEC3 is the optional ``aec`` extra, not among the
#: installer's default extras, and row 8 prices it on its own; the bench's own venv has
#: the extra, so ``auto`` would otherwise add it to those rows (and not to row 2's floor).
PLAIN_AEC_MODE = "off"


@dataclass(frozen=True)
class BenchPlan:
    """Durations and counts of one bench run."""

    mode: str
    speech_s: float
    """Speech fed to the device for bandwidth, CPU and footprint (rows 1, 2, 7)."""
    latency_speech_s: float
    """Speech fed to the instrumented device for the per-hop latencies (row 3)."""
    capacity_steps: tuple[int, ...]
    """Simulated devices tried against one relay core, in order (row 4)."""
    capacity_warmup_s: float
    capacity_measure_s: float
    bargein_trials: int
    """Replies interrupted (row 5)."""
    reconnects: int
    """Relay restarts (row 6)."""
    profile: bool
    """Profile the device and the relay (cProfile) when a CPU target is missed."""
    stop_at_first_failure: bool = True
    scaleout_devices: int = 40
    """Devices taking turns through HAProxy, with one relay then two (row 9)."""
    scaleout_measure_s: float = 30
    idle_devices: int = 2000
    """Idle devices connected through HAProxy to two relays (row 10)."""
    idle_measure_s: float = 30
    idle_s: float = 20.0
    """Window of each idle-device run (rows 11, 12), after 8 s to settle."""
    fleet_devices: int = 1000
    """Idle devices connected to one relay (row 13)."""
    #: a whole number of every idle period (device keepalive 20 s, heartbeat and stats
    #: 30 s), so each device's periodic traffic is counted as often as it happens
    fleet_measure_s: float = 60.0
    conv_steps: tuple[int, ...] = (50, 100, 150, 200)
    """Conversing devices tried against one relay core (row 14)."""
    conv_warmup_s: float = 8.0
    conv_measure_s: float = 24.0


FULL = BenchPlan("full", speech_s=60, latency_speech_s=40,
                 capacity_steps=(20, 30, 40, 50, 60, 80, 100, 150, 200, 300),
                 capacity_warmup_s=3, capacity_measure_s=10, bargein_trials=50,
                 reconnects=20, profile=True)
QUICK = BenchPlan("quick", speech_s=15, latency_speech_s=12, capacity_steps=(10, 30),
                  capacity_warmup_s=2, capacity_measure_s=4, bargein_trials=10,
                  reconnects=5, profile=False, stop_at_first_failure=False,
                  scaleout_devices=8, scaleout_measure_s=8, idle_devices=100,
                  idle_measure_s=8, idle_s=5,
                  fleet_devices=100, fleet_measure_s=4, conv_steps=(20,), conv_warmup_s=4,
                  conv_measure_s=8)
#: For a developer checking the bench code itself (--tiny): every row runs, briefly.
TINY = BenchPlan("tiny", speech_s=8, latency_speech_s=7, capacity_steps=(4,),
                 capacity_warmup_s=1, capacity_measure_s=2, bargein_trials=3,
                 reconnects=2, profile=False, stop_at_first_failure=False,
                 scaleout_devices=3, scaleout_measure_s=3, idle_devices=10, idle_measure_s=2,
                 idle_s=2, fleet_devices=10, fleet_measure_s=2, conv_steps=(4,),
                 conv_warmup_s=2, conv_measure_s=8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Workspace:
    """Scratch files of one bench run, and helpers to start its processes."""

    def __init__(self, root: Path, plan: BenchPlan) -> None:
        self.root = root
        self.plan = plan
        self.fixture: SpeechFixture = build_speech(root / "speech", plan.speech_s)
        self.reply_path = root / "reply-24k.raw"
        self.reply_path.write_bytes(reply_pcm(self.fixture))
        self.tokens_path = root / "tokens.json"
        self._store = TokenStore(self.tokens_path)
        self._tokens: dict[str, str] = {}
        self.children: list[Child] = []

    async def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Child:
        """Start a child process; :meth:`close` stops it if its row did not."""
        child = await Child.start(name, args, self.root, env=env)
        self.children.append(child)
        return child

    async def close(self) -> None:
        """Stop every child process still running (a row that failed half-way)."""
        for child in self.children:
            await child.stop(5)
        self.children.clear()

    def token(self, device: str) -> str:
        if device not in self._tokens:
            self._tokens[device] = self._store.add(device)
        return self._tokens[device]

    def token_file(self, device: str) -> Path:
        path = self.root / f"{device}.token"
        path.write_text(self.token(device) + "\n")
        return path

    def tokens_json(self, devices: list[str], name: str) -> Path:
        """A JSON object of device -> token (plain) for the load generator."""
        path = self.root / name
        path.write_text(json.dumps({d: self.token(d) for d in devices}))
        return path

    def device_config(self, device: str, url: str, audio_input: str, audio_output: str,
                      log_level: str = "info", aec_mode: str | None = None) -> Path:
        """A device YAML file, as an operator would write it (``aec_mode``: aec.mode,
        if not the default)."""
        path = self.root / f"{device}.yaml"
        path.write_text(
            f"device_id: {device}\n"
            f"log_level: {log_level}\n"
            "relay:\n"
            f"  url: \"{url}\"\n"
            f"  token_file: \"{self.token_file(device)}\"\n"
            "audio:\n"
            f"  input: \"{audio_input}\"\n"
            f"  output: \"{audio_output}\"\n"
            f"  output_rate_hz: {OUTPUT_RATE_HZ}\n"
            # any free port: several devices run at once, and the machine may run others
            "health:\n"
            "  port: 0\n"
            + ("" if aec_mode is None else f"aec:\n  mode: \"{aec_mode}\"\n"))
        return path

    async def relay(self, name: str, upstream: str, *extra: str, port: int = 0) -> Child:
        """Start a relay runner and wait until it listens."""
        args = python_module("edgevoice_dev.bench.relay_runner", "--tokens", str(self.tokens_path),
                             "--port", str(port), "--upstream", upstream,
                             "--reply", str(self.reply_path), "--reply-ms", str(REPLY_MS),
                             *extra)
        child = await self.spawn(name, args)
        await child.event("listening", 30)
        return child
