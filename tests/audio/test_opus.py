"""Opus round trips, loss recovery, and the error when libopus is missing."""

from __future__ import annotations

import ctypes.util
import os
import sys

import numpy as np
import pytest

from edgevoice.audio.opus import (
    CodecUnavailableError,
    OpusDecodeError,
    OpusDecoder,
    OpusEncoder,
    OpusSettings,
)
from edgevoice.config.base import SettingError
from edgevoice.errors import is_retryable

from ._signals import dominant_hz, frames, from_pcm, level_dbfs, noise, tone

RATE = 16_000


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced-sounding signal: harmonics of a wobbling pitch, plus a little noise."""
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    f0 = 140.0 + 30.0 * np.sin(2 * np.pi * 1.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t) ** 2
    return 6000.0 * voiced * envelope + noise(-50.0, n, seed)


def test_round_trip_keeps_a_tones_level_and_frequency() -> None:
    enc, dec = OpusEncoder(), OpusDecoder()
    signal = tone(440.0, -20.0, RATE * 2)
    out = from_pcm(b"".join(dec.decode(enc.encode(f)) for f in frames(signal)))
    assert len(out) == len(signal)
    steady = out[RATE // 2 :]  # past the codec's start-up
    assert abs(level_dbfs(steady) - (-20.0)) < 1.0
    assert abs(dominant_hz(steady, RATE) - 440.0) < 5.0


def level_contours(enc: OpusEncoder, signal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-20 ms levels (dBFS) of ``signal`` and of its Opus round trip, aligned."""
    dec = OpusDecoder()
    out = from_pcm(b"".join(dec.decode(enc.encode(f)) for f in frames(signal)))
    lag = enc.lookahead_samples
    a, b = signal[: len(signal) - lag], out[lag:]
    n = len(a) // 320
    return (np.array([level_dbfs(a[i * 320 : (i + 1) * 320]) for i in range(10, n)]),
            np.array([level_dbfs(b[i * 320 : (i + 1) * 320]) for i in range(10, n)]))


@pytest.mark.parametrize("bitrate_bps", [OpusSettings().bitrate_bps, 24_000])
def test_round_trip_keeps_the_loudness_contour_of_speech(bitrate_bps: int) -> None:
    # A speech codec keeps what is heard, not the waveform: compare frame levels of a
    # spoken phrase (words, pauses, 60 dB of range) at the shipped bitrate and above.
    from edgevoice.audio.wavio import load_wav
    from edgevoice.demo import bundled_speech
    speech = np.frombuffer(load_wav(bundled_speech()), dtype=np.int16).astype(np.float64)
    levels_in, levels_out = level_contours(OpusEncoder(bitrate_bps=bitrate_bps), speech)
    assert np.corrcoef(levels_in, levels_out)[0, 1] > 0.99
    assert float(np.mean(np.abs(levels_in - levels_out))) < 1.0  # dB, frame by frame


def test_round_trip_keeps_the_loudness_contour_of_a_voiced_buzz() -> None:
    # The hard case for a speech coder: a steady harmonic buzz whose level moves only
    # 7 dB. At 24 kbps its contour survives; below that the coder spends its bits on
    # the spectrum (16 kbps: correlation 0.93, 1.7 dB off a frame).
    levels_in, levels_out = level_contours(OpusEncoder(bitrate_bps=24_000), speechlike(2.0))
    assert np.corrcoef(levels_in, levels_out)[0, 1] > 0.95
    assert abs(float(np.mean(levels_in - levels_out))) < 1.5


def test_24_kbps_gives_about_50_bytes_a_frame() -> None:
    enc = OpusEncoder(bitrate_bps=24_000)
    sizes = [len(enc.encode(f)) for f in frames(speechlike(3.0))]
    assert 35 <= float(np.mean(sizes)) <= 75


def test_fec_is_really_enabled() -> None:
    # opuslib 3.0.1's setter silently did nothing; read the value back from libopus.
    assert OpusEncoder(fec=True).fec_enabled
    assert not OpusEncoder(fec=False).fec_enabled


def test_recover_rebuilds_a_lost_packet_from_the_next_one() -> None:
    enc, dec = OpusEncoder(bitrate_bps=24_000, fec=True, expected_loss_pct=20), OpusDecoder()
    fs = frames(speechlike(1.0))
    packets = [enc.encode(f) for f in fs]
    reference_dec = OpusDecoder()
    clean = [reference_dec.decode(p) for p in packets]
    lost = 30
    for p in packets[:lost]:
        dec.decode(p)
    rebuilt = dec.recover(packets[lost + 1])
    assert len(rebuilt) == 640
    # FEC is a low-bitrate copy: close to what the lost packet held, not silence.
    got, want = from_pcm(rebuilt), from_pcm(clean[lost])
    assert level_dbfs(got) > level_dbfs(want) - 6.0
    assert np.corrcoef(got, want)[0, 1] > 0.7
    assert len(dec.decode(packets[lost + 1])) == 640


def rebuild_errors(enc: OpusEncoder) -> tuple[float, float]:
    """Squared error of packets lost one in ten, rebuilt by FEC and by concealment."""
    packets = [enc.encode(f) for f in frames(speechlike(2.0, seed=3))]
    clean = [from_pcm(p) for p in map(OpusDecoder().decode, packets)]

    def error_with(rebuild: str) -> float:
        dec, total = OpusDecoder(), 0.0
        for i, p in enumerate(packets):
            if i % 10 == 5:  # lose every tenth packet
                got = dec.recover(packets[i + 1]) if rebuild == "fec" else dec.conceal()
                total += float(np.sum((from_pcm(got) - clean[i]) ** 2))
            else:
                dec.decode(p)
        return total

    return error_with("fec"), error_with("plc")


def test_fec_rebuilds_better_than_concealment() -> None:
    fec, plc = rebuild_errors(OpusEncoder(bitrate_bps=24_000, fec=True, expected_loss_pct=20))
    assert fec < plc


def test_at_the_default_bitrate_libopus_adds_no_fec_and_a_lost_frame_is_concealed() -> None:
    # What the ``fec`` setting's documentation says: below about 19 kbps libopus keeps
    # no low-bitrate copy for 16 kHz speech, whatever the setting (on TCP a frame is
    # lost only when a queue overflows, and the decoder conceals it).
    assert OpusSettings().bitrate_bps < 19_000
    fec, plc = rebuild_errors(OpusEncoder(fec=True, expected_loss_pct=10))
    assert fec == pytest.approx(plc)


def test_conceal_gives_one_frame_of_audio() -> None:
    enc, dec = OpusEncoder(), OpusDecoder()
    for f in frames(tone(300.0, -20.0, RATE)):
        dec.decode(enc.encode(f))
    concealed = dec.conceal()
    assert len(concealed) == 640
    assert level_dbfs(from_pcm(concealed)) > -40.0  # extrapolated, not silence


def test_conceal_follows_the_duration_of_the_last_packet() -> None:
    enc = OpusEncoder(sample_rate_hz=24_000, frame_ms=40)
    dec = OpusDecoder(sample_rate_hz=24_000)  # default 20 ms, but packets are 40 ms
    pcm = to_bytes(tone(300.0, -20.0, 960, rate_hz=24_000))
    assert len(dec.decode(enc.encode(pcm))) == 1920
    assert len(dec.conceal()) == 1920


def to_bytes(samples: np.ndarray) -> bytes:
    return np.round(samples).astype("<i2").tobytes()


def test_corrupt_packet_raises_a_decode_error() -> None:
    dec = OpusDecoder()
    with pytest.raises(OpusDecodeError):
        dec.decode(b"\xff\xff\xff\xff\xff\xff")
    with pytest.raises(OpusDecodeError):
        dec.decode(b"")


def test_wrong_frame_size_is_refused() -> None:
    with pytest.raises(ValueError, match="640-byte"):
        OpusEncoder().encode(bytes(600))


def test_unsupported_format_is_refused() -> None:
    with pytest.raises(ValueError, match="44100"):
        OpusEncoder(sample_rate_hz=44_100)
    with pytest.raises(ValueError, match="30 ms"):
        OpusDecoder(frame_ms=30)


def test_settings_are_validated() -> None:
    with pytest.raises(SettingError) as info:
        OpusSettings(complexity=11)
    assert info.value.key == "complexity"
    enc = OpusEncoder.from_settings(OpusSettings(bitrate_bps=16_000, fec=False))
    assert enc.settings.bitrate_bps == 16_000 and not enc.fec_enabled


def test_missing_libopus_names_the_package_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # Make opuslib_next's own library lookup fail, as on a machine without libopus0.
    for name in [m for m in sys.modules if m.startswith("opuslib_next")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: "libopus" not in str(p) and real_exists(p))
    with pytest.raises(CodecUnavailableError, match="apt-get install libopus0") as info:
        OpusEncoder()
    assert not is_retryable(info.value)


def test_missing_binding_names_the_package_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opuslib_next", None)  # import raises ImportError
    with pytest.raises(CodecUnavailableError, match="pip install opuslib-next"):
        OpusDecoder()


def test_decode_after_gap_recovers_one_conceals_a_few_and_caps_the_rest() -> None:
    from edgevoice.audio.opus import OpusDecoder, OpusEncoder
    encoder = OpusEncoder()
    t = np.arange(320 * 30) / 16000.0
    tone = (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes()
    packets = [encoder.encode(tone[i * 640:(i + 1) * 640]) for i in range(30)]
    decoder = OpusDecoder()
    assert len(decoder.decode_after_gap(packets[0], 0, 5)) == 1
    assert len(decoder.decode_after_gap(packets[2], 1, 5)) == 2  # FEC rebuilds packet 1
    assert len(decoder.decode_after_gap(packets[6], 3, 5)) == 4  # three concealed
    assert len(decoder.decode_after_gap(packets[20], 13, 5)) == 6  # capped at five
    assert all(len(p) == 640 for p in decoder.decode_after_gap(packets[22], 1, 5))


def test_codec_state_is_made_on_the_first_packet_and_given_back_by_release() -> None:
    enc, dec = OpusEncoder(), OpusDecoder()
    assert not enc.allocated and not dec.allocated  # an idle session holds no libopus state
    enc.reset()
    dec.reset()  # resetting what does not exist yet makes nothing
    assert not enc.allocated and not dec.allocated
    signal = frames(tone(440.0, -20.0, RATE))
    for pcm in signal[:10]:
        dec.decode(enc.encode(pcm))
    assert enc.allocated and dec.allocated
    enc.release()
    dec.release()
    assert not enc.allocated and not dec.allocated
    # the next packet starts a fresh stream and still decodes to the same tone
    out = from_pcm(b"".join(dec.decode(enc.encode(pcm)) for pcm in signal))
    assert enc.allocated and dec.allocated
    assert abs(dominant_hz(out[RATE // 4 :], RATE) - 440.0) < 3
    assert abs(level_dbfs(out[RATE // 4 :]) - (-20.0)) < 1.0


def test_released_state_is_really_freed() -> None:
    import gc
    import weakref

    enc = OpusEncoder()
    enc.encode(frames(tone(440.0, -20.0, RATE // 50))[0])
    state = weakref.ref(enc._enc)
    enc.release()
    gc.collect()
    assert state() is None  # opuslib frees the libopus state when its object goes


def test_results_are_fresh_bytes_not_views_of_the_reused_buffers() -> None:
    """The codecs write into one buffer per state; what they return must not change
    when the next packet is coded (a jitter buffer holds several at once)."""
    enc, dec = OpusEncoder(), OpusDecoder()
    loud, quiet = frames(tone(440.0, -6.0, RATE // 25))[:2], frames(tone(440.0, -40.0, RATE // 25))
    first_packet = enc.encode(loud[0])
    kept_packet = bytes(first_packet)
    first_pcm = dec.decode(first_packet)
    kept_pcm = bytes(first_pcm)
    for pcm in quiet:
        dec.decode(enc.encode(pcm))
    assert first_packet == kept_packet and first_pcm == kept_pcm
    assert len(first_pcm) == 640


def test_long_packets_decode_whole_and_concealment_follows_them() -> None:
    enc60, dec = OpusEncoder(frame_ms=60), OpusDecoder()
    pcm = dec.decode(enc60.encode(frames(tone(440.0, -20.0, RATE * 3 // 50), 3 * 320)[0]))
    assert len(pcm) == 3 * 640
    assert len(dec.conceal()) == 3 * 640


def test_opuslibs_own_calls_keep_their_argument_types() -> None:
    """Our typed function pointers are new ones: code that uses opuslib_next directly
    (it is a shared library of the process) still gets its own conventions."""
    import opuslib_next

    OpusEncoder().encode(bytes(640))
    OpusDecoder().conceal()
    assert opuslib_next.api.encoder.libopus_encode.argtypes[1] is opuslib_next.api.c_int16_pointer
    assert opuslib_next.api.decoder.libopus_decode.argtypes[3] is opuslib_next.api.c_int16_pointer
    enc = opuslib_next.Encoder(16000, 1, opuslib_next.APPLICATION_VOIP)
    assert opuslib_next.Decoder(16000, 1).decode(enc.encode(bytes(640), 320), 320)
