"""Per-device tokens: issued once, stored hashed, compared in constant time.

A token is ``<device-id>.<secret>``. The relay keeps only SHA-256 digests in a JSON
file (mode 0600), re-read when it changes so ``edgevoice token add`` takes effect
without a restart. The secret is 32 random bytes, so a fast hash is enough: there is
nothing to brute-force that a slow hash would protect.

Writers (``edgevoice token add|remove``, possibly many at once) take an exclusive
``flock`` on the store's directory around read-modify-write, and replace the file
atomically (write a temporary file, fsync, rename): no token is lost to a race and
the relay never reads half a file. The directory, not a lock file, is locked so
that root and the relay's user can both take the lock whoever wrote last.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import logging
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgevoice.config.base import require
from edgevoice.errors import ConfigError, EdgevoiceError
from edgevoice.protocol.limits import TokenBucket
from edgevoice.statefile import locked_directory, write_json_atomic
from edgevoice.tokens import digest_matches, hash_token

logger = logging.getLogger(__name__)

DEVICE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_SECRET = re.compile(r"^[A-Za-z0-9_-]{32,128}$")


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


class TokenStoreError(EdgevoiceError):
    """A token cannot be issued or removed: the reason says what to do."""


class TokenExistsError(TokenStoreError):
    """The device already has a token; replacing it must be asked for."""


def _read_store(path: Path) -> dict[str, object]:
    """The parsed store; ValueError (with the reason) when it is not a token store."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("devices"), dict):
        raise ValueError('expected {"version": 1, "devices": {...}}')
    for name, entry in data["devices"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise ValueError(f"device {name!r} has no sha256 digest")
    return data


def check_token_store(path: str | Path, config_file: str) -> int:
    """Refuse a missing or unreadable store (``file: key: reason``); else its size.

    A relay started on a missing store would refuse every device without saying why.
    """
    store = Path(path)
    key = "auth.tokens_file"
    try:
        data = _read_store(store)
    except FileNotFoundError:
        raise ConfigError(config_file, key, f"{store} does not exist: issue the first "
                          "device token with `edgevoice token add NAME`, which creates it"
                          ) from None
    except OSError as exc:
        raise ConfigError(config_file, key, f"cannot read {store}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(config_file, key, f"{store} is not a token store: {exc}") from None
    devices = data["devices"]
    assert isinstance(devices, dict)
    return len(devices)


@dataclass(frozen=True)
class AuthSettings:
    """How devices prove who they are."""

    tokens_file: str = "/var/lib/edgevoice-relay/tokens.json"
    """JSON file of token digests, written by `edgevoice token add`."""
    max_failures_per_minute: int = 10
    """Bad tokens from one address before its further bad tokens get HTTP 429 for the
    rest of the minute. A valid token is never refused for this."""
    max_failures_per_s: int = 50
    """Bad tokens per second from all addresses together (bursts of as many) before
    further bad tokens get HTTP 429: rotating addresses does not escape it."""

    def __post_init__(self) -> None:
        require(bool(self.tokens_file), "tokens_file", "must name a file")
        require(self.max_failures_per_minute >= 1, "max_failures_per_minute", "must be >= 1")
        require(self.max_failures_per_s >= 1, "max_failures_per_s", "must be >= 1")


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
            devices = _read_store(self.path)["devices"]
            assert isinstance(devices, dict)
            digests = {str(k): str(v["sha256"]) for k, v in devices.items()}
        except (OSError, ValueError) as exc:
            raise ConfigError(str(self.path), "devices", f"unreadable token file: {exc}") from None
        self._digests, self._stamp = digests, stamp
        logger.info("loaded %d device token%s from %s", len(digests),
                    "" if len(digests) == 1 else "s", self.path)

    def verify(self, token: str) -> str | None:
        """The device id the token belongs to, or None. Constant time in the secret."""
        self.reload_if_changed()
        parts = split_token(token)
        device_id = parts[0] if parts else ""
        expected = self._digests.get(device_id, self._dummy)
        # compare even when the device is unknown, so timing says nothing about ids
        ok = digest_matches(token, expected)
        return device_id if ok and parts and device_id in self._digests else None

    def devices(self) -> list[str]:
        self.reload_if_changed()
        return sorted(self._digests)

    def add(self, device_id: str, *, replace: bool = False) -> str:
        """Issue the token of ``device_id``; return it (shown only once).

        A device that has a token keeps it unless ``replace``: silently issuing a
        new one would lock out the device that uses the old one.
        """
        token = new_token(device_id)

        def change(devices: dict[str, object]) -> None:
            if device_id in devices and not replace:
                raise TokenExistsError(
                    f"{device_id!r} already has a token; `edgevoice token add {device_id} "
                    "--replace` issues a new one (the device must then be given it)")
            devices[device_id] = {
                "sha256": hash_token(token),
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}

        self._update(change)
        return token

    def remove(self, device_id: str) -> bool:
        removed: list[bool] = []
        self._update(lambda d: removed.append(d.pop(device_id, None) is not None))
        return removed[0]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = contextlib.ExitStack()
        try:
            lock.enter_context(locked_directory(self.path.parent))
        except OSError as exc:
            raise TokenStoreError(f"cannot use {self.path.parent}: {exc.strerror}") from None
        with lock:
            yield

    def _update(self, change: collections.abc.Callable[[dict[str, object]], object]) -> None:
        with self._locked():
            try:
                data = _read_store(self.path)
            except FileNotFoundError:
                data = {"version": 1, "devices": {}}
            except OSError as exc:
                raise TokenStoreError(f"cannot read {self.path}: {exc.strerror}") from None
            except ValueError as exc:
                raise TokenStoreError(f"{self.path} is not a token store ({exc}): fix or "
                                      "move it aside; nothing was changed") from None
            devices = data["devices"]
            assert isinstance(devices, dict)
            change(devices)
            try:
                self._write(data)
            except OSError as exc:
                raise TokenStoreError(f"cannot write {self.path}: {exc.strerror}") from None
        self._stamp = None
        self.reload_if_changed()

    def _write(self, data: dict[str, object]) -> None:
        write_json_atomic(self.path, data)


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


class GuessThrottle:
    """Slows token guessing per address and relay-wide; pure (takes ``now``).

    It is asked only about tokens that failed verification: a valid token is checked
    first and never refused for what other clients at its address (a NAT, a site)
    did. That costs no safety: a secret is 32 random bytes, so guessing one is
    hopeless at any rate, and the throttle is there to keep refusals cheap and
    their log short, not to stop a search that cannot succeed.
    """

    def __init__(self, max_per_minute: int, max_total_per_s: int, now: float, *,
                 per_address: FailureLimiter | None = None) -> None:
        #: this process's, or the fleet's (relay/shared.py), counts per address
        self.per_address = per_address or FailureLimiter(max_per_minute)
        self.total = TokenBucket(max_total_per_s, max_total_per_s, now)

    def failed(self, address: str, now: float) -> bool:
        """Record one bad token from ``address``; True when it is to get 429, not 401."""
        over_address = self.per_address.blocked(address, now)
        self.per_address.record_failure(address, now)
        over_total = not self.total.take(1.0, now)
        return over_address or over_total
