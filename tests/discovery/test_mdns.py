"""Finding the relay with mDNS/DNS-SD: the pure choices, and a real relay and device
in two network namespaces joined by a veth that this test creates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from edgevoice_dev.testing.netfault import NetnsPair, have_netns

from edgevoice.config.base import SettingError
from edgevoice.config.loader import load_text
from edgevoice.config.model import DeviceConfig
from edgevoice.discovery.mdns import (
    DeviceDiscoverySettings,
    FoundRelay,
    RelayDiscoverySettings,
    choose,
    relay_url,
)

PLAIN = FoundRelay("attic", "attic.local.", ("10.0.0.5",), 8780, tls=False)
SECURE = FoundRelay("hall", "hall.local.", ("10.0.0.6",), 8443, tls=True, path="/")


def test_a_tls_relay_is_reached_by_name_and_a_plain_one_by_address() -> None:
    assert relay_url(SECURE) == "wss://hall.local:8443/"
    assert relay_url(PLAIN) == "ws://10.0.0.5:8780/"


def test_a_plain_relay_is_only_used_when_allowed_and_the_preferred_one_wins() -> None:
    strict = DeviceDiscoverySettings()
    assert choose([PLAIN], strict) is None  # the token never goes to an unverified relay
    assert choose([PLAIN, SECURE], strict) == SECURE
    lax = DeviceDiscoverySettings(allow_plain=True)
    assert choose([PLAIN, SECURE], lax) == PLAIN
    assert choose([PLAIN, SECURE], DeviceDiscoverySettings(allow_plain=True,
                                                           prefer="HALL")) == SECURE
    assert choose([PLAIN], DeviceDiscoverySettings(allow_plain=True, prefer="hall")) is None


def test_settings() -> None:
    config = load_text("relay: {url: auto, token_file: /x}\ndiscovery: {allow_plain: true}\n",
                       DeviceConfig, "device.yaml")
    assert config.relay.url == "auto" and config.discovery.allow_plain
    with pytest.raises(SettingError, match="addresses"):
        RelayDiscoverySettings(addresses=("relay.local",))


def _edgevoice(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-m", "edgevoice"]


@pytest.mark.root
@pytest.mark.skipif(not have_netns(), reason="needs root, iproute2 and nftables")
def test_a_device_with_url_auto_finds_the_relay_over_multicast(tmp_path: Path) -> None:
    pytest.importorskip("zeroconf")
    from edgevoice.demo import bundled_speech

    with NetnsPair() as net:
        relay_yaml = tmp_path / "relay.yaml"
        relay_yaml.write_text(json.dumps({
            "listen": {"host": net.relay_ip, "port": 18780},
            "admin": {"port": 18766},
            "auth": {"tokens_file": str(tmp_path / "tokens.json")},
            "discovery": {"advertise": True, "instance_name": "test-relay"},
        }))
        (tmp_path / "tokens.json").write_text('{"version": 1, "devices": {}}')
        token = subprocess.run([sys.executable, "-m", "edgevoice", "token", "add", "kitchen",
                                "--config", str(relay_yaml)], capture_output=True,
                               text=True, check=True).stdout.strip()
        (tmp_path / "kitchen.token").write_text(token + "\n")
        os.chmod(tmp_path / "kitchen.token", 0o600)
        device_yaml = tmp_path / "device.yaml"
        device_yaml.write_text(json.dumps({
            "relay": {"url": "auto", "token_file": str(tmp_path / "kitchen.token")},
            "audio": {"input": f"wav:{bundled_speech()}",
                      "output": f"wav:{tmp_path / 'reply.wav'}"},
            "discovery": {"allow_plain": True, "browse_ms": 1500},
            "timers": {"state_file": str(tmp_path / "timers.json")},
        }))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        relay = subprocess.Popen([*_edgevoice(net.relay_ns), "relay",
                                  "--config", str(relay_yaml)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        device = subprocess.Popen([*_edgevoice(net.device_ns), "device",
                                   "--config", str(device_yaml)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        connected: dict[str, object] = {}
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not connected:
                time.sleep(0.5)
                out = net.ns(net.relay_ns, "curl", "-s", "127.0.0.1:18766/devices",
                             check=False).stdout
                try:
                    devices = json.loads(out or "[]")
                except ValueError:
                    continue
                connected = next((d for d in devices if d["device_id"] == "kitchen"
                                  and d["connected"]), {})
        finally:
            for proc in (device, relay):
                proc.terminate()
            device_log = device.communicate(timeout=20)[1].decode()
            relay_log = relay.communicate(timeout=20)[1].decode()
    assert connected, f"device never connected\n{device_log[-2000:]}\n{relay_log[-2000:]}"
    # it came from the other namespace, to the address the relay advertised
    assert str(connected["address"]).startswith(net.device_ip)
    assert f"found relay test-relay at ws://{net.relay_ip}:18780/" in device_log
