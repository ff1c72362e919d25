"""Drive the virtual sound card (``scripts/soundcard``) from tests.

:class:`VirtualSoundCard` starts a private PulseAudio with a 16 kHz "mic feed" and a
48 kHz "speaker", plays WAV files into the microphone, and records what the speaker
receives. Use it as a context manager::

    with VirtualSoundCard() as card:
        subprocess.Popen([...], env=card.environ())   # the process under test
        card.play_into_mic("speech.wav")
        heard = card.record_speaker(2.0)               # 48 kHz mono s16le

PortAudio enumerates devices once, when ``sounddevice`` is imported, so the process
that opens sound devices must get :meth:`VirtualSoundCard.environ` *before* that
import: run it as a subprocess with that environment (what edgevoice's own tests do),
or update ``os.environ`` first thing in a fresh interpreter.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from edgevoice_dev import repository_root

MIC_RATE_HZ = 16_000
SPEAKER_RATE_HZ = 48_000
REQUIRED_TOOLS = ("pulseaudio", "pactl", "pacat", "paplay", "parec")
_SCRIPT = repository_root() / "scripts" / "soundcard"


def missing_tools() -> list[str]:
    """What is missing to run the card here (empty: it can run)."""
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if not _SCRIPT.exists():
        missing.append(str(_SCRIPT))
    return missing


class Recording:
    """A running ``parec`` of the speaker's monitor; :meth:`stop` returns the audio."""

    def __init__(self, card: VirtualSoundCard) -> None:
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 (open until stop())
        self._proc = subprocess.Popen(
            [
                "parec",
                "-d",
                "spk.monitor",
                f"--rate={SPEAKER_RATE_HZ}",
                "--channels=1",
                "--format=s16le",
                "--raw",
                "--latency-msec=20",
            ],
            stdout=self._file,
            stderr=subprocess.DEVNULL,
            env=card.environ(),
        )
        self._wait_until_connected()

    def _wait_until_connected(self, timeout_s: float = 10.0) -> None:
        """Return once ``parec`` is recording: a null sink's monitor streams silence
        while nothing plays, so the first bytes mean the stream is connected. Without
        this wait, a loaded host may connect ``parec`` after the sound began and the
        recording misses it."""
        deadline = time.monotonic() + timeout_s
        while os.fstat(self._file.fileno()).st_size == 0:
            if self._proc.poll() is not None:
                raise RuntimeError(f"parec exited with {self._proc.returncode}")
            if time.monotonic() > deadline:
                self._proc.kill()
                raise RuntimeError(f"parec recorded nothing within {timeout_s} s")
            time.sleep(0.005)

    def stop(self) -> bytes:
        """Stop recording; 48 kHz mono s16le PCM."""
        if self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        self._file.seek(0)
        data = self._file.read()
        self._file.close()
        return data[: len(data) - len(data) % 2]


class VirtualSoundCard:
    """Starts, uses and stops one ``scripts/soundcard`` instance in its own directory.

    Without ``directory`` a fresh short temporary one is made (PulseAudio's socket
    path must stay under ~100 bytes) and removed on :meth:`stop`.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self._own_dir = directory is None
        self.directory = Path(
            tempfile.mkdtemp(prefix="evsc-", dir="/tmp") if directory is None else directory
        )
        self.env: dict[str, str] = {}

    def _script(self, command: str) -> str:
        proc = subprocess.run(
            [str(_SCRIPT), command, str(self.directory)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"scripts/soundcard {command} failed: {proc.stderr.strip()}")
        return proc.stdout

    def start(self) -> None:
        self._script("start")
        self.env = {}
        for line in self._script("env").splitlines():
            # lines look like: export NAME=shell-quoted-value
            name, _, value = line.removeprefix("export ").partition("=")
            self.env[name] = shlex.split(value)[0] if value else ""

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._script("stop")
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def running(self) -> bool:
        return (
            subprocess.run(
                [str(_SCRIPT), "status", str(self.directory)], capture_output=True
            ).returncode
            == 0
        )

    def environ(self) -> dict[str, str]:
        """``os.environ`` plus what a process needs to use this card."""
        if not self.env:
            raise RuntimeError("the virtual sound card is not started")
        return {**os.environ, **self.env}

    def play_into_mic(self, wav_path: str | Path, wait: bool = True) -> subprocess.Popen[bytes]:
        """Play a WAV file into the microphone feed (``paplay -d micfeed``)."""
        proc = subprocess.Popen(
            ["paplay", "-d", "micfeed", str(wav_path)],
            env=self.environ(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if wait:
            _, err = proc.communicate(timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"paplay {wav_path} failed: {err.decode(errors='replace')}")
        return proc

    def start_recording(self) -> Recording:
        """Start recording the speaker; ``.stop()`` returns 48 kHz mono s16le."""
        return Recording(self)

    def record_speaker(self, seconds: float) -> bytes:
        """Record the speaker for ``seconds`` (wall clock); 48 kHz mono s16le."""
        rec = self.start_recording()
        time.sleep(seconds)
        return rec.stop()

    def __enter__(self) -> VirtualSoundCard:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
