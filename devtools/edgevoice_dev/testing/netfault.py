"""Network faults for reliability tests: a fault-injecting TCP proxy and network namespaces.

Two tools, for two kinds of test:

* :class:`FaultProxy` — an asyncio TCP proxy on 127.0.0.1 between a device and a
  relay. It adds a fixed delay each way (this kernel has no ``netem``), cuts every
  connection at once (both ends see a reset, as after a NAT rebinding or a relay
  crash), refuses new connections for a while (an outage), or stops forwarding
  without closing anything (a dead route: TCP keeps the connections, the bytes
  arrive late or never). No root needed.
* :class:`NetnsPair` — two network namespaces joined by a veth pair, with
  ``10.200.N.1`` (relay side) and ``10.200.N.2`` (device side). The link can be
  taken down and up, and ``nft`` rules with ``numgen random`` drop a share of the
  packets each way. Code runs inside a namespace either as a subprocess
  (``ip netns exec``) or in a thread of this process (:func:`run_in_netns`, which
  switches only that thread with ``setns(2)``). Needs root.

Everything stays on loopback or inside namespaces this module creates; nothing
here touches the host's own interfaces or firewall.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

_CHUNK_BYTES = 65536
CLONE_NEWNET = 0x40000000


# ----------------------------------------------------------------- the proxy


@dataclass
class ProxyStats:
    """What went through the proxy."""

    connections: int = 0
    refused: int = 0
    cuts: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass(eq=False)
class _Pair:
    """One proxied connection: the device side and the relay side."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.server):
            transport = writer.transport
            with contextlib.suppress(Exception):
                transport.abort()  # RST, not FIN: the peer learns at once
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """A TCP proxy from ``listen_host:port`` to ``target_host:target_port`` with faults.

    ``delay_s`` is added to every byte in each direction (order kept). Faults:
    :meth:`cut` (reset every connection), :meth:`outage` (cut, then refuse new
    connections for a while, or with ``mode="blackhole"`` hold every byte without
    closing anything for a while and then deliver it late).
    """

    def __init__(self, target_host: str, target_port: int, *, delay_s: float = 0.0,
                 listen_host: str = "127.0.0.1", listen_port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.delay_s = delay_s
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.stats = ProxyStats()
        self._server: asyncio.Server | None = None
        self._pairs: set[_Pair] = set()
        self._refusing = False
        self._flowing = asyncio.Event()
        self._flowing.set()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the proxy first"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"ws://{self.listen_host}:{self.port}/"

    @property
    def connections(self) -> int:
        return len(self._pairs)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.listen_host,
                                                  self.listen_port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self.cut()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ faults

    def cut(self) -> int:
        """Reset every live connection; return how many."""
        pairs = list(self._pairs)
        for pair in pairs:
            pair.abort()
        self._pairs.clear()
        if pairs:
            self.stats.cuts += 1
        return len(pairs)

    def refuse(self, refusing: bool) -> None:
        """While refusing, new connections are reset as soon as they are accepted."""
        self._refusing = refusing

    def hold(self, holding: bool) -> None:
        """While holding, nothing is forwarded either way and nothing is closed."""
        if holding:
            self._flowing.clear()
        else:
            self._flowing.set()

    async def outage(self, seconds: float,
                     mode: Literal["refuse", "blackhole"] = "refuse",
                     stall_s: float = 0.0) -> None:
        """Take the path down for ``seconds``, then bring it back.

        With ``stall_s`` (refuse mode), forwarding stops that long before the cut, so
        whatever was sent meanwhile is lost with the connections, as on a real link.
        """
        if mode == "refuse":
            if stall_s > 0:
                self.hold(True)
                try:
                    await asyncio.sleep(stall_s)
                finally:
                    self.refuse(True)
                    self.cut()
                    self.hold(False)
            self.refuse(True)
            self.cut()
            try:
                await asyncio.sleep(seconds)
            finally:
                self.refuse(False)
        else:
            self.hold(True)
            try:
                await asyncio.sleep(seconds)
            finally:
                self.hold(False)

    # ---------------------------------------------------------------- plumbing

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            self.stats.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host,
                                                                 self.target_port)
        except OSError:
            self.stats.refused += 1
            writer.transport.abort()
            return
        if self._refusing:  # the outage began while we were connecting
            self.stats.refused += 1
            up_writer.transport.abort()
            writer.transport.abort()
            return
        self.stats.connections += 1
        pair = _Pair(writer, up_writer)
        self._pairs.add(pair)
        pair.tasks = [asyncio.create_task(self._pipe(reader, up_writer, pair, up=True)),
                      asyncio.create_task(self._pipe(up_reader, writer, pair, up=False))]
        try:
            await asyncio.gather(*pair.tasks, return_exceptions=True)
        except asyncio.CancelledError:
            # the proxy is closing; asyncio's stream server would report a cancelled
            # handler as an error, so end quietly instead
            pair.abort()
        self._pairs.discard(pair)
        for side in (writer, up_writer):
            with contextlib.suppress(Exception):
                side.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    pair: _Pair, *, up: bool) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._flowing.wait()
                if not data:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return
                try:
                    writer.write(data)
                    await writer.drain()
                except (ConnectionError, OSError):
                    pair.abort()
                    return

        sender = asyncio.create_task(deliver())
        try:
            while True:
                data = await reader.read(_CHUNK_BYTES)
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
                queue.put_nowait((loop.time() + self.delay_s, data))
                if not data:
                    break
            await sender
        except (ConnectionError, OSError):
            pair.abort()
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender


# ------------------------------------------------------------ network namespaces

_counter = itertools.count(1)


def have_netns() -> bool:
    """Whether this process may create network namespaces, veths and nft tables."""
    return (os.geteuid() == 0 and shutil.which("ip") is not None
            and shutil.which("nft") is not None)


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


class NetnsPair:
    """Two namespaces joined by a veth: ``relay_ns`` (``relay_ip``) and ``device_ns``.

    Addresses are ``10.200.N.1`` and ``10.200.N.2``, N distinct per pair in this
    process (and the namespaces' names carry the pid), so parallel tests do not
    collide. Use as a context manager; ``close()`` deletes both namespaces (and
    with them the veth and any nft rules).
    """

    def __init__(self, subnet: int | None = None) -> None:
        n = subnet if subnet is not None else (os.getpid() % 200 + next(_counter)) % 250 + 1
        tag = f"{os.getpid()}-{n}"
        self.relay_ns = f"ev-relay-{tag}"
        self.device_ns = f"ev-dev-{tag}"
        self.relay_if = f"evr{n}-{os.getpid() % 10000}"[:15]
        self.device_if = f"evd{n}-{os.getpid() % 10000}"[:15]
        self.relay_ip = f"10.200.{n}.1"
        self.device_ip = f"10.200.{n}.2"
        self._created = False

    def __enter__(self) -> NetnsPair:
        self.create()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def create(self) -> None:
        if not have_netns():
            raise RuntimeError("network namespaces need root, iproute2 and nftables")
        _run("ip", "netns", "add", self.relay_ns)
        self._created = True
        _run("ip", "netns", "add", self.device_ns)
        # Create the veth inside the relay namespace, then move one end: the host's
        # own namespace never holds either end.
        self.ns(self.relay_ns, "ip", "link", "add", self.relay_if, "type", "veth",
                "peer", "name", self.device_if)
        self.ns(self.relay_ns, "ip", "link", "set", self.device_if, "netns", self.device_ns)
        for ns, ifname, ip in ((self.relay_ns, self.relay_if, self.relay_ip),
                               (self.device_ns, self.device_if, self.device_ip)):
            self.ns(ns, "ip", "addr", "add", f"{ip}/24", "dev", ifname)
            self.ns(ns, "ip", "link", "set", ifname, "up")
            self.ns(ns, "ip", "link", "set", "lo", "up")

    def close(self) -> None:
        if not self._created:
            return
        for ns in (self.device_ns, self.relay_ns):
            _run("ip", "netns", "del", ns, check=False)
        self._created = False

    def ns(self, namespace: str, *args: str,
           check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command inside ``namespace``."""
        return _run("ip", "netns", "exec", namespace, *args, check=check)

    # ------------------------------------------------------------------ faults

    def link(self, up: bool) -> None:
        """Take the device's end of the veth down (both directions dead) or up."""
        self.ns(self.device_ns, "ip", "link", "set", self.device_if, "up" if up else "down")

    def set_loss(self, percent: int) -> None:
        """Drop ``percent`` % of packets each way at the device's end (0: none)."""
        if not 0 <= percent <= 100:
            raise ValueError("loss is a percentage")
        self.ns(self.device_ns, "nft", "delete", "table", "inet", "evfault", check=False)
        if percent == 0:
            return
        rules = (
            "table inet evfault {\n"
            " chain in { type filter hook input priority 0; policy accept;\n"
            f"  iifname \"{self.device_if}\" numgen random mod 100 < {percent} counter drop\n"
            " }\n"
            " chain out { type filter hook output priority 0; policy accept;\n"
            f"  oifname \"{self.device_if}\" numgen random mod 100 < {percent} counter drop\n"
            " }\n"
            "}\n")
        proc = subprocess.run(["ip", "netns", "exec", self.device_ns, "nft", "-f", "-"],
                              input=rules, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"nft failed: {proc.stderr.strip()}")

    def dropped_packets(self) -> int:
        """Packets the loss rules dropped so far (both directions)."""
        out = self.ns(self.device_ns, "nft", "list", "table", "inet", "evfault",
                      check=False).stdout
        total = 0
        for line in out.splitlines():
            words = line.split()
            if "counter" in words and "packets" in words:
                total += int(words[words.index("packets") + 1])
        return total


def _setns(namespace: str) -> None:
    """Move the calling thread (only) into the named network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({namespace}): {os.strerror(errno)}")
    finally:
        os.close(fd)


class NetnsLoop:
    """An asyncio event loop in its own thread, inside a network namespace.

    Sockets are bound to the namespace of the thread that creates them, so
    everything this loop connects or listens on lives in ``namespace``.
    """

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"netns:{namespace}",
                                        daemon=True)

    def __enter__(self) -> NetnsLoop:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *_: object) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)

    def _main(self) -> None:
        try:
            _setns(self.namespace)
            self.loop = asyncio.new_event_loop()
        except BaseException as exc:  # reported to the caller of __enter__
            self._error = exc
            self._ready.set()
            return
        asyncio.set_event_loop(self.loop)
        self._ready.set()
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()

    def submit(self, factory: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        """Run ``factory()`` in the namespace's loop; an asyncio future of the caller's loop."""
        assert self.loop is not None

        async def wrapper() -> T:
            return await factory()

        concurrent = asyncio.run_coroutine_threadsafe(wrapper(), self.loop)
        return asyncio.wrap_future(concurrent)

    def run(self, factory: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
        """Run ``factory()`` in the namespace's loop and wait (blocking) for its result."""
        assert self.loop is not None

        async def wrapper() -> T:
            return await factory()

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout)

    def call(self, function: Callable[[], T], timeout: float = 10.0) -> T:
        """Run a plain function in the namespace's loop thread and wait for its result."""
        assert self.loop is not None

        async def wrapper() -> T:
            return function()

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout)


__all__ = ["FaultProxy", "NetnsLoop", "NetnsPair", "ProxyStats", "have_netns"]
