"""Session resume in the sans-I/O core: counters, journal, outbound queue (§7)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgevoice.errors import LocalProtocolError, RemoteProtocolError
from edgevoice.protocol.connection import Connection, Role, State
from edgevoice.protocol.messages import (
    AudioFlags,
    Error,
    Hello,
    Interrupt,
    Message,
    Ping,
    ResponseStart,
    ResumeRequest,
    ResumeResult,
    Stats,
    Transcript,
    TurnEnd,
    TurnStart,
    Welcome,
)
from edgevoice.protocol.replay import OutboundQueue, ReplayJournal, SentFrame, SentMessage


def open_pair() -> tuple[Connection, Connection]:
    device, relay = Connection(Role.DEVICE), Connection(Role.RELAY)
    relay.receive_text(device.start(Hello(device="d")))
    device.receive_text(relay.accept(Welcome(session_id="s1")))
    return device, relay


def test_only_reliable_messages_are_counted() -> None:
    device, relay = open_pair()
    for message in (TurnStart(1), Ping(1, 0), Stats({}), Interrupt(), TurnEnd(1)):
        relay.receive_text(device.send(message))
    assert device.messages_sent == relay.messages_received == 3
    for reply in (ResponseStart(1), Transcript("user", "hi"), Ping(2, 0),
                  Error("upstream_error", "x")):
        device.receive_text(relay.send(reply))
    assert relay.messages_sent == device.messages_received == 3


def test_an_error_before_welcome_is_not_counted() -> None:
    device = Connection(Role.DEVICE)
    device.start(Hello(device="d"))
    device.receive_text(Connection(Role.RELAY).send(Error("busy", "m")))
    assert device.messages_received == 0


def resume_pair(device: Connection, relay: Connection,
                resumed: bool = True) -> tuple[Connection, Connection, Welcome]:
    """Reconnect: new cores continuing the old ones' counters."""
    d2 = Connection(Role.DEVICE, next_seq=device.next_seq,
                    last_received_seq=device.last_received_seq,
                    messages_sent=device.messages_sent,
                    messages_received=device.messages_received)
    r2 = Connection(Role.RELAY)
    hello = Hello(device="d", resume=ResumeRequest("s1", device.last_received_seq,
                                                   device.messages_received))
    r2.receive_text(d2.start(hello))
    if resumed:
        r2.continue_session(next_seq=relay.next_seq, last_received_seq=relay.last_received_seq,
                            messages_sent=relay.messages_sent,
                            messages_received=relay.messages_received)
        welcome = Welcome("s1", resume=ResumeResult(True, relay.last_received_seq,
                                                    relay.messages_received))
    else:
        welcome = Welcome("s2")
    got = d2.receive_text(r2.accept(welcome))
    assert isinstance(got, Welcome) and d2.state is State.OPEN
    return d2, r2, got


def test_resumed_session_continues_and_replays_flagged() -> None:
    device, relay = open_pair()
    frames = [device.send_audio(b"a%d" % i, i * 20) for i in range(4)]
    for _, data in frames[:2]:
        relay.receive_binary(data)
    d2, r2, welcome = resume_pair(device, relay)
    assert welcome.resume.last_uplink_seq == 1
    replayed = [d2.replay_audio(frame) for frame, _ in frames[2:]]
    got = [r2.receive_binary(data) for data in replayed]
    assert [g.frame.seq for g in got if g] == [2, 3]
    assert all(g.frame.flags & AudioFlags.REPLAY for g in got if g)
    assert all(g.missing == 0 for g in got if g)
    fresh, data = d2.send_audio(b"new", 80)
    assert fresh.seq == 4 and r2.receive_binary(data) is not None


def test_refused_resume_starts_again_from_zero() -> None:
    device, relay = open_pair()
    for i in range(3):
        relay.receive_binary(device.send_audio(b"a", i)[1])
    relay.receive_text(device.send(TurnStart(1)))
    d2, _, welcome = resume_pair(device, relay, resumed=False)
    assert not welcome.resume.resumed
    assert (d2.next_seq, d2.last_received_seq, d2.messages_sent) == (0, None, 0)


def test_relay_may_not_invent_a_resume() -> None:
    device, relay = Connection(Role.DEVICE), Connection(Role.RELAY)
    relay.receive_text(device.start(Hello(device="d")))
    with pytest.raises(LocalProtocolError):
        relay.accept(Welcome("s", resume=ResumeResult(True)))
    with pytest.raises(LocalProtocolError):
        relay.continue_session(next_seq=1, last_received_seq=None, messages_sent=0,
                               messages_received=0)


def test_device_refuses_an_unasked_or_impossible_resume() -> None:
    from edgevoice.protocol.messages import encode_message
    device = Connection(Role.DEVICE)
    device.start(Hello(device="d"))
    with pytest.raises(RemoteProtocolError, match="did not ask"):
        device.receive_text(encode_message(Welcome("s", resume=ResumeResult(True))))
    device = Connection(Role.DEVICE, next_seq=5)
    device.start(Hello(device="d", resume=ResumeRequest("s")))
    with pytest.raises(RemoteProtocolError, match="more than was sent"):
        device.receive_text(encode_message(Welcome("s", resume=ResumeResult(True, 5))))


@pytest.mark.parametrize("resume", [
    ResumeRequest(""), ResumeRequest("x" * 65), ResumeRequest("s", -1),
    ResumeRequest("s", 2**32), ResumeRequest("s", 1, -3)])
def test_malformed_resume_requests_are_refused(resume: ResumeRequest) -> None:
    from edgevoice.protocol.messages import encode_message
    relay = Connection(Role.RELAY)
    with pytest.raises(RemoteProtocolError):
        relay.receive_text(encode_message(Hello(device="d", resume=resume)))


def test_replay_of_a_frame_never_sent_is_a_local_error() -> None:
    device, _ = open_pair()
    frame, _ = device.send_audio(b"x", 0)
    device2 = Connection(Role.DEVICE)
    device2.start(Hello(device="d"))
    with pytest.raises(LocalProtocolError):
        device2.replay_audio(frame)  # not open yet
    with pytest.raises(LocalProtocolError):
        device.resend(Ping(1, 0))  # not a reliable message


# ----------------------------------------------------------------- the journal


def test_journal_returns_what_the_peer_missed_in_order() -> None:
    device, _ = open_pair()
    journal = ReplayJournal(max_frames=100)
    sent: list[object] = []
    for i in range(6):
        if i % 3 == 0:
            message = TurnStart(i)
            device.send(message)
            journal.record_message(device.messages_sent, message, float(i))
            sent.append(message)
        frame, _ = device.send_audio(b"%d" % i, i)
        journal.record_frame(frame, float(i))
        sent.append(frame.seq)
    replay = journal.after(last_seq=2, messages_received=1)
    got = [e.message if isinstance(e, SentMessage) else e.frame.seq for e in replay.items]
    assert got == [TurnStart(3), 3, 4, 5]
    assert replay.frames == 3 and replay.frames_lost == 0
    assert [*journal.after(None, 0).items] and len(journal.after(5, 2).items) == 0


def test_journal_trims_oldest_and_reports_the_loss() -> None:
    device, _ = open_pair()
    journal = ReplayJournal(max_frames=3, max_messages=1)
    for i in range(10):
        journal.record_frame(device.send_audio(b"x", i)[0], 0.0)
    journal.record_message(1, TurnStart(1), 0.0)
    journal.record_message(2, TurnEnd(1), 0.0)
    replay = journal.after(last_seq=2, messages_received=0)
    assert [e.frame.seq for e in replay.items if isinstance(e, SentFrame)] == [7, 8, 9]
    assert replay.frames_lost == 4 and replay.messages_lost == 1
    assert len(journal) == 4 and journal.frames_held == 3


def test_journal_frames_cost_the_cyclic_collector_nothing() -> None:
    """A relay at capacity holds ~100 journaled frames per session; as objects the
    collector tracks, they were two thirds of what a full collection walked (a 55 ms
    loop stall at 150 sessions, bench row 14). Held as plain tuples of ints and bytes,
    the collector stops tracking them after their first young collection."""
    import gc

    device, _ = open_pair()
    journal = ReplayJournal(max_frames=200)
    journal.record_message(1, TurnStart(1), 0.0)
    gc.collect()
    before = len(gc.get_objects())
    for i in range(200):
        journal.record_frame(device.send_audio(b"x%d" % i, i, AudioFlags.START
                                               if i == 0 else AudioFlags.NONE)[0], float(i))
    gc.collect()
    assert len(gc.get_objects()) - before < 10  # was 400: two objects a frame
    replay = journal.after(last_seq=197, messages_received=1)
    frames = [e.frame for e in replay.items if isinstance(e, SentFrame)]
    assert [(f.seq, f.payload, f.timestamp_ms) for f in frames] == \
        [(198, b"x198", 198), (199, b"x199", 199)]
    assert [e.sent_at for e in replay.items] == [198.0, 199.0]
    first = journal.after(last_seq=None, messages_received=1).items[0]
    assert isinstance(first, SentFrame) and first.frame.flags is AudioFlags.START


def test_journal_refuses_claims_beyond_what_was_sent() -> None:
    journal = ReplayJournal(max_frames=3)
    with pytest.raises(RemoteProtocolError):
        journal.after(last_seq=0, messages_received=0)
    with pytest.raises(RemoteProtocolError):
        journal.after(last_seq=None, messages_received=1)


# -------------------------------------------------------- the property: no loss


@dataclass
class Wire:
    """Messages in flight on one connection; a cut loses a suffix of them."""

    items: list[str | bytes] = field(default_factory=list)


Item = tuple[str, int]


def send_item(conn: Connection, journal: ReplayJournal, item: Item, wire: Wire) -> None:
    kind, n = item
    if kind == "turn":
        message: Message = TurnStart(n)
        wire.items.append(conn.send(message))
        journal.record_message(conn.messages_sent, message, 0.0)
    else:
        frame, data = conn.send_audio(n.to_bytes(4, "big"), n)
        journal.record_frame(frame, 0.0)
        wire.items.append(data)


def deliver(conn: Connection, wire: Wire, count: int, got: list[Item]) -> None:
    for data in wire.items[:count]:
        if isinstance(data, str):
            message = conn.receive_text(data)
            assert isinstance(message, TurnStart)
            got.append(("turn", message.turn_id))
        else:
            received = conn.receive_binary(data)
            assert received is not None, "a replay must never deliver a duplicate"
            assert received.missing == 0, "a resume must never leave a gap"
            got.append(("audio", int.from_bytes(received.frame.payload, "big")))
    wire.items.clear()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from(["turn", "audio", "audio", "audio"]),
                                   max_size=12),
                          st.floats(0, 1)), min_size=1, max_size=8))
def test_any_sequence_of_cuts_delivers_everything_once_in_order(
        plan: list[tuple[list[str], float]]) -> None:
    device, relay = open_pair()
    journal = ReplayJournal(max_frames=1000)
    sent: list[Item] = []
    got: list[Item] = []
    counter = 0
    replay_wire = Wire()
    for kinds, kept in plan:
        wire = replay_wire
        for kind in kinds:
            counter += 1
            item = (kind, counter)
            sent.append(item)
            send_item(device, journal, item, wire)
        deliver(relay, wire, int(len(wire.items) * kept), got)  # the cut loses the rest
        device, relay, welcome = resume_pair(device, relay)
        replay_wire = Wire()
        for entry in journal.after(welcome.resume.last_uplink_seq,
                                   welcome.resume.uplink_messages).items:
            if isinstance(entry, SentFrame):
                replay_wire.items.append(device.replay_audio(entry.frame))
            else:
                replay_wire.items.append(device.resend(entry.message))
    deliver(relay, replay_wire, len(replay_wire.items), got)
    assert got == sent


# ------------------------------------------------------------ outbound queue


def test_outbound_queue_drops_oldest_audio_but_keeps_control() -> None:
    queue: OutboundQueue[int] = OutboundQueue(max_audio=3, max_control=2)
    queue.put_nowait(TurnStart(1))
    for i in range(5):
        queue.put_nowait(i)
    assert queue.put_nowait(TurnEnd(1))
    items = [queue.get_nowait() for _ in range(len(queue))]
    assert items == [TurnStart(1), 2, 3, 4, TurnEnd(1)]
    assert queue.audio_dropped == 2 and queue.control_dropped == 0
    for i in range(3):
        queue.put_nowait(TurnStart(i))
    assert queue.control_dropped == 1 and queue.get_nowait() == TurnStart(1)


def test_outbound_queue_get_waits_and_clear_keeps_control_when_asked() -> None:
    async def scenario() -> list[object]:
        queue: OutboundQueue[int] = OutboundQueue(max_audio=10)
        getter = asyncio.create_task(queue.get())
        await asyncio.sleep(0)
        queue.put_nowait(7)
        first = await getter
        queue.put_nowait(1)
        queue.put_nowait(TurnStart(2))
        assert queue.clear(audio_only=True) == 1
        return [first, queue.get_nowait(), len(queue), queue.audio_queued]
    assert asyncio.run(scenario()) == [7, TurnStart(2), 0, 0]
