"""The one token-hashing module: digests and the constant-time check."""

from __future__ import annotations

import hashlib

from edgevoice.tokens import digest_matches, hash_token


def test_digest_is_lower_hex_sha256_of_utf8() -> None:
    assert hash_token("kitchen.sécret") == hashlib.sha256("kitchen.sécret".encode()).hexdigest()
    assert hash_token("a") != hash_token("a ")


def test_digest_matches_only_the_same_secret() -> None:
    digest = hash_token("kitchen.s3cret")
    assert digest_matches("kitchen.s3cret", digest)
    assert not digest_matches("kitchen.s3creT", digest)
    assert not digest_matches("", digest)
    assert not digest_matches("kitchen.s3cret", digest.upper())  # servers keep lower case
