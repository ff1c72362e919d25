"""One vocabulary: docs/protocol.md §11 and the code agree on every code and reason.

The codes are collected from the code itself: every ``Error(...)`` the package
builds with a literal code, every code a Nova fault can become, and every
``response_end`` reason an upstream or the relay can produce.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from edgevoice.nova.faults import DEVICE_CODES
from edgevoice.nova.session import RESPONSE_END_REASONS
from edgevoice.protocol.messages import TURN_REFUSED_CODE

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "edgevoice"
SECTION = "## 11. Error codes and `response_end` reasons"


def _literal_args(name: str, keyword: str) -> set[str]:
    """String literals passed first (or as ``keyword``) to calls of ``name`` in the package."""
    found: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if called != name:
                continue
            values = [kw.value for kw in node.keywords if kw.arg == keyword]
            if node.args:
                values.append(node.args[0] if name != "ResponseEnd" else node.args[-1])
            found |= {
                v.value for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)
            }
    return found


def _documented() -> tuple[set[str], set[str]]:
    text = (ROOT / "docs" / "protocol.md").read_text()
    section = text[text.index(SECTION) :]
    codes = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE))
    reasons_line = next(line for line in section.splitlines() if line.startswith("`response_end`"))
    reasons = set(
        re.findall(r"`([a-z_]+)` \(", section[section.index(reasons_line) :].split("\n\n")[0])
    )
    return codes, reasons


def test_every_error_code_the_relay_can_send_is_documented_and_nothing_else() -> None:
    # relay_busy is named once, as a constant the relay and the device share
    sent = _literal_args("Error", "code") | set(DEVICE_CODES) | {TURN_REFUSED_CODE}
    documented, _ = _documented()
    assert sent - documented == set(), "codes the relay sends but the spec does not list"
    assert documented - sent == set(), "codes the spec lists but nothing sends"
    assert {"protocol_error", "relay_busy", "nova_stalled"} <= sent  # the scan works


def test_every_response_end_reason_is_documented_and_nothing_else() -> None:
    produced = (
        _literal_args("ResponseEnded", "reason")
        | _literal_args("ResponseEnd", "reason")
        | set(RESPONSE_END_REASONS)
    )
    _, documented = _documented()
    assert documented == {"end_turn", "interrupted", "error", "announcement"}
    assert produced <= documented, produced - documented
