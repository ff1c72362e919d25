"""The `edgevoice` command as an operator pipes and reads it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgevoice.config.loader import load_text
from edgevoice.config.model import DeviceConfig
from edgevoice.config.relay import RelayConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command, cls, shipped", [
    ("device", DeviceConfig, "config/device.yaml"),
    ("relay", RelayConfig, "config/relay.yaml"),
])
def test_help_config_prints_the_yaml_file_with_every_default(
        command: str, cls: type, shipped: str) -> None:
    result = subprocess.run([sys.executable, "-m", "edgevoice", command, "--help-config"],
                            capture_output=True, text=True, check=True, cwd=REPO)
    # a file one can save and edit: it loads, to the defaults, and is the shipped one
    assert load_text(result.stdout, cls, "help-config") == cls()
    assert result.stdout == (REPO / shipped).read_text()
    assert "<class" not in result.stdout and "typing." not in result.stdout


def test_help_config_into_a_closed_pipe_is_quiet() -> None:
    """`edgevoice relay --help-config | head -1`: the reader is gone before the write."""
    read_fd, write_fd = os.pipe()
    os.close(read_fd)  # every write now fails with EPIPE
    proc = subprocess.run([sys.executable, "-m", "edgevoice", "relay", "--help-config"],
                          stdout=write_fd, stderr=subprocess.PIPE, text=True, cwd=REPO,
                          timeout=60)
    os.close(write_fd)
    assert proc.stderr == "", proc.stderr
    assert proc.returncode == 0


def test_an_empty_credential_points_at_the_file_the_operator_writes(tmp_path: Path) -> None:
    """Under systemd the token arrives as a read-only credential copy: the message
    must name /etc/edgevoice/device.token, where the operator writes it."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "device-token").write_text("\n")
    cfg = tmp_path / "device.yaml"
    cfg.write_text("audio: {input: 'wav:x.wav', output: 'wav:y.wav'}\n")
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(creds)}
    result = subprocess.run([sys.executable, "-m", "edgevoice", "device", "--config", str(cfg),
                             "--check-config"], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=60)
    assert result.returncode == 78
    message = result.stderr.strip()
    assert message.startswith(f"{cfg}: relay.token_file: /etc/edgevoice/device.token"), message
    assert "put the device token in /etc/edgevoice/device.token" in message
