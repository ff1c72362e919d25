"""Fixtures shared across test folders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the fake Bedrock keeps its throwaway CA (key generation is slow: once)."""
    return tmp_path_factory.mktemp("fake-bedrock-ca")


@pytest.fixture
def fake(ca_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A local fake Bedrock endpoint, with the environment the real SDK needs to reach it
    (endpoint, CA bundle, static test credentials, no AWS config files)."""
    from edgevoice_dev.testing.fake_bedrock import FakeBedrock

    with FakeBedrock(ca_dir=ca_dir) as server:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        yield server
