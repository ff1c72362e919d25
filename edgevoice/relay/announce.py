"""Announcements and conversation starts, asked through the relay's admin endpoint.

``POST /announce`` makes a device say something ("the laundry is done") or play a
sound; ``POST /converse`` does the same and then opens a turn on the device without
its wake word ("ask the kitchen whether..."). Both are authenticated like every
admin ``POST`` (health/http.py's exposure rule).

An announcement is sent like a reply (``response_start``, paced Opus audio,
``response_end``), so any device plays it with the code that plays replies. It waits
for the device to be quiet: it is queued behind a turn or a reply in progress (and
its playback) and never cuts one; a device's queue is bounded (the newest request
is refused with 429 when it is full). Queued and played announcements show in the
fleet view (``/devices``: ``announcements``).

Text becomes speech through a local text-to-speech program (``flite`` from Debian
by default; the Nova Sonic upstream cannot be made to read a given text verbatim),
sounds are WAV files from ``announce.sounds_dir`` by name (never a path from the
request).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from edgevoice.audio.wavio import AudioFileError, load_wav
from edgevoice.config.base import require
from edgevoice.health.http import Handler, Request, Response, json_response
from edgevoice.protocol.messages import DeviceCall
from edgevoice.upstream.base import UPSTREAM_OUTPUT_RATE_HZ

logger = logging.getLogger(__name__)

_SOUND_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
#: How often a queued announcement checks whether its device went quiet, in seconds.
QUIET_POLL_S = 0.1


@dataclass(frozen=True)
class AnnounceSettings:
    """Announcements and conversation starts (admin POST /announce, /converse)."""

    tts_command: tuple[str, ...] = ("flite", "-voice", "slt", "-t", "{text}", "-o", "{wav}")
    """Text-to-speech program writing a WAV ({text} and {wav} are replaced; no shell).
    Debian: apt-get install flite."""
    sounds_dir: str = ""
    """Directory of WAV files an announcement may play by name ("doorbell")."""
    max_queued: int = 4
    """Announcements waiting per device; beyond it a new one is refused (429)."""
    max_text_chars: int = 400
    """Longest text an announcement may speak."""
    quiet_gap_ms: int = 600
    """Wait this long after the device's last reply before announcing (lets the
    device finish playing what it has buffered)."""

    def __post_init__(self) -> None:
        require(bool(self.tts_command), "tts_command", "name a program")
        require(1 <= self.max_queued <= 100, "max_queued", "must be 1..100")
        require(1 <= self.max_text_chars <= 5000, "max_text_chars", "must be 1..5000")
        require(0 <= self.quiet_gap_ms <= 10_000, "quiet_gap_ms", "must be 0..10000")


class AnnounceError(Exception):
    """An announcement cannot be made; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class AnnouncingSession(Protocol):
    """What the announcer needs of a device session (DeviceSession has these)."""

    @property
    def busy(self) -> bool: ...

    @property
    def software(self) -> str: ...

    async def play_announcement(self, pcm24k: bytes) -> None: ...

    async def send_control(self, message: DeviceCall) -> None: ...


@dataclass
class Announcement:
    device_id: str
    what: str
    pcm24k: bytes
    then_listen: bool
    queued_at: float = field(default_factory=time.time)


@dataclass
class DeviceQueue:
    items: collections.deque[Announcement] = field(default_factory=collections.deque)
    played: int = 0
    refused: int = 0
    last_played: str | None = None
    task: asyncio.Task[None] | None = None


async def synthesize(settings: AnnounceSettings, text: str) -> bytes:
    """``text`` spoken by the TTS program, as 24 kHz mono s16le."""
    with tempfile.TemporaryDirectory(prefix="edgevoice-tts-") as tmp:
        wav = str(Path(tmp) / "speech.wav")
        argv = [a.replace("{text}", text).replace("{wav}", wav) for a in settings.tts_command]
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            raise AnnounceError(503, f"text-to-speech program unavailable: {exc}") from None
        try:
            async with asyncio.timeout(20):
                _, err = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AnnounceError(503, "text-to-speech took too long") from None
        if process.returncode != 0:
            raise AnnounceError(503, f"text-to-speech failed: {err.decode()[-200:]}")
        return load_wav_24k(Path(wav))


def load_wav_24k(path: Path) -> bytes:
    try:
        return load_wav(path, UPSTREAM_OUTPUT_RATE_HZ)
    except (AudioFileError, OSError) as exc:
        raise AnnounceError(400, f"not a usable WAV: {exc}") from None


class Announcer:
    """Per-device queues of announcements, each played when its device is quiet."""

    def __init__(self, settings: AnnounceSettings,
                 sessions: Callable[[str], AnnouncingSession | None]) -> None:
        self.settings = settings
        self._sessions = sessions
        self.queues: dict[str, DeviceQueue] = {}

    def state(self, device_id: str) -> dict[str, object] | None:
        """What ``/devices`` shows of a device's announcements (None: never had any)."""
        q = self.queues.get(device_id)
        if q is None:
            return None
        return {"queued": [a.what for a in q.items], "played": q.played,
                "refused": q.refused, "last_played": q.last_played}

    def submit(self, item: Announcement) -> int:
        """Queue ``item``; its position (0: next). Raises :class:`AnnounceError`."""
        session = self._sessions(item.device_id)
        if session is None:
            raise AnnounceError(404, f"{item.device_id} is not connected")
        if item.then_listen and not session.software.startswith("edgevoice/"):
            raise AnnounceError(409, "this device cannot be made to listen remotely")
        q = self.queues.setdefault(item.device_id, DeviceQueue())
        if len(q.items) >= self.settings.max_queued:
            q.refused += 1
            raise AnnounceError(429, "too many announcements queued for this device")
        q.items.append(item)
        if q.task is None or q.task.done():
            q.task = asyncio.create_task(self._drain(item.device_id, q),
                                         name=f"announce-{item.device_id}")
        return len(q.items) - 1

    async def _drain(self, device_id: str, q: DeviceQueue) -> None:
        while q.items:
            session = await self._wait_quiet(device_id)
            item = q.items.popleft()
            if session is None:
                logger.info("announcement for %s dropped: it disconnected", device_id)
                continue
            logger.info("announcing to %s: %s", device_id, item.what)
            if item.pcm24k:
                await session.play_announcement(item.pcm24k)
            q.played += 1
            q.last_played = item.what
            if item.then_listen:
                session = await self._wait_quiet(device_id)
                if session is not None:
                    await session.send_control(DeviceCall(f"a{q.played}", "turn.start", {}))

    async def _wait_quiet(self, device_id: str) -> AnnouncingSession | None:
        """The session once it has been quiet for ``quiet_gap_ms`` (None: it left)."""
        quiet_since: float | None = None
        gap = self.settings.quiet_gap_ms / 1000
        loop = asyncio.get_running_loop()
        while True:
            session = self._sessions(device_id)
            if session is None:
                return None
            if session.busy:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = loop.time()
            elif loop.time() - quiet_since >= gap:
                return session
            # A short poll: "quiet" is a property of the session, not an event it sends.
            await asyncio.sleep(QUIET_POLL_S)

    async def close(self) -> None:
        for q in self.queues.values():
            if q.task is not None:
                q.task.cancel()


def announce_routes(announcer: Announcer) -> dict[tuple[str, str], Handler]:
    """``POST /announce`` and ``POST /converse`` for the relay's admin endpoint.

    Body: ``{"device": "kitchen", "text": "..."}`` or ``{"device": ..., "sound":
    "doorbell"}``; ``/converse`` takes the same (``text``/``sound`` optional) and opens
    a turn on the device afterwards. Answers 202 with the queue position.
    """
    settings = announcer.settings

    async def make(request: Request, then_listen: bool) -> Response:
        try:
            body = json.loads(request.body or b"{}")
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return json_response(400, {"error": 'send {"device": "name", "text": "..."}'})
        device, text, sound = body.get("device"), body.get("text"), body.get("sound")
        try:
            if not isinstance(device, str) or not device:
                raise AnnounceError(400, "device: a device id is required")
            if text is not None and sound is not None:
                raise AnnounceError(400, "send text or sound, not both")
            if text is not None:
                if not isinstance(text, str) or not text.strip():
                    raise AnnounceError(400, "text must be a non-empty string")
                if len(text) > settings.max_text_chars:
                    raise AnnounceError(400, f"text is over {settings.max_text_chars} chars")
                pcm, what = await synthesize(settings, text.strip()), f"text: {text[:60]}"
            elif sound is not None:
                if not isinstance(sound, str) or not _SOUND_NAME.match(sound) or \
                        not settings.sounds_dir:
                    raise AnnounceError(400, "sound must name a WAV in announce.sounds_dir")
                path = Path(settings.sounds_dir) / f"{sound}.wav"
                if not path.is_file():
                    raise AnnounceError(404, f"no sound {sound!r}")
                pcm, what = load_wav_24k(path), f"sound: {sound}"
            elif then_listen:
                pcm, what = b"", "listen"
            else:
                raise AnnounceError(400, "send text or sound")
            position = announcer.submit(Announcement(device, what, pcm, then_listen))
        except AnnounceError as exc:
            return json_response(exc.status, {"error": str(exc)})
        return json_response(202, {"queued": True, "position": position})

    async def announce(request: Request) -> Response:
        return await make(request, then_listen=False)

    async def converse(request: Request) -> Response:
        return await make(request, then_listen=True)

    return {("POST", "/announce"): announce, ("POST", "/converse"): converse}
