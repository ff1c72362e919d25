"""The session core, driven synchronously: close-code rules, lifecycle table, table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from edgevoice.errors import IllegalTransitionError, RemoteProtocolError
from edgevoice.protocol.connection import Connection, Role
from edgevoice.protocol.limits import TokenBucket, UplinkMeter, opus_packet_duration_ms
from edgevoice.protocol.messages import (
    AudioFlags,
    CloseCode,
    Hello,
    ResponseEnd,
    ResumeRequest,
    ResumeResult,
    Welcome,
    decode_message,
)
from edgevoice.protocol.replay import ReplayJournal
from edgevoice.protocol.session import (
    LINK_TRANSITIONS,
    SESSION_TRANSITIONS,
    Closer,
    LinkState,
    ResumeWindow,
    SessionLifecycle,
    SessionState,
    SessionTable,
    catch_up_after,
    check_link_transition,
    close_ends_session,
    replay_for,
)


@dataclass
class FakeSession:
    device_id: str
    session_id: str
    lifecycle: SessionLifecycle = field(init=False)

    def __post_init__(self) -> None:
        self.lifecycle = SessionLifecycle(self.session_id)


def maker(device: str, sid: str) -> Callable[[], FakeSession]:
    return lambda: FakeSession(device, sid)


# ----------------------------------------------------------------- close codes


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1008, 1009, 4000, 4002, 4004])
def test_relay_closes_that_end_the_session(code: int) -> None:
    assert close_ends_session(code, Closer.RELAY)


@pytest.mark.parametrize("code", [None, 1006, 1011, 4001, 4003, 4005])
def test_relay_closes_that_are_drops(code: int | None) -> None:
    assert not close_ends_session(code, Closer.RELAY)


def test_policy_violation_ends_the_session_on_both_ends_and_a_slow_reader_does_not() -> None:
    # The disagreement of issue 10: 1008 from the relay ends the session (§7.2); a
    # relay that wants the session kept (a slow reader) closes with 4004 instead.
    assert close_ends_session(CloseCode.POLICY_VIOLATION, Closer.RELAY)
    assert not close_ends_session(CloseCode.SLOW_READER, Closer.RELAY)


@pytest.mark.parametrize("code,ends", [(1000, True), (1001, True), (1002, False),
                                       (1006, False), (None, False)])
def test_device_closes(code: int | None, ends: bool) -> None:
    assert close_ends_session(code, Closer.DEVICE) is ends


# -------------------------------------------------------------- the lifecycle


def test_every_transition_outside_the_table_is_illegal() -> None:
    for old in SessionState:
        for new in SessionState:
            life = SessionLifecycle("s")
            life.state = old
            if (old, new) in SESSION_TRANSITIONS:
                life.to(new)
                assert life.state is new
            else:
                with pytest.raises(IllegalTransitionError):
                    life.to(new)


def test_a_closed_session_never_comes_back() -> None:
    assert not any(old is SessionState.CLOSED for old, _ in SESSION_TRANSITIONS)


def test_link_table() -> None:
    check_link_transition(LinkState.CONNECTED, LinkState.WAITING)
    with pytest.raises(IllegalTransitionError):
        check_link_transition(LinkState.STOPPED, LinkState.CONNECTING)
    assert all(old is not LinkState.STOPPED for old, _ in LINK_TRANSITIONS
               if _ is not LinkState.STOPPED)


# ------------------------------------------------------------------- the table


def test_back_to_back_hellos_leave_one_session_per_device() -> None:
    table: SessionTable[FakeSession] = SessionTable(max_sessions=10)
    ended = []
    for i in range(200):
        outcome = table.hello("d", None, maker("d", f"s{i}"), may_resume=False)
        if outcome.replaced is not None:
            ended.append(outcome.replaced)
    assert len(table) == 1 and table.get("d").session_id == "s199"  # type: ignore[union-attr]
    assert len(ended) == 199 and all(s.lifecycle.closed for s in ended)


def test_resume_continues_the_named_session_only() -> None:
    table: SessionTable[FakeSession] = SessionTable(max_sessions=10)
    first = table.hello("d", None, maker("d", "s1"), may_resume=False).session
    assert table.attached(first)
    assert table.dropped(first, hold=True) and first.lifecycle.state is SessionState.HELD
    again = table.hello("d", "s1", maker("d", "s2"), may_resume=True)
    assert again.resumed and again.session is first and again.replaced is None
    assert first.lifecycle.state is SessionState.ATTACHING
    other = table.hello("d", "nope", maker("d", "s3"), may_resume=True)
    assert not other.resumed and other.replaced is first and first.lifecycle.closed
    assert len(table) == 1


def test_resume_while_attached_and_during_a_replay() -> None:
    table: SessionTable[FakeSession] = SessionTable(max_sessions=10)
    s = table.hello("d", None, maker("d", "s1"), may_resume=False).session
    table.attached(s)
    outcome = table.hello("d", "s1", maker("d", "x"), may_resume=True)
    assert outcome.resumed and outcome.was_attached
    # a third connection resumes before the second finished its replay
    assert table.hello("d", "s1", maker("d", "y"), may_resume=True).resumed
    assert table.attached(s) and s.lifecycle.state is SessionState.ATTACHED


def test_a_replaced_session_cannot_attach_or_be_held() -> None:
    table: SessionTable[FakeSession] = SessionTable(max_sessions=10)
    old = table.hello("d", None, maker("d", "s1"), may_resume=False).session
    table.hello("d", None, maker("d", "s2"), may_resume=False)
    assert not table.attached(old)
    assert not table.dropped(old, hold=True)
    assert table.get("d").session_id == "s2"  # type: ignore[union-attr]


def test_room_is_counted_over_every_live_session() -> None:
    table: SessionTable[FakeSession] = SessionTable(max_sessions=2)
    a = table.hello("a", None, maker("a", "1"), may_resume=False).session
    table.hello("b", None, maker("b", "2"), may_resume=False)
    table.attached(a)
    table.dropped(a, hold=True)  # held sessions count too
    assert not table.has_room_for("c") and table.has_room_for("a")
    table.remove(a)
    assert table.has_room_for("c")


# ----------------------------------------------------------- audio-time limits


@pytest.mark.parametrize("toc,extra,ms", [
    (0x09 << 3 | 0, b"", 20.0),      # SILK WB 20 ms, one frame
    (0x0A << 3 | 0, b"", 40.0),      # SILK WB 40 ms
    (0x0B << 3 | 0, b"", 60.0),      # SILK WB 60 ms
    (0x0D << 3 | 0, b"", 20.0),      # hybrid 20 ms
    (0x1F << 3 | 0, b"", 20.0),      # CELT FB 20 ms
    (0x1C << 3 | 0, b"", 2.5),       # CELT FB 2.5 ms
    (0x0B << 3 | 1, b"", 120.0),     # two 60 ms frames
    (0x1F << 3 | 3, bytes([6]), 120.0),  # code 3: six 20 ms frames
])
def test_opus_packet_duration_from_the_toc(toc: int, extra: bytes, ms: float) -> None:
    assert opus_packet_duration_ms(bytes([toc]) + extra + b"\x00" * 10) == ms


def test_real_encoder_packets_are_20_ms() -> None:
    from edgevoice.audio.opus import OpusEncoder
    encoder = OpusEncoder(16_000)
    packet = encoder.encode(b"\x00\x01" * 320)
    assert opus_packet_duration_ms(packet) == 20.0


@pytest.mark.parametrize("packet", [b"", bytes([0x1F << 3 | 3])])
def test_unreadable_packets_are_protocol_errors(packet: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        opus_packet_duration_ms(packet)


def test_token_bucket_refills_at_its_rate_and_grants_once() -> None:
    bucket = TokenBucket(rate=1.0, burst=2.0, now=0.0)
    assert bucket.take(2.0, 0.0) and not bucket.take(1.0, 0.5)
    assert bucket.take(1.0, 1.0)
    bucket.grant(5.0)
    assert bucket.take(5.0, 1.0) and not bucket.take(1.0, 1.0)
    assert bucket.take(2.0, 100.0) and not bucket.take(1.0, 100.0)  # capped at burst


# ------------------------------------------- resume, back to back, no network


def _pair() -> tuple[Connection, Connection]:
    device, relay = Connection(Role.DEVICE), Connection(Role.RELAY)
    relay.receive_text(device.start(Hello(device="d")))
    device.receive_text(relay.accept(Welcome(session_id="s")))
    return device, relay


def _resumed(device: Connection, relay: Connection) -> tuple[Connection, Connection]:
    """New cores for the next connection of the same session, as both runners make them."""
    d2 = Connection(Role.DEVICE, next_seq=device.next_seq,
                    last_received_seq=device.last_received_seq,
                    messages_sent=device.messages_sent,
                    messages_received=device.messages_received)
    r2 = Connection(Role.RELAY)
    r2.receive_text(d2.start(Hello(device="d", resume=ResumeRequest(
        "s", device.last_received_seq, device.messages_received))))
    r2.continue_session(next_seq=relay.next_seq, last_received_seq=relay.last_received_seq,
                        messages_sent=relay.messages_sent,
                        messages_received=relay.messages_received)
    d2.receive_text(r2.accept(Welcome(session_id="s", resume=ResumeResult(
        True, r2.last_received_seq, r2.messages_received))))
    return d2, r2


def test_a_drop_loses_nothing_either_way_and_a_second_resume_resends_nothing() -> None:
    device, relay = _pair()
    journal = ReplayJournal(100)
    delivered = []
    for i in range(6):
        frame, data = relay.send_audio(bytes([0xF8, i]), 20 * i)
        journal.record_frame(frame, 0.0)
        if i < 3:  # the last three die with the link
            device.receive_binary(data)
    text = relay.send(ResponseEnd(1))
    journal.record_message(relay.messages_sent, ResponseEnd(1), 0.0)
    del text  # lost too
    d2, r2 = _resumed(device, relay)
    wire = replay_for(journal, r2, d2.last_received_seq, d2.messages_received)
    assert (wire.frames, wire.messages, wire.frames_lost) == (3, 1, 0)
    for data in wire.data:
        if isinstance(data, bytes):
            received = d2.receive_binary(data)
            assert received is not None and received.frame.flags & AudioFlags.REPLAY
            delivered.append(received.frame.seq)
        else:
            assert decode_message(data) == ResponseEnd(1)
            d2.receive_text(data)
    assert delivered == [3, 4, 5] and d2.messages_received == 1
    # everything arrived: resuming again re-sends nothing, and the next frame is seq 6
    d3, r3 = _resumed(d2, r2)
    assert replay_for(journal, r3, d3.last_received_seq, d3.messages_received).data == ()
    assert r3.send_audio(b"\xf8", 120)[0].seq == 6
    # a frame delivered twice is dropped by the receiver
    assert d3.receive_binary(r2.replay_audio(journal.after(4, 1).items[0].frame)) is None


def test_a_peer_claiming_more_than_was_sent_is_a_protocol_error() -> None:
    _device, relay = _pair()
    journal = ReplayJournal(10)
    frame, _ = relay.send_audio(b"\xf8", 0)
    journal.record_frame(frame, 0.0)
    with pytest.raises(RemoteProtocolError) as caught:
        replay_for(journal, relay, 5, 0)
    assert caught.value.close_code == CloseCode.PROTOCOL_ERROR


def test_catch_up_is_the_time_away_capped_by_the_window() -> None:
    assert catch_up_after(0.0, 10.0) == (0.0, 0.0)
    assert catch_up_after(2.0, 10.0) == (120.0, 2000.0)
    assert catch_up_after(60.0, 10.0) == (600.0, 10_000.0)
    # fifty resumes a few milliseconds apart earn about nothing
    assert sum(catch_up_after(0.005, 10.0)[0] for _ in range(50)) < 20


def test_uplink_meter_counts_audio_time_not_packets() -> None:
    def meter() -> UplinkMeter:
        return UplinkMeter(max_messages_per_s=200, max_audio_ms_per_s=1500,
                           max_pings_per_s=2, now=0.0)

    twenty = opus_packet_duration_ms(bytes([0x48]))
    sixty = opus_packet_duration_ms(bytes([0x58]))  # three times the audio per packet
    m = meter()
    assert all(m.audio_over(twenty, 0.0) is None for _ in range(150))  # 3 s: the burst
    over = m.audio_over(twenty, 0.0)
    assert over is not None and "audio" in over
    m = meter()
    assert sum(m.audio_over(sixty, 0.0) is None for _ in range(150)) == 50
    m = meter()  # real time for a minute is always within budget
    assert all(m.audio_over(twenty, i * 0.02) is None for i in range(3000))


def test_uplink_meter_messages_pings_and_catch_up() -> None:
    meter = UplinkMeter(max_messages_per_s=200, max_audio_ms_per_s=1500, max_pings_per_s=2,
                        now=0.0)
    assert sum(meter.over(0.0) is None for _ in range(300)) == 200
    meter.catch_up(*catch_up_after(1.0, 10.0))
    assert sum(meter.over(0.0) is None for _ in range(100)) == 60
    assert sum(meter.ping_over(0.0) is None for _ in range(20)) == 10


def test_resume_window_counts_from_the_first_drop_noticed() -> None:
    window = ResumeWindow(10.0)
    assert not window.is_open(0.0) and window.left_s(0.0) == 0.0
    assert window.dropped(100.0) and window.dropped_at == 100.0
    assert window.dropped(105.0) and window.left_s(105.0) == 5.0  # a failed attempt
    assert not window.dropped(110.0) and not window.is_open(110.0)
    window.clear()
    assert window.dropped(200.0) and window.left_s(200.0) == 10.0
    assert not ResumeWindow(0.0).dropped(0.0)  # resume switched off
