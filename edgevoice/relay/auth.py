"""Per-device tokens: issued once, stored hashed, compared in constant time.

A token is ``<device-id>.<secret>``. The relay keeps only SHA-256 digests in a JSON
file (mode 0600), re-read when it changes so ``edgevoice token add`` takes effect
without a restart. The secret is 32 random bytes, so a fast hash is enough: there is
nothing to brute-force that a slow hash would protect.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgevoice.config.base import require
from edgevoice.errors import ConfigError

logger = logging.getLogger(__name__)

DEVICE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_SECRET = re.compile(r"^[A-Za-z0-9_-]{32,128}$")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token(device_id: str) -> str:
    if not DEVICE_ID.match(device_id):
        raise ValueError(
            f"device id {device_id!r} must be lowercase letters, digits and dashes (1-63)")
    return f"{device_id}.{secrets.token_urlsafe(32)}"


def split_token(token: str) -> tuple[str, str] | None:
    """(device id, secret) of a well-formed token, else None."""
    device_id, dot, secret = token.partition(".")
    if not dot or not DEVICE_ID.match(device_id) or not _SECRET.match(secret):
        return None
    return device_id, secret


@dataclass(frozen=True)
class AuthSettings:
    """How devices prove who they are."""

    tokens_file: str = "/var/lib/edgevoice-relay/tokens.json"
    """JSON file of token digests, written by `edgevoice token add`."""
    max_failures_per_minute: int = 10
    """Bad tokens from one address before it gets HTTP 429 for a minute."""

    def __post_init__(self) -> None:
        require(bool(self.tokens_file), "tokens_file", "must name a file")
        require(self.max_failures_per_minute >= 1, "max_failures_per_minute", "must be >= 1")


class TokenStore:
    """The device-id → digest table, backed by a JSON file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._digests: dict[str, str] = {}
        self._stamp: tuple[int, int] | None = None
        self._dummy = hash_token(secrets.token_urlsafe(32))
        self.reload_if_changed()

    def reload_if_changed(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._digests, self._stamp = {}, None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            devices = data["devices"]
            digests = {str(k): str(v["sha256"]) for k, v in devices.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(str(self.path), "devices", f"unreadable token file: {exc}") from None
        self._digests, self._stamp = digests, stamp
        logger.info("loaded %d device tokens from %s", len(digests), self.path)

    def verify(self, token: str) -> str | None:
        """The device id the token belongs to, or None. Constant time in the secret."""
        self.reload_if_changed()
        parts = split_token(token)
        device_id = parts[0] if parts else ""
        expected = self._digests.get(device_id, self._dummy)
        # compare even when the device is unknown, so timing says nothing about ids
        ok = hmac.compare_digest(hash_token(token), expected)
        return device_id if ok and parts and device_id in self._digests else None

    def devices(self) -> list[str]:
        self.reload_if_changed()
        return sorted(self._digests)

    def add(self, device_id: str) -> str:
        """Issue (or replace) the token of ``device_id``; return it. Shown only once."""
        token = new_token(device_id)
        self._update(lambda d: d.__setitem__(device_id, {
            "sha256": hash_token(token),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}))
        return token

    def remove(self, device_id: str) -> bool:
        present = device_id in self.devices()
        if present:
            self._update(lambda d: d.pop(device_id))
        return present

    def _update(self, change: collections.abc.Callable[[dict[str, object]], object]) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            data = {"version": 1, "devices": {}}
        change(data["devices"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tokens-")
        try:
            os.fchmod(fd, 0o600)
            # `edgevoice token add` usually runs as root while the relay runs as its
            # own user: the file belongs to whoever owns its directory (the relay's
            # StateDirectory), or the relay could not read its own tokens.
            directory = self.path.parent.stat()
            if os.geteuid() == 0 and (directory.st_uid, directory.st_gid) != (0, 0):
                os.fchown(fd, directory.st_uid, directory.st_gid)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._stamp = None
        self.reload_if_changed()


class FailureLimiter:
    """Counts bad tokens per address over a sliding minute; pure (takes ``now``)."""

    def __init__(self, max_per_minute: int, max_addresses: int = 10_000) -> None:
        self.max_per_minute = max_per_minute
        self.max_addresses = max_addresses
        self._failures: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict())

    def blocked(self, address: str, now: float) -> bool:
        times = self._failures.get(address)
        if not times:
            return False
        while times and now - times[0] > 60.0:
            times.popleft()
        return len(times) >= self.max_per_minute

    def record_failure(self, address: str, now: float) -> None:
        times = self._failures.setdefault(address, collections.deque(maxlen=self.max_per_minute))
        self._failures.move_to_end(address)
        times.append(now)
        while len(self._failures) > self.max_addresses:  # bounded: forget the stalest
            self._failures.popitem(last=False)
