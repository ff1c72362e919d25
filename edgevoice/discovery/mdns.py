"""Finding the relay on the LAN: mDNS / DNS-SD with python-zeroconf (the ``discovery`` extra).

The relay advertises ``<name>._edgevoice._tcp.local.`` (:class:`RelayAdvertiser`) with
its port and a TXT record: ``tls`` (``1``: wss), ``path``, ``proto`` (the WebSocket
subprotocol) and ``version``. A device whose ``relay.url`` is ``auto`` browses for it
(:func:`browse`) and connects to the URL :func:`relay_url` builds: ``wss://`` to the
advertised *host name* when the relay speaks TLS (so the certificate is verified
against a name, as with a typed URL), ``ws://`` to its address otherwise. Tokens and
TLS verification are exactly as with a typed URL; what discovery cannot give is
authenticity: anyone on the LAN can advertise. Over ``wss://`` an impostor still
cannot present a valid certificate; over plain ``ws://`` the device would hand its
token to whoever answers first, so a device only accepts a plain relay when
``discovery.allow_plain`` says so (docs/home-assistant.md, "Finding the relay").

:func:`choose` (which relay, given a preferred name) and :func:`relay_url` are pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgevoice import __version__
from edgevoice.config.base import require
from edgevoice.protocol.messages import SUBPROTOCOL

if TYPE_CHECKING:
    from zeroconf.asyncio import AsyncZeroconf

logger = logging.getLogger(__name__)

SERVICE_TYPE = "_edgevoice._tcp.local."


class DiscoveryUnavailableError(RuntimeError):
    """python-zeroconf is not installed: ``pip install 'edgevoice[discovery]'``."""


def _zeroconf() -> Any:
    try:
        import zeroconf
        import zeroconf.asyncio
    except ImportError:
        raise DiscoveryUnavailableError(
            "mDNS discovery needs python-zeroconf: pip install 'edgevoice[discovery]'"
        ) from None
    return zeroconf


@dataclass(frozen=True)
class RelayDiscoverySettings:
    """Advertise the relay on the LAN with mDNS/DNS-SD (devices with relay.url: auto)."""

    advertise: bool = False
    """Advertise _edgevoice._tcp on the LAN (needs the 'discovery' extra)."""
    instance_name: str = ""
    """The name devices see (and may prefer); empty: this machine's host name."""
    host_name: str = ""
    """Host name advertised for TLS (must be a name in the certificate, ending in
    .local unless the devices resolve it otherwise); empty: <hostname>.local."""
    addresses: tuple[str, ...] = ()
    """IPv4 addresses to advertise; empty: listen.host if it is one, else every
    address of this machine."""

    def __post_init__(self) -> None:
        for i, address in enumerate(self.addresses):
            try:
                ipaddress.IPv4Address(address)
            except ValueError:
                require(False, f"addresses[{i}]", f"{address!r} is not an IPv4 address")
        require(len(self.instance_name) <= 63, "instance_name", "at most 63 characters")


@dataclass(frozen=True)
class DeviceDiscoverySettings:
    """How a device with relay.url: auto finds its relay (mDNS/DNS-SD)."""

    prefer: str = ""
    """Instance name of the relay to use when several answer; empty: the first found."""
    browse_ms: int = 3_000
    """How long to listen for relays each try."""
    allow_plain: bool = False
    """Accept a relay advertised without TLS (ws://). Anyone on the LAN can advertise:
    over plain ws:// the token would go to whoever answers. Only on a trusted LAN."""

    def __post_init__(self) -> None:
        require(200 <= self.browse_ms <= 60_000, "browse_ms", "must be 200..60000")


@dataclass(frozen=True)
class FoundRelay:
    """One relay that answered a browse."""

    name: str
    host: str
    addresses: tuple[str, ...]
    port: int
    tls: bool
    path: str = "/"
    version: str = ""


def relay_url(found: FoundRelay) -> str:
    """The URL to connect to ``found`` (TLS: by host name, so the name is verified)."""
    path = found.path if found.path.startswith("/") else "/" + found.path
    if found.tls:
        return f"wss://{found.host.rstrip('.')}:{found.port}{path}"
    return f"ws://{found.addresses[0]}:{found.port}{path}"


def choose(found: list[FoundRelay], settings: DeviceDiscoverySettings) -> FoundRelay | None:
    """The relay to use: the preferred one, else the first usable one (pure)."""
    usable = [f for f in found if (f.tls or settings.allow_plain) and f.addresses]
    if settings.prefer:
        usable = [f for f in usable if f.name.casefold() == settings.prefer.casefold()]
    return usable[0] if usable else None


def _addresses(settings: RelayDiscoverySettings, listen_host: str) -> list[str]:
    if settings.addresses:
        return list(settings.addresses)
    try:
        if listen_host and not ipaddress.ip_address(listen_host).is_unspecified:
            return [listen_host]
    except ValueError:
        pass
    zc = _zeroconf()
    return [a for a in zc.get_all_addresses() if not ipaddress.ip_address(a).is_loopback] \
        or ["127.0.0.1"]


class RelayAdvertiser:
    """Registers the relay's service while it runs."""

    def __init__(self, settings: RelayDiscoverySettings, *, listen_host: str, port: int,
                 tls: bool, interfaces: list[str] | None = None) -> None:
        self.settings = settings
        self.listen_host = listen_host
        self.port = port
        self.tls = tls
        self.interfaces = interfaces
        self._zc: AsyncZeroconf | None = None
        self._info: Any = None

    async def start(self) -> None:
        zc = _zeroconf()
        hostname = socket.gethostname().split(".")[0]
        name = self.settings.instance_name or hostname
        host = self.settings.host_name or f"{hostname}.local."
        if not host.endswith("."):
            host += "."
        addresses = _addresses(self.settings, self.listen_host)
        self._info = zc.ServiceInfo(
            SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=self.port, server=host,
            addresses=[socket.inet_aton(a) for a in addresses],
            properties={"tls": "1" if self.tls else "0", "path": "/", "proto": SUBPROTOCOL,
                        "version": __version__})
        self._zc = zc.asyncio.AsyncZeroconf(
            interfaces=self.interfaces or addresses, ip_version=zc.IPVersion.V4Only)
        await self._zc.async_register_service(self._info)
        logger.info("advertising %s on %s port %d (mDNS)", name, ", ".join(addresses),
                    self.port)

    async def stop(self) -> None:
        zc, self._zc = self._zc, None
        if zc is None:
            return
        try:
            await zc.async_unregister_service(self._info)
        finally:
            await zc.async_close()


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value else ""


async def browse(timeout_s: float, interfaces: list[str] | None = None) -> list[FoundRelay]:
    """Every relay that answers within ``timeout_s``, in the order they answered."""
    zc = _zeroconf()
    names: list[str] = []
    seen = asyncio.Event()

    def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        if state_change is zc.ServiceStateChange.Added and name not in names:
            names.append(name)
            seen.set()

    azc = zc.asyncio.AsyncZeroconf(interfaces=interfaces or zc.InterfaceChoice.All,
                                   ip_version=zc.IPVersion.V4Only)
    browser = zc.asyncio.AsyncServiceBrowser(azc.zeroconf, SERVICE_TYPE,
                                             handlers=[on_change])
    found: list[FoundRelay] = []
    try:
        await asyncio.sleep(timeout_s)
        for name in names:
            info = zc.asyncio.AsyncServiceInfo(SERVICE_TYPE, name)
            if not await info.async_request(azc.zeroconf, 1500):
                continue
            props = info.properties or {}
            instance = name.removesuffix("." + SERVICE_TYPE)
            found.append(FoundRelay(
                name=instance, host=str(info.server or ""),
                addresses=tuple(info.parsed_addresses()), port=int(info.port or 0),
                tls=_text(props.get(b"tls")) == "1", path=_text(props.get(b"path")) or "/",
                version=_text(props.get(b"version"))))
    finally:
        await browser.async_cancel()
        await azc.async_close()
    return found


async def find_relay_url(settings: DeviceDiscoverySettings, stopped: asyncio.Event,
                         on_status: Callable[[str], None] | None = None,
                         max_wait_s: float = 30.0) -> str | None:
    """Browse until a usable relay answers; its URL (None: ``stopped`` was set).

    Retries with a growing pause (up to ``max_wait_s``) and says what it is doing
    through ``on_status`` (systemd STATUS=).
    """
    wait_s = 1.0
    while not stopped.is_set():
        found = await browse(settings.browse_ms / 1000)
        chosen = choose(found, settings)
        if chosen is not None:
            url = relay_url(chosen)
            logger.info("found relay %s at %s (mDNS)", chosen.name, url)
            return url
        skipped = [f.name for f in found]
        status = (f"looking for a relay on the LAN (mDNS): none usable of {skipped}"
                  if skipped else "looking for a relay on the LAN (mDNS): none found")
        if any(not f.tls for f in found) and not settings.allow_plain:
            status += " (plain ws:// relays need discovery.allow_plain)"
        logger.warning("%s; retrying in %.0f s", status, wait_s)
        if on_status is not None:
            on_status(f"{status}; retrying in {wait_s:.0f} s")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopped.wait(), wait_s)
        wait_s = min(max_wait_s, wait_s * 2)
    return None
