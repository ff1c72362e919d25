"""The systemd units: they load cleanly, keep their promises, and stay hardened.

``systemd-analyze verify`` and ``systemd-analyze security --offline=true`` work
without systemd running. ``verify`` insists that ExecStart= exists, so it runs
against a throwaway root holding the units, systemd's own target units and a stub
``/opt/edgevoice/venv/bin/edgevoice``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS_DIR = REPO / "systemd"
SERVICES = ["edgevoice.service", "edgevoice-relay.service"]
PATHS = ["edgevoice-reconfigure.path", "edgevoice-relay-reconfigure.path"]
HELPERS = ["edgevoice-reconfigure.service", "edgevoice-relay-reconfigure.service"]
ALL_UNITS = SERVICES + PATHS + HELPERS
MAX_EXPOSURE = 2.0

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd)"
)


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as ordered (key, value) lists; repeated keys kept."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"{section}.{key}: expected one value, got {found}"
    return found[0]


def system_unit_dir() -> Path:
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (candidate / "multi-user.target").exists():
            return candidate
    pytest.skip("systemd's own unit files are not installed")


def make_verify_root(root: Path, units: dict[str, str]) -> Path:
    """A root with systemd's targets, our units and a stub ExecStart binary."""
    shutil.copytree(system_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    for stub in ("opt/edgevoice/venv/bin/edgevoice", "usr/bin/systemctl"):
        binary = root / stub
        binary.parent.mkdir(parents=True, exist_ok=True)
        binary.write_text("#!/bin/sh\nexit 0\n")
        binary.chmod(0o755)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for name, text in units.items():
        (unit_dir / name).write_text(text)
    return root


def verify(root: Path, name: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, "verify", "--man=no", f"--root={root}", f"/etc/systemd/system/{name}"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def exposure(path: Path) -> tuple[float, str]:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1)), match.group(2)


# ----------------------------------------------------------------------------- analyze


@needs_analyze
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    units = {name: (UNITS_DIR / name).read_text() for name in ALL_UNITS}
    root = make_verify_root(tmp_path / "root", units)
    for name in ALL_UNITS:
        result = verify(root, name)
        # verify exits 0 on unknown keys and bad values: any output is a failure
        assert (result.returncode, result.stdout + result.stderr) == (0, ""), name


@needs_analyze
def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    # the check above can fail: a typo and a missing binary are both reported
    broken = (UNITS_DIR / "edgevoice.service").read_text()
    broken = broken.replace("ProtectSystem=strict", "ProtectSystem=strickt")
    broken = broken.replace("/opt/edgevoice/venv/bin/edgevoice", "/opt/edgevoice/venv/bin/nope")
    root = make_verify_root(tmp_path / "root", {"edgevoice.service": broken})
    result = verify(root, "edgevoice.service")
    output = result.stdout + result.stderr
    assert "strickt" in output
    assert "nope" in output


@needs_analyze
@pytest.mark.parametrize("name", SERVICES + HELPERS)
def test_services_are_rated_ok_by_systemd_analyze_security(name: str) -> None:
    score, verdict = exposure(UNITS_DIR / name)
    assert score <= MAX_EXPOSURE, f"{name}: exposure {score} {verdict}"
    assert verdict in ("OK", "SAFE")


@needs_analyze
def test_the_security_check_can_fail(tmp_path: Path) -> None:
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nExecStart=/bin/true\n")
    score, _ = exposure(bare)
    assert score > MAX_EXPOSURE


# ----------------------------------------------------------------------------- promises


@pytest.mark.parametrize("name", SERVICES)
def test_services_keep_the_supervision_contract(name: str) -> None:
    unit = parse_unit(UNITS_DIR / name)
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert one(unit, "Service", "WatchdogSec") == "30"
    assert one(unit, "Service", "Restart") == "always"
    assert one(unit, "Service", "RestartSec") == "2"
    # a forgotten board must keep retrying: no start-rate limit
    assert one(unit, "Unit", "StartLimitIntervalSec") == "0"
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    # the relay's SIGTERM drains then closes: drain 8 s + 3 s + shutdown_timeout_ms 5 s
    assert one(unit, "Service", "TimeoutStopSec") == ("20" if "relay" in name else "10")
    assert values(unit, "Service", "DynamicUser") in ([], ["no"])
    assert one(unit, "Service", "CapabilityBoundingSet") == ""
    assert one(unit, "Service", "NoNewPrivileges") == "yes"
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_device_unit_runs_the_device_with_its_token_as_a_credential() -> None:
    unit = parse_unit(UNITS_DIR / "edgevoice.service")
    assert one(unit, "Service", "ExecStart") == (
        "/opt/edgevoice/venv/bin/edgevoice device --config /etc/edgevoice/device.yaml"
    )
    assert one(unit, "Service", "User") == "edgevoice"
    assert one(unit, "Service", "LoadCredential") == "device-token:/etc/edgevoice/device.token"
    # only groups that exist on every Debian: a missing group stops the unit
    assert one(unit, "Service", "SupplementaryGroups") == "audio"
    assert one(unit, "Service", "StateDirectory") == "edgevoice"
    assert one(unit, "Service", "RuntimeDirectory") == "edgevoice"
    assert one(unit, "Service", "ConfigurationDirectory") == "edgevoice"
    assert one(unit, "Service", "DevicePolicy") == "closed"
    assert "char-alsa rw" in values(unit, "Service", "DeviceAllow")
    # cffi callbacks (sounddevice) need writable+executable memory
    assert values(unit, "Service", "MemoryDenyWriteExecute") == []
    # supplementary groups would be mapped to nobody
    assert values(unit, "Service", "PrivateUsers") in ([], ["no"])


def test_relay_unit_runs_the_relay_on_its_own_user() -> None:
    unit = parse_unit(UNITS_DIR / "edgevoice-relay.service")
    assert one(unit, "Service", "ExecStart") == (
        "/opt/edgevoice/venv/bin/edgevoice relay --config /etc/edgevoice/relay.yaml"
    )
    assert one(unit, "Service", "User") == "edgevoice-relay"
    assert one(unit, "Service", "StateDirectory") == "edgevoice-relay"
    assert one(unit, "Service", "PrivateDevices") == "yes"
    assert one(unit, "Service", "MemoryDenyWriteExecute") == "yes"
    assert values(unit, "Service", "SupplementaryGroups") == []


@pytest.mark.parametrize(
    ("service", "path_unit", "helper"), list(zip(SERVICES, PATHS, HELPERS, strict=True))
)
def test_a_config_change_is_applied_and_a_config_error_waits_for_it(
    service: str, path_unit: str, helper: str
) -> None:
    unit = parse_unit(UNITS_DIR / service)
    watcher = parse_unit(UNITS_DIR / path_unit)
    restarter = parse_unit(UNITS_DIR / helper)
    # exit 78 stops the service instead of looping every 2 s ...
    assert one(unit, "Service", "RestartPreventExitStatus") == "78"
    # ... and saving a changed config or token restarts it (the path unit starts
    # its namesake .service, which restarts the daemon whatever its state)
    assert values(watcher, "Path", "Unit") in ([], [helper])
    assert path_unit.removesuffix(".path") == helper.removesuffix(".service")
    assert one(restarter, "Service", "Type") == "oneshot"
    assert one(restarter, "Service", "ExecStart") == (
        f"/usr/bin/systemctl restart --no-block {service}"
    )
    # a start limit, once hit, would make the path unit stop watching for good
    assert one(restarter, "Unit", "StartLimitIntervalSec") == "0"
    assert one(watcher, "Install", "WantedBy") == "paths.target"
    config = one(unit, "Service", "ExecStart").split("--config ")[1]
    watched = values(watcher, "Path", "PathChanged")
    assert config in watched
    for credential in values(unit, "Service", "LoadCredential"):
        assert credential.split(":", 1)[1] in watched


def test_the_exit_status_for_config_errors_is_the_clis() -> None:
    from edgevoice.config.loader import EXIT_CONFIG

    unit = parse_unit(UNITS_DIR / "edgevoice.service")
    assert one(unit, "Service", "RestartPreventExitStatus") == str(EXIT_CONFIG)


def test_the_watchdog_notices_a_stall_well_within_watchdogsec() -> None:
    from edgevoice.service import WatchdogSettings

    watchdog_s = int(one(parse_unit(UNITS_DIR / "edgevoice.service"), "Service", "WatchdogSec"))
    settings = WatchdogSettings()
    assert settings.stall_after_s < watchdog_s / 2
    assert settings.loop_stall_after_s < watchdog_s / 2


# ----------------------------------------------------------------------------- W^X

MDWE_RUNNER = textwrap.dedent(
    """
    import ctypes, importlib, sys
    libc = ctypes.CDLL(None, use_errno=True)
    # PR_SET_MDWE = 65, PR_MDWE_REFUSE_EXEC_GAIN = 1: the kernel's own version of
    # systemd's MemoryDenyWriteExecute=yes (Linux >= 6.3)
    if libc.prctl(65, 1, 0, 0, 0) != 0:
        sys.exit(77)
    exec(sys.argv[1])
    """
)


def run_under_mdwe(code: str, *, mdwe: bool = True) -> subprocess.CompletedProcess[str]:
    runner = MDWE_RUNNER if mdwe else "import sys\nexec(sys.argv[1])"
    return subprocess.run(
        [sys.executable, "-c", runner, code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def require_mdwe() -> None:
    if run_under_mdwe("pass").returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3)")


RELAY_WORK = """
import numpy, soxr, opuslib_next
import edgevoice.relay.server, edgevoice.relay.auth
enc = opuslib_next.Encoder(16000, 1, opuslib_next.APPLICATION_VOIP)
dec = opuslib_next.Decoder(16000, 1)
pcm = dec.decode(enc.encode(bytes(640), 320), 320)
out = soxr.resample(numpy.zeros(1600, dtype=numpy.int16), 16000, 24000)
try:
    import awscrt.io
    awscrt.io.ClientBootstrap(awscrt.io.EventLoopGroup(1), awscrt.io.DefaultHostResolver(
        awscrt.io.EventLoopGroup(1)))
    import aws_sdk_bedrock_runtime.client
except ImportError:
    pass
print("relay work ok")
"""


def test_relay_code_runs_without_writable_executable_memory() -> None:
    # the relay unit sets MemoryDenyWriteExecute=yes: its libraries must cope
    require_mdwe()
    plain = run_under_mdwe(RELAY_WORK, mdwe=False)
    if plain.returncode != 0:
        pytest.skip(f"the relay's libraries do not run here: {plain.stderr.strip()[-200:]}")
    result = run_under_mdwe(RELAY_WORK)
    assert result.returncode == 0, result.stderr
    assert "relay work ok" in result.stdout


def test_device_audio_callbacks_need_writable_executable_memory() -> None:
    # why the device unit leaves MemoryDenyWriteExecute= out
    require_mdwe()
    callback = "import sounddevice\nsounddevice._ffi.callback('PaStreamCallback', lambda *a: 0)"
    plain = run_under_mdwe(callback, mdwe=False)
    if plain.returncode != 0:
        pytest.skip(f"sounddevice does not work here: {plain.stderr.strip()[-200:]}")
    result = run_under_mdwe(callback)
    assert result.returncode != 0
    assert "write+execute" in result.stderr
