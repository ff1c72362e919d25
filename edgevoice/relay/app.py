"""Runs the relay process: config → token store → upstream → server, until SIGTERM.

Around the server: sd_notify (READY once listening, STATUS with the number of
devices, WATCHDOG while the event loop turns, STOPPING) and the admin endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
from collections.abc import Mapping
from typing import Any

from edgevoice.config.relay import RelayConfig
from edgevoice.health.http import load_token
from edgevoice.health.relay import FleetTracker, relay_admin_api
from edgevoice.relay.announce import Announcer, announce_routes
from edgevoice.relay.auth import TokenStore
from edgevoice.relay.devicecalls import DeviceCallError, DeviceCalls
from edgevoice.relay.health_source import RelayHealth
from edgevoice.relay.server import RelayServer
from edgevoice.relay.shared import HistoryKeepingUpstream, RedisState, default_relay_id
from edgevoice.service.notify import LoopLagProbe, SystemdNotifier
from edgevoice.upstream.base import DeviceContext, Upstream
from edgevoice.upstream.echo import EchoUpstream
from edgevoice.web.gate import BrowserGate, ticket_routes

logger = logging.getLogger(__name__)


def build_upstream(config: RelayConfig) -> Upstream:
    """The upstream named in the config.

    Nova Sonic needs the ``nova`` extra (Python >= 3.12); without it the relay stops
    with an UpstreamError that says what to install, before accepting any device.
    """
    if config.upstream.kind == "nova":
        from edgevoice.nova.upstream import NovaUpstream
        return NovaUpstream(config.upstream.nova)
    return EchoUpstream(config.upstream.echo)


class DeviceContexts:
    """Builds each device session's DeviceContext from what the relay knows of it.

    The device-status tool reads the device's latest stats message through it.
    """

    def __init__(self) -> None:
        self.fleet: FleetTracker | None = None
        self.device_calls: DeviceCalls | None = None

    def status_of(self, device_id: str) -> Mapping[str, object]:
        # One lookup: this runs at every session open (records() sorts the whole fleet).
        record = self.fleet.record(device_id) if self.fleet else None
        return dict(record.last_stats or {}) if record is not None else {}

    def __call__(self, device_id: str, session_id: str) -> DeviceContext:
        timezone = str(self.status_of(device_id).get("timezone") or "UTC")
        calls = self.device_calls

        async def call_device(name: str, args: Mapping[str, Any], timeout_s: float
                              ) -> dict[str, Any]:
            if calls is None:
                raise DeviceCallError("this relay cannot reach its devices' functions")
            return await calls.call(device_id, name, args, timeout_s)

        return DeviceContext(device_id, session_id, timezone=timezone,
                             status=lambda: self.status_of(device_id),
                             call_device=call_device)


def build_server(config: RelayConfig, shared: RedisState | None = None) -> RelayServer:
    """The relay; with ``shared``, its tokens, fleet, history and limiter are the fleet's."""
    contexts = DeviceContexts()
    browser = BrowserGate(config.web, tls=config.listen.tls_cert_file is not None) \
        if config.web.enabled else None
    upstream = build_upstream(config)
    if shared is None:
        server = RelayServer(config.listen, config.limits, TokenStore(config.auth.tokens_file),
                             upstream,
                             max_failures_per_minute=config.auth.max_failures_per_minute,
                             max_failures_per_s=config.auth.max_failures_per_s,
                             context_factory=contexts, downlink_opus=config.downlink_opus,
                             browser=browser)
    else:
        history = HistoryKeepingUpstream(
            upstream, shared.history, config.cluster.store.history_load_timeout_ms / 1000)
        server = RelayServer(config.listen, config.limits, shared.tokens, history,
                             context_factory=contexts, downlink_opus=config.downlink_opus,
                             browser=browser, fleet=shared.fleet, limiter=shared.limiter)
    contexts.fleet = server.fleet
    contexts.device_calls = server.device_calls
    return server


def shared_state(config: RelayConfig) -> RedisState | None:
    """The connection to the fleet's shared store, when the config names one."""
    cluster = config.cluster
    if cluster.store.kind != "redis":
        return None
    relay_id = cluster.relay_id or default_relay_id(config.listen.port)
    return RedisState(cluster.store, relay_id, config.auth.max_failures_per_minute)


def ensure_fd_limit(needed: int) -> int:
    """Raise the soft open-files limit towards ``needed`` (up to the hard limit).

    The units set ``LimitNOFILE`` for the default limits; this covers a relay run by
    hand or configured for more devices. Returns the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < needed:
        logger.warning("open-files limit is %d, but limits.max_devices and "
                       "limits.max_pending_connections need about %d: raise LimitNOFILE "
                       "in the unit or lower those limits", soft, needed)
    return soft


async def run_relay(config: RelayConfig, config_file: str = "config") -> None:
    notifier = SystemdNotifier(settings=config.watchdog)
    admin_token = load_token(config.admin.token_file, key="admin.token_file") \
        if config.admin.token_file else None
    shared = shared_state(config)
    if shared is not None:
        await shared.start(tokens_file=config.auth.tokens_file)
    server = build_server(config, shared)
    browser_routes = ticket_routes(server.browser.store, config.web, config.listen,
                                   admin_token_set=admin_token is not None) \
        if server.browser is not None else None
    announcer = Announcer(config.announce, lambda device_id: server.sessions.get(device_id))
    admin = relay_admin_api(RelayHealth(server, announcer=announcer), config.admin,
                            admin_token, source_file=config_file,
                            extra_routes={**(browser_routes or {}),
                                          **announce_routes(announcer)})
    ensure_fd_limit(server.required_fds())
    # an accept() that fails for want of file descriptors is logged by asyncio with a
    # traceback per attempt: keep one line a minute
    logging.getLogger("asyncio").addFilter(server.log_filter)
    await server.start()
    await admin.start()
    logger.debug("admin endpoint on %s:%d", config.admin.bind, admin.port)
    advertiser = None
    if config.discovery.advertise:  # devices with relay.url: auto find it (mDNS)
        from edgevoice.discovery.mdns import RelayAdvertiser
        advertiser = RelayAdvertiser(config.discovery, listen_host=config.listen.host,
                                     port=server.port,
                                     tls=config.listen.tls_cert_file is not None)
        await advertiser.start()
    stop = asyncio.Event()
    drain = asyncio.Event()  # SIGTERM drains (restarts, upgrades); SIGINT just stops
    loop = asyncio.get_running_loop()

    def drain_and_stop() -> None:
        drain.set()
        stop.set()
    loop.add_signal_handler(signal.SIGTERM, drain_and_stop)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    probe = LoopLagProbe()
    probe.start()
    watchdog = notifier.watchdog_task(probe)
    notifier.ready(f"listening on {config.listen.host}:{server.port}")
    try:
        while not stop.is_set():
            count = len(server.sessions)
            store = "" if shared is None or shared.reachable else \
                f"; shared store unreachable, {shared.writes_dropped} writes dropped"
            notifier.status(f"{count} device{'' if count == 1 else 's'} connected "
                            f"({server.upstream.name} upstream{store})")
            server.keep_heap()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 5.0)
        if drain.is_set():
            timeout_s = config.cluster.drain_timeout_ms / 1000
            notifier.stopping(f"draining: finishing replies (at most {timeout_s:.0f} s)")
            idle, busy = await server.drain(timeout_s)
            logger.info("drained: %d devices sent elsewhere after their reply, %d cut "
                        "short", idle, busy)
        logger.info("stopping: telling devices we are going away")
    finally:
        notifier.stopping("stopping: closing device connections")
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        probe.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        if advertiser is not None:
            await advertiser.stop()
        await admin.stop()
        await announcer.close()
        await server.close()
        if shared is not None:
            await shared.aclose()
        notifier.close()
