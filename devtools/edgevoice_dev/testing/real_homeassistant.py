"""A real Home Assistant core on 127.0.0.1, for the slow Home Assistant tools test.

Home Assistant needs Python >= 3.13; it is installed from PyPI into ``.venv-ha/`` at
the repository root (about three minutes the first time; pinned versions, since its
integrations change between releases), with the frontend package (without it Home
Assistant starts in recovery mode) and the intents its conversation agent needs. It
runs with ``--skip-pip`` and a minimal configuration: two template entities backed by
input booleans and a template sensor. :func:`start_home_assistant` then onboards a
user through the REST API, creates a long-lived access token over the WebSocket API
and puts three entities in the "Kitchen" area (one of the areas onboarding creates).

The install holds a lock (``.venv-ha.lock``), so ``python -m
edgevoice_dev.testing.real_homeassistant`` can fetch it in the background while the
rest of the test suite runs (``scripts/test`` does) and the test waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGES = ("homeassistant==2025.4.4", "home-assistant-frontend==20250411.0",
            "home-assistant-intents==2025.3.28")
VENV = Path(__file__).resolve().parents[3] / ".venv-ha"
LOCK = VENV.with_name(".venv-ha.lock")

CONFIGURATION = """\
homeassistant:
  name: Test
  latitude: 0
  longitude: 0
  elevation: 0
  unit_system: metric
  time_zone: UTC
  country: DE
http:
  server_host: 127.0.0.1
  server_port: {port}
api:
onboarding:
auth:
conversation:
websocket_api:
config:
frontend:
input_boolean:
  kitchen_light_state:
    name: Kitchen light state
  kettle_state:
    name: Kettle state
template:
  - light:
      - name: Kitchen light
        unique_id: kitchen_light
        state: "{{{{ is_state('input_boolean.kitchen_light_state', 'on') }}}}"
        turn_on:
          - action: input_boolean.turn_on
            target: {{entity_id: input_boolean.kitchen_light_state}}
        turn_off:
          - action: input_boolean.turn_off
            target: {{entity_id: input_boolean.kitchen_light_state}}
    switch:
      - name: Kettle
        unique_id: kettle
        state: "{{{{ is_state('input_boolean.kettle_state', 'on') }}}}"
        turn_on:
          - action: input_boolean.turn_on
            target: {{entity_id: input_boolean.kettle_state}}
        turn_off:
          - action: input_boolean.turn_off
            target: {{entity_id: input_boolean.kettle_state}}
    sensor:
      - name: Kitchen temperature
        unique_id: kitchen_temperature
        state: "21.5"
        unit_of_measurement: "°C"
"""


class HomeAssistantUnavailable(RuntimeError):
    """No Python >= 3.13 here, or Home Assistant would not install."""


def python313() -> str | None:
    """A Python >= 3.13 interpreter that runs, if this machine has one (pyenv's shims
    fail without a selected version, so each candidate is tried)."""
    pyenv = sorted((Path.home() / ".pyenv" / "versions").glob("3.1[3-9]*/bin/python3"))
    for candidate in [*map(str, pyenv), shutil.which("python3.13"), shutil.which("python3")]:
        if not candidate:
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            check = "import sys; print(sys.version_info >= (3, 13))"
            proc = subprocess.run([candidate, "-c", check], capture_output=True, text=True,
                                  timeout=30)
            if proc.stdout.strip() == "True":
                return candidate
    return None


def ensure_installed() -> Path:
    """The ``hass`` program of ``.venv-ha``, installing it first if needed (or waiting
    for an install in progress elsewhere: a background prefetch)."""
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return _install()


def _install() -> Path:
    hass = VENV / "bin" / "hass"
    marker = VENV / "edgevoice-packages.txt"
    if hass.exists() and marker.exists() and marker.read_text() == "\n".join(PACKAGES):
        return hass
    python = python313()
    if python is None:
        raise HomeAssistantUnavailable("Home Assistant needs Python >= 3.13")
    subprocess.run([python, "-m", "venv", "--clear", str(VENV)], check=True, timeout=120)
    proc = subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", *PACKAGES],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise HomeAssistantUnavailable(f"pip install failed: {proc.stderr[-1000:]}")
    marker.write_text("\n".join(PACKAGES))
    return hass


@dataclass(frozen=True)
class RunningHomeAssistant:
    url: str
    token: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, data: dict[str, str], *, form: bool = False) -> Any:
    body = urllib.parse.urlencode(data).encode() if form else json.dumps(data).encode()
    ctype = "application/x-www-form-urlencoded" if form else "application/json"
    request = urllib.request.Request(url, body, {"Content-Type": ctype})
    with urllib.request.urlopen(request, timeout=20) as response:
        return json.loads(response.read())


async def _long_lived_token(port: int, access_token: str) -> str:
    from websockets.asyncio.client import connect

    async with connect(f"ws://127.0.0.1:{port}/api/websocket") as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "auth", "access_token": access_token}))
        await ws.recv()

        async def call(call_id: int, **message: Any) -> Any:
            await ws.send(json.dumps({"id": call_id, **message}))
            while True:
                answer = json.loads(await ws.recv())
                if answer.get("id") == call_id:
                    if not answer.get("success"):
                        raise RuntimeError(f"{message['type']}: {answer.get('error')}")
                    return answer.get("result")

        token = await call(1, type="auth/long_lived_access_token", client_name="edgevoice",
                           lifespan=1)
        for n, entity in enumerate(("light.kitchen_light", "switch.kettle",
                                    "sensor.kitchen_temperature")):
            await call(10 + n, type="config/entity_registry/update", entity_id=entity,
                       area_id="kitchen")
        return str(token)


@contextlib.contextmanager
def start_home_assistant(config_dir: Path, start_timeout_s: float = 120
                         ) -> Iterator[RunningHomeAssistant]:
    """Run Home Assistant in ``config_dir`` until the block ends."""
    hass = ensure_installed()
    port = _free_port()
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "configuration.yaml").write_text(CONFIGURATION.format(port=port))
    log = open(config_dir / "hass.out", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen([str(hass), "--config", str(config_dir), "--skip-pip"],
                               stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                urllib.request.urlopen(url + "/api/", timeout=2)
            except urllib.error.HTTPError as exc:
                if exc.code == 401:
                    break  # up, and asking for a token
            except OSError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise HomeAssistantUnavailable("Home Assistant did not start: see "
                                               f"{config_dir / 'hass.out'}")
            time.sleep(0.5)
        client_id = url + "/"
        code = _post(url + "/api/onboarding/users", {
            "client_id": client_id, "name": "Test", "username": "test",
            "password": "test-password-1234", "language": "en"})["auth_code"]
        access = _post(url + "/auth/token", {"grant_type": "authorization_code",
                                             "code": code, "client_id": client_id},
                       form=True)["access_token"]
        token = asyncio.run(_long_lived_token(port, access))
        yield RunningHomeAssistant(url, token)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def main() -> int:
    """Install Home Assistant into ``.venv-ha`` (a prefetch; exit 0 also when this
    machine cannot: the test says why)."""
    try:
        print(f"Home Assistant ready: {ensure_installed()}")
    except (HomeAssistantUnavailable, OSError, subprocess.SubprocessError) as exc:
        print(f"Home Assistant not installed: {exc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
