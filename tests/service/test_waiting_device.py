"""A device whose sound card is missing waits for it: no traceback, no exit, no restart loop.

The real `edgevoice device` process, a real datagram socket standing in for
systemd's notify socket, and a device name that no sound card has.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from edgevoice_dev.testing.timeouts import scaled

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def test_no_sound_card_means_waiting_not_crashing(tmp_path: Path) -> None:
    port = free_port()
    token = tmp_path / "device.token"
    token.write_text("kitchen.secretsecretsecretsecretsecretsecret\n")
    cfg = tmp_path / "device.yaml"
    cfg.write_text(
        f"relay: {{url: 'ws://127.0.0.1:{free_port()}/', token_file: {token}}}\n"
        "audio: {input: 'no-such-card-usb', output: 'no-such-card-usb', reopen_max_ms: 1000}\n"
        f"health: {{port: {port}}}\n")
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(0.2)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "2000000"}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, "-m", "edgevoice", "device", "--config", str(cfg)],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    messages: list[str] = []
    health: tuple[int, str] = (0, "")
    try:
        deadline = time.monotonic() + scaled(30)
        # long enough for several retries (backoff capped at 1 s) and keep-alives
        settle = None
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                messages.append(notify.recv(4096).decode())
            if health[0] != 503:
                health = get(f"http://127.0.0.1:{port}/healthz")
            if settle is None and health[0] == 503:
                settle = time.monotonic() + 5.0
            if settle is not None and time.monotonic() > settle:
                break
            assert proc.poll() is None, proc.communicate()[1]
        assert proc.poll() is None, "the daemon exited instead of waiting"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=scaled(15))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        notify.close()
    assert proc.returncode == 0, stderr
    assert health[0] == 503, health
    assert "waiting for sound card" in " ".join(json.loads(health[1]).get("problems", [])) \
        or "waiting for sound card" in health[1], health
    statuses = [line for m in messages for line in m.splitlines() if line.startswith("STATUS=")]
    assert any(s.startswith("STATUS=waiting for sound card") for s in statuses), statuses
    assert not any("READY=1" in m for m in messages), "ready without a sound card"
    # the start timeout is extended while waiting, so systemd does not kill it
    assert sum("EXTEND_TIMEOUT_USEC=" in m for m in messages) >= 2, messages
    assert "Traceback" not in stderr, stderr
    waits = [line for line in stderr.splitlines() if "waiting_for_sound_card" in line]
    assert len(waits) == 1, stderr  # one line, not one per retry
    assert "not feeding the systemd watchdog" not in stderr, stderr
