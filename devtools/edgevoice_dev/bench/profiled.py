"""Run a module under cProfile, counting CPU time rather than wall time.

``python -m edgevoice_dev.bench.profiled OUT MODULE [ARGS...]`` runs ``python -m MODULE
ARGS...`` in this process and writes its profile to OUT when it exits (a SIGTERM
the module handles, as ``edgevoice device`` does, ends it cleanly). Measuring with
``time.process_time`` keeps the time an asyncio program spends waiting in
``epoll`` out of the picture: what is left is where the CPU goes.

With ``--on-signal``, profiling starts only when the process receives SIGUSR2, so
the start-up (imports, configuration) stays out of a steady-state profile.
"""

from __future__ import annotations

import cProfile
import runpy
import signal
import sys
import time
from types import FrameType


def main() -> int:
    argv = sys.argv[1:]
    on_signal = bool(argv) and argv[0] == "--on-signal"
    if on_signal:
        argv = argv[1:]
    if len(argv) < 2:
        print("usage: python -m edgevoice_dev.bench.profiled [--on-signal] OUT MODULE [ARGS...]",
              file=sys.stderr)
        return 2
    out, module, *args = argv
    sys.argv = [module, *args]
    profile = cProfile.Profile(time.process_time)
    status: object = 0
    if on_signal:
        def start(signum: int, frame: FrameType | None) -> None:
            profile.enable()
        signal.signal(signal.SIGUSR2, start)
    else:
        profile.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        status = exc.code
    finally:
        profile.disable()
        profile.dump_stats(out)
    return status if isinstance(status, int) else 1


if __name__ == "__main__":
    raise SystemExit(main())
