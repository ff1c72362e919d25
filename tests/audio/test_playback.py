"""The playback jitter buffer: prefill, drain, flush, overflow, underrun, threads."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from edgevoice.audio.playback import (
    TRANSITIONS,
    IllegalTransitionError,
    PlaybackBuffer,
    PlaybackEnded,
    PlaybackEvent,
    PlaybackStarted,
    PlaybackState,
)

from ._signals import to_pcm, tone

RATE = 24_000
MS = RATE // 1000  # samples per ms


class Recorder:
    """Collects events with the thread that delivered them."""

    def __init__(self) -> None:
        self.events: list[PlaybackEvent] = []
        self.threads: list[str] = []

    def __call__(self, event: PlaybackEvent) -> None:
        self.events.append(event)
        self.threads.append(threading.current_thread().name)

    def kinds(self) -> list[str]:
        out = []
        for e in self.events:
            if isinstance(e, PlaybackStarted):
                out.append("started")
            else:
                out.append("flushed" if e.flushed else "ended")
        return out


def ramp(start: int, n: int) -> bytes:
    """Distinct, predictable samples: a counter wrapped to int16."""
    return (np.arange(start, start + n, dtype=np.int64) % 65536 - 32768).astype("<i2").tobytes()


class TickClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def make(prefill_ms: int = 60, max_ms: int = 1000) -> tuple[PlaybackBuffer, Recorder]:
    rec = Recorder()
    return PlaybackBuffer(RATE, prefill_ms, max_ms, on_event=rec, clock=TickClock()), rec


def test_nothing_plays_until_prefill_is_buffered() -> None:
    buf, rec = make(prefill_ms=60)
    buf.push(ramp(0, 40 * MS))
    assert buf.pull(20 * MS) == bytes(40 * MS)
    assert rec.events == [] and not buf.playing
    assert buf.playable_samples() == 0
    buf.push(ramp(40 * MS, 20 * MS))
    assert buf.playable_samples() == 60 * MS
    assert buf.pull(20 * MS) == ramp(0, 20 * MS)
    assert rec.kinds() == ["started"] and buf.playing
    assert buf.stats.underruns == 0


def test_end_of_response_starts_a_short_response_without_prefill_and_drains_it() -> None:
    buf, rec = make(prefill_ms=60)
    buf.push(ramp(0, 30 * MS))
    buf.end_of_response()
    out = buf.pull(20 * MS) + buf.pull(20 * MS)
    assert out == ramp(0, 30 * MS) + bytes(2 * 10 * MS)
    assert rec.kinds() == ["started", "ended"]
    assert buf.state is PlaybackState.IDLE and not buf.playing
    assert buf.stats.underruns == 0  # running dry at the end is not an underrun
    assert buf.stats.played_samples == 30 * MS
    ended = rec.events[1]
    assert isinstance(ended, PlaybackEnded) and ended.at > rec.events[0].at


def test_underrun_is_counted_while_playing_then_playback_resumes_after_prefill() -> None:
    buf, rec = make(prefill_ms=40)
    buf.push(ramp(0, 50 * MS))
    assert buf.pull(40 * MS) == ramp(0, 40 * MS)
    assert buf.pull(20 * MS) == ramp(40 * MS, 10 * MS) + bytes(2 * 10 * MS)
    assert buf.stats.underruns == 1
    assert buf.pull(20 * MS) == bytes(2 * 20 * MS)  # same starvation: not a new underrun
    assert buf.stats.underruns == 1
    assert buf.stats.underrun_samples == 30 * MS
    assert buf.playing and buf.state is PlaybackState.STARVED
    buf.push(ramp(50 * MS, 20 * MS))  # less than the prefill: keep waiting
    assert buf.pull(10 * MS) == bytes(2 * 10 * MS)
    buf.push(ramp(70 * MS, 20 * MS))
    assert buf.pull(40 * MS) == ramp(50 * MS, 40 * MS)
    assert rec.kinds() == ["started"]  # one response, one start


def test_idle_pulls_are_silent_and_never_count_as_underruns() -> None:
    buf, rec = make()
    for _ in range(10):
        assert buf.pull(480) == bytes(960)
    assert buf.stats.underruns == 0 and rec.events == []
    assert buf.last_block_dbfs == -100.0


def test_flush_discards_everything_and_the_next_pull_is_silent() -> None:
    buf, rec = make(prefill_ms=20)
    buf.push(ramp(0, 200 * MS))
    buf.pull(20 * MS)
    assert buf.flush() == 180 * MS
    assert buf.pull(20 * MS) == bytes(2 * 20 * MS)
    assert rec.kinds() == ["started", "flushed"]
    assert buf.stats.flushed_samples == 180 * MS
    assert buf.buffered_samples == 0 and not buf.playing
    # The next response starts from scratch, with its own prefill and events.
    buf.push(ramp(1000, 40 * MS))
    assert buf.pull(20 * MS) == ramp(1000, 20 * MS)
    assert rec.kinds() == ["started", "flushed", "started"]


def test_flush_before_playback_started_sends_no_event() -> None:
    buf, rec = make(prefill_ms=60)
    buf.push(ramp(0, 20 * MS))
    assert buf.flush() == 20 * MS
    assert rec.events == []
    assert buf.flush() == 0


def test_flush_cancels_a_pending_end_of_response() -> None:
    buf, rec = make(prefill_ms=0)
    buf.push(ramp(0, 100 * MS))
    buf.end_of_response()
    buf.pull(10 * MS)
    buf.flush()
    buf.push(ramp(0, 100 * MS))
    buf.pull(50 * MS)
    assert rec.kinds() == ["started", "flushed", "started"]  # no stale "ended"


def test_overflow_drops_the_oldest_and_counts_it() -> None:
    buf, _ = make(prefill_ms=10, max_ms=100)
    buf.push(ramp(0, 80 * MS))
    buf.push(ramp(80 * MS, 50 * MS))
    assert buf.stats.dropped_samples == 30 * MS
    assert buf.buffered_ms == pytest.approx(100.0)
    assert buf.pull(100 * MS) == ramp(30 * MS, 100 * MS)


def test_a_push_larger_than_the_buffer_keeps_its_newest_part() -> None:
    buf, _ = make(prefill_ms=10, max_ms=100)
    buf.push(ramp(0, 10 * MS))
    buf.push(ramp(10 * MS, 250 * MS))
    assert buf.stats.dropped_samples == 160 * MS
    assert buf.pull(100 * MS) == ramp(160 * MS, 100 * MS)


def test_back_to_back_responses_each_get_their_events() -> None:
    buf, rec = make(prefill_ms=20)
    buf.push(ramp(0, 30 * MS))
    buf.end_of_response()
    buf.push(ramp(30 * MS, 30 * MS))  # the next reply arrives while the first drains
    buf.end_of_response()
    out = b"".join(buf.pull(25 * MS) for _ in range(4))
    assert out[: 2 * 60 * MS] == ramp(0, 60 * MS)
    assert rec.kinds() == ["started", "ended", "started", "ended"]
    assert buf.stats.responses_started == 2


def test_end_of_response_with_nothing_pushed_does_nothing() -> None:
    buf, rec = make()
    buf.end_of_response()
    buf.pull(480)
    assert rec.events == [] and buf.state is PlaybackState.IDLE


def test_end_of_response_while_starved_ends_at_the_next_pull() -> None:
    buf, rec = make(prefill_ms=10)
    buf.push(ramp(0, 10 * MS))
    buf.pull(20 * MS)
    assert buf.state is PlaybackState.STARVED
    buf.end_of_response()
    buf.pull(20 * MS)
    assert rec.kinds() == ["started", "ended"]


def test_last_block_level_follows_what_was_played() -> None:
    buf, _ = make(prefill_ms=0)
    buf.push(to_pcm(tone(1000.0, -20.0, 100 * MS, rate_hz=RATE)))
    buf.pull(20 * MS)
    assert buf.last_block_dbfs == pytest.approx(-20.0, abs=0.2)
    buf.flush()
    buf.pull(20 * MS)
    assert buf.last_block_dbfs == -100.0


def test_pull_into_a_strided_view_of_a_stereo_block() -> None:
    # What an output callback does with a 2-channel device: fill one column, copy it.
    buf, _ = make(prefill_ms=0)
    buf.push(ramp(0, 10 * MS))
    block = np.full((20 * MS, 2), 7, dtype=np.int16)
    assert buf.pull_into(block[:, 0]) == 10 * MS
    block[:, 1] = block[:, 0]
    assert block[: 10 * MS, 1].tobytes() == ramp(0, 10 * MS)
    assert not block[10 * MS :].any()


def test_data_listener_is_told_about_pushes_and_ends() -> None:
    buf, _ = make()
    calls = []
    buf.on_data = lambda: calls.append(buf.buffered_samples)
    buf.push(ramp(0, 100))
    buf.end_of_response()
    assert calls == [100, 100]


def test_odd_length_push_is_refused() -> None:
    with pytest.raises(ValueError, match="even length"):
        make()[0].push(b"\x00")


def test_every_state_has_its_transitions_listed_and_others_raise() -> None:
    assert set(TRANSITIONS) == set(PlaybackState)
    buf, _ = make()
    with pytest.raises(IllegalTransitionError, match="IDLE -> PLAYING"):
        buf._goto(PlaybackState.PLAYING)


def test_hammer_a_producer_and_an_audio_thread_lose_and_reorder_nothing() -> None:
    total = 3 * RATE  # three seconds
    buf, rec = make(prefill_ms=20, max_ms=10_000)
    got: list[bytes] = []
    done = threading.Event()

    def audio_thread() -> None:
        block = np.zeros(10 * MS, dtype=np.int16)
        while not done.is_set():
            real = buf.pull_into(block)
            got.append(block[:real].tobytes())
            if rec.kinds()[-1:] == ["ended"]:
                done.set()

    def producer() -> None:
        rnd = random.Random(1)
        sent = 0
        while sent < total:
            n = min(rnd.randint(1, 3000), total - sent)
            buf.push(ramp(sent, n))
            sent += n
        buf.end_of_response()

    consumer = threading.Thread(target=audio_thread, name="audio")
    consumer.start()
    producer()
    assert done.wait(timeout=60)
    consumer.join()
    assert b"".join(got) == ramp(0, total)
    assert buf.stats.played_samples == total and buf.stats.dropped_samples == 0
    assert rec.kinds()[0] == "started" and rec.kinds()[-1] == "ended"
    assert set(rec.threads) == {"audio"}  # started and drained: from the audio thread


def test_hammer_with_flushes_keeps_the_books_balanced() -> None:
    buf, rec = make(prefill_ms=20, max_ms=200)
    stop = threading.Event()
    pushed = 0

    def audio_thread() -> None:
        block = np.zeros(5 * MS, dtype=np.int16)
        while not stop.is_set():
            buf.pull_into(block)

    consumer = threading.Thread(target=audio_thread, name="audio")
    consumer.start()
    rnd = random.Random(2)
    for i in range(3000):
        n = rnd.randint(1, 2000)
        buf.push(ramp(i, n))
        pushed += n
        if i % 97 == 0:
            buf.flush()
        if i % 53 == 0:
            buf.end_of_response()
    buf.end_of_response()
    buf.flush()
    stop.set()
    consumer.join()
    s = buf.stats
    assert s.played_samples + s.flushed_samples + s.dropped_samples == pushed
    # Events pair up: every end closes a start, never two starts in a row.
    open_ = False
    for kind in rec.kinds():
        assert open_ == (kind != "started")
        open_ = kind == "started"


def test_responses_dropped_whole_by_an_overflow_end_once() -> None:
    buf, rec = make(prefill_ms=10, max_ms=100)
    for i in range(2):
        buf.push(ramp(i * 30 * MS, 30 * MS))
        buf.end_of_response()
    buf.push(ramp(60 * MS, 200 * MS))  # drops both earlier replies and more
    assert buf.pull(100 * MS) == ramp(160 * MS, 100 * MS)
    assert rec.kinds() == ["started", "ended", "started"]


def test_a_zero_length_pull_ends_a_drained_response() -> None:
    # A consumer that pulls only ready audio (a fast WAV sink) relies on this.
    buf, rec = make(prefill_ms=10)
    buf.push(ramp(0, 20 * MS))
    assert buf.pull_into(np.zeros(20 * MS, dtype=np.int16)) == 20 * MS
    buf.end_of_response()
    assert buf.pull(0) == b""
    assert rec.kinds() == ["started", "ended"]
    assert buf.stats.underruns == 0


# -- cues (earcons) ------------------------------------------------------------------------


def const(value: int, n: int) -> bytes:
    return np.full(n, value, dtype="<i2").tobytes()


def test_a_cue_plays_by_itself_with_no_response_events() -> None:
    buf, rec = make()
    buf.play_cue(const(1000, 30 * MS))
    assert buf.busy and buf.cue_playing
    out = np.frombuffer(buf.pull(20 * MS), dtype=np.int16)
    assert (out == 1000).all()
    out = np.frombuffer(buf.pull(20 * MS), dtype=np.int16)
    assert (out[: 10 * MS] == 1000).all() and (out[10 * MS :] == 0).all()
    assert not buf.busy and buf.state is PlaybackState.IDLE
    assert rec.events == [] and buf.stats.played_samples == 0  # not a response


def test_a_reply_never_waits_behind_a_cue() -> None:
    """The 'done' earcon used to be queued in front of the reply and delay it."""
    buf, rec = make(prefill_ms=20)
    buf.play_cue(const(1000, 225 * MS))  # the end-of-listening earcon
    buf.pull(20 * MS)  # 20 ms of it played
    buf.push(const(5000, 100 * MS))  # the reply arrives
    out = np.frombuffer(buf.pull(20 * MS), dtype=np.int16).astype(np.int32)
    assert rec.kinds() == ["started"]  # the reply started in this very pull
    fade = 5 * MS
    # the reply from its first sample, the cue fading out over 5 ms on top of it
    assert 5000 < out[0] <= 6000 and (np.diff(out[:fade]) <= 0).all()
    assert (out[fade:] == 5000).all()
    assert not buf.cue_playing


def test_a_cue_mixes_over_a_playing_reply_and_saturates() -> None:
    buf, _ = make(prefill_ms=0)
    buf.push(const(30_000, 100 * MS))
    buf.pull(20 * MS)  # the reply is playing
    buf.play_cue(const(10_000, 10 * MS))
    out = np.frombuffer(buf.pull(20 * MS), dtype=np.int16)
    assert (out[: 10 * MS] == 32767).all()  # clipped, not wrapped around
    assert (out[10 * MS :] == 30_000).all()


def test_a_flush_keeps_the_cue_and_a_new_cue_replaces_the_old() -> None:
    buf, _ = make()
    buf.play_cue(const(1000, 100 * MS))
    buf.flush()  # barge-in flushes replies, not the cue the button press just made
    buf.play_cue(const(2000, 10 * MS))
    out = np.frombuffer(buf.pull(20 * MS), dtype=np.int16)
    assert (out[: 10 * MS] == 2000).all() and (out[10 * MS :] == 0).all()


def stream_reply(buf: PlaybackBuffer, frames: int, late_ms: dict[int, int],
                 phase_ms: int = 7) -> int:
    """A reply streamed at real time (one 20 ms frame every 20 ms, frame k ``late_ms[k]``
    late), pulled every 20 ms like a sound card; returns ms from the first frame's
    arrival to the first pull that played it."""
    arrivals = sorted((k * 20 + late_ms.get(k, 0), k) for k in range(frames))
    pushed = 0
    started_at: int | None = None
    t = 0
    while buf.state is not PlaybackState.IDLE or pushed < frames:
        while pushed < frames and arrivals[pushed][0] <= t:
            buf.push(ramp(0, 20 * MS))
            pushed += 1
            if pushed == frames:
                buf.end_of_response()
        if (t - phase_ms) % 20 == 0:
            was_playing = buf.playing
            buf.pull(20 * MS)
            if started_at is None and not was_playing and buf.playing:
                started_at = t
        t += 1
    assert started_at is not None
    return started_at - arrivals[0][0]


def test_prefill_follows_a_link_that_delivers_in_time_and_backs_off_after_an_underrun() -> None:
    rec = Recorder()
    buf = PlaybackBuffer(RATE, 60, 1000, on_event=rec, clock=TickClock(), prefill_min_ms=20)
    fixed, _ = make(prefill_ms=60)
    steady = {k: k % 3 for k in range(30)}  # 0-2 ms of jitter
    delays = [stream_reply(buf, 30, steady) for _ in range(4)]
    fixed_delays = [stream_reply(fixed, 30, steady) for _ in range(4)]
    assert buf.stats.underruns == 0 and fixed.stats.underruns == 0
    assert fixed_delays == [fixed_delays[0]] * 4 and fixed_delays[0] >= 40
    assert delays[0] == fixed_delays[0]  # the first reply waits the full prefill
    assert delays[-1] <= fixed_delays[0] - 20  # then a frame sooner, at least
    assert buf.prefill_samples < buf.prefill_max_samples
    assert buf.stats.prefill_samples == buf.prefill_samples
    # the link stalls 50 ms mid-reply: one underrun, and the next reply waits the full
    # prefill again
    stream_reply(buf, 30, {k: 50 if k >= 10 else 0 for k in range(30)})
    assert buf.stats.underruns == 1
    assert buf.prefill_samples == buf.prefill_max_samples
    assert stream_reply(buf, 30, steady) == fixed_delays[0]
    assert buf.stats.underruns == 1


def test_a_fixed_prefill_never_moves_and_a_bad_minimum_is_refused() -> None:
    buf, _ = make(prefill_ms=60)
    for _ in range(3):
        stream_reply(buf, 10, {})
    assert buf.prefill_samples == 60 * MS
    with pytest.raises(ValueError, match="prefill_min_ms"):
        PlaybackBuffer(RATE, 60, 1000, prefill_min_ms=80)
