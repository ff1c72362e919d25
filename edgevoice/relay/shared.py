"""State that several relays share through Redis, so any relay can serve any device.

One relay needs none of this and keeps its embedded defaults: the token file
(:class:`edgevoice.relay.auth.TokenStore`), the in-process fleet tracker and
bad-token limiter, and no history beyond a session. With ``cluster.store.kind:
redis`` (docs/scale-out.md) the relays share, under ``cluster.store.key_prefix``:

* **device tokens** (:class:`RedisTokens`): digests only, as in the file; each relay
  verifies against a local copy, so a handshake never waits on the network. Whoever
  changes them bumps a version counter and publishes a notice; each relay re-reads
  on the notice (at once) and, for a writer that publishes none or a notice lost
  while its subscription was down, whenever it renews its liveness key (the version
  rides in the same command);
* **the fleet view** (:class:`SharedFleet`): each relay writes its devices' records;
  ``/devices`` on any relay answers for the whole fleet, marking the devices of a
  relay that stopped heartbeating as disconnected;
* **conversation history** (:class:`RedisHistory`, :class:`HistoryKeepingUpstream`):
  the final transcripts of each device, handed to the upstream when a session opens
  (``DeviceContext.history``), so the context survives a relay's death;
* **the bad-token limit** (:class:`SharedFailureLimiter`): failures per address
  counted fleet-wide, so N relays do not give an attacker N times the guesses.

Writes never block a device: they go through one bounded queue (drops counted) to
one writer task. The store being down degrades, never stops, the relays: tokens
stay as last read, fleet records and history lines are dropped (counted, logged
once per outage), history loads give up after ``history_load_timeout_ms``.

Why Redis rather than PostgreSQL (both are Debian packages here): all of this is
small, hot and mostly ephemeral — per-relay liveness with a TTL, one-minute
failure counters, bounded per-device lists — which Redis has as primitives
(``SET PX``, ``INCR``+``EXPIRE``, ``RPUSH``+``LTRIM``), at well under a millisecond,
with no schema to migrate and no table bloat from counters rewritten every second.
Tokens are the one durable thing: run Redis with ``appendonly yes``
(deploy/redis/edgevoice-redis.conf).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

from edgevoice.config.base import require
from edgevoice.errors import ConfigError
from edgevoice.health.relay import DeviceRecord, FleetTracker
from edgevoice.relay.auth import (
    FailureLimiter,
    TokenExistsError,
    TokenStoreError,
    new_token,
    split_token,
)
from edgevoice.tokens import digest_matches, hash_token
from edgevoice.upstream.base import (
    DeviceContext,
    HistoryLine,
    TranscriptReceived,
    Upstream,
    UpstreamEvent,
    UpstreamSession,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SharedStoreSettings:
    """The store several relays share (docs/scale-out.md)."""

    kind: Literal["none", "redis"] = "none"
    """none: one relay, state in the process and the token file. redis: shared."""
    url: str = "redis://127.0.0.1:6379/0"
    """Redis URL (redis://, rediss:// for TLS, unix:///run/redis/redis.sock)."""
    key_prefix: str = "edgevoice:"
    """Prefix of every key, so several fleets can share one Redis."""
    refresh_ms: int = 500
    """How often the fleet view is re-read while someone asks for it, in milliseconds;
    a relay's liveness key lives max(3 x this, 2 s) and is renewed every third of
    that. Tokens need no polling: a token added with ``edgevoice token`` is accepted
    everywhere at once (a published notice); one written otherwise, within a third
    of the liveness time."""
    history_max_lines: int = 40
    """Final transcript lines kept per device (Nova accepts 40 messages of history)."""
    history_ttl_s: int = 86_400
    """A device's history is forgotten after this many seconds without a new line."""
    history_load_timeout_ms: int = 1_000
    """A new session waits at most this long for its history before starting without."""
    write_queue: int = 10_000
    """Writes waiting for the store; beyond it the oldest are dropped (counted)."""

    def __post_init__(self) -> None:
        require(self.kind != "redis" or self.url.startswith(("redis://", "rediss://", "unix://")),
                "url", "must be redis://, rediss:// or unix://")
        require(bool(self.key_prefix), "key_prefix", "must not be empty")
        require(50 <= self.refresh_ms <= 60_000, "refresh_ms", "must be 50..60000")
        require(1 <= self.history_max_lines <= 1000, "history_max_lines", "must be 1..1000")
        require(self.history_ttl_s >= 60, "history_ttl_s", "must be >= 60")
        require(self.history_load_timeout_ms >= 10, "history_load_timeout_ms", "must be >= 10")
        require(self.write_queue >= 100, "write_queue", "must be >= 100")


@dataclass(frozen=True)
class ClusterSettings:
    """Running several relays behind a load balancer (docs/scale-out.md)."""

    relay_id: str = ""
    """This relay's name in the fleet view; empty: host name and device port."""
    drain_timeout_ms: int = 8_000
    """On SIGTERM, wait at most this long for turns and replies in flight before sending
    every device elsewhere (close 4004), in milliseconds; also for a single relay.
    Keep systemd's TimeoutStopSec above it."""
    store: SharedStoreSettings = field(default_factory=SharedStoreSettings)
    """Shared state; kind none for a single relay."""

    def __post_init__(self) -> None:
        require(0 <= self.drain_timeout_ms <= 600_000, "drain_timeout_ms", "must be 0..600000")


# --------------------------------------------------------------------------- seams


class DeviceTokens(Protocol):
    """Where device tokens live: the file (one relay) or the shared store."""

    def verify(self, token: str) -> str | None:
        """The device id the token belongs to, or None. Constant time, never blocks."""

    def devices(self) -> list[str]: ...

    def add(self, device_id: str, *, replace: bool = False) -> str:
        """Issue a device's token and return it (shown once); TokenExistsError if it has
        one, unless ``replace``."""

    def remove(self, device_id: str) -> bool: ...


class ConversationStore(Protocol):
    """Each device's conversation, beyond one session (and one relay)."""

    async def load(self, device_id: str) -> tuple[HistoryLine, ...]:
        """The device's last lines, oldest first."""

    def append(self, device_id: str, line: HistoryLine) -> None:
        """Record one final line; never blocks (it may be dropped, counted)."""


class MemoryHistory:
    """A ConversationStore in this process, for at most ``max_devices`` devices."""

    def __init__(self, max_lines: int = 40, max_devices: int = 10_000) -> None:
        self.max_lines = max_lines
        self.max_devices = max_devices
        self._lines: collections.OrderedDict[str, collections.deque[HistoryLine]] = (
            collections.OrderedDict())

    async def load(self, device_id: str) -> tuple[HistoryLine, ...]:
        return tuple(self._lines.get(device_id, ()))

    def append(self, device_id: str, line: HistoryLine) -> None:
        lines = self._lines.setdefault(device_id, collections.deque(maxlen=self.max_lines))
        self._lines.move_to_end(device_id)
        lines.append(line)
        while len(self._lines) > self.max_devices:
            self._lines.popitem(last=False)


class HistoryKeepingSession:
    """An upstream session whose final transcripts are recorded in a ConversationStore."""

    def __init__(self, inner: UpstreamSession, store: ConversationStore, device_id: str) -> None:
        self.inner = inner
        self.store = store
        self.device_id = device_id

    async def start_turn(self) -> None:
        await self.inner.start_turn()

    async def send_audio(self, pcm: bytes) -> None:
        await self.inner.send_audio(pcm)

    async def end_turn(self) -> None:
        await self.inner.end_turn()

    async def interrupt(self) -> None:
        await self.inner.interrupt()

    async def events(self) -> AsyncIterator[UpstreamEvent]:
        async for event in self.inner.events():
            if isinstance(event, TranscriptReceived) and event.final and event.text.strip():
                self.store.append(self.device_id, HistoryLine(event.role, event.text.strip()))
            yield event

    async def close(self) -> None:
        await self.inner.close()


class HistoryKeepingUpstream:
    """Wraps an upstream: sessions start from the device's stored history and add to it."""

    def __init__(self, inner: Upstream, store: ConversationStore,
                 load_timeout_s: float = 1.0) -> None:
        self.inner = inner
        self.store = store
        self.load_timeout_s = load_timeout_s
        self.name = inner.name
        self.load_failures = 0

    async def open_session(self, context: DeviceContext) -> UpstreamSession:
        try:
            history = await asyncio.wait_for(self.store.load(context.device_id),
                                             self.load_timeout_s)
        except Exception as exc:  # the store is down or slow: talk without the history
            self.load_failures += 1
            logger.warning("%s: no conversation history (%s); starting without it",
                           context.device_id, exc or type(exc).__name__)
            history = ()
        if history:
            logger.debug("%s: session starts with %d history lines", context.device_id,
                         len(history))
        session = await self.inner.open_session(dataclasses.replace(context, history=history))
        return HistoryKeepingSession(session, self.store, context.device_id)

    async def aclose(self) -> None:
        await self.inner.aclose()


# --------------------------------------------------------------------------- Redis


Write = Callable[["Redis"], Awaitable[None]]


class _Keys:
    def __init__(self, prefix: str) -> None:
        self.tokens = f"{prefix}tokens"
        self.tokens_version = f"{prefix}tokens:version"
        #: channel on which token writers announce a new version
        self.tokens_changed = f"{prefix}tokens:changed"
        self.fleet = f"{prefix}fleet"
        self.fleet_session = f"{prefix}fleet:session"
        self.prefix = prefix

    def relay(self, relay_id: str) -> str:
        return f"{self.prefix}relay:{relay_id}"

    def history(self, device_id: str) -> str:
        return f"{self.prefix}history:{device_id}"

    def failures(self, address: str, minute: int) -> str:
        return f"{self.prefix}authfail:{address}:{minute}"


def _redis_module() -> Any:
    try:
        import redis
    except ImportError:
        raise ConfigError("relay.yaml", "cluster.store.kind",
                          "redis needs the 'cluster' extra: pip install 'edgevoice[cluster]'") \
            from None
    return redis


class RedisTokens:
    """Device token digests in Redis; verified against a local copy (DeviceTokens).

    The relay refreshes the copy from its state task (:meth:`refresh`); the token
    CLI, which has no event loop, writes with a short-lived synchronous client.
    """

    def __init__(self, url: str, key_prefix: str) -> None:
        self.url = url
        self.keys = _Keys(key_prefix)
        self._digests: dict[str, str] = {}
        self._version: str | None = None
        self._dummy = hash_token(new_token("x"))
        self.loaded = False

    # relay side ---------------------------------------------------------
    def verify(self, token: str) -> str | None:
        parts = split_token(token)
        device_id = parts[0] if parts else ""
        expected = self._digests.get(device_id, self._dummy)
        # compare even for an unknown device, so timing says nothing about ids
        ok = digest_matches(token, expected)
        return device_id if ok and parts and device_id in self._digests else None

    async def refresh(self, client: Redis) -> None:
        version = cast("str | None", await client.get(self.keys.tokens_version))
        await self.refresh_at(client, version)

    async def refresh_at(self, client: Redis, version: str | None) -> None:
        """Re-read the tokens unless ``version`` (the counter just read) is the one held."""
        if self.loaded and version == self._version:
            return
        raw = cast("dict[str, str]", await client.hgetall(self.keys.tokens))
        self._digests = _digests(raw)
        self._version = version
        logger.info("loaded %d device tokens from the shared store", len(self._digests))
        self.loaded = True

    async def seed_from_file(self, client: Redis, path: str | Path) -> int:
        """Copy the token file's devices that the store lacks (moving to a fleet)."""
        try:
            text = await asyncio.to_thread(Path(path).read_text, encoding="utf-8")
            data = json.loads(text)
            devices = data["devices"]
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(str(path), "devices", f"unreadable token file: {exc}") from None
        added = 0
        for device_id, entry in devices.items():
            if await client.hsetnx(self.keys.tokens, str(device_id), json.dumps(entry)):
                added += 1
        if added:
            version = await client.incr(self.keys.tokens_version)
            await client.publish(self.keys.tokens_changed, version)
            logger.info("copied %d device tokens from %s into the shared store", added, path)
        return added

    # CLI side ------------------------------------------------------------
    def _sync_client(self) -> Any:
        return _redis_module().Redis.from_url(self.url, decode_responses=True,
                                              socket_timeout=5)

    def devices(self) -> list[str]:
        if self.loaded:
            return sorted(self._digests)
        with self._store_errors(), self._sync_client() as client:
            return sorted(_digests(client.hgetall(self.keys.tokens)))

    def add(self, device_id: str, *, replace: bool = False) -> str:
        token = new_token(device_id)
        entry = json.dumps({
            "sha256": hash_token(token),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")})
        with self._store_errors(), self._sync_client() as client:
            if replace:
                client.hset(self.keys.tokens, device_id, entry)
            elif not client.hsetnx(self.keys.tokens, device_id, entry):
                raise TokenExistsError(
                    f"{device_id!r} already has a token; `edgevoice token add {device_id} "
                    "--replace` issues a new one (the device must then be given it)")
            self._changed(client)
        return token

    def remove(self, device_id: str) -> bool:
        with self._store_errors(), self._sync_client() as client:
            removed = client.hdel(self.keys.tokens, device_id)
            self._changed(client)
        return bool(removed)

    def _changed(self, client: Any) -> None:
        """Bump the version and tell the relays: they re-read at once, not at their next
        liveness renewal."""
        client.publish(self.keys.tokens_changed, client.incr(self.keys.tokens_version))

    @contextlib.contextmanager
    def _store_errors(self) -> Iterator[None]:
        redis = _redis_module()
        try:
            yield
        except redis.RedisError as exc:
            raise TokenStoreError(f"shared store {_safe_url(self.url)}: {exc}") from None


def _digests(raw: Mapping[str, str]) -> dict[str, str]:
    digests = {}
    for device_id, entry in raw.items():
        try:
            digests[str(device_id)] = str(json.loads(entry)["sha256"])
        except (ValueError, KeyError, TypeError):
            logger.warning("shared store: unreadable token entry for %s; ignored", device_id)
    return digests


#: Write a fleet record only if the device's current session is still ``session``:
#: a relay that notices a connection's end late must not mark a device that already
#: reconnected elsewhere as gone. KEYS: fleet, fleet:session. ARGV: device, session, record
_SET_IF_SESSION = """
local current = redis.call('HGET', KEYS[2], ARGV[1])
if current == false or current == ARGV[2] then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""


class SharedFleet(FleetTracker):
    """The fleet view of every relay: records written through to the store.

    ``records()`` (``/devices``) answers from the last read of the whole fleet,
    refreshed every ``refresh_ms`` while someone asks, overlaid with this relay's
    own devices, which are always current.
    """

    def __init__(self, state: RedisState) -> None:
        super().__init__()
        self.state = state
        self._shared: dict[str, DeviceRecord] = {}
        self._wanted_until = 0.0
        # Devices whose stats or token counts changed since the last batch: written
        # together, every refresh_ms, in one round trip (see _mark).
        self._dirty: set[str] = set()
        self._batch_armed = False
        #: store round trips that carried batched documents, and the documents
        self.batches_written = 0
        self.batched_documents = 0

    def _document(self, record: DeviceRecord) -> str:
        return json.dumps({**dataclasses.asdict(record), "relay": self.state.relay_id})

    def _mark(self, device_id: str) -> None:
        """Write this device's record with the next batch, not a round trip of its own.

        Stats arrive with every device's heartbeat: one store write each was a second
        wake-up of the relay per heartbeat (bench row 10). Other relays read the fleet
        every refresh_ms at most, so a batch per refresh_ms shows them the same; the
        newest record is written, whatever changed in between."""
        self._dirty.add(device_id)
        if not self._batch_armed:
            self._batch_armed = True
            asyncio.get_running_loop().call_later(self.state.settings.refresh_ms / 1000,
                                                  self._submit_batch)

    def _submit_batch(self) -> None:
        self._batch_armed = False
        if self._dirty:
            self.state.submit(self._write_batch)

    def submit_pending(self) -> None:
        """Queue the batch now (the relay is stopping): what changed is not lost."""
        self._submit_batch()

    async def _write_batch(self, client: Redis) -> None:
        devices, self._dirty = self._dirty, set()
        keys = self.state.keys
        pipe = client.pipeline(transaction=False)
        written = 0
        for device_id in sorted(devices):
            record = FleetTracker.record(self, device_id)  # as it is now
            if record is None:
                continue
            # only over this relay's own session: a device that moved on stays theirs
            pipe.eval(_SET_IF_SESSION, 2, keys.fleet, keys.fleet_session, device_id,
                      record.session_id or "", self._document(record))
            written += 1
        if not written:
            return
        try:
            await pipe.execute()
        except Exception:
            for device_id in devices:  # the store is away: the next batch retries them
                self._mark(device_id)
            raise
        self.batches_written += 1
        self.batched_documents += written

    def _write(self, device_id: str, *, force: bool) -> None:
        record = FleetTracker.record(self, device_id)  # this relay's own
        if record is None:
            return
        document = self._document(record)
        session = record.session_id or ""
        keys = self.state.keys

        async def write(client: Redis) -> None:
            if force:
                pipe = client.pipeline(transaction=True)
                pipe.hset(keys.fleet_session, device_id, session)
                pipe.hset(keys.fleet, device_id, document)
                await pipe.execute()
            else:
                await client.eval(_SET_IF_SESSION, 2, keys.fleet, keys.fleet_session,
                                  device_id, session, document)
        self.state.submit(write)

    def connected(self, device_id: str, *, session_id: str, address: str | None,
                  at: float) -> None:
        if FleetTracker.record(self, device_id) is None and device_id in self._shared:
            # first seen here: carry over what other relays counted (connections, tokens)
            self._records[device_id] = dataclasses.replace(self._shared[device_id],
                                                           connected=False)
        super().connected(device_id, session_id=session_id, address=address, at=at)
        self._write(device_id, force=True)

    def disconnected(self, device_id: str, *, session_id: str, at: float) -> None:
        super().disconnected(device_id, session_id=session_id, at=at)
        self._write(device_id, force=False)

    def stats_received(self, device_id: str, stats: Mapping[str, object], *, at: float) -> None:
        super().stats_received(device_id, stats, at=at)
        self._mark(device_id)

    def tokens_used(self, device_id: str, *, input_tokens: int, output_tokens: int,
                    upstream_audio_s: float = 0.0) -> None:
        super().tokens_used(device_id, input_tokens=input_tokens, output_tokens=output_tokens,
                            upstream_audio_s=upstream_audio_s)
        self._mark(device_id)

    @property
    def wanted(self) -> bool:
        return time.monotonic() < self._wanted_until

    def record(self, device_id: str) -> DeviceRecord | None:
        local = super().record(device_id)
        if local is not None and (local.connected or device_id not in self._shared):
            return local
        return self._shared.get(device_id, local)

    def records(self) -> list[DeviceRecord]:
        self._wanted_until = time.monotonic() + 60.0
        merged = dict(self._shared)
        for record in super().records():
            if record.connected or record.device_id not in merged:
                merged[record.device_id] = record
        return [merged[k] for k in sorted(merged)]

    async def refresh(self, client: Redis) -> None:
        raw = cast("dict[str, str]", await client.hgetall(self.state.keys.fleet))
        documents: dict[str, dict[str, Any]] = {}
        for device_id, text in raw.items():
            try:
                documents[device_id] = json.loads(text)
            except ValueError:
                continue
        relays = sorted({str(d.get("relay", "")) for d in documents.values()})
        alive: dict[str, bool] = {}
        if relays:
            pipe = client.pipeline(transaction=False)
            for relay_id in relays:
                pipe.exists(self.state.keys.relay(relay_id))
            alive = {r: bool(n) for r, n in zip(relays, await pipe.execute(), strict=True)}
        fields = {f.name for f in dataclasses.fields(DeviceRecord)}
        shared = {}
        for device_id, document in documents.items():
            relay_alive = alive.get(str(document.get("relay", "")), False)
            values = {k: v for k, v in document.items() if k in fields}
            try:
                record = DeviceRecord(**values)
            except TypeError:
                continue
            shared[device_id] = dataclasses.replace(
                record, connected=bool(record.connected and relay_alive))
        self._shared = shared


class SharedFailureLimiter(FailureLimiter):
    """Bad tokens per address counted over the whole fleet (sliding minute, approximated
    from the current and the previous minute's counters).

    Each relay blocks an address from its own count at once, and from the fleet's
    count as soon as it records one more failure from it: the fleet as a whole lets
    through at most ``max_per_minute`` plus one per relay.
    """

    def __init__(self, max_per_minute: int, state: RedisState,
                 max_addresses: int = 10_000) -> None:
        super().__init__(max_per_minute, max_addresses)
        self.state = state
        #: address -> monotonic time until which the fleet count blocks it
        self._fleet_blocked: collections.OrderedDict[str, float] = collections.OrderedDict()

    def blocked(self, address: str, now: float) -> bool:
        until = self._fleet_blocked.get(address)
        if until is not None and now >= until:
            del self._fleet_blocked[address]
            until = None
        return until is not None or super().blocked(address, now)

    def record_failure(self, address: str, now: float) -> None:
        super().record_failure(address, now)
        keys, limit = self.state.keys, self.max_per_minute
        wall = time.time()
        minute, into = divmod(wall, 60.0)

        async def count(client: Redis) -> None:
            pipe = client.pipeline(transaction=True)
            pipe.incr(keys.failures(address, int(minute)))
            pipe.expire(keys.failures(address, int(minute)), 130)
            pipe.get(keys.failures(address, int(minute) - 1))
            current, _, previous = await pipe.execute()
            total = int(current) + int(previous or 0) * (1.0 - into / 60.0)
            if total >= limit:
                self._fleet_blocked[address] = now + 60.0
                self._fleet_blocked.move_to_end(address)
                while len(self._fleet_blocked) > self.max_addresses:
                    self._fleet_blocked.popitem(last=False)
                logger.info("%s: %d bad tokens in a minute across the fleet; refusing it",
                            address, int(total))
        self.state.submit(count)


class RedisHistory:
    """Each device's final transcript lines in a capped Redis list (ConversationStore)."""

    def __init__(self, state: RedisState, max_lines: int, ttl_s: int) -> None:
        self.state = state
        self.max_lines = max_lines
        self.ttl_s = ttl_s

    async def load(self, device_id: str) -> tuple[HistoryLine, ...]:
        client = self.state.client
        raw = await client.lrange(self.state.keys.history(device_id), -self.max_lines, -1)
        lines = []
        for text in raw:
            try:
                item = json.loads(text)
                if item["role"] in ("user", "assistant"):
                    lines.append(HistoryLine(item["role"], str(item["text"])))
            except (ValueError, KeyError, TypeError):
                continue
        return tuple(lines)

    def append(self, device_id: str, line: HistoryLine) -> None:
        key = self.state.keys.history(device_id)
        document = json.dumps({"role": line.role, "text": line.text})

        async def write(client: Redis) -> None:
            pipe = client.pipeline(transaction=True)
            pipe.rpush(key, document)
            pipe.ltrim(key, -self.max_lines, -1)
            pipe.expire(key, self.ttl_s)
            await pipe.execute()
        self.state.submit(write)


def default_relay_id(port: int) -> str:
    return f"{socket.gethostname()}:{port}"


#: Renew this relay's liveness key and read the tokens' version in one command (one
#: round trip, one wake-up). KEYS: relay, tokens:version. ARGV: value, ttl ms
_RENEW_AND_VERSION = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('GET', KEYS[2])
"""


def liveness_ttl_ms(refresh_ms: int) -> int:
    """How long a relay's liveness key outlives its last renewal."""
    return max(3 * refresh_ms, 2000)


class RefreshSchedule:
    """When a relay's refresher has work, without I/O (takes ``now``, in seconds).

    An idle relay in a fleet used to wake every ``refresh_ms`` for two round trips
    (renew its key, read the tokens' version): 15 wake-ups a second at the 200 ms the
    tests use, a third of a per-cent of a core before any device spoke (bench row 9).
    Now: the liveness key is renewed every third of its time to live (the tokens'
    version read in the same command), and the fleet view is re-read every
    ``refresh_ms`` only while someone asks for it.
    """

    __slots__ = ("_fleet_at", "_renew_at", "fleet_every_s", "renew_every_s")

    def __init__(self, refresh_ms: int, now: float) -> None:
        self.renew_every_s = liveness_ttl_ms(refresh_ms) / 3000
        self.fleet_every_s = refresh_ms / 1000
        self._renew_at = now
        self._fleet_at = now

    def poll(self, now: float, fleet_wanted: bool) -> tuple[bool, bool]:
        """(renew the liveness key, re-read the fleet view) at ``now``."""
        renew = now >= self._renew_at
        if renew:
            self._renew_at = now + self.renew_every_s
        fleet = fleet_wanted and now >= self._fleet_at
        if fleet:
            self._fleet_at = now + self.fleet_every_s
        return renew, fleet

    def wake_at(self, fleet_wanted: bool) -> float:
        """When :meth:`poll` next has something to do."""
        return min(self._renew_at, self._fleet_at) if fleet_wanted else self._renew_at


class RedisState:
    """One relay's connection to the shared store: its tables, writer and refresher."""

    def __init__(self, settings: SharedStoreSettings, relay_id: str,
                 max_failures_per_minute: int) -> None:
        self.settings = settings
        self.relay_id = relay_id
        self.keys = _Keys(settings.key_prefix)
        redis = _redis_module()
        self.client: Redis = redis.asyncio.Redis.from_url(
            settings.url, decode_responses=True, socket_timeout=2.0,
            socket_connect_timeout=2.0, health_check_interval=30)
        #: the token notices' subscription: a read that waits for the next notice,
        #: however long (no socket timeout; the liveness renewal finds a dead store)
        self._notices: Redis = redis.asyncio.Redis.from_url(
            settings.url, decode_responses=True, socket_timeout=None,
            socket_connect_timeout=2.0)
        self.tokens = RedisTokens(settings.url, settings.key_prefix)
        self.fleet = SharedFleet(self)
        self.limiter = SharedFailureLimiter(max_failures_per_minute, self)
        self.history = RedisHistory(self, settings.history_max_lines, settings.history_ttl_s)
        self._writes: collections.deque[Write] = collections.deque()
        self._write_ready = asyncio.Event()
        self.writes_dropped = 0
        self.errors = 0
        self.reachable = False
        self._tasks: list[asyncio.Task[None]] = []

    def submit(self, write: Write) -> None:
        """Queue a write for the writer task; the oldest is dropped when full (counted)."""
        if len(self._writes) >= self.settings.write_queue:
            self._writes.popleft()
            self.writes_dropped += 1
        self._writes.append(write)
        self._write_ready.set()

    async def start(self, tokens_file: str | None = None) -> None:
        """Read the tokens once (seeding them from ``tokens_file``), then keep refreshing.

        An unreachable store is logged, not fatal: the relay starts, refuses devices
        until it has read the tokens, and keeps trying.
        """
        try:
            if tokens_file is not None:
                await self.tokens.seed_from_file(self.client, tokens_file)
            await self._refresh()
        except ConfigError:
            raise
        except Exception as exc:
            self._failed("start", exc)
        self._tasks = [asyncio.create_task(self._refresher(), name="shared-refresh"),
                       asyncio.create_task(self._token_notices(), name="shared-tokens"),
                       asyncio.create_task(self._writer(), name="shared-writer")]

    async def aclose(self) -> None:
        """Stop the tasks, flush queued writes (for a second at most), close the connection."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.fleet.submit_pending()
        # a store that is gone loses the rest; the relay key's TTL ends this relay there
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                while self._writes:
                    await self._writes.popleft()(self.client)
                await self.client.delete(self.keys.relay(self.relay_id))
        await self.client.aclose()
        await self._notices.aclose()

    def _failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        if self.reachable or self.errors == 1:
            logger.error("shared store %s unreachable (%s: %s); relays keep serving with what "
                         "they have", _safe_url(self.settings.url), what,
                         exc or type(exc).__name__)
        self.reachable = False

    def _ok(self) -> None:
        if not self.reachable:
            logger.info("shared store %s reachable", _safe_url(self.settings.url))
        self.reachable = True

    async def _refresh(self, *, renew: bool = True, fleet: bool = True) -> None:
        if renew:
            version = await self.client.eval(
                _RENEW_AND_VERSION, 2, self.keys.relay(self.relay_id), self.keys.tokens_version,
                str(time.time()), liveness_ttl_ms(self.settings.refresh_ms))
            await self.tokens.refresh_at(self.client, cast("str | None", version))
        if fleet and self.fleet.wanted:
            await self.fleet.refresh(self.client)
        self._ok()

    async def _refresher(self) -> None:
        loop = asyncio.get_running_loop()
        schedule = RefreshSchedule(self.settings.refresh_ms, loop.time())
        schedule.poll(loop.time(), self.fleet.wanted)  # start() has just done both
        while True:
            await asyncio.sleep(max(0.0, schedule.wake_at(self.fleet.wanted) - loop.time()))
            renew, fleet = schedule.poll(loop.time(), self.fleet.wanted)
            if not (renew or fleet):
                continue
            try:
                await self._refresh(renew=renew, fleet=fleet)
            except Exception as exc:
                self._failed("refresh", exc)

    async def _token_notices(self) -> None:
        """Re-read the tokens when a writer announces a change; after (re)subscribing,
        once, for what was announced while the subscription was down."""
        while True:
            pubsub = self._notices.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.keys.tokens_changed)
                await self.tokens.refresh(self.client)
                async for _notice in pubsub.listen():
                    await self.tokens.refresh(self.client)
            except Exception as exc:
                self._failed("token notices", exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(self.settings.refresh_ms / 1000)

    async def _writer(self) -> None:
        while True:
            await self._write_ready.wait()
            self._write_ready.clear()
            while self._writes:
                write = self._writes[0]
                try:
                    await write(self.client)
                except Exception as exc:
                    self._failed("write", exc)
                    if len(self._writes) > 0 and self._writes[0] is write:
                        self._writes.popleft()
                        self.writes_dropped += 1
                    await asyncio.sleep(self.settings.refresh_ms / 1000)
                    continue
                if self._writes and self._writes[0] is write:
                    self._writes.popleft()


def _safe_url(url: str) -> str:
    """The URL without a password."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def token_store_for(tokens_file: str, store: SharedStoreSettings) -> DeviceTokens:
    """The tokens a relay with this config uses: the file, or the shared store."""
    if store.kind == "redis":
        return RedisTokens(store.url, store.key_prefix)
    from edgevoice.relay.auth import TokenStore
    return TokenStore(tokens_file)
