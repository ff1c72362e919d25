"""docs/architecture.md against the code: the generated part is current, and the
layering it states holds."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from edgevoice_dev.archdoc import BEGIN, END, import_graph, render

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def test_the_generated_part_of_the_page_matches_the_code() -> None:
    text = DOC.read_text(encoding="utf-8")
    generated = text[text.index(BEGIN):text.index(END) + len(END)] + "\n"
    assert generated == render(ROOT), "run: .venv/bin/python -m edgevoice_dev.archdoc"


def test_layering() -> None:
    graph = import_graph(ROOT / "edgevoice")
    assert graph["protocol"] <= {"errors", "decoding"}
    for device_side in ("device", "audio", "triggers", "feedback"):
        assert not graph[device_side] & {"relay", "nova", "upstream", "web"}, device_side


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
