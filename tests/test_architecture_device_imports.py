"""What a running device daemon has imported: not the standard library's heavy modules
its dependencies import only for paths it never takes (resident memory, bench rows 11
and 12, issue 15)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import wave
from pathlib import Path

from edgevoice_dev.testing.harness import run, running_relay
from edgevoice_dev.testing.timeouts import timeout_factor

ROOT = Path(__file__).resolve().parents[1]

#: What importlib.metadata (imported by websockets.version) and urllib.request (by
#: websockets.proxy) would bring in if their code ran, and what pymicro-wakeword's
#: wrapper imports (edgevoice runs its models itself: triggers/microwake.py).
HEAVY = ("email", "email.message", "http.client", "zipfile", "csv", "importlib.resources",
         "importlib.metadata._meta", "statistics", "decimal", "fractions",
         "pymicro_wakeword")

#: Runs the real entry point; when it returns (SIGTERM), writes the modules it imported.
DEVICE = """\
import sys
from edgevoice.cli import main
code = main(["device", "--config", sys.argv[1]])
with open(sys.argv[2], "w") as f:
    f.write("\\n".join(sorted(sys.modules)))
sys.exit(code)
"""


def _quiet_wav(path: Path, seconds: float) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes(b"\x01\x00\xff\xff" * int(8_000 * seconds))
    return path


async def _run_device_with_the_wake_word(tmp_path: Path) -> list[str]:
    limit_s = 30 * timeout_factor()
    async with running_relay(tmp_path) as relay:
        token = tmp_path / "d1.token"
        token.write_text(relay.tokens.add("d1") + "\n")
        config = tmp_path / "device.yaml"
        config.write_text(
            "device_id: d1\n"
            "log_level: warning\n"
            f"relay:\n  url: \"ws://127.0.0.1:{relay.port}/\"\n  token_file: \"{token}\"\n"
            f"audio:\n  input: \"wav:{_quiet_wav(tmp_path / 'room.wav', 60)}\"\n"
            f"  output: \"wav:{tmp_path / 'out.wav'}\"\n"
            "health:\n  port: 0\n"
            "turn:\n  start: wake\n")
        modules = tmp_path / "modules.txt"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", DEVICE, str(config), str(modules), cwd=ROOT,
            stderr=subprocess.PIPE)
        try:
            async with asyncio.timeout(limit_s):
                while "d1" not in relay.sessions:  # connected: the link's path was taken
                    assert proc.returncode is None, "the device exited early"
                    await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # a few heartbeats' worth of idle listening
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(limit_s):
                _, stderr = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, stderr.decode()
        return modules.read_text().split()


def test_a_device_listening_for_its_wake_word_has_not_run_what_it_never_uses(
        tmp_path: Path) -> None:
    loaded = run(_run_device_with_the_wake_word(tmp_path), timeout=120 * timeout_factor())
    # it did run the wake word and the link
    assert {"edgevoice.triggers.microwake", "micro_features_cpp",
            "websockets.asyncio.client"} <= set(loaded)
    assert [m for m in HEAVY if m in loaded] == []


def test_a_deferred_module_runs_when_first_used() -> None:
    code = ("import sys\n"
            "from edgevoice.cli import DEVICE_DEFERRED_MODULES, defer_imports\n"
            "defer_imports(DEVICE_DEFERRED_MODULES)\n"
            "import websockets.asyncio.client, importlib.metadata, urllib.request\n"
            "print('email' in sys.modules, 'http.client' in sys.modules)\n"
            "from urllib.request import getproxies\n"
            "print(importlib.metadata.version('websockets') == websockets.__version__,\n"
            "      type(getproxies()).__name__, 'http.client' in sys.modules)\n"
            "print(type(sys.modules['importlib.metadata']).__name__,\n"
            "      importlib.metadata is sys.modules['importlib.metadata'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.splitlines()
    assert out == ["False False", "True dict True", "module True"]


def test_a_module_already_imported_is_left_alone() -> None:
    code = ("import sys, urllib.request\n"
            "from edgevoice.cli import defer_imports\n"
            "before = sys.modules['urllib.request']\n"
            "defer_imports(['urllib.request', 'no_such_module_here'])\n"
            "print(sys.modules['urllib.request'] is before,\n"
            "      'no_such_module_here' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()
    assert out == ["True", "False"]
