"""What a benchmark row reports: its figures, its target, and whether it met it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MET = "met"
MISSED = "MISSED"
INFO = "-"
ERROR = "error"


def verdict(ok: bool) -> str:
    return MET if ok else MISSED


def fmt_ms(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def fmt_bytes_per_s(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:.1f} kB/s"
    return f"{value:,.0f} B/s"


def fmt_kb(value: float) -> str:
    return f"{value / 1000:,.0f} kB" if value >= 10_000 else f"{value:,.0f} B"


@dataclass
class Line:
    """One line of the results table."""

    metric: str
    edgevoice: str
    reference: str
    target: str
    verdict: str

    def as_dict(self) -> dict[str, str]:
        return {"metric": self.metric, "edgevoice": self.edgevoice,
                "reference": self.reference, "target": self.target, "verdict": self.verdict}


@dataclass
class RowResult:
    """A numbered row of the issue: its table lines, raw numbers and notes."""

    number: int
    title: str
    lines: list[Line] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: why a missed target was missed, and what would fix it
    findings: list[str] = field(default_factory=list)
    #: a profile summary (Markdown) supporting the findings
    profile: str = ""
    error: str = ""
    seconds: float = 0.0

    @property
    def missed(self) -> bool:
        return any(line.verdict == MISSED for line in self.lines)

    def as_dict(self) -> dict[str, Any]:
        return {"row": self.number, "title": self.title,
                "lines": [line.as_dict() for line in self.lines], "data": self.data,
                "notes": self.notes, "findings": self.findings, "profile": self.profile,
                "error": self.error, "seconds": round(self.seconds, 1)}

    @classmethod
    def failed(cls, number: int, title: str, error: str) -> RowResult:
        row = cls(number, title, error=error)
        row.lines.append(Line("(did not run)", "n/a", "n/a", "", ERROR))
        return row
