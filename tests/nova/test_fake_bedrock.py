"""The fake Bedrock endpoint itself: TLS with its throwaway CA, and its process mode."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from edgevoice_dev.testing.fake_bedrock import FakeBedrock
from edgevoice_dev.testing.tls import make_test_ca


def test_test_ca_is_reused_and_trusted_for_localhost_and_127(tmp_path: Path) -> None:
    first = make_test_ca(tmp_path)
    pem = first.ca_file.read_bytes()
    again = make_test_ca(tmp_path)
    assert again == first and again.ca_file.read_bytes() == pem
    assert oct(first.key_file.stat().st_mode & 0o777) == "0o600"
    with FakeBedrock(ca_dir=tmp_path) as fake:
        for host in ("127.0.0.1", "localhost"):
            context = ssl.create_default_context(cafile=str(fake.ca_file))
            context.set_alpn_protocols(["h2"])
            with (
                socket.create_connection(("127.0.0.1", fake.port), timeout=5) as raw,
                context.wrap_socket(raw, server_hostname=host) as tls,
            ):
                assert tls.selected_alpn_protocol() == "h2"


def test_env_points_the_sdk_at_the_fake_with_static_credentials(tmp_path: Path) -> None:
    with FakeBedrock(ca_dir=tmp_path) as fake:
        env = fake.env
        assert env["AWS_ENDPOINT_URL_BEDROCK_RUNTIME"] == f"https://127.0.0.1:{fake.port}"
        assert env["SSL_CERT_FILE"] == str(fake.ca_file)
        assert env["AWS_CONFIG_FILE"] == env["AWS_SHARED_CREDENTIALS_FILE"] == "/dev/null"
        assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]


def test_runs_as_a_separate_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip(
        "aws_sdk_bedrock_runtime", reason="talking to it needs Python >= 3.12 and the nova extra"
    )
    from edgevoice.nova.upstream import NovaSettings, NovaUpstream
    from edgevoice.upstream.base import DeviceContext, ResponseEnded

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgevoice_dev.testing.fake_bedrock",
            "--port",
            "0",
            "--ca-dir",
            str(tmp_path),
            "--audio-chunks",
            "2",
            "--chunk-interval",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        for key, value in info["env"].items():
            monkeypatch.setenv(key, value)

        async def one_turn() -> list[object]:
            upstream = NovaUpstream(NovaSettings(drain_timeout_s=0.5))
            session = await upstream.open_session(DeviceContext("d", "s"))
            await session.start_turn()
            loud = (3000).to_bytes(2, "little", signed=True) * 320
            for _ in range(10):
                await session.send_audio(loud)
                await asyncio.sleep(0.02)
            await session.end_turn()
            got: list[object] = []
            async with asyncio.timeout(10):
                async for event in session.events():
                    got.append(event)
                    if isinstance(event, ResponseEnded):
                        break
            await session.close()
            await upstream.aclose()
            return got

        events = asyncio.run(one_turn())
        assert any(isinstance(e, ResponseEnded) for e in events)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    assert os.path.exists(tmp_path / "ca.pem")
