"""Earcons: synthesised, clean (no clicks, no DC), within the volume, and recognisable."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from edgevoice.config.base import SettingError
from edgevoice.feedback.earcons import FADE_MS, Earcon, Earcons
from edgevoice.feedback.settings import FeedbackSettings

RATES = (16_000, 24_000, 44_100, 48_000)


def samples(pcm: bytes) -> npt.NDArray[np.float64]:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64) / 32767.0


def dominant_hz(signal: npt.NDArray[np.float64], rate_hz: int) -> float:
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return float(np.fft.rfftfreq(len(signal), 1 / rate_hz)[np.argmax(spectrum)])


def bursts(signal: npt.NDArray[np.float64], rate_hz: int) -> int:
    """How many separate sounds: runs of 5 ms windows above 10 % of the peak."""
    window = rate_hz // 200
    n = len(signal) // window
    loud = np.abs(signal[: n * window]).reshape(n, window).max(axis=1) > 0.1 * np.max(
        np.abs(signal)
    )
    return int(np.sum(loud[1:] & ~loud[:-1]) + loud[0])


@pytest.mark.parametrize("rate_hz", RATES)
@pytest.mark.parametrize("earcon", list(Earcon))
def test_length_peak_and_dc(earcon: Earcon, rate_hz: int) -> None:
    volume = 0.5
    pcm = Earcons(rate_hz, volume).pcm(earcon)
    x = samples(pcm)
    assert len(pcm) % 2 == 0
    assert 0.15 < len(x) / rate_hz < 0.8  # noticeable, and over before it annoys
    assert np.max(np.abs(x)) <= volume + 1 / 32767
    assert np.max(np.abs(x)) > 0.95 * volume  # and it uses the volume it was given
    assert abs(np.mean(x)) < 1e-3 * volume  # no DC: it would thump the speaker


@pytest.mark.parametrize("earcon", list(Earcon))
def test_every_note_fades_in_and_out(earcon: Earcon) -> None:
    rate_hz = 48_000
    x = samples(Earcons(rate_hz, 1.0).pcm(earcon))
    fade = int(FADE_MS * rate_hz / 1000)
    assert abs(x[0]) < 0.01 and abs(x[-1]) < 0.01
    # The first and last millisecond are far quieter than the body.
    ms = rate_hz // 1000
    body = np.max(np.abs(x[fade : fade * 4]))
    assert np.max(np.abs(x[:ms])) < 0.2 * body
    assert np.max(np.abs(x[-ms:])) < 0.2 * body
    # No click anywhere: no step between neighbouring samples bigger than the steepest
    # slope of the sound itself (the buzz's harmonics make its slope the largest).
    steps = np.abs(np.diff(x))
    assert np.max(steps) < 0.6


def test_rising_and_falling_two_tones() -> None:
    rate_hz = 16_000
    earcons = Earcons(rate_hz)
    start = samples(earcons.pcm(Earcon.LISTEN_START))
    end = samples(earcons.pcm(Earcon.LISTEN_END))
    half = len(start) // 2
    first, second = dominant_hz(start[: half - 400], rate_hz), dominant_hz(start[half:], rate_hz)
    assert first == pytest.approx(659, abs=15) and second == pytest.approx(880, abs=15)
    first, second = dominant_hz(end[: half - 400], rate_hz), dominant_hz(end[half:], rate_hz)
    assert first == pytest.approx(880, abs=15) and second == pytest.approx(659, abs=15)
    assert bursts(start, rate_hz) == 2 and bursts(end, rate_hz) == 2


def test_error_is_a_low_buzz_and_offline_three_low_beeps() -> None:
    rate_hz = 48_000
    earcons = Earcons(rate_hz)
    error = samples(earcons.pcm(Earcon.ERROR))
    assert dominant_hz(error, rate_hz) == pytest.approx(200, abs=10)
    spectrum = np.abs(np.fft.rfft(error))
    freqs = np.fft.rfftfreq(len(error), 1 / rate_hz)
    harmonics = float(spectrum[(freqs > 500) & (freqs < 4000)].sum()) / float(spectrum.sum())
    assert harmonics > 0.2  # a buzz, not a pure tone
    offline = samples(earcons.pcm(Earcon.OFFLINE))
    assert dominant_hz(offline, rate_hz) == pytest.approx(330, abs=15)
    assert bursts(offline, rate_hz) == 3
    assert bursts(error, rate_hz) == 1


def test_spectra_are_distinct() -> None:
    rate_hz = 16_000
    earcons = Earcons(rate_hz)
    n = rate_hz  # one second, zero-padded: comparable bins
    spectra = {}
    for earcon in Earcon:
        x = samples(earcons.pcm(earcon))
        s = np.abs(np.fft.rfft(x, n))
        spectra[earcon] = s / np.linalg.norm(s)
    for a in Earcon:
        for b in Earcon:
            similarity = float(np.dot(spectra[a], spectra[b]))
            if a is b:
                assert similarity == pytest.approx(1.0)
            elif {a, b} == {Earcon.LISTEN_START, Earcon.LISTEN_END}:
                # Same two notes in the other order: alike in spectrum, told apart by
                # their order (tested above).
                continue
            else:
                assert similarity < 0.5, (a, b)


def test_rendered_once_and_cached() -> None:
    earcons = Earcons(24_000)
    assert earcons.pcm(Earcon.ERROR) is earcons.pcm(Earcon.ERROR)
    assert earcons.duration_ms(Earcon.ERROR) == pytest.approx(350, abs=1)


def test_zero_volume_is_silence() -> None:
    assert set(Earcons(16_000, 0.0).pcm(Earcon.OFFLINE)) == {0}


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="volume"):
        Earcons(16_000, 1.5)
    with pytest.raises(ValueError, match="rate_hz"):
        Earcons(4_000)


def test_feedback_settings() -> None:
    default = FeedbackSettings()
    assert (default.earcons_enabled, default.earcon_volume) == (True, 0.5)
    assert (default.led_enabled, default.led_pin, default.led_pwm) == (False, 27, True)
    with pytest.raises(SettingError, match="earcon_volume"):
        FeedbackSettings(earcon_volume=2.0)
    with pytest.raises(SettingError, match="led_pin"):
        FeedbackSettings(led_pin=99)
