"""`edgevoice token` and the relay's token store, as an operator (and a race) uses them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgevoice.cli import main
from edgevoice.relay.auth import TokenStore

REPO = Path(__file__).resolve().parents[2]


def relay_config(tmp_path: Path, tokens: Path) -> Path:
    cfg = tmp_path / "relay.yaml"
    cfg.write_text(f"listen: {{port: 0}}\nadmin: {{port: 0}}\nauth: {{tokens_file: {tokens}}}\n")
    return cfg


def edgevoice(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edgevoice", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)


def test_a_hundred_concurrent_token_adds_lose_no_token(tmp_path: Path) -> None:
    """Each child runs the `token add` command; all race on one store."""
    tokens = tmp_path / "state" / "tokens.json"
    cfg = relay_config(tmp_path, tokens)
    out = tmp_path / "issued"
    out.mkdir()
    children = []
    for i in range(100):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                sys.stdout = (out / f"d{i}").open("w")
                sys.stderr = open(os.devnull, "w")  # noqa: SIM115
                code = main(["token", "add", f"d{i}", "--config", str(cfg)])
                sys.stdout.close()
            finally:
                os._exit(code)
        children.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    assert codes == [0] * 100
    store = TokenStore(tokens)
    assert store.devices() == sorted(f"d{i}" for i in range(100))
    for i in range(100):
        assert store.verify((out / f"d{i}").read_text().strip()) == f"d{i}"
    assert not list(tokens.parent.glob(".tokens-*")), "a temporary file was left behind"


def test_adding_a_device_twice_keeps_its_token_unless_replace(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    cfg = relay_config(tmp_path, tokens)
    first = edgevoice("token", "add", "kitchen", "--config", str(cfg))
    assert first.returncode == 0, first.stderr
    before = tokens.read_bytes()
    again = edgevoice("token", "add", "kitchen", "--config", str(cfg))
    assert again.returncode != 0 and again.stdout == ""
    assert "already has a token" in again.stderr and "--replace" in again.stderr
    assert "Traceback" not in again.stderr
    assert tokens.read_bytes() == before
    assert TokenStore(tokens).verify(first.stdout.strip()) == "kitchen"

    rotated = edgevoice("token", "add", "kitchen", "--replace", "--config", str(cfg))
    assert rotated.returncode == 0, rotated.stderr
    assert "no longer works" in rotated.stderr
    store = TokenStore(tokens)
    assert store.verify(rotated.stdout.strip()) == "kitchen"
    assert store.verify(first.stdout.strip()) is None


def test_an_unwritable_store_is_a_clear_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    cfg = relay_config(tmp_path, state / "tokens.json")
    # root writes anywhere a mode allows nothing: make the directory immutable instead
    as_root = os.geteuid() == 0
    if as_root:
        if shutil.which("chattr") is None:
            pytest.skip("as root, an unwritable directory needs chattr")
        subprocess.run(["chattr", "+i", str(state)], check=True)
    else:
        state.chmod(0o555)
    try:
        result = edgevoice("token", "add", "kitchen", "--config", str(cfg))
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(state)], check=True)
        state.chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"cannot write {state / 'tokens.json'}" in result.stderr
    assert "sudo -u edgevoice-relay" in result.stderr
    assert not (state / "tokens.json").exists()


def test_a_corrupt_store_is_refused_and_left_alone(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text('{"devices": {"kitchen": ')
    cfg = relay_config(tmp_path, tokens)
    result = edgevoice("token", "add", "hall", "--config", str(cfg))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert str(tokens) in result.stderr
    assert tokens.read_text() == '{"devices": {"kitchen": '


@pytest.mark.parametrize("content, reason", [
    (None, "does not exist"),
    ("not json", "is not a token store"),
    ('{"version": 1, "devices": {"kitchen": {"created": "x"}}}', "no sha256"),
])
def test_a_missing_or_corrupt_store_is_refused_by_check_config_and_at_start(
        tmp_path: Path, content: str | None, reason: str) -> None:
    tokens = tmp_path / "tokens.json"
    if content is not None:
        tokens.write_text(content)
    cfg = relay_config(tmp_path, tokens)
    for args in (["--check-config"], []):
        result = edgevoice("relay", "--config", str(cfg), *args)
        assert result.returncode == 78, result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith(f"{cfg}: auth.tokens_file: "), line
        assert reason in line and "Traceback" not in result.stderr


def test_check_config_passes_a_good_store(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    TokenStore(tokens).add("kitchen")
    cfg = relay_config(tmp_path, tokens)
    result = edgevoice("relay", "--config", str(cfg), "--check-config")
    assert result.returncode == 0, result.stderr
    assert json.loads(tokens.read_text())["devices"].keys() == {"kitchen"}
