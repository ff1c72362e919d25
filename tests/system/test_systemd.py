"""Relay and device installed by scripts/install into a Debian machine booted by a real
systemd, and what an operator meets there: units, watchdog, credential, path units,
config errors in the journal at their priority, a missing sound card, uninstall.

One test, in order, because each step builds on the machine the previous one left
(installing takes most of the time). The machine is described in machine.py; its
root file system and wheels are cached outside the repository between runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pytest
from edgevoice_dev.testing.timeouts import scaled
from machine import (  # type: ignore[import-not-found]
    REPO,
    Machine,
    MachineError,
    cache_dir,
    missing_tools,
    prepare,
)

# a cold cache builds the Debian root first (about 2 minutes on a good network)
pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.timeout(900),
              pytest.mark.skipif(bool(missing_tools()),
                                 reason=f"needs {', '.join(missing_tools())}")]

SRC = "/usr/local/src/edgevoice"
WHEELS = "/var/cache/edgevoice-wheels"
#: What install and uninstall may touch; compared before and after.
WATCHED = "/etc /opt /usr/local /var/lib"
#: useradd's backups of the files it edits: the system users are kept on purpose
USER_FILES = {"/etc/passwd-", "/etc/group-", "/etc/shadow-", "/etc/gshadow-",
              "/etc/subuid-", "/etc/subgid-"}


def wait_until(what: str, check: Callable[[], object], timeout_s: float) -> object:
    deadline = time.monotonic() + scaled(timeout_s)
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


class Box:
    """The machine, with the few questions the checks ask of it."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine

    def sh(self, script: str, check: bool = True) -> str:
        return self.m.sh(script, check=check).stdout

    def show(self, unit: str) -> dict[str, str]:
        out = self.m.run("systemctl", "show", unit, "-p",
                         "ActiveState,SubState,StatusText,MainPID,NRestarts,Result,ExecMainStatus"
                         ).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, *args: str) -> str:
        return self.m.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, *args).stdout

    def http(self, url: str) -> tuple[int, str]:
        code = ("import sys, urllib.request, urllib.error\n"
                "try:\n r = urllib.request.urlopen(sys.argv[1], timeout=5); c = r.status\n"
                "except urllib.error.HTTPError as e:\n r = e; c = e.code\n"
                "except OSError as e:\n print(0); print(e); sys.exit()\n"
                "print(c); print(r.read().decode())\n")
        out = self.m.run("python3", "-c", code, url).stdout
        status, _, body = out.partition("\n")
        return int(status), body

    def files(self) -> set[str]:
        return set(self.sh(f"find {WATCHED} -xdev 2>/dev/null | sort").split())


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    try:
        rootfs, wheels = prepare()
    except MachineError as exc:
        pytest.fail(str(exc))
    assert REPO not in cache_dir().resolve().parents, "the machine must live outside the repo"
    work = tmp_path_factory.mktemp("machine")
    with Machine(rootfs, workdir=work,
                 binds_ro=[(REPO, SRC), (wheels, WHEELS)]) as machine:
        yield Box(machine)


def test_relay_and_device_under_a_real_systemd(box: Box) -> None:
    started = time.monotonic()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.monotonic() - started, 1)

    before = box.files()
    # shorter watchdog and start timeouts than shipped, so the test need not wait
    # 30 s and 90 s to prove what they do; a drop-in, as an operator would
    box.sh("mkdir -p /etc/systemd/system/edgevoice.service.d && printf "
           "'[Service]\\nWatchdogSec=4\\nTimeoutStartSec=5\\n' "
           "> /etc/systemd/system/edgevoice.service.d/test.conf")

    # ---- the relay, installed offline from the wheel folder
    out = box.sh(f"cd {SRC} && ./scripts/install --relay --wheels {WHEELS} --extras '' "
                 "--no-start 2>&1")
    assert "using /usr/bin/python3 (Python 3.11" in out, out
    lap("relay installed")
    # --no-start: the relay waits, but its config is watched from now on
    assert box.show("edgevoice-relay")["ActiveState"] == "inactive"
    assert box.show("edgevoice-relay-reconfigure.path")["ActiveState"] == "active"
    box.sh("systemctl start --no-block edgevoice-relay")
    wait_until("the relay running and saying so",
               lambda: (s := box.show("edgevoice-relay"))["SubState"] == "running"
               and s["StatusText"].startswith("0 devices connected"), 30)
    token = box.sh("runuser -u edgevoice-relay -- edgevoice token add kitchen "
                   "--config /etc/edgevoice/relay.yaml").strip()
    assert token.startswith("kitchen.")
    again = box.m.run("runuser", "-u", "edgevoice-relay", "--", "edgevoice", "token", "add",
                      "kitchen", "--config", "/etc/edgevoice/relay.yaml", check=False)
    assert again.returncode != 0 and "already has a token" in again.stderr

    # ---- the device: this machine has no sound card at all
    out = box.m.run("sh", "-c", f"cd {SRC} && ./scripts/install --wheels {WHEELS} --extras '' "
                    "--relay-url ws://127.0.0.1:8780/ --token - 2>&1", input=token + "\n").stdout
    lap("device installed")
    waiting = wait_until(
        "the device to wait for its sound card",
        lambda: (s := box.show("edgevoice"))["StatusText"].startswith("waiting for sound card")
        and s, 30)
    assert isinstance(waiting, dict)
    # well past TimeoutStartSec=5 and several RestartSec=2: still the same process
    time.sleep(8)
    still = box.show("edgevoice")
    assert still["MainPID"] == waiting["MainPID"] != "0", (waiting, still)
    assert still["NRestarts"] == "0" and still["ActiveState"] == "activating", still
    assert still["StatusText"].startswith("waiting for sound card"), still
    code, body = box.http("http://127.0.0.1:8765/healthz")
    assert code == 503 and "waiting for sound card" in body, (code, body)
    # the daemon's warning is stored at warning priority, once (not once per retry)
    warnings = box.journal("edgevoice", "-p", "warning")
    assert warnings.count("event=waiting_for_sound_card") == 1, warnings
    assert "Traceback" not in box.journal("edgevoice")
    lap("waiting checked")

    # ---- the credential: root-only on disk, handed to the service by systemd
    assert box.sh("stat -c '%a %U %G' /etc/edgevoice/device.token").split() == [
        "600", "root", "root"]
    denied = box.m.run("runuser", "-u", "edgevoice", "--", "cat", "/etc/edgevoice/device.token",
                       check=False)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    pid = waiting["MainPID"]
    creds = box.sh(f"tr '\\0' '\\n' < /proc/{pid}/environ | sed -n 's/^CREDENTIALS_DIRECTORY=//p'"
                   ).strip()
    assert creds, "no CREDENTIALS_DIRECTORY in the service's environment"
    other = box.m.run("runuser", "-u", "edgevoice-relay", "--", "cat",
                      f"{creds}/device-token", check=False)
    assert other.returncode != 0, "another service's user read the device token"

    # ---- give it audio (WAV files stand in for the card): a config change, applied by
    # the path unit alone
    box.sh("python3 -c \"import wave; w = wave.open('/var/lib/edgevoice/mic.wav', 'wb'); "
           "w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000); "
           "w.writeframes(bytes(2 * 16000 * 900)); w.close()\" && "
           "chown edgevoice: /var/lib/edgevoice/mic.wav")
    box.sh("sed -i -e 's|^  input: default|  input: \"wav:/var/lib/edgevoice/mic.wav\"|' "
           "-e 's|^  output: default|  output: \"wav:/var/lib/edgevoice/speaker.wav\"|' "
           "/etc/edgevoice/device.yaml")
    running = wait_until(
        "the device restarted by the path unit and running",
        lambda: (s := box.show("edgevoice"))["SubState"] == "running" and s["MainPID"] != pid
        and s, 30)
    assert isinstance(running, dict)
    assert running["StatusText"] in ("listening for speech", "idle"), running
    assert box.show("edgevoice-reconfigure.service")["Result"] == "success"
    wait_until("the relay to count the device",
               lambda: box.show("edgevoice-relay")["StatusText"].startswith("1 device connected"),
               15)
    code, body = box.http("http://127.0.0.1:8765/healthz")
    assert code == 200, body
    # a healthy start logs no warning
    healthy = box.journal("edgevoice", "-p", "warning", f"_PID={running['MainPID']}")
    assert healthy.strip() == "", healthy
    lap("running checked")

    # ---- the watchdog restarts a frozen daemon
    box.sh(f"kill -STOP {running['MainPID']}")
    restarted = wait_until(
        "the watchdog to restart the frozen daemon",
        lambda: (s := box.show("edgevoice"))["SubState"] == "running"
        and s["MainPID"] not in (running["MainPID"], "0") and s, 30)
    assert isinstance(restarted, dict) and int(restarted["NRestarts"]) >= 1
    assert "Watchdog timeout" in box.sh("journalctl --no-pager -u edgevoice")
    lap("watchdog checked")

    # ---- a broken config: the unit fails, the journal says file: key: reason, at err
    box.sh("printf 'silence:\\n  hangover_ms: -5\\n' >> /etc/edgevoice/device.yaml")
    failed = wait_until("the unit to fail on the broken config",
                        lambda: (s := box.show("edgevoice"))["ActiveState"] == "failed" and s, 30)
    assert isinstance(failed, dict) and failed["ExecMainStatus"] == "78", failed
    time.sleep(3)  # no restart loop: RestartPreventExitStatus=78
    assert box.show("edgevoice")["ActiveState"] == "failed"
    errors = box.journal("edgevoice", "-p", "err")
    assert "/etc/edgevoice/device.yaml: silence.hangover_ms: must be >= 0" in errors, errors
    lap("broken config checked")

    # ---- uninstall removes what install added (the system users stay, documented)
    box.sh("rm -r /etc/systemd/system/edgevoice.service.d")
    box.sh(f"cd {SRC} && ./scripts/uninstall --purge && ./scripts/uninstall --relay --purge")
    assert box.sh("systemctl list-unit-files 'edgevoice*' --no-legend", check=False).strip() == ""
    left = box.files() - before - USER_FILES
    assert not left, sorted(left)
    lap("uninstalled")
    print("system test timings (s):", json.dumps(timings))
    assert timings["uninstalled"] < 360, timings

