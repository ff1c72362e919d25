"""`edgevoice device` as systemd runs it: a real process, notify socket, health API.

A relay process and a device process talk on 127.0.0.1; the test binds the unix
datagram socket systemd would (NOTIFY_SOCKET) and reads what the daemon says.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgevoice.audio.wavio import load_wav, write_wav
from edgevoice.demo import bundled_speech


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Notifications:
    """The datagram socket systemd would listen on."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.received: list[tuple[float, str]] = []

    def drain(self) -> list[tuple[float, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                return self.received
            for line in data.decode().splitlines():
                self.received.append((time.monotonic(), line))

    def lines(self, prefix: str) -> list[tuple[float, str]]:
        return [(t, line) for t, line in self.drain() if line.startswith(prefix)]


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[tuple[int, int, str]]:
    port, admin = free_port(), free_port()
    cfg = tmp_path / "relay.yaml"
    cfg.write_text(f"listen: {{port: {port}}}\nadmin: {{port: {admin}}}\n"
                   f"auth: {{tokens_file: {tmp_path / 'tokens.json'}}}\n")
    token = subprocess.run([sys.executable, "-m", "edgevoice", "token", "add", "kitchen",
                            "--config", str(cfg)], capture_output=True, text=True,
                           check=True).stdout.strip()
    proc = subprocess.Popen([sys.executable, "-m", "edgevoice", "relay", "--config", str(cfg)],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: get(f"http://127.0.0.1:{admin}/healthz")[0] == 200
                 if _listening(admin) else False, 20, "the relay")
        yield port, admin, token
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_device_process_under_systemd_conventions(tmp_path: Path,
                                                  relay: tuple[int, int, str]) -> None:
    port, admin, token = relay
    # microphone: 3 s of silence, then speech, then silence; the file then ends and
    # capture stalls, which must stop the watchdog keep-alives
    speech = np.frombuffer(load_wav(bundled_speech()), dtype=np.int16)
    quiet = np.zeros(16000 * 3, dtype=np.int16)
    mic = tmp_path / "mic.wav"
    write_wav(mic, np.concatenate([quiet, speech]).tobytes(), 16000)
    (tmp_path / "device.token").write_text(token + "\n")
    health_port = free_port()
    cfg = tmp_path / "device.yaml"
    cfg.write_text(f"""device_id: kitchen
relay: {{url: "ws://127.0.0.1:{port}/", token_file: {tmp_path / 'device.token'}}}
audio: {{input: "wav:{mic}", output: "wav:{tmp_path / 'speaker.wav'}"}}
turn: {{start: api}}
health: {{port: {health_port}}}
watchdog: {{stall_after_s: 1.5}}
""")
    notify = Notifications(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
           "WATCHDOG_USEC": "1000000"}
    env.pop("WATCHDOG_PID", None)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "edgevoice", "device", "--config", str(cfg)],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: notify.lines("READY=1"), 20, "READY=1")
        ready_at = notify.lines("READY=1")[0][0]
        assert ready_at - started < 20
        assert notify.lines("STATUS="), "a STATUS= line"
        # watchdog keep-alives at about half of WATCHDOG_USEC
        wait_for(lambda: len(notify.lines("WATCHDOG=1")) >= 3, 5, "three WATCHDOG=1")
        pings = [t for t, _ in notify.lines("WATCHDOG=1")]
        gaps = np.diff(pings)
        assert 0.2 < float(np.median(gaps)) < 0.9, gaps

        base = f"http://127.0.0.1:{health_port}"
        status, body = get(f"{base}/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, body = get(f"{base}/stats")
        stats = json.loads(body)
        assert status == 200 and stats["link_state"] == "connected"
        assert stats["device_id"] == "kitchen" and stats["relay_rtt_ms"] is not None
        status, body = get(f"{base}/metrics")
        assert status == 200 and "edgevoice_link_up 1.0" in body
        status, body = get(f"http://127.0.0.1:{admin}/devices")
        fleet = json.loads(body)
        assert [d["device_id"] for d in fleet] == ["kitchen"] and fleet[0]["connected"]
        wait_for(lambda: json.loads(get(f"http://127.0.0.1:{admin}/devices")[1])[0]
                 ["last_stats"], 5, "the device's stats at the relay")

        # SIGUSR1 starts a turn; the speech that follows is echoed back
        proc.send_signal(signal.SIGUSR1)

        def turn_done() -> bool:
            turns = json.loads(get(f"{base}/stats")[1])["turns"]
            return bool(turns) and turns[-1]["outcome"] != "open"
        wait_for(turn_done, 25, "the signalled turn to finish")
        turn = json.loads(get(f"{base}/stats")[1])["turns"][-1]
        assert turn["trigger"] == "signal" and turn["outcome"] == "completed", turn
        assert turn["first_uplink_to_first_downlink_ms"] is not None

        # the WAV has ended: capture stalled, so keep-alives stop and /healthz says why
        def stalled() -> bool:
            status, body = get(f"{base}/healthz")
            return status == 503 and "no audio" in body
        wait_for(stalled, 15, "/healthz to report the stalled capture")
        before = len(notify.lines("WATCHDOG=1"))
        time.sleep(1.5)
        assert len(notify.lines("WATCHDOG=1")) == before, "watchdog fed while capture stalled"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert notify.lines("STOPPING=1")
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=10)
    assert "Traceback" not in err, err[-3000:]
    # the token never reaches the logs
    assert token.split(".", 1)[1] not in err


def test_health_endpoint_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    cfg = tmp_path / "device.yaml"
    (tmp_path / "t").write_text("kitchen.x\n")
    cfg.write_text(f"relay: {{token_file: {tmp_path / 't'}}}\n"
                   "audio: {input: 'wav:/dev/null', output: 'wav:/dev/null'}\n"
                   "health: {bind: 0.0.0.0}\n")
    proc = subprocess.run([sys.executable, "-m", "edgevoice", "device", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 78
    assert "health.token_file" in proc.stderr
