"""Config loading: shipped files, every kind of bad value, and the exit status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgevoice.config.loader import load_text
from edgevoice.config.model import DeviceConfig, load_device_config
from edgevoice.config.relay import RelayConfig, load_relay_config
from edgevoice.config.render import render
from edgevoice.config.templates import DEVICE_HEADER, RELAY_HEADER
from edgevoice.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_configs_load_and_are_current() -> None:
    assert load_device_config(ROOT / "config/device.yaml") == DeviceConfig()
    assert load_relay_config(ROOT / "config/relay.yaml") == RelayConfig()
    assert (ROOT / "config/device.yaml").read_text() == render(DeviceConfig, DEVICE_HEADER), \
        "config/device.yaml is stale: run scripts/gen-config"
    assert (ROOT / "config/relay.yaml").read_text() == render(RelayConfig, RELAY_HEADER), \
        "config/relay.yaml is stale: run scripts/gen-config"


@pytest.mark.parametrize("text, key, reason", [
    ("bogus: 1", "bogus", "unknown key"),
    ("silence: {hangover_ms: -5}", "silence.hangover_ms", ">= 0"),
    ("silence: {hangover_ms: soon}", "silence.hangover_ms", "whole number"),
    ("opus: {fec: maybe}", "opus.fec", "true or false"),
    ("opus: {bitrate_bps: 1.5}", "opus.bitrate_bps", "whole number"),
    ("relay: {url: http://x/}", "relay.url", "ws://"),
    ("relay: {backoff: {multiplier: 0.5}}", "relay.backoff.multiplier", ">= 1"),
    ("log_level: loud", "log_level", "is not one of"),
    ("audio: [1, 2]", "audio", "expected a mapping"),
    ("audio: {speaker_block_ms: 30}", "audio.speaker_block_ms", "multiple of 20"),
    ("audio: {speaker_block_ms: 200}", "audio.speaker_block_ms", "between 20 and 100"),
    ("device_id: Kitchen!", "device_id", "lowercase"),
    ("timezone: Mars/Base", "timezone", "unknown time zone"),
    ("turn: {max_turn_ms: .nan}", "turn.max_turn_ms", "whole number"),
    ("silence: {onset_db: .inf}", "silence.onset_db", "finite"),
    ("relay: {token_file: 5}", "relay.token_file", "expected a string"),
    ("audio:\n  input: [\n", "line", "invalid YAML"),
])
def test_bad_values_name_file_key_and_reason(text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(text, DeviceConfig, "device.yaml")
    assert info.value.file == "device.yaml"
    assert info.value.key.startswith(key)
    assert reason in info.value.reason
    assert str(info.value).startswith(f"device.yaml: {key}")


@pytest.mark.parametrize("command", ["device", "relay"])
def test_broken_config_exits_78_before_starting(tmp_path: Path, command: str) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("log_level: chatty\n")
    proc = subprocess.run([sys.executable, "-m", "edgevoice", command, "--config", str(broken)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 78
    assert proc.stderr.strip() == f"{broken}: log_level: 'chatty' is not one of " \
        "'debug', 'info', 'warning', 'error'"


def test_missing_config_file_exits_78(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "edgevoice", "relay", "--config",
                           str(tmp_path / "nope.yaml"), "--check-config"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 78 and "cannot read" in proc.stderr


def test_check_config_reads_the_token(tmp_path: Path) -> None:
    token = tmp_path / "t"
    token.write_text("kitchen.abc\n")
    cfg = tmp_path / "d.yaml"
    cfg.write_text(f"relay:\n  token_file: {token}\n")
    ok = subprocess.run([sys.executable, "-m", "edgevoice", "device", "--config", str(cfg),
                         "--check-config"], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    token.write_text("")
    empty = subprocess.run([sys.executable, "-m", "edgevoice", "device", "--config", str(cfg),
                            "--check-config"], capture_output=True, text=True, timeout=30)
    assert empty.returncode == 78 and "relay.token_file" in empty.stderr


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(
        st.sampled_from(["relay", "audio", "silence", "url", "input", "hangover_ms", "x",
                         "opus", "turn", "backoff", "listen", "limits", "port", "kind"]),
        c, max_size=4), max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(doc=yaml_values, cls=st.sampled_from([DeviceConfig, RelayConfig]))
def test_random_documents_never_crash_the_loader(doc: object, cls: type) -> None:
    import yaml
    text = yaml.safe_dump(doc)
    try:
        load_text(text, cls, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.file == "fuzz.yaml" and exc.key and exc.reason


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_random_text_never_crashes_the_loader(text: str) -> None:
    try:
        load_text(text, DeviceConfig, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.file == "fuzz.yaml"


def test_device_name_comes_from_the_token_and_must_match_the_config(tmp_path: Path) -> None:
    from edgevoice.device.daemon import device_identity
    assert device_identity(DeviceConfig(), "kitchen.secret", "d.yaml") == "kitchen"
    assert device_identity(DeviceConfig(device_id="kitchen"), "kitchen.s", "d.yaml") == "kitchen"
    with pytest.raises(ConfigError, match="issued for 'kitchen'") as info:
        device_identity(DeviceConfig(device_id="hall"), "kitchen.s", "d.yaml")
    assert info.value.key == "device_id"
    with pytest.raises(ConfigError) as info:
        device_identity(DeviceConfig(), "no-dot-here", "d.yaml")
    assert info.value.key == "relay.token_file"
