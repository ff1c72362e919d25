"""Speech fixtures made on the spot with ``flite`` (Debian package ``flite``).

flite's voices slt, rms, awb and kal16 are understood by speech recognisers and
wake-word models, unlike espeak-ng's, so tests that need real speech use them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from edgevoice.audio.wavio import load_wav, wav_info, write_wav

VOICES = ("slt", "rms", "awb", "kal16", "kal")


def synthesize(
    text: str, voice: str = "slt", path: str | Path | None = None, rate_hz: int = 16_000
) -> Path:
    """Speak ``text`` into a 16-bit mono WAV at ``rate_hz`` and return its path.

    Without ``path`` a temporary file is made (the caller deletes it).
    """
    if shutil.which("flite") is None:
        raise RuntimeError("flite is not installed: apt-get install flite")
    if voice not in VOICES:
        raise ValueError(f"unknown flite voice {voice!r}; one of {VOICES}")
    if path is None:
        handle, name = tempfile.mkstemp(prefix="speech-", suffix=".wav")
        os.close(handle)  # flite writes the file itself
        path = name
    out = Path(path)
    proc = subprocess.run(
        ["flite", "-voice", voice, "-t", text, "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"flite failed for voice {voice}: {proc.stderr.strip()}")
    if wav_info(out).rate_hz != rate_hz:  # kal is 8 kHz; the rest are 16 kHz
        write_wav(out, load_wav(out, rate_hz), rate_hz)
    return out
