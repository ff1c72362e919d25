"""Device tokens: hashed at rest, constant-time checks, rate limits, file ownership."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from edgevoice.relay.auth import FailureLimiter, TokenStore, new_token, split_token
from edgevoice.tokens import hash_token


def test_tokens_are_stored_hashed_and_verified(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    token = store.add("kitchen")
    text = (tmp_path / "tokens.json").read_text()
    assert token not in text and token.split(".")[1] not in text
    assert json.loads(text)["devices"]["kitchen"]["sha256"] == hash_token(token)
    assert stat.S_IMODE((tmp_path / "tokens.json").stat().st_mode) == 0o600
    assert store.verify(token) == "kitchen"
    assert store.verify(token + "x") is None
    assert store.verify("hall." + token.split(".")[1]) is None
    assert store.verify("") is None and store.verify("no-dot") is None


def test_reissuing_replaces_the_old_token(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    old = store.add("kitchen")
    new = store.add("kitchen", replace=True)
    assert store.verify(old) is None and store.verify(new) == "kitchen"


def test_another_process_adding_a_token_is_seen_without_restart(tmp_path: Path) -> None:
    relay_view = TokenStore(tmp_path / "tokens.json")
    token = TokenStore(tmp_path / "tokens.json").add("hall")
    assert relay_view.verify(token) == "hall"
    assert TokenStore(tmp_path / "tokens.json").remove("hall")
    assert relay_view.verify(token) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_token_file_belongs_to_the_owner_of_its_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 4242, 4243)
    TokenStore(state / "tokens.json").add("kitchen")
    st = (state / "tokens.json").stat()
    assert (st.st_uid, st.st_gid) == (4242, 4243)


def test_token_format() -> None:
    token = new_token("kitchen-2")
    assert split_token(token) is not None
    with pytest.raises(ValueError):
        new_token("Kitchen!")


def test_failure_limiter_blocks_an_address_for_a_minute() -> None:
    limiter = FailureLimiter(max_per_minute=3)
    for i in range(3):
        assert not limiter.blocked("10.0.0.1", float(i))
        limiter.record_failure("10.0.0.1", float(i))
    assert limiter.blocked("10.0.0.1", 3.0)
    assert not limiter.blocked("10.0.0.2", 3.0)
    assert not limiter.blocked("10.0.0.1", 62.5)


def test_failure_limiter_memory_is_bounded() -> None:
    limiter = FailureLimiter(max_per_minute=2, max_addresses=100)
    for i in range(1000):
        limiter.record_failure(f"a{i}", 0.0)
    assert len(limiter._failures) == 100
