"""edgevoice doctor: each check against fakes or a real relay stub, and the whole run."""

from __future__ import annotations

import asyncio
import io
import re
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from doctor_support import TIMEOUT_FACTOR, FakeAudio, RelayStub, pcm, room, sine

from edgevoice.config.model import DeviceConfig
from edgevoice.device.link import RelaySettings
from edgevoice.doctor import (
    TONE_DBFS,
    AudioDevice,
    Check,
    CheckResult,
    DeviceNotFoundError,
    DoctorEnv,
    Status,
    analyse_levels,
    check_config,
    check_gpio,
    check_microphone,
    check_opus,
    check_relay,
    check_sound_devices,
    check_speaker,
    check_systemd,
    check_token,
    doctor_checks,
    find_device,
    format_result,
    module_available,
    run_check,
    run_doctor,
    tone,
)

TOKEN = "kitchen-device-token-0123456789"


def env_with(audio: FakeAudio | None = None, **kwargs: object) -> DoctorEnv:
    return replace(DoctorEnv(audio=audio or FakeAudio(), record_s=0.5), **kwargs)  # type: ignore[arg-type]


def token_file(tmp_path: Path, token: str = TOKEN) -> Path:
    path = tmp_path / "device.token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def config_for(url: str, tmp_path: Path, token: str = TOKEN) -> DeviceConfig:
    return DeviceConfig(
        device_id="kitchen",
        relay=RelaySettings(
            url=url,
            token_file=str(token_file(tmp_path, token)),
            open_timeout_ms=int(5000 * TIMEOUT_FACTOR),
        ),
    )


def free_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- levels


def test_analyse_levels_of_a_known_sine() -> None:
    report = analyse_levels(pcm(sine(16000, 1.0, -6.0)), 16000)
    assert report.peak_dbfs == pytest.approx(-6.0, abs=0.1)
    # a sine's RMS is 3 dB below its peak, and every frame is the same
    assert report.noise_floor_dbfs == pytest.approx(-9.0, abs=0.2)
    assert report.clipped_fraction == 0
    assert not report.digital_silence


def test_analyse_levels_finds_the_floor_under_speech() -> None:
    report = analyse_levels(room(48000, 3.0, -60.0, speech_dbfs=-10.0), 48000)
    assert report.noise_floor_dbfs == pytest.approx(-60.0, abs=1.5)
    assert report.peak_dbfs == pytest.approx(-10.0, abs=0.5)


def test_analyse_levels_counts_clipping_and_digital_silence() -> None:
    clipped = analyse_levels(pcm(sine(16000, 1.0, 6.0)), 16000)  # driven past full scale
    assert clipped.clipped_fraction > 0.1
    assert clipped.peak_dbfs == pytest.approx(0.0, abs=0.01)
    silent = analyse_levels(bytes(32000), 16000)
    assert silent.digital_silence
    assert silent.noise_floor_dbfs == silent.peak_dbfs == -100.0
    with pytest.raises(ValueError):
        analyse_levels(b"", 16000)


def test_tone_is_the_promised_level_and_starts_silently() -> None:
    samples = np.frombuffer(tone(48000), dtype="<i2")
    assert samples.size == 24000
    assert 20 * np.log10(np.max(np.abs(samples)) / 32768) == pytest.approx(TONE_DBFS, abs=0.1)
    assert samples[0] == 0 and abs(int(samples[-1])) < 50  # faded: no click


# --------------------------------------------------------------------------- devices


DEVICES = FakeAudio().devices_list


def test_find_device_by_exact_name_unique_part_or_default() -> None:
    assert find_device(DEVICES, "pulse", "input", 3).index == 2
    assert find_device(DEVICES, "usb pnp", "input", 3).index == 1
    assert find_device(DEVICES, "default", "output", 3).index == 3
    # "Headphones" offers no input: only devices of the asked kind count
    assert find_device(DEVICES, "hw:0", "output", None).index == 0
    with pytest.raises(DeviceNotFoundError, match="no input device matches 'Headphones'"):
        find_device(DEVICES, "Headphones", "input", 3)
    with pytest.raises(DeviceNotFoundError, match="matches 2 input devices"):
        find_device(DEVICES, "p", "input", 3)  # "USB PnP" and "pulse"
    with pytest.raises(DeviceNotFoundError, match="no default input"):
        find_device(DEVICES, "default", "input", None)


def test_sound_devices_are_listed_by_name() -> None:
    result = check_sound_devices(env_with())
    assert result.status is Status.OK
    assert "'USB PnP Sound Device: Audio (hw:1,0)' (in, 44100 Hz)" in result.detail
    assert "'bcm2835 Headphones: - (hw:0,0)' (out, 48000 Hz)" in result.detail


def test_no_speaker_fails_the_devices_check() -> None:
    audio = FakeAudio(devices_list=[AudioDevice(1, "USB mic", 1, 0, 16000)])
    result = check_sound_devices(env_with(audio))
    assert result.status is Status.FAIL
    assert "no output device" in result.detail
    assert "aplay -l" in result.fix


def test_sound_system_that_cannot_be_queried_fails() -> None:
    class BrokenAudio(FakeAudio):
        def devices(self) -> list[AudioDevice]:
            raise OSError("PortAudio library not found")

    result = check_sound_devices(env_with(BrokenAudio()))
    assert result.status is Status.FAIL
    assert "PortAudio library not found" in result.detail
    assert check_microphone("default", env_with(BrokenAudio())).status is Status.FAIL


# --------------------------------------------------------------------------- microphone


def test_microphone_reports_floor_peak_and_a_threshold() -> None:
    audio = FakeAudio(recording=room(44100, 0.5, -62.0, speech_dbfs=-20.0))
    result = check_microphone("USB PnP", audio_env := env_with(audio), onset_db=10.0)
    assert result.status is Status.OK, result
    assert audio.recorded == [("USB PnP Sound Device: Audio (hw:1,0)", 0.5, 44100)]
    assert "at 44100 Hz" in result.detail
    numbers = re.search(
        r"noise floor (\S+) dBFS, peak (\S+) dBFS, no clipping; "
        r"suggested silence.min_speech_dbfs: (\S+)$",
        result.detail,
    )
    assert numbers is not None, result.detail
    floor, peak, suggested = (float(n) for n in numbers.groups())
    assert floor == pytest.approx(-62.0, abs=1.5)
    assert peak == pytest.approx(-20.0, abs=0.5)
    assert suggested == round(floor + 10.0)
    assert audio_env.record_s == 0.5


def test_microphone_warnings_say_what_to_turn() -> None:
    clipping = check_microphone("default", env_with(FakeAudio(recording=pcm(sine(44100, 0.5, 3)))))
    assert clipping.status is Status.WARN
    assert "clipped" in clipping.detail and "lower the capture gain" in clipping.fix
    silent = check_microphone("default", env_with(FakeAudio(recording=bytes(44100))))
    assert silent.status is Status.WARN
    assert "digital silence" in silent.detail and "alsamixer" in silent.fix
    noisy = check_microphone("default", env_with(FakeAudio(recording=room(44100, 0.5, -25.0))))
    assert noisy.status is Status.WARN
    assert "noisy" in noisy.fix


def test_microphone_that_is_missing_or_busy_fails() -> None:
    missing = check_microphone("ReSpeaker", env_with())
    assert missing.status is Status.FAIL
    assert "no input device matches 'ReSpeaker'" in missing.detail
    assert "'USB PnP Sound Device: Audio (hw:1,0)'" in missing.detail  # the names to pick from
    assert "audio.input" in missing.fix
    busy = check_microphone(
        "default", env_with(FakeAudio(recording=OSError("Device unavailable [PaErrorCode -9985]")))
    )
    assert busy.status is Status.FAIL
    assert "Device unavailable" in busy.detail
    assert "systemctl stop edgevoice" in busy.fix


def test_microphone_can_be_a_wav_file(tmp_path: Path) -> None:
    wav = tmp_path / "speech.wav"
    wav.write_bytes(b"RIFF")
    assert check_microphone(f"wav:{wav}", env_with()).status is Status.OK
    assert check_microphone(f"wav+fast:{wav}", env_with()).status is Status.OK
    assert check_microphone(f"wav:{tmp_path / 'nope.wav'}", env_with()).status is Status.FAIL


# --------------------------------------------------------------------------- speaker, opus


def test_speaker_plays_a_tone_at_the_devices_rate() -> None:
    audio = FakeAudio()
    result = check_speaker("Headphones", env_with(audio))
    assert result.status is Status.OK
    ((name, played, rate),) = audio.played
    assert (name, rate) == ("bcm2835 Headphones: - (hw:0,0)", 48000)
    assert played == tone(48000)
    assert "Headphones" in result.detail


def test_speaker_plays_at_48_khz_as_the_daemon_will_else_at_the_devices_rate() -> None:
    audio = FakeAudio()  # "default": 44.1 kHz by default, takes 48 kHz
    assert check_speaker("default", env_with(audio)).status is Status.OK
    assert [rate for _, _, rate in audio.played] == [48000]
    old_dac = FakeAudio(refused_rates=frozenset({48000}))
    result = check_speaker("default", env_with(old_dac))
    assert result.status is Status.OK and "at 44100 Hz" in result.detail
    assert [(rate, pcm == tone(44100)) for _, pcm, rate in old_dac.played] == [(44100, True)]


def test_speaker_plays_at_the_configured_output_rate_first() -> None:
    audio = FakeAudio()  # takes 48 kHz, but the config asks for 22.05 kHz
    result = check_speaker("default", env_with(audio), 22050)
    assert result.status is Status.OK and "at 22050 Hz" in result.detail
    assert [rate for _, _, rate in audio.played] == [22050]
    refused = FakeAudio(refused_rates=frozenset({22050}))  # as the daemon: the default then
    assert check_speaker("default", env_with(refused), 22050).status is Status.OK
    assert [rate for _, _, rate in refused.played] == [44100]


def test_speaker_failures() -> None:
    assert check_speaker("USB PnP", env_with()).status is Status.FAIL  # a mic, not a speaker
    broken = FakeAudio(play_error=OSError("Invalid sample rate"))
    result = check_speaker("default", env_with(broken))
    assert result.status is Status.FAIL and "Invalid sample rate" in result.detail
    assert check_speaker("wav:/tmp/out.wav", env_with()).status is Status.OK


def test_opus_with_the_real_library_and_without_it() -> None:
    real = check_opus(DoctorEnv())
    assert real.status is Status.OK, real
    assert "libopus" in real.detail

    def missing() -> str:
        raise OSError("libopus.so.0: cannot open shared object file")

    result = check_opus(env_with(opus=missing))
    assert result.status is Status.FAIL
    assert "libopus.so.0" in result.detail and "libopus0" in result.fix


# --------------------------------------------------------------------------- relay


def test_relay_accepts_the_token_and_no_session_is_opened(tmp_path: Path) -> None:
    with RelayStub(TOKEN) as relay:
        result = asyncio.run(
            check_relay(config_for(relay.url, tmp_path), "device.yaml", env_with())
        )
        assert result.status is Status.OK, result
        assert "accepted the token (edgevoice.v1)" in result.detail
        (headers,) = relay.requests
        assert headers["Authorization"] == f"Bearer {TOKEN}"
        assert headers["Sec-WebSocket-Protocol"] == "edgevoice.v1"
        for _ in range(100):  # the stub notices the close a moment later
            if relay.sessions:
                break
            time.sleep(0.01)
        assert relay.sessions == 1
        assert relay.messages == []  # no hello: a running daemon's session is left alone


def test_relay_rejecting_the_token_says_how_to_get_one(tmp_path: Path) -> None:
    with RelayStub("another-token") as relay:
        result = asyncio.run(
            check_relay(config_for(relay.url, tmp_path), "device.yaml", env_with())
        )
    assert result.status is Status.FAIL
    assert "token rejected" in result.detail and "HTTP 401" in result.detail
    # plain `token add` would be refused for a device that has a token: say --replace
    assert "edgevoice token add NAME --replace" in result.fix
    assert "/etc/edgevoice/device.token" in result.fix
    assert "/etc/edgevoice/device.token" in result.fix
    assert TOKEN not in result.detail + result.fix


def test_relay_unreachable(tmp_path: Path) -> None:
    url = f"ws://127.0.0.1:{free_port()}/"
    result = asyncio.run(check_relay(config_for(url, tmp_path), "device.yaml", env_with()))
    assert result.status is Status.FAIL
    assert result.detail.startswith("relay unreachable")
    assert "relay.url" in result.fix


def test_relay_without_the_subprotocol_or_with_an_error_status(tmp_path: Path) -> None:
    with RelayStub(TOKEN, subprotocols=()) as relay:
        result = asyncio.run(
            check_relay(config_for(relay.url, tmp_path), "device.yaml", env_with())
        )
    assert result.status is Status.FAIL
    assert "not the edgevoice.v1 protocol" in result.detail
    with RelayStub(TOKEN, status=503) as relay:
        result = asyncio.run(
            check_relay(config_for(relay.url, tmp_path), "device.yaml", env_with())
        )
    assert result.status is Status.FAIL
    assert "answered HTTP 503" in result.detail


def test_relay_check_skips_without_config_or_token(tmp_path: Path) -> None:
    skipped = asyncio.run(check_relay(None, "device.yaml", env_with()))
    assert skipped.status is Status.WARN
    config = DeviceConfig(relay=RelaySettings(token_file=str(tmp_path / "missing.token")))
    no_token = asyncio.run(check_relay(config, "device.yaml", env_with()))
    assert no_token.status is Status.WARN and "token" in no_token.detail


# --------------------------------------------------------------------------- config, token


def test_config_check_uses_the_real_loader(tmp_path: Path) -> None:
    good = tmp_path / "device.yaml"
    good.write_text("device_id: kitchen\nrelay:\n  url: wss://relay.example:8780/\n")
    config, result = check_config(str(good), DoctorEnv())
    assert result.status is Status.OK and config is not None
    assert "'kitchen'" in result.detail and "wss://relay.example:8780/" in result.detail
    bad = tmp_path / "bad.yaml"
    bad.write_text("audio:\n  inptu: USB\n")
    config, result = check_config(str(bad), DoctorEnv())
    assert config is None and result.status is Status.FAIL
    assert "audio.inptu" in result.detail and "unknown key" in result.detail
    assert "fix audio.inptu in" in result.fix
    config, result = check_config(str(tmp_path / "none.yaml"), DoctorEnv())
    assert result.status is Status.FAIL and "readable YAML file" in result.fix


def test_token_check_never_shows_the_token(tmp_path: Path) -> None:
    config = config_for("ws://127.0.0.1:1/", tmp_path)
    result = check_token(config, "device.yaml", DoctorEnv())
    assert result.status is Status.OK
    assert f"({len(TOKEN)} characters)" in result.detail and TOKEN not in result.detail
    token_file(tmp_path, "")
    empty = check_token(config, "device.yaml", DoctorEnv())
    assert empty.status is Status.FAIL and "edgevoice token add" in empty.fix


# --------------------------------------------------------------------------- systemd, gpio


class ScriptedRun:
    def __init__(self, answer: str | Exception) -> None:
        self.answer = answer
        self.calls: list[list[str]] = []

    def __call__(self, argv: object) -> tuple[int, str]:
        self.calls.append(list(argv))  # type: ignore[call-overload]
        if isinstance(self.answer, Exception):
            raise self.answer
        return (0 if self.answer == "active\n" else 3), self.answer


def systemd_root(tmp_path: Path) -> Path:
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    return tmp_path


def test_systemd_not_running_is_a_warning(tmp_path: Path) -> None:
    run = ScriptedRun("active\n")
    result = check_systemd(env_with(root=tmp_path, run=run))
    assert (result.status, result.detail) == (
        Status.WARN,
        "systemd not running: the service cannot be checked",
    )
    assert run.calls == []


@pytest.mark.parametrize(
    ("answer", "status", "fix_part"),
    [
        ("active\n", Status.OK, ""),
        ("failed\n", Status.FAIL, "journalctl -u edgevoice"),
        ("inactive\n", Status.WARN, "systemctl enable --now edgevoice"),
        ("activating\n", Status.WARN, "wait"),
        (FileNotFoundError("systemctl"), Status.WARN, "systemctl"),
    ],
)
def test_systemd_unit_state(
    tmp_path: Path, answer: str | Exception, status: Status, fix_part: str
) -> None:
    run = ScriptedRun(answer)
    result = check_systemd(env_with(root=systemd_root(tmp_path), run=run))
    assert result.status is status
    assert fix_part in result.fix
    assert run.calls == [["systemctl", "is-active", "edgevoice"]]


@dataclass(frozen=True)
class Enabled:
    enabled: bool = True


@dataclass(frozen=True)
class ConfigWithButton:
    button: Enabled = Enabled()
    led: Enabled = Enabled(enabled=False)


def test_gpio_only_matters_when_a_button_or_led_is_enabled(tmp_path: Path) -> None:
    assert check_gpio(DeviceConfig(), env_with(root=tmp_path)).status is Status.OK
    config = ConfigWithButton()
    result = check_gpio(config, env_with(root=tmp_path))  # type: ignore[arg-type]
    assert result.status is Status.FAIL and "/dev/gpiochip" in result.detail
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/gpiochip0").touch()
    no_lib = check_gpio(config, env_with(root=tmp_path, module_available=lambda name: False))  # type: ignore[arg-type]
    assert no_lib.status is Status.FAIL and "edgevoice[pi]" in no_lib.fix
    with_lib = env_with(root=tmp_path, module_available=lambda name: name == "gpiozero")
    ok = check_gpio(config, with_lib)  # type: ignore[arg-type]
    assert ok.status is Status.OK
    assert ok.detail == "button: gpiochip0 present, gpiozero importable"
    assert module_available("json") and not module_available("edgevoice_no_such_module")


# --------------------------------------------------------------------------- running


def test_a_crashing_or_hanging_check_becomes_a_failure() -> None:
    def crash() -> CheckResult:
        raise RuntimeError("oops")

    def hang() -> CheckResult:
        time.sleep(30)
        return CheckResult.ok("never")

    async def not_a_result() -> CheckResult:
        return "fine"  # type: ignore[return-value]

    crashed = asyncio.run(run_check(Check("crash", crash)))
    assert crashed.status is Status.FAIL and "RuntimeError: oops" in crashed.detail
    hung = asyncio.run(run_check(Check("hang", hang, timeout_s=0.2)))
    assert hung.status is Status.FAIL and "no answer within 0.2 s" in hung.detail
    odd = asyncio.run(run_check(Check("odd", not_a_result)))
    assert odd.status is Status.FAIL


def test_format_result_indents_details_and_shows_the_fix() -> None:
    text = format_result("relay", CheckResult.fail("line one\nline two", "do this"), width=8)
    assert text.splitlines() == [
        "FAIL  relay   line one",
        "              line two",
        "              fix: do this",
    ]
    assert format_result("opus", CheckResult.ok("fine"), width=8) == "OK    opus    fine"


def test_exit_status_is_non_zero_only_when_something_failed() -> None:
    out = io.StringIO()
    warn_only = [
        Check("a", lambda: CheckResult.ok("x")),
        Check("b", lambda: CheckResult.warn("y", "z")),
    ]
    assert run_doctor("device.yaml", out, checks=warn_only) == 0
    assert out.getvalue().splitlines()[-1] == "0 FAIL, 1 WARN, 1 OK"
    failing = [*warn_only, Check("c", lambda: CheckResult.fail("no", "fix it"))]
    assert run_doctor("device.yaml", io.StringIO(), checks=failing) == 1


def test_the_whole_doctor_on_a_healthy_setup(tmp_path: Path) -> None:
    with RelayStub(TOKEN) as relay:
        config_file = tmp_path / "device.yaml"
        config_file.write_text(
            "device_id: kitchen\n"
            f"relay:\n  url: {relay.url}\n  token_file: {token_file(tmp_path)}\n"
            "audio:\n  input: USB PnP\n  output: Headphones\n  output_rate_hz: 44100\n"
        )
        audio = FakeAudio(recording=room(44100, 0.5, -60.0, speech_dbfs=-15.0))
        env = env_with(audio, root=systemd_root(tmp_path), run=ScriptedRun("active\n"))
        out = io.StringIO()
        status = run_doctor(config_file, out, env=env)
    text = out.getvalue()
    assert status == 0, text
    names = [c.name for c in doctor_checks(str(config_file), env)]
    assert names == [
        "config",
        "token",
        "sound devices",
        "microphone",
        "speaker",
        "opus",
        "relay",
        "systemd",
        "gpio",
    ]
    for name in names:
        assert any(line.startswith("OK") and f" {name} " in line for line in text.splitlines()), (
            name
        )
    assert text.splitlines()[-1] == "0 FAIL, 0 WARN, 9 OK"
    assert audio.recorded[0][0].startswith("USB PnP") and audio.played[0][0].startswith("bcm2835")
    assert audio.played[0][2] == 44100  # the configured rate, though the device prefers 48 kHz
    assert TOKEN not in text


def test_a_broken_config_still_checks_the_sound_card(tmp_path: Path) -> None:
    config_file = tmp_path / "device.yaml"
    config_file.write_text("device_id: Not Valid\n")
    audio = FakeAudio(recording=room(44100, 0.5, -60.0))
    out = io.StringIO()
    assert run_doctor(config_file, out, env=env_with(audio, root=tmp_path)) == 1
    text = out.getvalue()
    assert "FAIL  config" in text and "device_id" in text
    assert audio.recorded and audio.played  # the default devices were still tried
    assert "skipped: the config did not load" in text
