"""Bearer secrets, hashed once and compared in constant time: the one place for it.

Device tokens (the relay's token store), the health endpoints' operator tokens and
the browser's tickets are all random secrets of at least 32 bytes, so a fast hash is
enough: a slow one would protect nothing that brute force could reach. Servers keep
only :func:`hash_token` digests and check a presented secret with
:func:`digest_matches`, whose time does not depend on where the digests differ.
"""

from __future__ import annotations

import hashlib
import hmac


def hash_token(token: str) -> str:
    """The lower-case hex SHA-256 of ``token`` (UTF-8): what servers keep and compare."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def digest_matches(token: str, expected_sha256: str) -> bool:
    """Whether ``token`` hashes to ``expected_sha256``, compared in constant time."""
    return hmac.compare_digest(hash_token(token), expected_sha256)


__all__ = ["digest_matches", "hash_token"]
