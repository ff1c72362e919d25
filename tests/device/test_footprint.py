"""What a device process loads at start-up: only what it uses (resident memory, issue 15)."""

from __future__ import annotations

import subprocess
import sys


def test_the_device_loads_no_metrics_library_until_the_first_scrape() -> None:
    code = (
        "import sys, edgevoice.cli, edgevoice.device.app\n"
        "from edgevoice.health import exposition\n"
        "print(sorted(m for m in sys.modules if m.startswith(('prometheus_client', 'wsgiref'))))\n"
        "exposition.render(exposition.gauge('x', 'x', 1.0))\n"
        "print('prometheus_client' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["[]", "True"]


def test_numpy_gets_one_openblas_thread_unless_told_otherwise() -> None:
    code = "import os, edgevoice; print(os.environ['OPENBLAS_NUM_THREADS'])"
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PATH": "/usr/bin:/bin", **_pythonpath()})
    told = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env={"OPENBLAS_NUM_THREADS": "2", **_pythonpath()})
    assert (plain.stdout.strip(), told.stdout.strip()) == ("1", "2")


def _pythonpath() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k == "PYTHONPATH"}
