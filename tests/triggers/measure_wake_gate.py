# ruff: noqa: E501 - the Markdown table rows it writes read best unbroken
"""Measure what the wake word's quiet gate changes; write its section of docs/wake-words.md.

Not part of the product and not a test: run it by hand when the gate, a model or the
wake-word runtime changes, and commit the section it writes::

    .venv/bin/python tests/triggers/measure_wake_gate.py --out docs/wake-words.md

The same clips as measure_wake.py (a model's phrase by 45 generated voices, 3
conditions, 2 phrasings), each placed after seconds of a room's steady noise, run
through the trigger twice on the same audio: gated (the shipped settings) and ungated
(``gate_margin_db: null``). Level and noise floor come from a real silence detector, as
in the daemon. Rooms: a quiet one (white noise at -60 dBFS, the phrase at its own
level), a quiet talker (the phrase at -35 dBFS active level over -55), a fan (-25
over -35) and a loud fan (-30 over -35). Then the hour of other speech, for false wakes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from measure_wake import RATE, Clip, negatives, positives

from edgevoice.audio.silence import SilenceDetector
from edgevoice.triggers.wake import WakeSettings, WakeWordTrigger

SECTION = "## The quiet gate"
#: name: (phrase level dBFS or None for its own, noise dBFS, what it stands for)
ROOMS: dict[str, tuple[float | None, float, str]] = {
    "quiet room": (None, -60.0, "the phrase at its own level, room at -60 dBFS"),
    "quiet talker": (-35.0, -55.0, "phrase at -35 dBFS over -55"),
    "fan": (-25.0, -35.0, "phrase at -25 dBFS over a fan at -35"),
    "loud fan": (-30.0, -35.0, "phrase at -30 dBFS over a fan at -35 (5 dB)"),
}


def active_dbfs(x: np.ndarray[Any, Any]) -> float:
    frames = x[: len(x) // 320 * 320].reshape(-1, 320)
    energy = np.mean(frames**2, axis=1)
    return float(10 * np.log10(np.mean(energy[energy > energy.max() * 1e-3])))


def scene(clip: Clip, room: str, before_s: float, seed: int) -> np.ndarray[Any, Any]:
    level, noise, _ = ROOMS[room]
    y = clip.samples if level is None else clip.samples * 10 ** ((level - active_dbfs(clip.samples)) / 20)
    body = np.concatenate([np.zeros(int(before_s * RATE)), y, np.zeros(2 * RATE)])
    return body + np.random.default_rng(seed).standard_normal(len(body)) * 10 ** (noise / 20)


def listen(trigger: WakeWordTrigger, x: np.ndarray[Any, Any]) -> tuple[list[int], float]:
    """Frames with a detection event, and the CPU seconds the trigger took."""
    asyncio.run(trigger.start(lambda event: None))
    detector = SilenceDetector()
    pcm = np.clip(np.round(x * 32768), -32768, 32767).astype("<i2").tobytes()
    out: list[int] = []
    cpu = 0.0
    for i in range(0, len(pcm) - 640 + 1, 640):
        frame = pcm[i:i + 640]
        detector.process(frame)
        started = time.process_time()
        events = trigger.process(frame, detector.level_dbfs, detector.noise_floor_dbfs)
        cpu += time.process_time() - started
        if events:
            out.append(i // 640)
    return out, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hey_jarvis")
    parser.add_argument("--every", type=int, default=1, help="every n-th clip (a subset)")
    parser.add_argument("--before-s", type=float, default=8.0)
    parser.add_argument("--negative-seconds", type=float, default=3600.0)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/edgevoice-wake"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    clips = positives(args.model, args.cache)[:: args.every]
    gated = WakeWordTrigger(WakeSettings(models=(args.model,)))
    ungated = WakeWordTrigger(WakeSettings(models=(args.model,), gate_margin_db=None))
    rows = []
    for room in ROOMS:
        tally: Counter[str] = Counter()
        det_diff: Counter[int] = Counter()
        end_diff: Counter[int] = Counter()
        cpu = {"gated": 0.0, "ungated": 0.0}
        for n, clip in enumerate(clips):
            x = scene(clip, room, args.before_s, seed=n)
            a, cpu_a = listen(ungated, x)
            a_det, a_end = ungated.last_detection_frame_index, ungated.last_phrase_end_frame_index
            b, cpu_b = listen(gated, x)
            b_det, b_end = gated.last_detection_frame_index, gated.last_phrase_end_frame_index
            cpu["ungated"] += cpu_a
            cpu["gated"] += cpu_b
            tally["frames"] += len(x) // 320
            tally["gated"] += gated.frames_gated
            tally["ungated hits"] += bool(a)
            tally["gated hits"] += bool(b)
            if a and b and a_det is not None and b_det is not None and a_end is not None and b_end is not None:
                det_diff[b_det - a_det] += 1
                end_diff[b_end - a_end] += 1
            elif a:
                tally["lost"] += 1
            elif b:
                tally["gained"] += 1
        rows.append((room, len(clips), tally, det_diff, end_diff, cpu))
        print(room, dict(tally), dict(det_diff), file=sys.stderr)
    neg = negatives(args.negative_seconds, args.cache)
    hours = len(neg) / RATE / 3600
    stream = np.concatenate([np.zeros(RATE), neg, np.zeros(RATE)])
    stream = stream + np.random.default_rng(9).standard_normal(len(stream)) * 10 ** (-60 / 20)
    false_ungated, _ = listen(ungated, stream)
    false_gated, _ = listen(gated, stream)
    gated_share = gated.frames_gated / (len(stream) // 320)
    text = render(args, rows, hours, len(false_ungated), len(false_gated), gated_share,
                  gated.settings)
    gated.close()
    ungated.close()
    if args.out:
        old = args.out.read_text() if args.out.exists() else ""
        keep = old.split(SECTION)[0].rstrip("\n")
        args.out.write_text(keep + "\n\n" + text)
    print(text)
    return 0


def _share(counter: Counter[int], total: int) -> str:
    return f"{100 * counter.get(0, 0) / total:.0f} %" if total else "-"


def render(args: argparse.Namespace, rows: list[Any], hours: float, false_ungated: int,
           false_gated: int, gated_share: float, settings: WakeSettings) -> str:
    lines = [SECTION, "",
             "Generated by `tests/triggers/measure_wake_gate.py` (the section above by measure_wake.py).",
             f"The models run only on frames `gate_margin_db` ({settings.gate_margin_db:g} dB) above the"
             " silence detector's noise floor and for `gate_hold_ms`"
             f" ({settings.gate_hold_ms} ms) after; when the gate opens they first hear the last"
             f" `gate_preroll_ms` ({settings.gate_preroll_ms} ms) with their own frame numbers."
             f" Each clip of {args.model} ({rows[0][1]} clips: "
             f"{'all' if args.every == 1 else f'every {args.every}th'} of measure_wake.py's) follows {args.before_s:g} s of the room's noise and runs twice on the same"
             " audio, gated and ungated. *Same frame*: the detection (and the phrase-end estimate the uplink"
             " starts from) on the very same frame as ungated; the others differ by the frames shown"
             " (a model invokes every 1.5 frames).", "",
             "| room | detected ungated | gated | lost | gained | same detection frame | same phrase-end frame | other differences (frames: clips) | frames gated | trigger CPU gated / ungated |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for room, n, tally, det_diff, end_diff, cpu in rows:
        both = sum(det_diff.values())
        others = ", ".join(f"{k:+d}: {v}" for k, v in sorted(det_diff.items()) if k)
        lines.append(
            f"| {room}: {ROOMS[room][2]} | {100 * tally['ungated hits'] / n:.0f} % | {100 * tally['gated hits'] / n:.0f} %"
            f" | {tally['lost']} | {tally['gained']} | {_share(det_diff, both)} | {_share(end_diff, both)}"
            f" | {others or '-'} | {100 * tally['gated'] / tally['frames']:.0f} %"
            f" | {cpu['gated']:.1f} s / {cpu['ungated']:.1f} s |")
    lines += ["",
              f"Other speech ({hours * 60:.0f} min, measure_wake.py's negatives over a -60 dBFS room):"
              f" {false_ungated} false wakes ungated, {false_gated} gated; the gate was closed for"
              f" {100 * gated_share:.0f} % of it (the pauses between sentences).",
              "",
              "A clip's frames include the room before it, so the CPU column shows the gate's saving"
              " on a mostly quiet stream; in a quiet room the models do not run at all (bench row 12)."
              " Each opening costs the models' work for the pre-roll, the sound and the hold (about"
              " 125 frames' worth, ~2.5 s of ungated listening); a frame the gate holds back costs a"
              " level comparison and a slot in the ring.",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
