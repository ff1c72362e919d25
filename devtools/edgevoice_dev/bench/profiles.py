"""Where the CPU goes: a cProfile written by a bench process, summarised as Markdown.

Two views of one profile (CPU time, see :mod:`edgevoice_dev.bench.profiled`): the
functions that burn the most CPU themselves (``tottime``), and edgevoice's own
functions by the CPU spent in them and below (``cumtime``), which says which of
our code paths to look at.
"""

from __future__ import annotations

import pstats
from pathlib import Path

_Key = tuple[str, int, str]


def label(key: _Key) -> str:
    filename, line, name = key
    if filename == "~":
        return name.replace("<", "").replace(">", "")
    for marker in ("site-packages/", "/lib/python3"):
        if marker in filename:
            filename = filename.split(marker, 1)[1]
            break
    if "/edgevoice/" in filename:
        filename = "edgevoice/" + filename.rsplit("/edgevoice/", 1)[1]
    return f"{filename}:{line} {name}"


def summarize(path: Path, *, top: int = 12, title: str = "") -> str:
    """A Markdown summary of the profile at ``path``."""
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    rows: list[tuple[_Key, float, float, int]] = [
        (key, tt, ct, nc) for key, (_cc, nc, tt, ct, _callers) in stats.items()]
    total = sum(tt for _, tt, _, _ in rows) or 1.0
    lines = []
    if title:
        lines.append(f"**{title}** ({total:.2f} s of CPU profiled)\n")
    lines.append("| self CPU | calls | function |")
    lines.append("|---:|---:|---|")
    for key, tt, _ct, nc in sorted(rows, key=lambda r: r[1], reverse=True)[:top]:
        lines.append(f"| {100 * tt / total:.1f} % | {nc:,} | `{label(key)}` |")
    ours = [r for r in rows if "/edgevoice/" in r[0][0] and "/bench/" not in r[0][0]]
    if ours:
        lines.append("")
        lines.append("| CPU in and below | calls | edgevoice function |")
        lines.append("|---:|---:|---|")
        for key, _tt, ct, nc in sorted(ours, key=lambda r: r[2], reverse=True)[:top]:
            lines.append(f"| {100 * ct / total:.1f} % | {nc:,} | `{label(key)}` |")
    return "\n".join(lines)
