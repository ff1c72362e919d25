"""Acceptance of session resume: a 3 s outage mid-utterance and mid-reply loses nothing.

The shipped daemon (it keeps its turn while the link is suspended) and a real
relay with the echo upstream, joined through a
:class:`~edgevoice_dev.testing.netfault.FaultProxy` that resets every connection and
refuses new ones for 3 s. Just before the cut the proxy stalls for a moment, so
frames sent then die with the connection and must be re-sent.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from edgevoice_dev.testing.harness import run, running_relay
from edgevoice_dev.testing.netfault import FaultProxy
from reliability_support import record, scaled, wait_until

from edgevoice.audio.wavio import WavSink, WavSource
from edgevoice.backoff import BackoffSettings
from edgevoice.config.model import DeviceConfig
from edgevoice.device.daemon import DeviceDaemon, TurnTimeline
from edgevoice.relay.server import RelayServer

OUTAGE_S = 3.0


def daemon_for(url: str, token: str, source: Path, out: Path,
               done: asyncio.Future[TurnTimeline]) -> DeviceDaemon:
    base = DeviceConfig()
    relay = replace(base.relay, url=url,
                    backoff=BackoffSettings(initial_ms=100, max_ms=1000, min_ms=20))
    config = replace(base, device_id="d1", relay=relay)
    return DeviceDaemon(config, token, WavSource(source, realtime=True),
                          WavSink(out, realtime=True),
                          on_turn_done=lambda t: done.done() or done.set_result(t))


async def one_turn(tmp_path: Path, source: Path, *, cut_when: str,
                   ) -> tuple[TurnTimeline, DeviceDaemon, RelayServer, dict[str, int]]:
    async with running_relay(tmp_path) as relay:
        token = relay.tokens.add("d1")
        async with FaultProxy("127.0.0.1", relay.port) as proxy:
            done: asyncio.Future[TurnTimeline] = asyncio.get_running_loop().create_future()
            daemon = daemon_for(proxy.url, token, source, tmp_path / "heard.wav", done)
            task = asyncio.create_task(daemon.run())
            try:
                if cut_when == "utterance":
                    # 1.4 s into the 6 s utterance
                    await wait_until(lambda: daemon.current is not None
                                     and daemon.current.uplink_frames >= 70, within_s=10)
                else:
                    # 1 s into the reply
                    await wait_until(lambda: daemon.counters.frames_received >= 50,
                                     within_s=20)
                await proxy.outage(OUTAGE_S, stall_s=0.3)
                turn = await asyncio.wait_for(done, scaled(40))
                snapshot = {"frames_in": relay.counters.frames_in,
                            "frames_out": relay.counters.frames_out,
                            "uplink_concealed": relay.counters.frames_concealed,
                            "sessions": relay.counters.sessions_total,
                            "resumed": relay.counters.sessions_resumed}
            finally:
                daemon.stop()
                await task
            return turn, daemon, relay, snapshot


def test_outage_mid_utterance_delivers_every_frame_and_the_whole_reply(
        tmp_path: Path, long_voice_wav: Path) -> None:
    turn, daemon, server, relay = run(one_turn(tmp_path, long_voice_wav, cut_when="utterance"),
                                      timeout=scaled(90))
    link = daemon.link.stats
    assert turn.outcome == "completed", turn.as_dict()
    assert daemon.counters.suspensions >= 1 and link.resumes == 1 and relay["resumed"] == 1
    # the operator sees the resume on both ends' /metrics
    from edgevoice.device.health_source import DaemonHealth
    from edgevoice.health import exposition
    from edgevoice.health.device import device_metrics
    from edgevoice.health.http import HealthSettings
    from edgevoice.health.relay import relay_metrics
    from edgevoice.relay.health_source import RelayHealth
    device_text = exposition.render(device_metrics(
        DaemonHealth(daemon, HealthSettings()).snapshot(), [])).decode()
    assert "edgevoice_link_resumes_total 1.0" in device_text
    assert "edgevoice_frames_replayed_total 0.0" not in device_text
    relay_text = exposition.render(relay_metrics(RelayHealth(server).snapshot(), [], [])).decode()
    assert "edgevoice_relay_sessions_resumed_total 1.0" in relay_text
    assert "edgevoice_relay_sessions_held_total 1.0" in relay_text
    assert relay["sessions"] == 1
    # 100 % of the uplink: every frame the daemon produced reached the upstream, once
    assert turn.uplink_frames >= 300
    assert relay["frames_in"] == turn.uplink_frames
    assert relay["uplink_concealed"] == 0
    assert link.frames_replayed > 0 and link.frames_queued_suspended > 100
    assert daemon.link.dropped == 0
    # and the echo of all of it played, with nothing concealed
    assert daemon.counters.frames_received == relay["frames_out"] >= turn.uplink_frames - 2
    assert daemon.counters.frames_concealed == 0
    record("outage_3s_mid_utterance", {
        "uplink_frames": turn.uplink_frames, "frames_in_at_relay": relay["frames_in"],
        "frames_queued_while_down": link.frames_queued_suspended,
        "frames_replayed": link.frames_replayed,
        "drop_to_resumed_s": round(link.last_resume_s or 0, 3),
        "reply_frames": daemon.counters.frames_received, "reply_frames_concealed": 0})


def test_outage_mid_reply_resumes_playback_where_it_stopped(
        tmp_path: Path, voice_wav: Path) -> None:
    turn, daemon, _, relay = run(one_turn(tmp_path, voice_wav, cut_when="reply"),
                                 timeout=scaled(90))
    link = daemon.link.stats
    assert turn.outcome == "completed", turn.as_dict()
    assert link.resumes == 1 and relay["resumed"] == 1 and relay["sessions"] == 1
    # every reply frame arrived once, in order: nothing concealed, nothing repeated
    assert daemon.counters.frames_received == relay["frames_out"] == turn.downlink_frames
    assert daemon.counters.frames_concealed == 0
    assert daemon.link._session_conn is not None
    assert daemon.link._session_conn.missing == 0
    # playback stalled during the outage and then played the rest, all of it
    stats = daemon.playback.stats
    assert stats.underruns >= 1
    rate = daemon.sink.sample_rate_hz
    expected = turn.downlink_frames * rate // 50
    # all of the reply played (earcons, if any, come on top of it)
    assert expected * 0.98 <= stats.played_samples <= expected + rate
    assert turn.playback_end is not None and turn.playback_start is not None
    assert turn.playback_end - turn.playback_start >= OUTAGE_S
    record("outage_3s_mid_reply", {
        "reply_frames": turn.downlink_frames, "reply_frames_concealed": 0,
        "drop_to_resumed_s": round(link.last_resume_s or 0, 3),
        "playback_underruns": stats.underruns,
        "playback_s": round(turn.playback_end - turn.playback_start, 2)})
