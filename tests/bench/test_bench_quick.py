"""The bench runs, and produces every row with numbers. Its figures are never asserted.

The pure parts (counting WebSocket frames, matching timestamps) are tested on
made-up inputs; the whole bench runs once in its quick mode, as CI's
``edgevoice bench --quick``.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from edgevoice_dev.bench import main
from edgevoice_dev.bench.analysis import (
    Spread,
    downlink_delays,
    paired_delays,
    percentile,
    silence_delays,
)
from edgevoice_dev.bench.report import render_markdown, render_table
from edgevoice_dev.bench.runner import parse_rows
from edgevoice_dev.bench.wire import (
    OPCODE_BINARY,
    OPCODE_PING,
    OPCODE_TEXT,
    WebSocketTally,
    client_frame_bytes,
)
from edgevoice_dev.testing.cluster import missing_tools


def _frame(opcode: int, payload: bytes, masked: bool) -> bytes:
    n = len(payload)
    if n < 126:
        header = bytes([0x80 | opcode, (0x80 if masked else 0) | n])
    elif n < 65536:
        header = bytes([0x80 | opcode, (0x80 if masked else 0) | 126]) + struct.pack("!H", n)
    else:
        header = bytes([0x80 | opcode, (0x80 if masked else 0) | 127]) + struct.pack("!Q", n)
    return header + (b"\0\0\0\0" if masked else b"") + payload


def test_tally_splits_handshake_audio_and_control_even_when_fed_byte_by_byte() -> None:
    handshake = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    frames = [_frame(OPCODE_TEXT, b'{"type":"hello"}', True),
              _frame(OPCODE_BINARY, bytes(70), True),
              _frame(OPCODE_BINARY, bytes(300), True),
              _frame(OPCODE_PING, b"", True),
              _frame(OPCODE_BINARY, bytes(70_000), True)]
    stream = handshake + b"".join(frames)
    tally = WebSocketTally()
    for i, byte in enumerate(stream):
        tally.feed(bytes([byte]), now=float(i))
    assert tally.handshake_bytes == len(handshake)
    audio = tally.tally(OPCODE_BINARY)
    assert audio.frames == 3
    assert audio.wire_bytes == len(frames[1]) + len(frames[2]) + len(frames[4])
    assert audio.payload_bytes == 70 + 300 + 70_000
    assert tally.control_bytes == len(frames[0]) + len(frames[3])
    assert len(tally.binary_times) == 3
    assert client_frame_bytes(70) == len(frames[1])
    assert client_frame_bytes(300) == len(frames[2])
    assert client_frame_bytes(70_000) == len(frames[4])


def test_server_frames_are_unmasked_and_need_no_handshake() -> None:
    tally = WebSocketTally(http_first=False)
    tally.feed(_frame(OPCODE_BINARY, bytes(60), False) * 2, now=1.0)
    assert tally.tally(OPCODE_BINARY).frames == 2
    assert tally.tally(OPCODE_BINARY).wire_bytes == 2 * (2 + 60)
    assert tally.binary_frames_between(0.5, 1.5) == 2
    assert tally.binary_frames_between(1.5, 2.0) == 0


def test_percentiles_and_spread() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.5
    assert percentile(values, 100) == 100.0
    assert math.isnan(percentile([], 50))
    spread = Spread.of([0.001, 0.002, 0.003])
    assert spread.n == 3 and spread.p50_ms == 2.0 and spread.max_ms == 3.0


def test_paired_delays_match_frames_by_position_and_count_the_unmatched() -> None:
    sent = [[0.0, 0.02, 0.04], [1.0]]
    arrived = [[0.001, 0.022], [1.005], [2.0]]
    delays, unmatched = paired_delays(sent, arrived)
    assert [round(d, 3) for d in delays] == [0.001, 0.002, 0.005]
    assert unmatched == 2  # one frame never arrived, one group had no sender


def test_downlink_delays_follow_the_first_sample_through_a_bursty_resampler() -> None:
    # 24 -> 48 kHz: frame j starts at output sample 960 j. The resampler releases
    # nothing for frame 0, then frames 0 and 1 together, as soxr HQ does.
    emitted = [[0.000, 0.020, 0.040]]
    pushes = [[(0.021, 1660), (0.041, 1660)]]
    delays, missing = downlink_delays(emitted, pushes, 48_000)
    assert [round(d, 3) for d in delays] == [0.021, 0.001, 0.001]
    assert missing == 0
    delays, missing = downlink_delays([[0.0, 0.02, 0.04, 0.06]], [[(0.001, 1920)]], 48_000)
    assert len(delays) == 2 and missing == 2  # the reply was cut after two frames


def test_the_answer_is_timed_from_a_turns_last_frame_to_the_first_reply_block() -> None:
    from edgevoice_dev.bench.latency import reply_after_hangover

    uplink = [[1.00, 1.02, 1.04], [5.00, 5.02], []]
    pulls = [(1.02, 0), (1.06, 0), (1.08, 960), (1.10, 960), (5.10, 960)]
    assert [round(d, 3) for d in reply_after_hangover(uplink, pulls)] == [0.04, 0.08]


def test_a_reply_glitches_when_a_frame_comes_after_the_jitter_buffer_needed_it() -> None:
    from edgevoice_dev.bench.convcap import glitched

    steady = [0.0, 0.0, 0.0, 0.02, 0.04, 0.06, 0.08]  # paced, three frames ahead
    assert not glitched(steady)
    assert not glitched([0.0, 0.05, 0.09])  # late, but within the 60 ms prefill
    assert glitched([0.0, 0.02, 0.04, 0.15])  # frame 3 needed at 0.12
    assert not glitched([])


def test_wire_projection_counts_one_record_and_one_segment_per_packet() -> None:
    from edgevoice_dev.bench.wirecost import envelope_correlation, projected_wire

    assert projected_wire(60, 1) == (60 + 18 + 22 + 52) * 50
    assert projected_wire(60, 2) == (2 * (60 + 18) + 22 + 52) * 25
    x = np.sin(np.linspace(0, 30, 16_000)) * np.linspace(0, 10_000, 16_000)
    assert envelope_correlation(x, x) > 0.999
    assert envelope_correlation(x, x[::-1].copy()) < 0.5


def test_silence_is_the_first_empty_block_pulled_after_the_interrupt() -> None:
    pulls = [(0.00, 960), (0.02, 960), (0.04, 960), (0.06, 0), (0.08, 960), (0.10, 960)]
    delays, missed = silence_delays([0.05, 0.09], pulls)
    assert [round(d, 3) for d in delays] == [0.01]
    assert missed == 1


def test_per_thread_cpu_matches_threads_by_id_and_names_them_as_at_the_end() -> None:
    """PortAudio's input thread may burn a second of CPU waiting for the sound server's
    first block, then take its name (edgevoice-mic) at its first callback: a window
    that began after that counts only what it used within the window."""
    from edgevoice_dev.bench.life import ENDED, thread_shares

    before = {10: ("python", 5.0), 11: ("edgevoice-mic", 1.4), 12: ("edgevoice-play", 0.5)}
    after = {10: ("python", 5.5), 11: ("edgevoice-mic", 1.5), 13: ("edgevoice-play", 0.05)}
    shares = thread_shares(10, before, after, process_pct=8.0, span_s=10.0)
    assert shares[0] == ("10 event-loop", 5.0)
    assert dict(shares)["11 edgevoice-mic"] == pytest.approx(1.0)
    assert dict(shares)["13 edgevoice-play"] == pytest.approx(0.5)
    # 12 ended within the window: what it used is the process's total less the others'
    assert dict(shares)[ENDED] == pytest.approx(1.5)
    renamed = {11: ("python", 1.4)}
    assert thread_shares(10, renamed, {11: ("edgevoice-mic", 1.5)}, 1.0, 10.0) == [
        ("11 edgevoice-mic", pytest.approx(1.0))]


def test_only_publish_writes_the_tracked_results_and_page(tmp_path: Path) -> None:
    from edgevoice_dev.bench.runner import output_paths
    # a plain full run (on some laptop) must not rewrite what the docs show
    assert output_paths(tmp_path, "full") == (tmp_path / "bench" / "results-full.json",
                                              tmp_path / "bench" / "benchmarks-full.md")
    assert output_paths(tmp_path, "full", publish=True) == (
        tmp_path / "bench" / "results.json", tmp_path / "docs" / "benchmarks.md")
    assert output_paths(tmp_path, "quick")[1] == tmp_path / "bench" / "benchmarks-quick.md"
    assert output_paths(tmp_path, "full", md_path=tmp_path / "x.md")[1] == tmp_path / "x.md"
    ignored = subprocess.run(["git", "check-ignore", "bench/results-full.json",
                              "bench/benchmarks-full.md"], cwd=Path(__file__).parents[2],
                             capture_output=True, text=True)
    assert ignored.stdout.split() == ["bench/results-full.json", "bench/benchmarks-full.md"]


def test_publish_is_refused_for_a_quick_run() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--publish"])
    assert exc.value.code == 2


def test_rows_are_parsed_like_a_page_range() -> None:
    assert parse_rows("1-7") == [1, 2, 3, 4, 5, 6, 7]
    assert parse_rows("3, 1,6-7") == [1, 3, 6, 7]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_bench_runs_every_row_with_both_peers_and_the_floor(tmp_path: Path) -> None:
    """``edgevoice bench --quick`` as a user runs it (CI's proof that the benchmarks keep
    running: one run serves both, rather than a tiny run here and a quick one after)."""
    json_path, md_path = tmp_path / "results.json", tmp_path / "benchmarks.md"
    status = subprocess.run(
        [sys.executable, "-m", "edgevoice", "bench", "--quick", "--json", str(json_path),
         "--markdown", str(md_path)], timeout=1700).returncode
    results = json.loads(json_path.read_text())
    rows = {row["row"]: row for row in results["rows"]}
    assert sorted(rows) == list(range(1, 18))
    assert {row["row"]: row["error"] for row in rows.values()} == dict.fromkeys(rows, "")
    assert status == 0
    for row in rows.values():
        assert row["lines"] and row["lines"][0]["edgevoice"] not in ("", "n/a")
    peers = {peer["name"]: peer for peer in rows[1]["data"]["peers"]}
    assert {"wyoming", "nova-json"} <= set(peers)
    assert all(peer["streaming_bytes_per_s"] > 0 for peer in peers.values())
    assert rows[1]["data"]["edgevoice"]["audio_frames"] > 0
    assert rows[2]["data"]["floor"]["total_s"] > 0
    lean = rows[2]["data"]["lean_loop"]  # the leanest Python doing the same codec work
    assert lean["up_frames"] > 0 and lean["down_frames"] > 0 and lean["ratio_to_floor"] > 1
    assert rows[2]["data"]["opus"]["complexity"] >= 0
    assert rows[3]["data"]["uplink_live"]["n"] > 0 and rows[3]["data"]["downlink"]["n"] > 0
    assert rows[4]["data"]["steps"][0]["connected"] > 0
    assert rows[5]["data"]["to_silent"]["n"] > 0
    assert rows[6]["data"]["restarts"] > 0
    assert rows[7]["data"]["rss_mb"] > 0
    assert rows[8]["data"]["aec_cpu_s"] > 0 and rows[8]["data"]["echo_reduction_db"] > 10
    if not missing_tools():  # rows 9 and 10 need haproxy and redis-server
        assert rows[9]["data"]["relays_2"]["turns"] > 0 and rows[9]["data"]["ratio"] > 0
        # each relay's cost with its devices silent was measured, not assumed
        assert len(rows[9]["data"]["relays_2"]["relay_fixed_cpu_pct_each"]) == 2
        assert rows[10]["data"]["connected"] == rows[10]["data"]["devices"] > 0
    assert rows[3]["data"]["answer_after_hangover"]["n"] > 0
    for number in (11, 12):  # idle device, with and without the wake word, on both paths
        for path in ("wav", "card"):
            run = rows[number]["data"][path]
            assert run["cpu_pct"] > 0 and run["rss_mb"] > 20 and run["threads"]
        # beside it, what a stream on the same card costs with no daemon code at all
        assert rows[number]["data"]["capture_alone_pct"] > 0
    assert rows[4]["data"]["steps"][0]["loop_stall"]["n"] > 0
    assert rows[14]["data"]["steps"][0]["replies"] > 0
    lean_relay = rows[14]["data"]["lean_relay"]  # the leanest Python relay beside it
    assert lean_relay["cpu_pct"] > 0 and lean_relay["replies"] > 0
    # the relay's single steps were timed over the window (thousands of them), and the
    # timed run served its devices as the untimed one did
    timed = rows[14]["data"]["timed"]
    assert timed["replies"] > 0 and timed["single_steps"]["n"] > 1000
    assert 0 < timed["single_steps"]["p50_ms"] <= timed["single_steps"]["max_ms"]
    assert rows[15]["data"]["step"]["refused"] > 0  # beyond the limit, turns are shed
    assert rows[16]["data"]["tcp"]["segs_out"] > 0 and rows[16]["data"]["ratio"] > 1
    # the Nova day: audio counted upstream is what the fake received, under the target
    assert rows[17]["data"]["upstream_s"] == rows[17]["data"]["received_by_fake_s"]
    assert rows[17]["data"]["ratio"] <= 2.5
    assert rows[13]["data"]["devices"] == 100 and rows[13]["data"]["relay_rss_kib_connected"] > 0
    assert results["machine"]["cpu_model"] and results["command"].startswith("edgevoice bench")
    speed = results["machine"]["speed"]  # what lets pages from other hosts be compared
    assert speed["opus_10s_ms"] > 0 and speed["python_loop_ms"] > 0
    page = md_path.read_text()
    assert results["command"] in page and results["machine"]["cpu_model"] in page
    assert f"in {speed['opus_10s_ms']:.1f} ms" in page
    table = render_table(results)
    assert "wyoming" in table and "nova-json" in table and "floor" in table
    assert render_markdown(results) == page


def test_row_2s_floor_is_the_best_of_enough_passes_to_leave_a_moment_of_load_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Best of three let a busy moment inflate the floor by up to a fifth (and flatter
    the ratio); the row asks for nine."""
    from types import SimpleNamespace

    from edgevoice_dev.bench import conversation
    from edgevoice_dev.bench.floor import Floor

    asked: list[int] = []

    def fake_floor(*args: object, passes: int = 3, **kwargs: object) -> Floor:
        asked.append(passes)
        return Floor(10, 2, 0.1, 0.01, 0.001)

    monkeypatch.setattr(conversation, "measure_floor", fake_floor)
    reply = tmp_path / "reply.raw"
    reply.write_bytes(bytes(960))
    ws = SimpleNamespace(fixture=SimpleNamespace(pcm=bytes(640)), reply_path=reply)
    run = SimpleNamespace(cpu_s=0.5, window_s=10.0, up_frames_in_window=10,
                          down_frames_in_window=2, machine_busy_pct=5.0, threads=[])
    conversation._cpu_lines(ws, run, "WAV stand-ins")  # type: ignore[arg-type]
    assert asked == [conversation.FLOOR_PASSES] and conversation.FLOOR_PASSES >= 9


def test_the_page_names_the_hosts_speed_and_says_so_when_a_run_did_not_record_it() -> None:
    from edgevoice_dev.bench.proc import machine_speed
    from edgevoice_dev.bench.report import _speed_line

    speed = machine_speed(passes=2)
    assert set(speed) == {"opus_10s_ms", "python_loop_ms", "passes"} and min(speed.values()) > 0
    line = _speed_line(speed)
    assert f"{speed['python_loop_ms']:.1f} ms" in line and "best of 2," in line
    assert "not recorded" in _speed_line(None)  # pages published before it existed


def test_best_stage_times_keeps_each_stages_fastest_pass_and_sets_every_pass_up_afresh() -> None:
    from edgevoice_dev.bench.proc import best_stage_times

    passes: list[list[int]] = []

    def one_pass() -> tuple[Callable[[], None], Callable[[], None]]:
        made: list[int] = []
        passes.append(made)
        slow_first = len(passes) == 1  # stage 1 slow in pass 1, stage 2 slow in pass 2

        def spin(slow: bool) -> None:
            end = time.process_time() + (0.05 if slow else 0.005)
            while time.process_time() < end:
                pass

        def first() -> None:
            made.append(1)
            spin(slow_first)

        def second() -> None:
            assert made == [1]  # a later stage sees what an earlier one made
            spin(not slow_first)

        return first, second

    best = best_stage_times(2, one_pass)
    assert len(passes) == 2 and len(best) == 2
    assert all(0.004 <= t < 0.04 for t in best)  # each the fast one of its two passes


def test_an_idle_row_over_target_says_what_the_card_alone_costs() -> None:
    from edgevoice_dev.bench.life import IdleRun, _over_target_story

    card = IdleRun("card", False, 1.2, 50.0, 20.0, 0.3,
                   [("1 event-loop", 0.3), ("2 edgevoice-mic", 0.5), ("3 threaded-ml", 0.4)])
    text = _over_target_story(card, 0.55, 1.0)
    assert "costs 0.55 % by itself" in text and "own share is 0.65 %" in text
    assert "leaves it 0.45 %" in text
    assert "the card alone is over the target" in _over_target_story(card, 1.1, 1.0)
    assert "by itself" not in _over_target_story(card, None, 1.0)


def test_the_cpu_rows_measure_the_device_a_plain_install_gets(tmp_path: Path) -> None:
    # AEC3 is an extra the installer leaves out: rows 2, 11 and 12 run without it
    from edgevoice_dev.bench.plan import PLAIN_AEC_MODE, QUICK, Workspace

    from edgevoice.config.model import load_device_config

    ws = Workspace.__new__(Workspace)
    ws.root, ws.plan = tmp_path, QUICK
    ws.token_file = lambda device: tmp_path / f"{device}.token"  # type: ignore[method-assign]
    (tmp_path / "d.token").write_text("t" * 32)
    plain = load_device_config(ws.device_config("d", "ws://127.0.0.1:1/", "wav:a.wav",
                                                "wav:b.wav", aec_mode=PLAIN_AEC_MODE))
    assert plain.aec.mode == PLAIN_AEC_MODE == "off"
    default = load_device_config(ws.device_config("d", "ws://127.0.0.1:1/", "wav:a.wav",
                                                  "wav:b.wav"))
    assert default.aec.mode != "off"


def _lean_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A lean loop's inputs: 3 s of 16 kHz speech-level noise (WAV), 1 s of 24 kHz reply
    audio (raw s16le)."""
    import wave

    import numpy as np

    rng = np.random.default_rng(5)
    speech = tmp_path / "speech.wav"
    with wave.open(str(speech), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes((rng.standard_normal(16_000 * 3) * 3000).astype("<i2").tobytes())
    reply = tmp_path / "reply.raw"
    reply.write_bytes((rng.standard_normal(24_000) * 3000).astype("<i2").tobytes())
    return speech, reply


def test_the_lean_loop_sends_and_decodes_what_it_is_asked_to(tmp_path: Path) -> None:
    """Row 2's leanest-Python reference, its two processes for real: the frames it
    encodes per second follow --up-per-s, and it decodes the reply bursts its peer sends."""
    speech, reply = _lean_inputs(tmp_path)
    server = subprocess.Popen(
        [sys.executable, "-m", "edgevoice_dev.bench.lean", "serve", "--reply", str(reply),
         "--down-per-s", "25"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = json.loads(server.stdout.readline())["port"]
        out = subprocess.run(
            [sys.executable, "-m", "edgevoice_dev.bench.lean", "client", "--port", str(port),
             "--speech", str(speech), "--seconds", "3", "--up-per-s", "25"],
            capture_output=True, text=True, timeout=60, check=True).stdout
    finally:
        server.terminate()
        server.wait(10)
    done = json.loads(out.splitlines()[-1])
    assert done["event"] == "done" and done["cpu_s"] > 0
    assert 70 <= done["up_frames"] <= 76  # half of the 150 frames captured in 3 s
    assert done["down_frames"] >= 30  # at least one 600 ms reply burst


def test_the_lean_relay_answers_each_turn_with_a_whole_reply(tmp_path: Path) -> None:
    """Row 14's leanest-Python reference, its two processes for real: each device's turn
    gets its whole 150-frame reply, so the load keeps cycling (speech, reply, pause)."""
    speech, reply = _lean_inputs(tmp_path)
    relay = subprocess.Popen([sys.executable, "-m", "edgevoice_dev.bench.lean_relay", "serve",
                              "--reply", str(reply)], stdout=subprocess.PIPE, text=True)
    try:
        assert relay.stdout is not None
        port = json.loads(relay.stdout.readline())["port"]
        # two devices, phases 0 and 4 s of the 8 s cycle: replies end at about 6 and 10 s
        out = subprocess.run(
            [sys.executable, "-m", "edgevoice_dev.bench.lean_relay", "load", "--port",
             str(port), "--clients", "2", "--speech", str(speech), "--warmup", "0.5",
             "--measure", "10.5"], capture_output=True, text=True, timeout=60,
            check=True).stdout
    finally:
        relay.terminate()
        relay.wait(10)
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["event"] for e in events] == ["measure_start", "measure_end"]
    assert events[1]["replies"] == 2
