"""``edgevoice doctor``: check a device's setup, one line per finding, each with a fix.

The doctor is a list of :class:`Check` objects, each a name and a function (plain or
async) that returns a :class:`CheckResult`: OK, WARN or FAIL, what was found, and
the one thing to do about it. :func:`doctor_checks` builds the standard list from a
device config; :func:`run_checks` runs any list and prints it; :func:`run_doctor` is
the whole command and returns its exit status (1 if anything failed).

Everything the checks touch outside Python (sound devices, libopus, the relay,
systemd, GPIO) comes through :class:`DoctorEnv`, so tests hand in small fakes and
a real WebSocket server on 127.0.0.1 instead of patching.

Run it with the service stopped: the service holds the sound card, and ALSA
devices open by one program at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import importlib
import importlib.util
import inspect
import logging
import ssl
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, TextIO

import numpy as np

from edgevoice.audio.silence import SILENCE_DBFS
from edgevoice.audio.sounddevice_io import candidate_rates, speaker_rate_hz
from edgevoice.errors import ConfigError
from edgevoice.protocol.messages import SUBPROTOCOL

if TYPE_CHECKING:
    from edgevoice.config.model import DeviceConfig

logger = logging.getLogger(__name__)

#: Seconds of microphone audio the level check records.
RECORD_S = 3.0
#: The test tone: frequency, length and level.
TONE_HZ = 440.0
TONE_S = 0.5
TONE_DBFS = -12.0
#: Frame length for level analysis; the same 20 ms the silence detector sees.
LEVEL_FRAME_MS = 20
#: Fraction of clipped samples that earns a warning.
CLIPPING_WARN_FRACTION = 0.001
#: A noise floor louder than this makes speech hard to tell from the room.
NOISY_FLOOR_DBFS = -35.0
TOKEN_FIX = (
    "run `edgevoice token add NAME` on the relay and put the token in "
    "/etc/edgevoice/device.token (chmod 600)"
)
#: A token the relay refuses was usually replaced there (`token add NAME --replace`)
#: or removed: running plain `token add` again would only be refused.
REJECTED_TOKEN_FIX = (
    "on the relay, `edgevoice token list` shows the devices it knows; issue this device a "
    "new token with `edgevoice token add NAME --replace` and put it in "
    "/etc/edgevoice/device.token (the service restarts by itself)"
)
STOP_SERVICE_FIX = (
    "stop the service first (sudo systemctl stop edgevoice): a sound card serves one program"
)


class Status(enum.Enum):
    """How a check came out. FAIL makes the doctor exit non-zero."""

    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class CheckResult:
    """What a check found (``detail``, may span lines) and what to do (``fix``, one line)."""

    status: Status
    detail: str
    fix: str = ""

    @classmethod
    def ok(cls, detail: str) -> CheckResult:
        return cls(Status.OK, detail)

    @classmethod
    def warn(cls, detail: str, fix: str) -> CheckResult:
        return cls(Status.WARN, detail, fix)

    @classmethod
    def fail(cls, detail: str, fix: str) -> CheckResult:
        return cls(Status.FAIL, detail, fix)


CheckFunction = Callable[[], "CheckResult | Awaitable[CheckResult]"]
"""A plain function (run in a thread) or an async function."""


@dataclass(frozen=True)
class Check:
    """One named check. A plain function runs in a worker thread (it may block on a
    sound card); an async one runs on the event loop. Either is cut off after
    ``timeout_s``."""

    name: str
    run: CheckFunction
    timeout_s: float = 20.0


# --------------------------------------------------------------------------- seams


@dataclass(frozen=True)
class AudioDevice:
    """A sound device as PortAudio lists it."""

    index: int
    name: str
    input_channels: int
    output_channels: int
    default_rate_hz: int

    def offers(self, kind: Literal["input", "output"]) -> bool:
        return (self.input_channels if kind == "input" else self.output_channels) > 0


class AudioProbe(Protocol):
    """The sound system, as far as the doctor needs it."""

    def devices(self) -> list[AudioDevice]:
        """Every device (raises OSError when the sound system cannot be queried)."""

    def default_device(self, kind: Literal["input", "output"]) -> int | None:
        """Index of the default device of ``kind``, or None."""

    def record(self, device: AudioDevice, seconds: float, rate_hz: int) -> bytes:
        """Record mono s16le PCM (blocking)."""

    def play(self, device: AudioDevice, pcm: bytes, rate_hz: int) -> None:
        """Play mono s16le PCM to the end (blocking)."""


class SounddeviceProbe:
    """The real :class:`AudioProbe`: PortAudio through ``sounddevice`` (imported lazily)."""

    def devices(self) -> list[AudioDevice]:
        import sounddevice

        return [
            AudioDevice(
                index=int(d["index"]),
                name=str(d["name"]),
                input_channels=int(d["max_input_channels"]),
                output_channels=int(d["max_output_channels"]),
                default_rate_hz=int(d["default_samplerate"]),
            )
            for d in sounddevice.query_devices()
        ]

    def default_device(self, kind: Literal["input", "output"]) -> int | None:
        import sounddevice

        try:
            return int(sounddevice.query_devices(kind=kind)["index"])
        except (sounddevice.PortAudioError, ValueError):
            return None

    def record(self, device: AudioDevice, seconds: float, rate_hz: int) -> bytes:
        import sounddevice

        frames = int(seconds * rate_hz)
        recording = sounddevice.rec(
            frames, samplerate=rate_hz, channels=1, dtype="int16", device=device.index
        )
        sounddevice.wait()
        return bytes(recording.tobytes())

    def play(self, device: AudioDevice, pcm: bytes, rate_hz: int) -> None:
        import numpy
        import sounddevice

        samples = numpy.frombuffer(pcm, dtype="<i2")
        sounddevice.play(samples, samplerate=rate_hz, device=device.index, blocking=True)


#: Runs a command; returns (exit status, stdout). Raises FileNotFoundError without it.
CommandRunner = Callable[[Sequence[str]], "tuple[int, str]"]


def run_command(argv: Sequence[str]) -> tuple[int, str]:
    """The real :data:`CommandRunner` (10 s limit)."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    return done.returncode, done.stdout


def opus_version() -> str:
    """Create the daemon's Opus encoder and encode a frame; return libopus' version.

    Raises when the binding or the library is missing: that is the finding.
    """
    from edgevoice.audio.opus import OpusEncoder

    encoder = OpusEncoder()
    encoder.encode(bytes(encoder.frame_bytes))
    lib = importlib.import_module("opuslib_next")
    version = lib.api.info.get_version_string()
    return version.decode() if isinstance(version, bytes) else str(version)


def module_available(name: str) -> bool:
    """Whether ``name`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _load_config(path: str) -> DeviceConfig:
    from edgevoice.config.model import load_device_config

    return load_device_config(path)


def _read_token(config: DeviceConfig, path: str) -> str:
    from edgevoice.device.daemon import read_token

    return read_token(config, path)


@dataclass(frozen=True)
class DoctorEnv:
    """Everything outside Python the checks use; the defaults are the real machine."""

    load_config: Callable[[str], DeviceConfig] = _load_config
    read_token: Callable[[DeviceConfig, str], str] = _read_token
    audio: AudioProbe = field(default_factory=SounddeviceProbe)
    opus: Callable[[], str] = opus_version
    run: CommandRunner = run_command
    module_available: Callable[[str], bool] = module_available
    #: filesystem root for /run/systemd/system and /dev/gpiochip*
    root: Path = Path("/")
    record_s: float = RECORD_S


# --------------------------------------------------------------------------- levels


@dataclass(frozen=True)
class LevelReport:
    """What a stretch of microphone audio says about the room and the gain."""

    noise_floor_dbfs: float
    peak_dbfs: float
    clipped_fraction: float
    digital_silence: bool


def analyse_levels(pcm: bytes, rate_hz: int) -> LevelReport:
    """Levels of mono s16le ``pcm``, measured as the silence detector measures them
    (RMS of 20 ms frames against a full-scale square wave).

    The noise floor is the 10th percentile of the frame levels: the quiet moments,
    which a doctor run in a normal room mostly has, without letting one all-quiet
    frame claim the floor is lower than it is.
    """
    samples = np.frombuffer(pcm[: len(pcm) - len(pcm) % 2], dtype="<i2").astype(np.float64)
    if samples.size == 0:
        raise ValueError("no audio to analyse")
    frame = min(samples.size, max(1, rate_hz * LEVEL_FRAME_MS // 1000))
    frames = samples[: samples.size // frame * frame].reshape(-1, frame)
    energy = np.mean(frames * frames, axis=1) / (32768.0 * 32768.0)
    with np.errstate(divide="ignore"):
        levels = np.maximum(10.0 * np.log10(energy), SILENCE_DBFS)
    peak = float(np.max(np.abs(samples)))
    return LevelReport(
        noise_floor_dbfs=float(np.percentile(levels, 10)),
        peak_dbfs=max(SILENCE_DBFS, 20.0 * np.log10(peak / 32768.0)) if peak else SILENCE_DBFS,
        clipped_fraction=float(np.mean(np.abs(samples) >= 32767.0)),
        digital_silence=peak == 0.0,
    )


def tone(rate_hz: int, *, hz: float = TONE_HZ, seconds: float = TONE_S) -> bytes:
    """A sine at :data:`TONE_DBFS` with 10 ms fades (no clicks), as mono s16le PCM."""
    n = np.arange(int(rate_hz * seconds))
    fade = max(1, rate_hz // 100)
    envelope = np.minimum(1.0, np.minimum(n, n[::-1]) / fade)
    wave = 32767 * 10 ** (TONE_DBFS / 20) * envelope * np.sin(2 * np.pi * hz * n / rate_hz)
    return wave.astype("<i2").tobytes()


# --------------------------------------------------------------------------- devices


class DeviceNotFoundError(LookupError):
    """No device, or more than one, matches a configured name."""


def find_device(
    devices: Sequence[AudioDevice],
    name: str,
    kind: Literal["input", "output"],
    default_index: int | None,
) -> AudioDevice:
    """The device a configured name means: "default", an exact name, or a unique part.

    Case is ignored for parts, and only devices that offer ``kind`` count, so
    "USB" finds the one USB microphone even when the USB speaker is listed too.
    """
    candidates = [d for d in devices if d.offers(kind)]
    if name == "default":
        for device in candidates:
            if device.index == default_index:
                return device
        raise DeviceNotFoundError(f"there is no default {kind} device")
    exact = [d for d in candidates if d.name == name]
    if len(exact) == 1:
        return exact[0]
    partial = [d for d in candidates if name.lower() in d.name.lower()]
    if len(partial) == 1:
        return partial[0]
    if not partial:
        raise DeviceNotFoundError(f"no {kind} device matches {name!r}")
    names = ", ".join(repr(d.name) for d in partial)
    raise DeviceNotFoundError(f"{name!r} matches {len(partial)} {kind} devices: {names}")


def _listing(devices: Sequence[AudioDevice], kind: Literal["input", "output"]) -> str:
    names = [d.name for d in devices if d.offers(kind)]
    return ", ".join(repr(n) for n in names) if names else "none"


# --------------------------------------------------------------------------- the checks


def check_config(config_path: str, env: DoctorEnv) -> tuple[DeviceConfig | None, CheckResult]:
    """Load the config once; the other checks are built from what it says."""
    try:
        config = env.load_config(config_path)
    except ConfigError as exc:
        if exc.key.startswith("("):  # the file itself: missing, unreadable, not YAML
            fix = f"make {exc.file} a readable YAML file (config/device.yaml is an example)"
        else:
            fix = f"fix {exc.key} in {exc.file} (`edgevoice device --help-config` lists keys)"
        return None, CheckResult.fail(str(exc), fix)
    except ImportError as exc:
        return None, CheckResult.warn(
            f"the config loader is not available: {exc}", "reinstall edgevoice"
        )
    return config, CheckResult.ok(
        f"{config_path}: device {config.device_id or '(named by its token)'!r}, "
        f"relay {config.relay.url}"
    )


def check_token(config: DeviceConfig | None, config_path: str, env: DoctorEnv) -> CheckResult:
    """The device token can be read (never shown)."""
    if config is None:
        return CheckResult.warn("skipped: the config did not load", "fix the config first")
    try:
        token = env.read_token(config, config_path)
    except ConfigError as exc:
        return CheckResult.fail(exc.reason, TOKEN_FIX)
    return CheckResult.ok(f"device token found ({len(token)} characters)")


def check_sound_devices(env: DoctorEnv) -> CheckResult:
    """List every sound device by name; fail when there is no microphone or speaker."""
    try:
        devices = env.audio.devices()
    except Exception as exc:  # PortAudio missing or broken: exactly the finding
        return CheckResult.fail(
            f"cannot list sound devices: {exc}", "apt-get install libportaudio2; check `aplay -l`"
        )
    lines = [f"{len(devices)} sound devices" + (":" if devices else "")]
    for d in devices:
        roles = [r for r, n in (("in", d.input_channels), ("out", d.output_channels)) if n]
        lines.append(f"  {d.name!r} ({'/'.join(roles) or 'no channels'}, {d.default_rate_hz} Hz)")
    detail = "\n".join(lines)
    missing = [k for k in ("input", "output") if not any(d.offers(k) for d in devices)]
    if missing:
        return CheckResult.fail(
            f"{detail}\nno {' and no '.join(missing)} device",
            "connect the sound card and check `arecord -l` / `aplay -l` "
            "(a HAT needs its dtoverlay in /boot/firmware/config.txt)",
        )
    return CheckResult.ok(detail)


def _resolve(
    env: DoctorEnv, name: str, kind: Literal["input", "output"]
) -> AudioDevice | CheckResult:
    try:
        devices = env.audio.devices()
        default = env.audio.default_device(kind)
    except Exception as exc:
        return CheckResult.fail(f"cannot list sound devices: {exc}", "see the devices check")
    try:
        return find_device(devices, name, kind, default)
    except DeviceNotFoundError as exc:
        return CheckResult.fail(
            f"{exc} (available: {_listing(devices, kind)})",
            f"set audio.{kind} to one of the names listed, or a unique part of it",
        )


def check_microphone(name: str, env: DoctorEnv, *, onset_db: float = 10.0) -> CheckResult:
    """Record from the configured input; report the noise floor, peak and clipping."""
    if name.startswith(("wav:", "wav+fast:")):
        return _check_wav_input(name)
    device = _resolve(env, name, "input")
    if isinstance(device, CheckResult):
        return device
    rate = device.default_rate_hz
    try:
        pcm = env.audio.record(device, env.record_s, rate)
        report = analyse_levels(pcm, rate)
    except Exception as exc:
        return CheckResult.fail(f"cannot record from {device.name!r}: {exc}", STOP_SERVICE_FIX)
    where = f"{device.name!r} at {rate} Hz, {env.record_s:g} s"
    if report.digital_silence:
        return CheckResult.warn(
            f"{where}: digital silence (every sample is 0)",
            "unmute the capture channel and raise its gain (alsamixer, F4), check the mic cable",
        )
    # Clamped: under -70 dBFS any real microphone's hiss would count as speech, and
    # over -20 dBFS users would have to shout.
    suggested = min(-20, max(-70, round(report.noise_floor_dbfs + onset_db)))
    detail = (
        f"{where}: noise floor {report.noise_floor_dbfs:.1f} dBFS, peak "
        f"{report.peak_dbfs:.1f} dBFS, "
        + (
            f"{report.clipped_fraction:.2%} of samples clipped"
            if report.clipped_fraction
            else "no clipping"
        )
        + f"; suggested silence.min_speech_dbfs: {suggested}"
    )
    if report.clipped_fraction > CLIPPING_WARN_FRACTION:
        return CheckResult.warn(detail, "lower the capture gain (alsamixer, F4) until it stops")
    if report.noise_floor_dbfs > NOISY_FLOOR_DBFS:
        return CheckResult.warn(
            detail, "very noisy input: lower the capture gain or move the mic away from noise"
        )
    return CheckResult.ok(detail)


def _check_wav_input(name: str) -> CheckResult:
    path = Path(name.split(":", 1)[1])
    if path.is_file():
        return CheckResult.ok(f"input is the WAV file {path}")
    return CheckResult.fail(f"input WAV file {path} does not exist", "fix audio.input")


def check_speaker(name: str, env: DoctorEnv, rate_hz: int | None = None) -> CheckResult:
    """Play a short tone on the configured output, at the rate the daemon will use
    (``rate_hz`` is ``audio.output_rate_hz``)."""
    if name.startswith("wav:"):
        return CheckResult.ok(f"output is the WAV file {name[4:]}: nothing to play")
    device = _resolve(env, name, "output")
    if isinstance(device, CheckResult):
        return device
    for rate in candidate_rates(speaker_rate_hz(rate_hz), device.default_rate_hz):
        try:
            env.audio.play(device, tone(rate), rate)
            break
        except Exception as exc:
            error = exc
    else:
        return CheckResult.fail(f"cannot play on {device.name!r}: {error}", STOP_SERVICE_FIX)
    return CheckResult.ok(
        f"played a {TONE_S:g} s {TONE_HZ:g} Hz beep on {device.name!r} at {rate} Hz: "
        "you should have heard it"
    )


def check_opus(env: DoctorEnv) -> CheckResult:
    """libopus and its binding load, and an encoder can be made and used."""
    try:
        version = env.opus()
    except Exception as exc:
        return CheckResult.fail(
            f"Opus unavailable: {exc}", "apt-get install libopus0 and pip install opuslib-next"
        )
    return CheckResult.ok(f"{version}: encoder created, a frame encoded")


async def check_relay(config: DeviceConfig | None, config_path: str, env: DoctorEnv) -> CheckResult:
    """Open a WebSocket to the relay with the device token and close it again.

    No hello is sent, so the relay opens no session and a running daemon's session
    is not replaced.
    """
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus, WebSocketException
    from websockets.typing import Subprotocol

    if config is None:
        return CheckResult.warn("skipped: the config did not load", "fix the config first")
    relay = config.relay
    if relay.url == "auto":
        from edgevoice.discovery.mdns import browse, choose, relay_url
        try:
            found = choose(await browse(config.discovery.browse_ms / 1000), config.discovery)
        except (RuntimeError, OSError):
            found = None
        if found is None:
            return CheckResult.warn("skipped: relay.url is auto and no relay was found",
                                    "see the discovery check")
        relay = dataclasses.replace(relay, url=relay_url(found))
    try:
        token = env.read_token(config, config_path)
    except ConfigError:
        return CheckResult.warn("skipped: no device token", "see the token check")
    context: ssl.SSLContext | None = None
    if relay.url.startswith("wss://"):
        context = ssl.create_default_context()
        if relay.ca_file:
            context.load_verify_locations(relay.ca_file)
    try:
        async with connect(
            relay.url,
            additional_headers={"Authorization": f"Bearer {token}"},
            subprotocols=[Subprotocol(SUBPROTOCOL)],
            open_timeout=relay.open_timeout_ms / 1000,
            ssl=context,
            proxy=None,
        ) as ws:
            chosen = ws.subprotocol
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status in (401, 403):
            return CheckResult.fail(f"token rejected by {relay.url} (HTTP {status})",
                                    REJECTED_TOKEN_FIX)
        if status == 429:
            return CheckResult.fail(
                f"{relay.url} is refusing this address after bad tokens (HTTP 429)",
                "fix the token, then wait a minute",
            )
        return CheckResult.fail(
            f"{relay.url} answered HTTP {status}", "check relay.url and the relay's log"
        )
    except ssl.SSLCertVerificationError as exc:
        return CheckResult.fail(
            f"TLS certificate of {relay.url} not trusted: {exc.verify_message}",
            "set relay.ca_file to the CA that signed the relay's certificate",
        )
    except (OSError, TimeoutError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        return CheckResult.fail(
            f"relay unreachable: {relay.url}: {reason}",
            "check relay.url, that the relay runs, and the network/firewall",
        )
    except WebSocketException as exc:
        return CheckResult.fail(
            f"{relay.url} is not an edgevoice relay: {exc}", "check relay.url (host, port, path)"
        )
    if chosen != SUBPROTOCOL:
        return CheckResult.fail(
            f"{relay.url} accepted the token but not the {SUBPROTOCOL} protocol",
            "update edgevoice on the relay and on the device to the same version",
        )
    return CheckResult.ok(f"{relay.url} accepted the token ({SUBPROTOCOL})")


async def check_discovery(config: DeviceConfig | None) -> CheckResult:
    """List the relays that answer on the LAN (mDNS); needed when relay.url is auto."""
    from edgevoice.discovery.mdns import (
        DeviceDiscoverySettings,
        DiscoveryUnavailableError,
        browse,
        choose,
        relay_url,
    )

    auto = config is not None and config.relay.url == "auto"
    if not auto:  # no multicast on the LAN unless the device would use it
        return CheckResult.ok("not used: relay.url is set")
    settings = config.discovery if config is not None else DeviceDiscoverySettings()
    try:
        found = await browse(settings.browse_ms / 1000)
    except DiscoveryUnavailableError as exc:
        fix = "pip install 'edgevoice[discovery]'"
        return CheckResult.fail(str(exc), fix) if auto else CheckResult.ok(
            "not used (relay.url is set); mDNS discovery is not installed")
    except OSError as exc:
        return CheckResult.warn(f"cannot browse the LAN: {exc}", "check the network")
    lines = [f"{f.name}: {relay_url(f)} ({', '.join(f.addresses)}, "
             f"{'TLS' if f.tls else 'no TLS'}, edgevoice {f.version or '?'})" for f in found]
    chosen = choose(found, settings)
    if auto and chosen is None:
        return CheckResult.fail("\n".join(lines) or "no relay answered",
                                "advertise it (relay: discovery.advertise: true), or allow "
                                "plain relays (discovery.allow_plain), or set relay.url")
    if auto and chosen is not None:
        lines.append(f"relay.url auto -> {relay_url(chosen)}")
    return CheckResult.ok("\n".join(lines) or "no relay advertised on the LAN")


def check_systemd(env: DoctorEnv) -> CheckResult:
    """The edgevoice unit is active (when systemd runs this machine)."""
    if not (env.root / "run/systemd/system").is_dir():
        return CheckResult.warn(
            "systemd not running: the service cannot be checked",
            "on the device, install the unit from systemd/ and start it with systemd",
        )
    try:
        _, out = env.run(["systemctl", "is-active", "edgevoice"])
    except (OSError, subprocess.SubprocessError) as exc:
        return CheckResult.warn(f"cannot ask systemctl: {exc}", "check that systemctl works")
    state = out.strip() or "unknown"
    if state == "active":
        return CheckResult.ok("edgevoice.service is active")
    if state == "failed":
        return CheckResult.fail(
            "edgevoice.service has failed", "read `journalctl -u edgevoice -e`, then restart it"
        )
    if state in ("activating", "reloading", "deactivating"):
        return CheckResult.warn(f"edgevoice.service is {state}", "wait, then run the doctor again")
    return CheckResult.warn(
        f"edgevoice.service is {state}", "sudo systemctl enable --now edgevoice"
    )


def gpio_users(config: DeviceConfig | None) -> list[str]:
    """The enabled config sections that drive GPIO pins (button, LED).

    Looked up by name rather than typed, because those sections belong to the
    optional ``pi`` extra and may be absent from a build.
    """
    users = []
    for path in ("button", "led", "triggers.button", "feedback.led"):
        section: object = config
        for part in path.split("."):
            section = getattr(section, part, None)
        if getattr(section, "enabled", False) is True:
            users.append(path)
    return users


def check_gpio(config: DeviceConfig | None, env: DoctorEnv) -> CheckResult:
    """GPIO chips exist and gpiozero imports, when a button or LED is enabled."""
    users = gpio_users(config)
    if not users:
        return CheckResult.ok("no GPIO button or LED enabled")
    what = " and ".join(users)
    chips = sorted(p.name for p in (env.root / "dev").glob("gpiochip*"))
    if not chips:
        return CheckResult.fail(
            f"{what} enabled but there is no /dev/gpiochip*",
            "run on the Pi itself; in a container pass the /dev/gpiochip* devices through",
        )
    if not env.module_available("gpiozero"):
        return CheckResult.fail(
            f"{what} enabled but gpiozero is not installed", "pip install 'edgevoice[pi]'"
        )
    return CheckResult.ok(f"{what}: {', '.join(chips)} present, gpiozero importable")


def doctor_checks(config_path: str, env: DoctorEnv | None = None) -> list[Check]:
    """The standard checks for the device config at ``config_path``.

    The config is loaded once, here; when it does not load, the audio checks still
    run against the default devices and the checks that need it say they skipped.
    """
    env = env or DoctorEnv()
    config, loaded = check_config(config_path, env)
    audio_in = config.audio.input if config else "default"
    audio_out = config.audio.output if config else "default"
    out_rate_hz = config.audio.output_rate_hz if config else None
    onset_db = config.silence.onset_db if config else 10.0
    return [
        Check("config", lambda: loaded),
        Check("token", functools.partial(check_token, config, config_path, env)),
        Check("sound devices", functools.partial(check_sound_devices, env)),
        Check(
            "microphone",
            functools.partial(check_microphone, audio_in, env, onset_db=onset_db),
            timeout_s=env.record_s + 15,
        ),
        Check("speaker", functools.partial(check_speaker, audio_out, env, out_rate_hz)),
        Check("opus", functools.partial(check_opus, env)),
        Check("relay", functools.partial(check_relay, config, config_path, env)),
        Check("systemd", functools.partial(check_systemd, env)),
        Check("gpio", functools.partial(check_gpio, config, env)),
    ] + ([Check("discovery", functools.partial(check_discovery, config))]
         if config is not None and config.relay.url == "auto" else [])


# --------------------------------------------------------------------------- running


async def run_check(check: Check) -> CheckResult:
    """Run one check; a check that crashes or hangs is reported, not propagated."""
    try:
        if inspect.iscoroutinefunction(check.run):
            result = await asyncio.wait_for(check.run(), check.timeout_s)
        else:
            result = await asyncio.wait_for(_in_daemon_thread(check.run), check.timeout_s)
    except TimeoutError:
        return CheckResult.fail(f"no answer within {check.timeout_s:g} s", "run it again")
    except Exception as exc:
        logger.debug("check %s crashed", check.name, exc_info=True)
        return CheckResult.fail(
            f"the check itself failed: {type(exc).__name__}: {exc}", "report this as a bug"
        )
    if not isinstance(result, CheckResult):
        return CheckResult.fail(f"the check returned {result!r}", "report this as a bug")
    return result


async def _in_daemon_thread(function: Callable[[], object]) -> object:
    """Run a blocking check in a daemon thread.

    Not the default executor: ``asyncio.run`` waits for its threads at exit, so one
    sound card call that never returns would hang the doctor after it timed out.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[object] = loop.create_future()

    def settle(outcome: object, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(outcome)

    def work() -> None:
        outcome: object = None
        error: BaseException | None = None
        try:
            outcome = function()
        except BaseException as exc:
            error = exc
        # RuntimeError: the loop is gone because the doctor gave up on this check.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, outcome, error)

    threading.Thread(target=work, name="doctor-check", daemon=True).start()
    return await future


def format_result(name: str, result: CheckResult, width: int = 14) -> str:
    """``STATUS name detail`` with continuation lines indented and the fix last."""
    indent = " " * (6 + width)
    first, *rest = result.detail.splitlines() or [""]
    lines = [f"{result.status.value:<6}{name:<{width}}{first}"]
    lines.extend(indent + line for line in rest)
    if result.fix and result.status is not Status.OK:
        lines.append(f"{indent}fix: {result.fix}")
    return "\n".join(lines)


async def run_checks(checks: Sequence[Check], out: TextIO) -> list[CheckResult]:
    """Run ``checks`` one after another (they share the sound card), printing each."""
    width = max((len(c.name) for c in checks), default=0) + 2
    results = []
    for check in checks:
        result = await run_check(check)
        results.append(result)
        print(format_result(check.name, result, width), file=out, flush=True)
    return results


def summary(results: Sequence[CheckResult]) -> str:
    counts = {s: sum(1 for r in results if r.status is s) for s in Status}
    return ", ".join(f"{counts[s]} {s.value}" for s in (Status.FAIL, Status.WARN, Status.OK))


def run_doctor(
    config_path: str | Path,
    out: TextIO | None = None,
    *,
    env: DoctorEnv | None = None,
    checks: Sequence[Check] | None = None,
) -> int:
    """``edgevoice doctor``: print every finding; 1 if any check failed, else 0.

    ``checks`` replaces the standard list (the CLI may add or drop some).
    """
    out = out or sys.stdout
    path = str(config_path)
    print(f"edgevoice doctor: {path}", file=out)
    chosen = list(checks) if checks is not None else doctor_checks(path, env)
    results = asyncio.run(run_checks(chosen, out))
    print(summary(results), file=out)
    return 1 if any(r.status is Status.FAIL for r in results) else 0
