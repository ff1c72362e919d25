"""``edgevoice relay --check-config --live`` against the fake Bedrock (and a network namespace)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip(
    "aws_sdk_bedrock_runtime",
    reason="the Nova Sonic upstream needs Python >= 3.12 and the 'nova' extra",
)

from edgevoice_dev.testing.fake_bedrock import FakeBedrock, StreamPlan

from edgevoice.nova.livecheck import Finding, live_check
from edgevoice.nova.settings import NovaSettings


def check(settings: NovaSettings | None = None) -> dict[str, Finding]:
    findings = asyncio.run(live_check(settings or NovaSettings(open_timeout_s=3.0)))
    return {f.what: f for f in findings}


def test_a_working_setup_reports_every_check_ok_and_closes_the_stream(fake: FakeBedrock) -> None:
    found = check()
    assert [f.what for f in found.values()] == ["credentials", "region", "model access", "latency"]
    assert all(f.ok for f in found.values())
    assert "ms" in found["latency"].detail
    (stream,) = fake.received
    assert stream.names()[-3:] == ["contentEnd", "promptEnd", "sessionEnd"]
    assert stream.input_closed


def test_missing_credentials_are_named_with_their_fix(
    fake: FakeBedrock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    (finding,) = check().values()
    assert (finding.what, finding.ok, finding.code) == ("credentials", False, "nova_no_credentials")
    assert "AWS_PROFILE" in finding.fix
    assert fake.received == []


@pytest.mark.parametrize(
    ("plan", "what", "code"),
    [
        (StreamPlan(http_status=403), "model access", "nova_access_denied"),
        (StreamPlan(http_status=429), "model access", "nova_throttled"),
        (
            StreamPlan(
                error_type="ValidationException",
                error_message="The provided model identifier is invalid.",
                http_status=400,
            ),
            "model access",
            "nova_unknown_model",
        ),
        (StreamPlan(open_delay_s=30), "region", "nova_timeout"),
    ],
)
def test_each_failure_names_its_code_and_fix(
    fake: FakeBedrock, plan: StreamPlan, what: str, code: str
) -> None:
    fake.script.push(plan)
    found = check(NovaSettings(open_timeout_s=1.5))
    failed = [f for f in found.values() if not f.ok]
    assert [(f.what, f.code) for f in failed] == [(what, code)]
    assert failed[0].fix


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_a_region_without_an_endpoint_is_named_by_the_cli(tmp_path: Path) -> None:
    # In a network namespace of our own no name resolves: what a wrong region looks like.
    config = tmp_path / "relay.yaml"
    tokens = tmp_path / "tokens.json"
    tokens.write_text('{"version": 1, "devices": {}}')
    config.write_text(
        "upstream:\n  kind: nova\n  nova: {region: xx-nowhere-7, open_timeout_s: 3}\n"
        f"auth: {{tokens_file: {tokens}}}\n"
    )
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "AKIDEDGEVOICETEST",
        "AWS_SECRET_ACCESS_KEY": "edgevoice-test-secret",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }
    env.pop("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", None)
    command = [
        sys.executable,
        "-m",
        "edgevoice",
        "relay",
        "--config",
        str(config),
        "--check-config",
        "--live",
    ]
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("unshare -rn is not permitted here")
    started = time.monotonic()
    result = subprocess.run(
        ["unshare", "-rn", *command], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 69, result.stdout + result.stderr
    assert time.monotonic() - started < 15  # named at once, not after timeouts
    assert "region: FAILED (nova_region)" in result.stdout
    assert "fix: check nova.region" in result.stdout


def test_check_config_without_live_points_at_it_and_warns_about_nova_1(tmp_path: Path) -> None:
    config = tmp_path / "relay.yaml"
    tokens = tmp_path / "tokens.json"
    tokens.write_text('{"version": 1, "devices": {}}')
    config.write_text(
        "upstream:\n  kind: nova\n  nova: {model_id: amazon.nova-sonic-v1:0}\n"
        f"auth: {{tokens_file: {tokens}}}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "edgevoice", "relay", "--config", str(config), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "end of life" in result.stdout and "--live" in result.stdout
