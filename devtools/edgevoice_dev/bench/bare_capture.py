"""Capture alone: what a microphone stream costs before any daemon code runs (rows 11, 12).

``python -m edgevoice_dev.bench.bare_capture [--block-ms N]`` opens the input device
the daemon would open ("default", 16 kHz when it can, through the same
:func:`~edgevoice.audio.sounddevice_io.plan_stream`), asks for the daemon's capture
block (``audio.capture_block_ms``, 60 ms by default) and gives PortAudio a callback
that does nothing. It prints a ``capturing`` JSON event once the first block arrived,
then runs until SIGTERM.

Its CPU over the idle rows' window is the part of an idle device's cost that no daemon
code can remove on that sound card: PortAudio's callback thread and the sound
server's client thread, woken by every block and every server packet. The idle rows
print it beside the device's figure, as row 2 prints the codec floor.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Sequence
from typing import Any

from edgevoice.audio.base import CAPTURE_RATE_HZ, frame_samples
from edgevoice.audio.sounddevice_io import (
    DEFAULT_CAPTURE_BLOCK_MS,
    _sounddevice,
    plan_stream,
)
from edgevoice_dev.bench.proc import emit


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-ms", type=int, default=DEFAULT_CAPTURE_BLOCK_MS)
    args = parser.parse_args(argv)
    # SIGTERM is taken by sigwait below, never delivered: blocked before PortAudio starts
    # its threads (they inherit the mask), so this process wakes for nothing but audio.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    sd = _sounddevice()
    plan = plan_stream(sd, "default", "input", CAPTURE_RATE_HZ)
    first = threading.Event()

    def on_block(indata: Any, frames: int, time_info: Any, status: Any) -> None:
        if not first.is_set():
            first.set()

    stream = sd.RawInputStream(device=plan.index, samplerate=plan.rate_hz,
                               channels=plan.channels, dtype="int16",
                               blocksize=frame_samples(plan.rate_hz, args.block_ms),
                               callback=on_block)
    stream.start()
    try:
        if not first.wait(10.0):
            emit({"event": "error", "error": "no audio within 10 s"})
            return 1
        emit({"event": "capturing", "device": plan.name, "rate_hz": plan.rate_hz,
              "channels": plan.channels, "block_ms": args.block_ms})
        signal.sigwait({signal.SIGTERM})
    finally:
        stream.stop()
        stream.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
