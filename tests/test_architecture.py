"""docs/architecture.md against the code: the generated part is current, and the
layering it states holds."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from edgevoice_dev.archdoc import BEGIN, END, import_graph, render

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def test_the_pages_state_tables_match_the_code() -> None:
    """The state tables must be current (they are the spec of each machine). The import
    table is regenerated with them but not compared: the layering rules below are what
    must hold, and a new import between units should not fail the suite."""
    text = DOC.read_text(encoding="utf-8")
    documented = text[text.index(BEGIN):text.index(END) + len(END)] + "\n"
    marker = "### State tables"
    assert documented[documented.index(marker):] == render(ROOT)[render(ROOT).index(marker):], \
        "run: .venv/bin/python -m edgevoice_dev.archdoc"


def test_layering() -> None:
    graph = import_graph(ROOT / "edgevoice")
    assert graph["protocol"] <= {"errors", "decoding", "queues"}
    for device_side in ("device", "audio", "triggers", "feedback"):
        assert not graph[device_side] & {"relay", "nova", "upstream", "web"}, device_side


def test_a_device_process_loads_none_of_the_relays_modules() -> None:
    # What `edgevoice device` imports at start: its file's model and its pieces, not
    # the relay's settings (config/relay.py) and what they drag in (RSS on a board).
    code = ("import sys, edgevoice.cli, edgevoice.device.app; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('edgevoice.relay', "
            "'edgevoice.nova', 'edgevoice.web', 'edgevoice.upstream', 'edgevoice.tools', "
            "'edgevoice.health.relay', 'edgevoice.config.relay', 'aws_sdk', 'redis')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.split() == []


@pytest.mark.parametrize("core", ["protocol/connection.py", "protocol/session.py",
                                  "protocol/messages.py",
                                  "device/turn.py", "device/records.py",
                                  "audio/silence.py", "nova/session.py", "decoding.py"])
def test_cores_do_no_io(core: str) -> None:
    tree = ast.parse((ROOT / "edgevoice" / core).read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"asyncio", "socket", "sounddevice", "websockets", "ssl",
                           "aws_sdk_bedrock_runtime", "gpiozero"}, core
