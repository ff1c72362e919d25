"""Barge-in on the echo-cancelled microphone, in simulated rooms.

A reply plays at full volume through synthetic speaker-to-microphone impulse responses
(delay, coupling, reverberation); the microphone also hears room noise and, in some
runs, a user at -25 dBFS talking over the reply. WebRTC AEC3 (the ``aec`` extra) gets
the played frames as its reference in the capture's sample clock, and the unchanged
barge-in detector and echo guard decide on the cleaned frames. Time is counted in
20 ms frames, never wall time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import speech_synth as synth

from edgevoice.audio.aec import (
    FRAME_BYTES,
    AecSettings,
    EchoCancellerUnavailableError,
    ReferenceFifo,
    WebRtcEchoCanceller,
    load_echo_canceller,
)
from edgevoice.feedback.states import DeviceState
from edgevoice.triggers.bargein import BargeInDetector, BargeInSettings, pcm_dbfs

pytest.importorskip("pywebrtc_audio")

FRAME_S = 0.02
REPLY_S = 9.0
USER_AT_S = 5.0
USER_DBFS = -25.0

#: (coupling dB, delay ms, RT60 ms): a bookshelf speaker a metre away, a loud smart
#: speaker with its microphone beside the driver, a tiled kitchen, a small enclosure.
ROOMS = [
    (-20.0, 20.0, 250.0),
    (-10.0, 150.0, 400.0),
    (-10.0, 60.0, 800.0),
    (-3.0, 10.0, 300.0),
    (0.0, 40.0, 600.0),
]


def full_volume_reply(seed: int = 11) -> synth.Signal:
    reply = synth.speech_like(REPLY_S, seed=seed, f0_hz=120.0)
    return reply * 0.98  # peaks at full scale: the volume knob all the way up


def run_room(coupling_db: float, delay_ms: float, rt60_ms: float, *, user: bool,
             settings: BargeInSettings | None = None,
             reply_seed: int = 11) -> tuple[list[int], float]:
    """Frames at which barge-in fired, and the echo reduction (dB) AEC achieved.

    ``settings`` default to the defaults: nobody told the device how the room rings.
    """
    reply = full_volume_reply(reply_seed)
    echo = synth.room(reply, coupling_db, delay_ms, rt60_ms)
    mic = echo + synth.noise(REPLY_S, -65.0)
    if user:
        voice = synth.at_level(synth.speech_like(REPLY_S - USER_AT_S, seed=5, f0_hz=210.0),
                               USER_DBFS)
        start = int(USER_AT_S * synth.RATE_HZ)
        mic[start:start + len(voice)] += voice[: len(mic) - start]
    aec = WebRtcEchoCanceller(AecSettings())
    fifo = ReferenceFifo()
    detector = BargeInDetector(settings or BargeInSettings())
    detector.set_state(DeviceState.SPEAKING)
    fired: list[int] = []
    echo_in = echo_out = 0.0
    for index, (played, heard) in enumerate(
            zip(synth.frames_of(reply), synth.frames_of(mic), strict=False)):
        # The playback callback wrote this block; the capture reads one frame of it.
        fifo.write(np.frombuffer(played, dtype="<i2"))
        cleaned = aec.process(heard, fifo.read())
        detector.on_playback_block(pcm_dbfs(played), index * FRAME_S)
        if detector.on_capture_frame(pcm_dbfs(cleaned), (index + 1) * FRAME_S,
                                     raw_dbfs=pcm_dbfs(heard)):
            fired.append(index)
            detector.set_state(DeviceState.IDLE)
            detector.set_state(DeviceState.SPEAKING)
        if not user and index * FRAME_S > 2.0:  # after convergence
            echo_in += float(np.sum(np.frombuffer(heard, "<i2").astype(float) ** 2))
            echo_out += float(np.sum(np.frombuffer(cleaned, "<i2").astype(float) ** 2))
    reduction = 10 * np.log10(echo_in / max(echo_out, 1.0)) if echo_in else 0.0
    return fired, reduction


def test_user_at_minus_25_dbfs_interrupts_within_300_ms_at_minus_10_db_and_150_ms() -> None:
    fired, _ = run_room(-10.0, 150.0, 400.0, user=True)
    onset = int(USER_AT_S / FRAME_S)
    after = [f for f in fired if f >= onset]
    assert [f for f in fired if f < onset] == []  # no self-interruption before the user
    assert after, "the user never interrupted"
    latency_ms = (after[0] + 1 - onset) * FRAME_S * 1000
    assert latency_ms <= 300, latency_ms


@pytest.mark.parametrize(("coupling_db", "delay_ms", "rt60_ms"), ROOMS)
def test_no_self_interruption_at_full_volume(coupling_db: float, delay_ms: float,
                                             rt60_ms: float) -> None:
    """With the defaults: the room's ring is measured, not configured."""
    fired, reduction = run_room(coupling_db, delay_ms, rt60_ms, user=False)
    assert fired == [], f"interrupted itself at frames {fired} (AEC removed {reduction:.1f} dB)"


@pytest.mark.parametrize(("coupling_db", "delay_ms", "rt60_ms"), ROOMS)
def test_no_self_interruption_when_the_owner_set_the_rooms_ring(
        coupling_db: float, delay_ms: float, rt60_ms: float) -> None:
    """reverb_rt60_ms set for the room (hardware/README.md: makes the first pause safe)."""
    settings = BargeInSettings(reverb_rt60_ms=int(max(400.0, rt60_ms)))
    fired, _ = run_room(coupling_db, delay_ms, rt60_ms, user=False, settings=settings)
    assert fired == [], fired


@pytest.mark.slow
@pytest.mark.parametrize("reply_seed", [12, 13, 21])
@pytest.mark.parametrize(("coupling_db", "delay_ms", "rt60_ms"),
                         [(-10.0, 60.0, 1000.0), (-6.0, 100.0, 700.0), (0.0, 40.0, 600.0)])
def test_no_self_interruption_in_ringing_rooms_with_other_replies(
        coupling_db: float, delay_ms: float, rt60_ms: float, reply_seed: int) -> None:
    fired, _ = run_room(coupling_db, delay_ms, rt60_ms, user=False, reply_seed=reply_seed)
    assert fired == [], fired


@pytest.mark.slow
@pytest.mark.parametrize(("coupling_db", "delay_ms", "rt60_ms"), ROOMS)
def test_user_interrupts_in_every_room(coupling_db: float, delay_ms: float,
                                       rt60_ms: float) -> None:
    fired, _ = run_room(coupling_db, delay_ms, rt60_ms, user=True)
    onset = int(USER_AT_S / FRAME_S)
    assert fired and fired[0] >= onset, fired


def test_reference_fifo_keeps_the_capture_clock_and_stays_bounded() -> None:
    fifo = ReferenceFifo(max_ms=100)
    assert fifo.read() == b"\0" * FRAME_BYTES  # nothing played: silence
    fifo.write(np.arange(480, dtype=np.int16))  # 30 ms played
    first = np.frombuffer(fifo.read(), "<i2")
    assert list(first[:3]) == [0, 1, 2] and first[-1] == 319
    second = np.frombuffer(fifo.read(), "<i2")
    assert second[0] == 320 and second[159] == 479 and not second[160:].any()
    assert fifo.stats.short_frames == 2
    fifo.write(np.ones(16000, dtype=np.int16))  # a stalled capture: 1 s piles up
    assert fifo.buffered_samples == 1600 and fifo.stats.dropped_samples == 14400


def test_canceller_refuses_partial_frames() -> None:
    aec = WebRtcEchoCanceller()
    with pytest.raises(ValueError, match="640"):
        aec.process(b"\0" * 320, b"\0" * 640)


def test_without_the_extra_auto_falls_back_and_on_refuses(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    monkeypatch.setitem(sys.modules, "pywebrtc_audio", None)
    assert load_echo_canceller(AecSettings(mode="auto")) is None
    assert load_echo_canceller(AecSettings(mode="off")) is None
    with pytest.raises(EchoCancellerUnavailableError, match=r"edgevoice\[aec\]"):
        load_echo_canceller(AecSettings(mode="on"))


def test_the_speakers_blocks_reach_the_reference_at_16_khz_in_the_capture_clock() -> None:
    """What the sound card pulls (48 kHz, gain applied) is what the canceller gets."""
    from edgevoice.audio.aec import PlaybackReference
    from edgevoice.audio.playback import PlaybackBuffer

    fifo = ReferenceFifo()
    playback = PlaybackBuffer(48_000, prefill_ms=0)
    playback.on_pulled = PlaybackReference(fifo, 48_000)
    playback.gain = 0.5
    t = np.arange(48_000) / 48_000
    tone = np.round(np.sin(2 * np.pi * 440 * t) * 16000).astype("<i2")
    playback.push(tone.tobytes())
    playback.end_of_response()
    frames = []
    for _ in range(50):  # one second: a 20 ms pull at 48 kHz, then a captured frame
        playback.pull(960)
        frames.append(np.frombuffer(fifo.read(), "<i2"))
    heard = np.concatenate(frames[5:45]).astype(np.float64)  # past the resampler's delay
    assert np.sqrt(np.mean(heard**2)) == pytest.approx(16000 * 0.5 / np.sqrt(2), rel=0.05)
    spectrum = np.abs(np.fft.rfft(heard))
    assert np.fft.rfftfreq(len(heard), 1 / 16000)[np.argmax(spectrum)] == pytest.approx(440, abs=5)


def test_the_daemon_cancels_its_own_voice_before_the_detector_hears_it(tmp_path: Path) -> None:
    """Wiring: the speaker's blocks feed the reference; every captured frame is cleaned."""
    from dataclasses import replace

    from edgevoice.audio.wavio import WavSink, WavSource, write_wav
    from edgevoice.config.model import DeviceConfig
    from edgevoice.device.daemon import DeviceDaemon

    silence = tmp_path / "mic.wav"
    write_wav(silence, bytes(3200), 16000)
    config = replace(DeviceConfig(), aec=AecSettings(mode="on"))
    daemon = DeviceDaemon(config, "kitchen.x", WavSource(silence),
                          WavSink(tmp_path / "out.wav", rate_hz=16000, realtime=False))
    assert daemon.echo_canceller is not None
    reply = full_volume_reply()[: 6 * synth.RATE_HZ]
    echo = synth.room(reply, -10.0, 150.0, 400.0) + synth.noise(6.0, -65.0)
    playback = daemon.downlink.playback
    playback.push(synth.to_pcm(reply))
    playback.end_of_response()
    raw_levels, heard_levels = [], []
    for heard in synth.frames_of(echo):
        playback.pull(320)  # the sound card takes a block (the tap feeds the reference)
        daemon.turn_taking.on_frame(heard)  # ... and the microphone delivers a frame
        raw_levels.append(pcm_dbfs(heard))
        heard_levels.append(daemon.detector.level_dbfs)
    settled = slice(150, None)  # after AEC3 converged
    assert np.mean(raw_levels[settled]) - np.mean(heard_levels[settled]) > 20


def _cleaned(aec: WebRtcEchoCanceller, played: synth.Signal, heard: synth.Signal) -> np.ndarray:
    fifo = ReferenceFifo()
    out = []
    for block, mic in zip(synth.frames_of(played), synth.frames_of(heard), strict=False):
        if np.frombuffer(block, "<i2").any():  # a parked speaker writes no reference
            fifo.write(np.frombuffer(block, dtype="<i2"))
        out.append(aec.process(mic, fifo.read()))
    return np.frombuffer(b"".join(out), "<i2").astype(np.float64)


def test_with_nothing_played_the_canceller_is_skipped_and_the_stream_keeps_its_timing() -> None:
    """Idle listening: AEC3 is not run, and the capture comes out exactly as delayed as
    AEC3 delays it, with no sample lost or repeated where the bypass begins."""
    mic = synth.speech_like(3.0, seed=7) * 0.3
    aec = WebRtcEchoCanceller(AecSettings())
    out = _cleaned(aec, np.zeros_like(mic), mic)
    assert aec.bypassed == 150 - 50 and aec.frames == 50  # 1 s, then skipped
    lag = WebRtcEchoCanceller.LATENCY_SAMPLES
    start = 50 * 320  # the first bypassed frame
    raw = np.frombuffer(synth.to_pcm(mic), "<i2").astype(np.float64)
    assert np.array_equal(out[start:], raw[start - lag:len(raw) - lag])
    # and what AEC3 gave before is that same capture, delayed by just as much: no jump
    before = out[start - 16 * 320:start]

    def match(shift: int) -> float:
        return float(np.corrcoef(before, raw[start - 16 * 320 - shift:start - shift])[0, 1])

    assert max(range(0, 320, 8), key=match) == lag


def test_a_reply_after_a_long_silence_is_cancelled_as_well_as_without_the_bypass() -> None:
    quiet_s = 3.0
    reply = np.concatenate([np.zeros(int(quiet_s * synth.RATE_HZ)), full_volume_reply()])
    echo = synth.room(reply, -10.0, 60.0, 400.0)
    mic = echo + synth.noise(len(reply) / synth.RATE_HZ, -65.0)
    gated = WebRtcEchoCanceller(AecSettings())
    plain = WebRtcEchoCanceller(AecSettings(), bypass_after_ms=None)
    out_gated, out_plain = _cleaned(gated, reply, mic), _cleaned(plain, reply, mic)
    assert gated.bypassed > 90 and plain.bypassed == 0
    settled = int((quiet_s + 2.0) * synth.RATE_HZ)  # after convergence

    def residual_db(out: np.ndarray) -> float:
        return float(10 * np.log10(np.mean(out[settled:] ** 2) + 1.0))

    echo_db = float(10 * np.log10(np.mean(mic[settled:] ** 2 * 32768.0**2)))
    assert echo_db - residual_db(out_gated) > 10.0  # the echo is cancelled at all ...
    assert abs(residual_db(out_gated) - residual_db(out_plain)) < 1.0  # ... and as well
