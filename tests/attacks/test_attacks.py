"""Issue 11's attacks, each against a live relay while a legitimate device has turns.

Every test asserts three things: the legitimate device keeps completing turns, the
relay stays within its bounds (sessions, connections, file descriptors, memory,
log lines), and the counters show what was refused. The fast variants use smaller
numbers; the ``slow`` ones the issue's. Attacks 8 (concurrent ``token add``) and 10
(the health endpoint) are tested with the token store and the health server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from attack_support import (
    masked_frame,
    open_device,
    open_fds,
    raise_fd_limit,
    raw_status,
    raw_upgrade,
    record,
    relay_and_device,
    rss_mib,
    scaled,
    wait_until,
)
from edgevoice_dev.testing.harness import run
from websockets.exceptions import ConnectionClosed

from edgevoice.audio.opus import OpusEncoder
from edgevoice.protocol.connection import Connection, Role
from edgevoice.protocol.messages import (
    Hello,
    Interrupt,
    ResumeRequest,
    TurnStart,
    Welcome,
    decode_message,
    encode_message,
)


class LogCount(logging.Handler):
    """Counts the records (and tracebacks) logged while attached to the root logger."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records = 0
        self.tracebacks = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.INFO:
            self.records += 1
            self.tracebacks += record.exc_info is not None


@contextlib.contextmanager
def counting_logs() -> Iterator[LogCount]:
    handler = LogCount()
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


def opus_packets(n: int) -> list[bytes]:
    encoder = OpusEncoder()
    return [encoder.encode(struct.pack("<320h", *(
        int(6000 * math.sin(2 * math.pi * 200 * (k * 320 + i) / 16000)) for i in range(320))))
        for k in range(n)]


def audio_frame(conn: Connection, payload: bytes) -> bytes:
    return conn.send_audio(payload, 0)[1]


# ----------------------------------------------------- 1. many sessions per device


def hellos_back_to_back(tmp_path: Path, speech: Path, hellos: int) -> None:
    async def scenario() -> None:
        async with relay_and_device(tmp_path, speech, shutdown_timeout_ms=3000) as (
                relay, legit):
            url = f"ws://127.0.0.1:{relay.port}/"
            token = relay.tokens.add("twin")
            results = await asyncio.gather(
                *(open_device(url, token, "twin") for _ in range(hellos)),
                return_exceptions=True)
            sockets = [ws for ws in results if not isinstance(ws, BaseException)]

            def pumps() -> int:
                return sum(1 for t in asyncio.all_tasks()
                           if t.get_name() == "upstream:twin" and not t.done())

            # every hello that got through has been applied, every replaced session ended
            await wait_until(lambda: relay.counters.sessions_total >= len(sockets) + 1
                             and pumps() == 1 and not relay._background, within_s=30)
            twins = [s for s in relay.table if s.device_id == "twin"]
            assert len(twins) == 1 and len(relay.table) == 2, (  # the twin and "good"
                [(s.device_id, s.lifecycle.state) for s in relay.table], relay.counters)
            assert len(sockets) >= hellos * 0.9
            assert relay.refusals.counts["session_replaced"] == relay.counters.sessions_total - 2
            # the fleet view shows a prefix of the session id, never the id itself
            shown = {r.device_id: r.session_id for r in relay.fleet.records()}
            assert shown["good"] == relay.table.get("good").session_id[:8]  # type: ignore[union-attr]
            await legit.completes_turns(1)
            # SIGTERM with hundreds of clients that neither read nor close
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await relay.close()
            stop_s = loop.time() - t0
            assert stop_s < 3.0 + scaled(3)
            record(f"hellos_{hellos}", {"hellos": hellos, "sessions_left": len(twins),
                                        "stop_s": round(stop_s, 2)})
            for ws in sockets:
                ws.transport.abort()
    run(scenario(), timeout=scaled(120))


def test_hellos_back_to_back_leave_one_session(tmp_path: Path, speech_wav: Path) -> None:
    hellos_back_to_back(tmp_path, speech_wav, 40)


@pytest.mark.slow
def test_two_hundred_hellos_leave_one_session(tmp_path: Path, speech_wav: Path) -> None:
    hellos_back_to_back(tmp_path, speech_wav, 200)


# ----------------------------------------------- 2. lockout of a shared address


def test_bad_tokens_never_lock_out_a_valid_one(tmp_path: Path, speech_wav: Path) -> None:
    async def scenario() -> None:
        async with relay_and_device(tmp_path, speech_wav) as (relay, legit):
            bad = [("Authorization", "Bearer good.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")]
            statuses = [await raw_status(relay.port, bad) for _ in range(30)]
            assert statuses.count(401) == 10 and statuses.count(429) == 20
            # the same address: a valid token still gets in
            other = relay.tokens.add("neighbour")
            assert await raw_status(relay.port, [("Authorization", f"Bearer {other}")]) == 101
            # and the real device, forced to reconnect from that address, is back at once
            link = legit.daemon.link
            before = link.stats.connects + link.stats.resumes
            session = relay.table.get("good")
            assert session is not None and session.ws is not None
            session.ws.transport.abort()
            await wait_until(lambda: link.stats.connects + link.stats.resumes > before)
            await legit.completes_turns(1)
            # rotating source addresses (all of 127.0.0.0/8 is loopback) does not
            # escape the relay-wide budget
            rotated = [await raw_status(relay.port, bad, source=f"127.0.{i // 250}.{i % 250 + 2}")
                       for i in range(120)]
            assert rotated.count(429) >= 40
            assert await raw_status(relay.port, [("Authorization", f"Bearer {other}")],
                                    source="127.0.0.77") == 101
            counts = relay.refusals.counts
            assert counts["auth_throttled"] >= 60 and relay.counters.auth_failures == 150
            record("shared_address", {"bad_tokens": 150, "throttled": counts["auth_throttled"],
                                      "valid_refused": 0})
    run(scenario(), timeout=scaled(120))


# ------------------------------------------------------- 3. ping flood, unread


def test_ping_flood_that_never_reads_is_dropped(tmp_path: Path, speech_wav: Path) -> None:
    async def scenario() -> None:
        async with relay_and_device(tmp_path, speech_wav) as (relay, legit):
            token = relay.tokens.add("flood")
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", relay.port))
            reader, writer = await asyncio.open_connection(sock=sock)
            from attack_support import upgrade_request
            writer.write(upgrade_request([("Authorization", f"Bearer {token}")]))
            await writer.drain()
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            # no hello; pings as fast as the socket takes them; never read again
            sent = 0
            with contextlib.suppress(ConnectionError, OSError):
                for _ in range(20_000):
                    writer.write(masked_frame(0x9, b"x" * 100))
                    sent += 1
                    if sent % 100 == 0:
                        await asyncio.wait_for(writer.drain(), scaled(5))
            await wait_until(lambda: relay.refusals.counts.get("ping_flood", 0) >= 1)
            await legit.completes_turns(1)
            assert relay.connections_open <= 2
            record("ping_flood", {"pings_sent": sent,
                                  "rtt_ms": legit.daemon.link.stats.rtt_ms,
                                  "refused": relay.refusals.counts.get("ping_flood")})
            writer.transport.abort()
    run(scenario(), timeout=scaled(90))


def test_a_peer_that_does_not_read_is_closed_at_its_buffer_bound(
        tmp_path: Path, speech_wav: Path) -> None:
    async def scenario() -> None:
        async with relay_and_device(tmp_path, speech_wav, max_pings_per_s=1_000_000,
                                    max_write_buffer_bytes=65_536) as (relay, legit):
            token = relay.tokens.add("deaf")
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", relay.port))
            reader, writer = await asyncio.open_connection(sock=sock)
            from attack_support import upgrade_request
            writer.write(upgrade_request([("Authorization", f"Bearer {token}")]))
            await writer.drain()
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            with contextlib.suppress(ConnectionError, OSError, TimeoutError):
                for i in range(200_000):
                    writer.write(masked_frame(0x9, b"y" * 120))
                    if i % 200 == 0:
                        await asyncio.wait_for(writer.drain(), scaled(5))
                        if relay.counters.slow_readers:
                            break
            await wait_until(lambda: relay.counters.slow_readers >= 1)
            assert relay.refusals.counts["slow_reader"] >= 1
            await legit.completes_turns(1)
            writer.transport.abort()
    run(scenario(), timeout=scaled(90))


# --------------------------------------------- 4. rate-limit bypass through resume


def test_resuming_again_and_again_earns_no_extra_messages(tmp_path: Path,
                                                          speech_wav: Path) -> None:
    async def scenario() -> None:
        async with relay_and_device(tmp_path, speech_wav) as (relay, legit):
            url = f"ws://127.0.0.1:{relay.port}/"
            token = relay.tokens.add("hog")
            ws = await open_device(url, token, "hog", hello=False)
            core = Connection(Role.DEVICE)
            await ws.send(core.start(Hello(device="hog")))
            welcome = core.receive_text(await ws.recv())
            assert isinstance(welcome, Welcome)
            session = relay.table.get("hog")
            assert session is not None
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            resumes = 0
            closed_by = None
            for _ in range(50):
                for _ in range(150):
                    await ws.send(core.send(Interrupt()))
                ws.transport.abort()  # a drop: the session is held
                ws = await open_device(url, token, "hog", hello=False)
                nxt = Connection(Role.DEVICE, messages_sent=core.messages_sent)
                try:
                    await ws.send(nxt.start(Hello(device="hog", resume=ResumeRequest(
                        welcome.session_id, None, 0))))
                    reply = decode_message(await ws.recv())
                except ConnectionClosed:
                    closed_by = ws.close_code
                    break
                if not isinstance(reply, Welcome) or not reply.resume.resumed:
                    break
                resumes += 1
                nxt.receive_text(encode_message(reply))
                core = nxt
            elapsed = loop.time() - t0
            accepted = session.conn.messages_received if session.conn else 0
            # the budget: a burst of 200, 200 a second, and the time actually away
            assert accepted <= 200 + 200 * elapsed + 60 * elapsed + 50
            assert relay.counters.rate_limited >= 1 and session.closed
            await legit.completes_turns(1)
            record("resume_bypass", {"resumes": resumes, "accepted": accepted,
                                     "elapsed_s": round(elapsed, 2),
                                     "accepted_per_s": round(accepted / elapsed),
                                     "closed_with": closed_by})
            ws.transport.abort()
    run(scenario(), timeout=scaled(120))


# ---------------------------------------------------------------- 5. slowloris


def slowloris(tmp_path: Path, speech: Path, sockets: int, cap: int) -> None:
    raise_fd_limit(4 * sockets + 1024)

    async def scenario() -> None:
        async with relay_and_device(tmp_path, speech, max_pending_connections=cap,
                                    shutdown_timeout_ms=2000) as (relay, legit):
            fds0, rss0 = open_fds(), rss_mib()
            with counting_logs() as logs:
                writers = []
                for _ in range(sockets):
                    with contextlib.suppress(OSError):
                        _, writer = await asyncio.open_connection("127.0.0.1", relay.port)
                        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
                        writers.append(writer)
                await asyncio.sleep(0.5)
                assert relay.connections_pending <= cap
                # a fresh device connects at once, between the slow ones
                token = relay.tokens.add("fresh")
                fresh = await open_device(f"ws://127.0.0.1:{relay.port}/", token, "fresh")
                assert isinstance(decode_message(await fresh.recv()), Welcome)
                await legit.completes_turns(1)
                fds, rss = open_fds(), rss_mib()
            # this process holds both ends: the attacker's sockets, and the relay's
            # (at most ``cap`` pending ones)
            assert fds - fds0 <= len(writers) + cap + 64
            assert relay.refusals.counts["pending_evicted"] >= len(writers) - cap
            assert logs.tracebacks == 0 and logs.records < 40
            # SIGTERM while the slow sockets hang on: bounded by shutdown_timeout_ms
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await relay.close()
            stop_s = loop.time() - t0
            assert stop_s < 2.0 + scaled(3)
            record(f"slowloris_{sockets}", {
                "sockets": len(writers), "pending_cap": cap,
                "evicted": relay.refusals.counts["pending_evicted"],
                "relay_side_fds": fds - fds0 - len(writers), "rss_growth_mib": round(rss - rss0, 1),
                "log_records": logs.records, "stop_s": round(stop_s, 2)})
            for writer in writers:
                writer.transport.abort()
            fresh.transport.abort()
    run(scenario(), timeout=scaled(180))


def test_slowloris_cannot_keep_a_device_out(tmp_path: Path, speech_wav: Path) -> None:
    slowloris(tmp_path, speech_wav, 300, 64)


@pytest.mark.slow
def test_slowloris_with_two_thousand_sockets(tmp_path: Path, speech_wav: Path) -> None:
    slowloris(tmp_path, speech_wav, 2000, 256)


# -------------------------------------------------------- 6. long Opus packets


def test_long_opus_packets_and_audio_floods_are_refused(tmp_path: Path,
                                                        speech_wav: Path) -> None:
    async def scenario() -> None:
        async with relay_and_device(tmp_path, speech_wav) as (relay, legit):
            url = f"ws://127.0.0.1:{relay.port}/"
            token = relay.tokens.add("fat")

            async def device() -> tuple[Connection, object]:
                ws = await open_device(url, token, "fat", hello=False)
                core = Connection(Role.DEVICE)
                await ws.send(core.start(Hello(device="fat")))
                core.receive_text(await ws.recv())
                await ws.send(core.send(TurnStart(1)))
                return core, ws

            # a 120 ms packet (two 60 ms SILK frames): a protocol error
            core, ws = await device()
            await ws.send(audio_frame(core, bytes([0x0B << 3 | 1]) + b"\x00" * 40))
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), scaled(10))
            assert ws.close_code == 1002
            # valid 20 ms packets, four times faster than real time: over the budget
            core, ws = await device()
            sent = 0
            with contextlib.suppress(ConnectionClosed):
                for packet in opus_packets(1000):
                    await ws.send(audio_frame(core, packet))
                    sent += 1
                    await asyncio.sleep(0.005)
            await wait_until(lambda: ws.close_code is not None)
            assert ws.close_code == 1008 and sent < 1000
            await legit.completes_turns(1)
            record("long_packets", {"closed_120ms_with": 1002, "flood_frames_sent": sent,
                                    "flood_closed_with": ws.close_code})
    run(scenario(), timeout=scaled(90))


# ---------------------------------------------- 7. duplicate Authorization header


def test_duplicate_authorization_headers_are_400_and_counted(tmp_path: Path,
                                                             speech_wav: Path) -> None:
    async def scenario() -> None:
        async with relay_and_device(tmp_path, speech_wav) as (relay, legit):
            token = relay.tokens.add("dup")
            headers = [("Authorization", f"Bearer {token}"), ("Authorization", "Bearer x")]
            with counting_logs() as logs:
                statuses = [await raw_status(relay.port, headers) for _ in range(300)]
            assert set(statuses) == {400}
            assert relay.refusals.counts["bad_handshake"] == 300
            assert relay.counters.auth_failures == 300
            assert logs.tracebacks == 0 and logs.records <= 3
            await legit.completes_turns(1)
            record("duplicate_authorization", {"requests": 300, "log_records": logs.records})
    run(scenario(), timeout=scaled(90))


# ------------------------------------------------ 9. failed upgrades leave nothing


def test_failed_upgrades_leave_no_state(tmp_path: Path, speech_wav: Path) -> None:
    async def scenario() -> None:
        async with relay_and_device(tmp_path, speech_wav) as (relay, legit):
            token = relay.tokens.add("leaky")
            baseline = relay.connections_open
            for i in range(300):
                status, _, writer = await raw_upgrade(
                    relay.port, [("Authorization", f"Bearer {token}")])
                assert status == 101
                writer.transport.abort()  # gone before its hello
                if i % 3 == 0:  # or no subprotocol at all
                    await raw_status(relay.port, [("Authorization", f"Bearer {token}"),
                                                  ("Sec-WebSocket-Protocol", "other")])
            await wait_until(lambda: relay.connections_open == baseline
                             and relay.connections_pending == 0)
            assert not hasattr(relay, "_authenticated")
            assert "leaky" not in {s.device_id for s in relay.table}
            await legit.completes_turns(1)
    run(scenario(), timeout=scaled(90))
