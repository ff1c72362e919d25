"""Row 8: what echo cancellation (the ``aec`` extra) costs the device in CPU.

The device's own speech fixture is played through a simulated room (150 ms delay,
-10 dB coupling, a 400 ms reverberant tail) and cancelled frame by frame by
:class:`edgevoice.audio.aec.WebRtcEchoCanceller`, exactly as the daemon does (one
20 ms frame = two AEC3 10 ms frames), timed with the process CPU clock. The
reference is the level-based echo guard alone (what runs without the extra).
"""

from __future__ import annotations

import time

import numpy as np
import numpy.typing as npt

from edgevoice.audio.aec import FRAME_BYTES, WebRtcEchoCanceller
from edgevoice.triggers.bargein import EchoGuard, pcm_dbfs
from edgevoice_dev.bench.plan import Workspace
from edgevoice_dev.bench.results import INFO, Line, RowResult, verdict

Samples = npt.NDArray[np.float64]

TITLE = "Echo cancellation CPU (aec extra), per second of audio"
#: 1 % of a core here is about 6 % of a Pi Zero 2 W core (DESIGN.md, sysbench).
TARGET_PCT = 1.0
PI_ZERO_2W_FACTOR = 6.0
RATE = 16_000


def _room(played: Samples, rng: np.random.Generator) -> Samples:
    delay = int(0.150 * RATE)
    taps = int(0.400 * RATE)
    response = np.zeros(delay + taps)
    response[delay] = 1.0
    response[delay:] += rng.standard_normal(taps) * np.exp(-6.9 * np.arange(taps) / taps) * 0.02
    echo: Samples = np.convolve(played, response)[: len(played)]
    gain = 10 ** (-10 / 20) * float(np.std(played)) / max(1e-9, float(np.std(echo)))
    return echo * gain


def _pcm(x: Samples) -> bytes:
    return np.clip(np.round(x), -32768, 32767).astype("<i2").tobytes()


def measure(speech16k: bytes, seconds: float) -> dict[str, float]:
    """CPU of AEC3 and of the echo guard over ``seconds`` of simulated echo."""
    base = np.frombuffer(speech16k, dtype="<i2").astype(np.float64)
    reps = int(np.ceil(seconds * RATE / max(1, len(base))))
    played = np.tile(base, reps)[: int(seconds * RATE)]
    rng = np.random.default_rng(1)
    mic = _room(played, rng) + rng.standard_normal(len(played)) * 10
    play_pcm, mic_pcm = _pcm(played), _pcm(mic)
    frames = len(play_pcm) // FRAME_BYTES
    aec = WebRtcEchoCanceller()
    cleaned = bytearray()
    started = time.process_time()
    for i in range(frames):
        part = slice(i * FRAME_BYTES, (i + 1) * FRAME_BYTES)
        cleaned += aec.process(mic_pcm[part], play_pcm[part])
    aec_s = time.process_time() - started
    guard = EchoGuard()
    started = time.process_time()
    for i in range(frames):
        part = slice(i * FRAME_BYTES, (i + 1) * FRAME_BYTES)
        guard.on_playback_block(pcm_dbfs(play_pcm[part]), i * 0.02)
        guard.on_capture_frame(pcm_dbfs(mic_pcm[part]), (i + 1) * 0.02)
    guard_s = time.process_time() - started
    audio_s = frames * 0.02
    settled = slice(int(2.0 * RATE) * 2, None)  # after AEC3 has converged
    before = np.frombuffer(mic_pcm[settled], "<i2").astype(np.float64)
    after = np.frombuffer(bytes(cleaned[settled]), "<i2").astype(np.float64)
    reduction = 10 * np.log10(np.mean(before ** 2) / max(1e-9, float(np.mean(after ** 2))))
    return {"audio_s": audio_s, "aec_cpu_s": aec_s, "guard_cpu_s": guard_s,
            "aec_us_per_10ms": aec_s / (frames * 2) * 1e6, "echo_reduction_db": reduction}


async def run_row(ws: Workspace) -> RowResult:
    row = RowResult(8, TITLE)
    try:
        import pywebrtc_audio  # noqa: F401 - only to tell "not installed" apart
    except ImportError:
        row.lines.append(Line("AEC3 CPU", "n/a", "", f"< {TARGET_PCT:g} % of a core", INFO))
        row.notes.append("pywebrtc-audio is not installed (pip install 'edgevoice[aec]')")
        return row
    seconds = max(10.0, ws.plan.speech_s)
    m = measure(ws.fixture.pcm, seconds)
    pct = m["aec_cpu_s"] / m["audio_s"] * 100
    guard_pct = m["guard_cpu_s"] / m["audio_s"] * 100
    row.lines.append(Line(
        "AEC3 CPU per second of audio",
        f"{m['aec_cpu_s'] / m['audio_s'] * 1000:.1f} ms/s ({pct:.2f} % of a core; "
        f"~{pct * PI_ZERO_2W_FACTOR:.0f} % of a Pi Zero 2 W core)",
        f"echo guard alone: {m['guard_cpu_s'] / m['audio_s'] * 1000:.2f} ms/s "
        f"({guard_pct:.3f} %)",
        f"< {TARGET_PCT:g} % of a core", verdict(pct < TARGET_PCT)))
    row.lines.append(Line("AEC3 CPU per 10 ms frame", f"{m['aec_us_per_10ms']:.0f} us", "",
                          "", INFO))
    row.lines.append(Line("Echo removed (after 2 s)", f"{m['echo_reduction_db']:.1f} dB", "",
                          "", INFO))
    row.data = {k: round(v, 4) for k, v in m.items()}
    row.notes.append(f"{m['audio_s']:.0f} s of the speech fixture through a simulated room "
                     "(150 ms delay, -10 dB coupling, 400 ms tail), 20 ms frames.")
    return row
